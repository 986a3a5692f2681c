"""Fuzz the readers of untrusted files: never a traceback, always success or a PortllmError.

Random bytes, and mutations of valid files: flipped and spliced header bytes, JSON fields of the
safetensors header, adapter_config.json, portllm.json, config.json and the shard index replaced
by arbitrary JSON values or removed. Bounded and derandomized so CI runs the same examples in a
few seconds.
"""

from __future__ import annotations

import json
import shutil
import struct
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from portllm_cli.errors import PortllmError
from portllm_cli.io.checkpoint import Checkpoint
from portllm_cli.io.safetensors import read_header, read_tensor
from portllm_cli.patch.format import read_patch
from tests.adversarial import make_checkpoint, make_patch, reseal, split_safetensors

FUZZ = settings(
    max_examples=150,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=20)
    | st.sampled_from(["F32", "BF16", "LORA", "../x", "/etc/passwd", "adapter_model.safetensors", "0" * 64]),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)


def _only_portllm_errors(fn, *args, **kwargs):
    """Run a reader: success, or a one-line PortllmError. Anything else fails the test."""
    try:
        return fn(*args, **kwargs)
    except PortllmError as exc:
        msg = str(exc)
        assert msg and "\n" not in msg, repr(msg)
        return None


@pytest.fixture(scope="module")
def seeds(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz-seeds")
    patch = make_patch(root / "p.patch")
    ckpt = make_checkpoint(root / "model", shards=2)
    return {"patch": patch, "ckpt": ckpt, "st": (patch / "adapter_model.safetensors").read_bytes()}


def _read_all(path: Path):
    h = read_header(path)
    for info in h.tensors.values():
        read_tensor(path, info)
    return h


# -- safetensors header parser ------------------------------------------------------------------
@FUZZ
@given(st.binary(max_size=512))
def test_random_bytes(data):
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "x.safetensors"
        p.write_bytes(data)
        _only_portllm_errors(_read_all, p)


@FUZZ
@given(header=st.binary(max_size=256), tail=st.binary(max_size=64))
def test_random_header_with_consistent_length(header, tail):
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "x.safetensors"
        p.write_bytes(struct.pack("<Q", len(header)) + header + tail)
        _only_portllm_errors(_read_all, p)


@pytest.mark.usefixtures("seeds")
class TestMutatedSafetensors:
    @FUZZ
    @given(data=st.data())
    def test_byte_mutations(self, seeds, data):
        blob = bytearray(seeds["st"])
        for _ in range(data.draw(st.integers(1, 6))):
            kind = data.draw(st.sampled_from(["flip", "set", "cut", "insert", "delete"]))
            at = data.draw(st.integers(0, len(blob) - 1))
            if kind == "flip":
                blob[at] ^= 1 << data.draw(st.integers(0, 7))
            elif kind == "set":
                blob[at] = data.draw(st.integers(0, 255))
            elif kind == "cut":
                del blob[at:]
            elif kind == "insert":
                blob[at:at] = data.draw(st.binary(min_size=1, max_size=8))
            else:
                del blob[at : at + data.draw(st.integers(1, 8))]
            if not blob:
                break
        with tempfile.TemporaryDirectory() as d:
            p = Path(d) / "x.safetensors"
            p.write_bytes(bytes(blob))
            _only_portllm_errors(_read_all, p)

    @FUZZ
    @given(data=st.data())
    def test_header_field_mutations(self, seeds, data):
        header, body = split_safetensors(seeds["st"])
        doc = json.loads(header)
        names = sorted(doc)
        name = data.draw(st.sampled_from(names))
        if name == "__metadata__" or data.draw(st.booleans()):
            doc[name] = data.draw(json_values)
        else:
            field = data.draw(st.sampled_from(["dtype", "shape", "data_offsets", "extra"]))
            if data.draw(st.booleans()):
                doc[name].pop(field, None)
            else:
                doc[name][field] = data.draw(json_values)
        raw = json.dumps(doc).encode()
        with tempfile.TemporaryDirectory() as d:
            p = Path(d) / "x.safetensors"
            p.write_bytes(struct.pack("<Q", len(raw)) + raw + body)
            _only_portllm_errors(_read_all, p)


# -- the patch reader ---------------------------------------------------------------------------
def _mutate_json_doc(doc, data, depth: int = 0):
    """Replace, delete or add one field somewhere in a JSON document (in place where possible)."""
    if isinstance(doc, dict) and doc and depth < 3 and data.draw(st.booleans()):
        key = data.draw(st.sampled_from(sorted(doc)))
        doc[key] = _mutate_json_doc(doc[key], data, depth + 1)
        return doc
    if isinstance(doc, dict):
        action = data.draw(st.sampled_from(["set", "delete", "add"]))
        if action == "delete" and doc:
            doc.pop(data.draw(st.sampled_from(sorted(doc))))
        elif action == "set" and doc:
            doc[data.draw(st.sampled_from(sorted(doc)))] = data.draw(json_values)
        else:
            doc[data.draw(st.text(max_size=12))] = data.draw(json_values)
        return doc
    return data.draw(json_values)


PATCH_FILES = ["adapter_config.json", "portllm.json"]


@pytest.mark.usefixtures("seeds")
class TestMutatedPatch:
    @FUZZ
    @given(data=st.data())
    def test_json_field_mutations(self, seeds, data):
        with tempfile.TemporaryDirectory() as d:
            p = Path(d) / "p"
            shutil.copytree(seeds["patch"], p)
            for _ in range(data.draw(st.integers(1, 3))):
                target = p / data.draw(st.sampled_from(PATCH_FILES))
                doc = _mutate_json_doc(json.loads(target.read_text()), data)
                target.write_text(json.dumps(doc))
            _only_portllm_errors(read_patch, p, verify=data.draw(st.booleans()))

    @FUZZ
    @given(data=st.data())
    def test_raw_text_mutations(self, seeds, data):
        with tempfile.TemporaryDirectory() as d:
            p = Path(d) / "p"
            shutil.copytree(seeds["patch"], p)
            target = p / data.draw(st.sampled_from(PATCH_FILES))
            text = target.read_text()
            at = data.draw(st.integers(0, len(text)))
            # splice in random text: duplicate keys, broken syntax, NaN, deep nesting, odd unicode
            piece = data.draw(
                st.text(max_size=12)
                | st.sampled_from([', "r": 64', ', "tensors": {}', "NaN", "[" * 3000, "\ud800", '"\\u0000"', "}"])
            )
            try:
                target.write_text(text[:at] + piece + text[at:])
            except UnicodeEncodeError:
                target.write_bytes((text[:at] + piece + text[at:]).encode("utf-8", "surrogatepass"))
            _only_portllm_errors(read_patch, p)

    @FUZZ
    @given(data=st.data())
    def test_weight_mutations_resealed(self, seeds, data):
        """Tampered weights whose manifest was updated to match: the parser itself must hold."""
        with tempfile.TemporaryDirectory() as d:
            p = Path(d) / "p"
            shutil.copytree(seeds["patch"], p)
            w = p / "adapter_model.safetensors"
            header, body = split_safetensors(w.read_bytes())
            if data.draw(st.booleans()):
                doc = _mutate_json_doc(json.loads(header), data)
                raw = json.dumps(doc).encode()
                blob = struct.pack("<Q", len(raw)) + raw + body
            else:
                blob = bytearray(w.read_bytes())
                for _ in range(data.draw(st.integers(1, 4))):
                    at = data.draw(st.integers(0, len(blob) - 1))
                    blob[at] = data.draw(st.integers(0, 255))
                blob = bytes(blob)
            w.write_bytes(blob)
            reseal(p)
            _only_portllm_errors(read_patch, p)


# -- model checkpoints --------------------------------------------------------------------------
@pytest.mark.usefixtures("seeds")
class TestMutatedCheckpoint:
    @FUZZ
    @given(data=st.data())
    def test_config_and_index_mutations(self, seeds, data):
        with tempfile.TemporaryDirectory() as d:
            m = Path(d) / "m"
            shutil.copytree(seeds["ckpt"], m)
            target = m / data.draw(st.sampled_from(["config.json", "model.safetensors.index.json"]))
            doc = _mutate_json_doc(json.loads(target.read_text()), data)
            target.write_text(json.dumps(doc))
            ck = _only_portllm_errors(Checkpoint.open, m)
            if ck is not None:
                for name in ck.names():
                    _only_portllm_errors(ck.tensor, name)
