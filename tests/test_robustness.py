"""Bad input, tampering and faults: each becomes one PortllmError line with a documented exit code.

Every test states the error class and exit code, the words the one-line message must carry,
and what the disk looks like afterwards (inputs untouched, no temporary directories left).
The core functions are called directly; the CLI maps a PortllmError to ``Error: <message>``
and its exit code in one place (cli/app.py, tested in test_cli_root.py).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from portllm_cli import errors as E
from portllm_cli.io import atomic
from portllm_cli.io.atomic import TMP_MARK, atomic_output_dir, check_output, clean_stale
from portllm_cli.io.checkpoint import Checkpoint, read_json, safe_member
from portllm_cli.io.safetensors import read_header, save_tensors
from portllm_cli.patch.format import read_patch
from portllm_cli.resolve import check_revision, resolve
from tests.adversarial import (
    make_checkpoint,
    make_patch,
    patch_tensors,
    raw_safetensors,
    reseal,
    split_safetensors,
    tree_state,
)


def expect(excinfo, cls, code: int, *fragments: str) -> str:
    """The error is exactly ``cls`` with exit ``code``, one line, carrying every fragment."""
    exc = excinfo.value
    assert type(exc) is cls, f"{type(exc).__name__}: {exc}"
    assert exc.exit_code == code
    msg = str(exc)
    assert "\n" not in msg and msg.strip() == msg and msg
    for f in fragments:
        assert f in msg, f"{f!r} not in {msg!r}"
    return msg


def no_temp_dirs(parent: Path) -> bool:
    return not [p for p in Path(parent).iterdir() if TMP_MARK in p.name]


@pytest.fixture
def patch_dir(tmp_path) -> Path:
    return make_patch(tmp_path / "p.patch")


def edit_json(path: Path, fn) -> None:
    doc = json.loads(path.read_text())
    fn(doc)
    path.write_text(json.dumps(doc))


# -- safetensors files --------------------------------------------------------------------------
@pytest.fixture
def good_st(tmp_path) -> Path:
    import torch

    p = tmp_path / "w.safetensors"
    save_tensors(p, {"a": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.ones(4, dtype=torch.float16)})
    return p


def test_empty_safetensors(tmp_path):
    p = tmp_path / "empty.safetensors"
    p.write_bytes(b"")
    with pytest.raises(E.PortllmError) as ei:
        read_header(p)
    expect(ei, E.InvalidInputError, 1, "empty or truncated")
    assert p.read_bytes() == b""


def test_truncated_inside_header(good_st):
    good_st.write_bytes(good_st.read_bytes()[:20])
    with pytest.raises(E.PortllmError) as ei:
        read_header(good_st)
    expect(ei, E.InvalidInputError, 1, "corrupt safetensors header", "20-byte file")


def test_truncated_data(good_st):
    blob = good_st.read_bytes()
    good_st.write_bytes(blob[:-5])
    with pytest.raises(E.PortllmError) as ei:
        read_header(good_st)
    expect(ei, E.IntegrityError, 4, "truncated file or lying header")
    assert good_st.read_bytes() == blob[:-5]


def test_header_lies_about_dtype(good_st):
    header, data = split_safetensors(good_st.read_bytes())
    doc = json.loads(header)
    doc["a"]["dtype"] = "F64"  # same offsets, twice the bytes per element
    good_st.write_bytes(raw_safetensors(doc, data))
    with pytest.raises(E.PortllmError) as ei:
        read_header(good_st)
    expect(ei, E.IntegrityError, 4, "'a'", "header says F64 [2, 3] (48 bytes)", "span 24 bytes")


def test_header_lies_about_offsets(good_st):
    header, data = split_safetensors(good_st.read_bytes())
    doc = json.loads(header)
    doc["b"]["data_offsets"] = [0, 8]  # overlaps tensor a
    good_st.write_bytes(raw_safetensors(doc, data))
    with pytest.raises(E.PortllmError) as ei:
        read_header(good_st)
    expect(ei, E.IntegrityError, 4, "overlap or leave a gap")


def test_offsets_past_the_end(good_st):
    header, data = split_safetensors(good_st.read_bytes())
    doc = json.loads(header)
    doc["a"]["data_offsets"] = [10**6, 10**6 + 24]
    good_st.write_bytes(raw_safetensors(doc, data))
    with pytest.raises(E.PortllmError) as ei:
        read_header(good_st)
    expect(ei, E.IntegrityError, 4, "'a' ends at byte 1000024")


def test_trailing_bytes(good_st):
    good_st.write_bytes(good_st.read_bytes() + b"\0" * 3)
    with pytest.raises(E.PortllmError) as ei:
        read_header(good_st)
    expect(ei, E.IntegrityError, 4, "3 unexpected trailing bytes")


@pytest.mark.parametrize(
    "header, words",
    [
        ({"a": {"dtype": "F33", "shape": [1], "data_offsets": [0, 4]}}, "unknown dtype 'F33'"),
        ({"a": {"dtype": ["F32"], "shape": [1], "data_offsets": [0, 4]}}, "unknown dtype ['F32']"),  # was a TypeError
        ({"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, "bad shape [-1]"),
        ({"a": {"dtype": "F32", "shape": "1", "data_offsets": [0, 4]}}, "bad shape '1'"),
        ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4.0]}}, "bad data_offsets"),
        ({"a": {"dtype": "F32", "shape": [1]}}, "bad data_offsets None"),
        ({"a": [1, 2]}, "entry is not an object"),
        ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4], "offset_hint": 9}}, "unknown header field(s) 'offset_hint'"),
        ({"__metadata__": {"k": 1}}, "__metadata__ must map strings to strings"),
        ({"__metadata__": []}, "__metadata__ must map strings to strings"),
        ([1, 2, 3], "not a JSON object"),
        ('{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, "a": {}}', "duplicate key 'a'"),
        ('{"a": {"dtype": "F32", "shape": [NaN], "data_offsets": [0, 4]}}', "non-standard JSON constant NaN"),
        ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
        ('{"a": ' + "9" * 5000 + "}", "malformed safetensors header"),
        (b"\xff\xfe{}", "not UTF-8"),
        ("{", "malformed safetensors header"),
    ],
)
def test_bad_headers(tmp_path, header, words):
    p = tmp_path / "bad.safetensors"
    blob = raw_safetensors(header, b"\0" * 4)
    p.write_bytes(blob)
    with pytest.raises(E.PortllmError) as ei:
        read_header(p)
    expect(ei, E.InvalidInputError, 1, str(p), words)
    assert p.read_bytes() == blob


def test_header_length_beyond_file(tmp_path):
    p = tmp_path / "bad.safetensors"
    p.write_bytes(struct.pack("<Q", 10**12) + b"{}")
    with pytest.raises(E.PortllmError) as ei:
        read_header(p)
    expect(ei, E.InvalidInputError, 1, "header length 1000000000000 for a 10-byte file")


def test_safetensors_path_is_a_directory(tmp_path):
    with pytest.raises(E.PortllmError) as ei:
        read_header(tmp_path)
    expect(ei, E.InvalidInputError, 1, "is a directory")


# -- model checkpoints: config.json, index json ------------------------------------------------
@pytest.fixture
def ckpt_dir(tmp_path) -> Path:
    return make_checkpoint(tmp_path / "model", shards=2)


def test_checkpoint_opens(ckpt_dir):
    ck = Checkpoint.open(ckpt_dir)
    assert len(ck.names()) == 4 and len(ck.files) == 2


def test_config_missing(ckpt_dir):
    (ckpt_dir / "config.json").unlink()
    with pytest.raises(E.PortllmError) as ei:
        Checkpoint.open(ckpt_dir)
    expect(ei, E.NotFoundError, 1, "no config.json")


@pytest.mark.parametrize(
    "text, words",
    [
        ("[1, 2]", "must be a JSON object"),
        ('{"model_type": "llama", "model_type": "mistral"}', "duplicate key 'model_type'"),
        ('{"vocab_size": "many"}', "'vocab_size' must be a non-negative integer, got 'many'"),
        ('{"hidden_size": true}', "'hidden_size' must be a non-negative integer"),
        ('{"model_type": 7}', "'model_type' must be a string"),
        ('{"text_config": {"vocab_size": -3}}', "'text_config.vocab_size' must be a non-negative integer"),
        ('{"text_config": []}', "'text_config' must be an object"),
        ('{"architectures": "Llama"}', "'architectures' must be a list of strings"),
        ('{"tie_word_embeddings": "yes"}', "'tie_word_embeddings' must be true or false"),
        ('{"model_type": ', "malformed model config"),
    ],
)
def test_config_bad(ckpt_dir, text, words):
    (ckpt_dir / "config.json").write_text(text)
    before = tree_state(ckpt_dir)
    with pytest.raises(E.PortllmError) as ei:
        Checkpoint.open(ckpt_dir)
    expect(ei, E.InvalidInputError, 1, "config.json", words)
    assert tree_state(ckpt_dir) == before


def _edit_index(d: Path, fn) -> None:
    edit_json(d / "model.safetensors.index.json", fn)


@pytest.mark.parametrize(
    "name", ["../outside.safetensors", "/etc/passwd", "sub/model.safetensors", "..", "a\\..\\b", "C:evil"]
)
def test_index_path_traversal(ckpt_dir, name):
    outside = ckpt_dir.parent / "outside.safetensors"
    shutil.copy(ckpt_dir / "model-00001-of-00002.safetensors", outside)

    def fn(doc):
        doc["weight_map"]["model.layers.0.self_attn.q_proj.weight"] = name

    _edit_index(ckpt_dir, fn)
    with pytest.raises(E.PortllmError) as ei:
        Checkpoint.open(ckpt_dir)
    expect(ei, E.UnsafeInputError, 1, "refusing file name", "model.layers.0.self_attn.q_proj.weight")


@pytest.mark.parametrize(
    "fn, cls, words",
    [
        (lambda d: d.pop("weight_map"), E.InvalidInputError, "missing or empty 'weight_map'"),
        (lambda d: d.__setitem__("weight_map", ["x"]), E.InvalidInputError, "missing or empty 'weight_map'"),
        (lambda d: d["weight_map"].__setitem__("model.layers.0.self_attn.q_proj.weight", 3), E.InvalidInputError,
         "file name must be a string"),
        (lambda d: d["weight_map"].__setitem__("model.layers.0.self_attn.q_proj.weight", "model-00002-of-00002.safetensors"),
         E.IntegrityError, "listed in model-00002-of-00002.safetensors but not stored there"),
        (lambda d: d["weight_map"].__setitem__("ghost.weight", "model-00001-of-00002.safetensors"),
         E.IntegrityError, "'ghost.weight' is listed"),
        (lambda d: d["weight_map"].__setitem__("x.weight", "model-00003-of-00002.safetensors"),
         E.NotFoundError, "shard listed in the index is missing"),
    ],
)
def test_index_bad(ckpt_dir, fn, cls, words):
    _edit_index(ckpt_dir, fn)
    before = tree_state(ckpt_dir)
    with pytest.raises(E.PortllmError) as ei:
        Checkpoint.open(ckpt_dir)
    expect(ei, cls, 4 if cls is E.IntegrityError else 1, words)
    assert tree_state(ckpt_dir) == before


def test_index_duplicate_keys(ckpt_dir):
    idx = ckpt_dir / "model.safetensors.index.json"
    text = idx.read_text()
    idx.write_text(text.replace('"weight_map"', '"weight_map": {}, "weight_map"', 1))
    with pytest.raises(E.PortllmError) as ei:
        Checkpoint.open(ckpt_dir)
    expect(ei, E.InvalidInputError, 1, "duplicate key 'weight_map'")


def test_tensor_in_two_shards(ckpt_dir):
    import torch

    save_tensors(
        ckpt_dir / "model-00002-of-00002.safetensors",
        {"model.layers.0.self_attn.q_proj.weight": torch.zeros(6, 8), "model.layers.1.self_attn.q_proj.weight": torch.zeros(6, 8)},
    )
    (ckpt_dir / "model.safetensors.index.json").unlink()
    with pytest.raises(E.PortllmError) as ei:
        Checkpoint.open(ckpt_dir)
    expect(ei, E.InvalidInputError, 1, "appears in two shards")


def test_corrupt_shard_named(ckpt_dir):
    shard = ckpt_dir / "model-00002-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:-1])
    with pytest.raises(E.PortllmError) as ei:
        Checkpoint.open(ckpt_dir)
    expect(ei, E.IntegrityError, 4, "model-00002-of-00002.safetensors")


def test_safe_member_accepts_plain_names(tmp_path):
    assert safe_member(tmp_path, "model-00001-of-00002.safetensors", "x") == tmp_path / "model-00001-of-00002.safetensors"


# -- patches: adapter_config.json, portllm.json, tensors ------------------------------------------
def test_patch_reads(patch_dir):
    p = read_patch(patch_dir)
    assert sorted(p.modules) == ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"]
    assert p.warnings == []


def _cfg(d: Path, fn) -> None:
    edit_json(d / "adapter_config.json", fn)


@pytest.mark.parametrize(
    "fn, cls, words",
    [
        (lambda c: c.__setitem__("r", 0), E.InvalidInputError, "'r' must be a positive integer, got 0"),
        (lambda c: c.__setitem__("r", -4), E.InvalidInputError, "'r' must be a positive integer, got -4"),
        (lambda c: c.__setitem__("r", "2"), E.InvalidInputError, "'r' must be a positive integer, got '2'"),
        (lambda c: c.__setitem__("r", True), E.InvalidInputError, "'r' must be a positive integer, got True"),
        (lambda c: c.pop("r"), E.InvalidInputError, "'r' (the LoRA rank) is missing"),
        (lambda c: c.__setitem__("r", 3), E.InvalidInputError, "factors have rank 2 but the config says r=3"),
        (lambda c: c.pop("lora_alpha"), E.InvalidInputError, "'lora_alpha' is missing"),
        (lambda c: c.__setitem__("lora_alpha", "16"), E.InvalidInputError, "'lora_alpha' must be a finite number"),
        (lambda c: c.__setitem__("lora_alpha", float("inf")), E.InvalidInputError, "'lora_alpha' must be a finite number"),
        (lambda c: c.__setitem__("use_rslora", "false"), E.InvalidInputError, "'use_rslora' must be true or false"),
        (lambda c: c.__setitem__("rank_pattern", {"q_proj": 0}), E.InvalidInputError,
         "rank_pattern['q_proj'] must be a positive integer, got 0"),
        (lambda c: c.__setitem__("alpha_pattern", {"q_proj": "big"}), E.InvalidInputError,  # was a ValueError
         "alpha_pattern['q_proj'] must be a finite number"),
        (lambda c: c.__setitem__("alpha_pattern", {"q_proj(": 2.0}), E.InvalidInputError,  # was a re.error
         "is not a valid module pattern"),
        (lambda c: c.__setitem__("rank_pattern", {"(a+)+$": 2}), E.UnsafeInputError, "nested quantifiers"),
        (lambda c: c.__setitem__("rank_pattern", [1]), E.InvalidInputError, "'rank_pattern' must be an object"),
        (lambda c: c.__setitem__("target_modules", [1, 2]), E.InvalidInputError, "'target_modules' must be a list of strings"),
        (lambda c: c.__setitem__("peft_type", "IA3"), E.UnsupportedError, "not a LoRA adapter"),
        (lambda c: c.__setitem__("use_dora", True), E.InvalidInputError, "use_dora is set but it has no lora_magnitude_vector"),
        (lambda c: c.__setitem__("alora_invocation_tokens", [5, 6]), E.UnsupportedError, "aLoRA"),
        (lambda c: c.__setitem__("layer_replication", [[0, 1]]), E.UnsupportedError, "layer_replication"),
        (lambda c: c.__setitem__("modules_to_save", "lm_head"), E.InvalidInputError, "'modules_to_save' must be a list"),
        (lambda c: c.__setitem__("init_lora_weights", "loftq"), E.UnsupportedError, "LoftQ"),
        (lambda c: c.__setitem__("init_lora_weights", "corda"), E.UnsupportedError, "CorDA"),
        (lambda c: c.__setitem__("init_lora_weights", "lora_ga"), E.UnsupportedError, "LoRA-GA"),
        (lambda c: c.__setitem__("init_lora_weights", "pissa_niter_4"), E.UnsupportedError, "randomized SVD"),
        (lambda c: c.__setitem__("init_lora_weights", "magic"), E.UnsupportedError, "not a value PEFT 0.21 knows"),
        (lambda c: c.update(init_lora_weights="pissa", use_dora=True), E.UnsupportedError, "DoRA on top of"),
        (lambda c: c.__setitem__("bias", "some"), E.InvalidInputError, "'bias' must be one of"),
        (lambda c: c.__setitem__("trainable_token_indices", [-1]), E.InvalidInputError, "trainable_token_indices"),
    ],
)
def test_adapter_config_bad(patch_dir, fn, cls, words):
    _cfg(patch_dir, fn)
    before = tree_state(patch_dir)
    with pytest.raises(E.PortllmError) as ei:
        read_patch(patch_dir)
    expect(ei, cls, 1, "adapter", words)
    assert tree_state(patch_dir) == before


def test_adapter_config_not_an_object(patch_dir):
    (patch_dir / "adapter_config.json").write_text('"LORA"')
    with pytest.raises(E.PortllmError) as ei:
        read_patch(patch_dir)
    expect(ei, E.InvalidInputError, 1, "adapter config must be a JSON object")


def test_adapter_config_duplicate_keys(patch_dir):
    # json.loads would keep the last "r": one reader sees rank 2, another 64.
    cfg = patch_dir / "adapter_config.json"
    cfg.write_text(cfg.read_text().replace('"r": 2', '"r": 2, "r": 64'))
    with pytest.raises(E.PortllmError) as ei:
        read_patch(patch_dir)
    expect(ei, E.InvalidInputError, 1, "adapter_config.json", "duplicate key 'r'")


def test_adapter_config_unknown_key_warns(patch_dir):
    _cfg(patch_dir, lambda c: c.__setitem__("shiny_new_peft_field", 1))
    p = read_patch(patch_dir)
    assert any("shiny_new_peft_field" in w for w in p.warnings)


def _retensor(d: Path, tensors: dict) -> None:
    (d / "adapter_model.safetensors").unlink()
    save_tensors(d / "adapter_model.safetensors", tensors)
    reseal(d)


def test_lora_a_without_lora_b(patch_dir):
    t = patch_tensors()
    del t["base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight"]
    _retensor(patch_dir, t)
    with pytest.raises(E.PortllmError) as ei:
        read_patch(patch_dir)
    expect(ei, E.InvalidInputError, 1, "module 'model.layers.0.self_attn.v_proj' has no lora_B")


def test_unknown_tensor_key(patch_dir):
    import torch

    t = patch_tensors()
    t["base_model.model.model.layers.0.mlp.gate_proj.weight"] = torch.zeros(2, 2)
    _retensor(patch_dir, t)
    with pytest.raises(E.PortllmError) as ei:
        read_patch(patch_dir)
    expect(ei, E.InvalidInputError, 1, "unknown tensor key 'base_model.model.model.layers.0.mlp.gate_proj.weight'")


def test_duplicate_factor_under_two_spellings(patch_dir):
    t = patch_tensors()
    t["model.layers.0.self_attn.q_proj.lora_A.default.weight"] = t["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"]
    _retensor(patch_dir, t)
    with pytest.raises(E.PortllmError) as ei:
        read_patch(patch_dir)
    expect(ei, E.InvalidInputError, 1, "duplicate lora_A for module 'model.layers.0.self_attn.q_proj'")


def test_factor_rank_mismatch(patch_dir):
    import torch

    t = patch_tensors()
    t["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"] = torch.randn(6, 3)
    _retensor(patch_dir, t)
    with pytest.raises(E.PortllmError) as ei:
        read_patch(patch_dir)
    expect(ei, E.InvalidInputError, 1, "lora_A has rank 2 but lora_B has rank 3")


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("verify", [True, False])
def test_nan_inf_in_patch_names_the_module(patch_dir, bad, verify):
    t = patch_tensors()
    t["base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight"][3, 1] = bad
    _retensor(patch_dir, t)  # the manifest matches: the check is on values, not on the hash
    with pytest.raises(E.PortllmError) as ei:
        read_patch(patch_dir, verify=verify)
    expect(ei, E.IntegrityError, 4, "module 'model.layers.0.self_attn.v_proj'", "lora_B holds NaN or Inf (1 values)")


def test_nan_in_half_precision_patch(patch_dir):
    import torch

    t = {k: v.to(torch.bfloat16) for k, v in patch_tensors().items()}
    t["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"][0, 0] = float("nan")
    _retensor(patch_dir, t)
    with pytest.raises(E.PortllmError) as ei:
        read_patch(patch_dir)
    expect(ei, E.IntegrityError, 4, "module 'model.layers.0.self_attn.q_proj'", "lora_A")


def test_tampered_weights_fail_sha256(patch_dir):
    w = patch_dir / "adapter_model.safetensors"
    blob = bytearray(w.read_bytes())
    blob[-1] ^= 0x01  # one bit of one float
    w.write_bytes(bytes(blob))
    with pytest.raises(E.PortllmError) as ei:
        read_patch(patch_dir)
    expect(ei, E.IntegrityError, 4, "sha256", "does not match the manifest")
    assert ei.value.hint and "--no-verify" in ei.value.hint
    assert read_patch(patch_dir, verify=False).modules  # --no-verify reads it


def test_weights_swapped_after_the_check_are_not_used(patch_dir, tmp_path, monkeypatch):
    """The sha256 that is checked is that of the bytes the tensors come from: a file replaced on disk
    between the integrity check and the parsing (a race by someone who can write to the folder)
    changes nothing, because the file is read once."""
    import torch

    from portllm_cli.patch import format as fmt

    evil = make_patch(tmp_path / "evil.patch", seed=7)
    expected = {name: (m.A.clone(), m.B.clone()) for name, m in read_patch(patch_dir).modules.items()}
    real_parse = fmt.parse_snapshot

    def swap_then_parse(path, data):
        shutil.copy(evil / "adapter_model.safetensors", path)  # the race, won by the attacker
        return real_parse(path, data)

    monkeypatch.setattr(fmt, "parse_snapshot", swap_then_parse)
    got = read_patch(patch_dir)
    assert (patch_dir / "adapter_model.safetensors").read_bytes() == (evil / "adapter_model.safetensors").read_bytes()
    for name, (a, b) in expected.items():
        assert torch.equal(got.modules[name].A, a) and torch.equal(got.modules[name].B, b)


@pytest.mark.parametrize(
    "fn, cls, words",
    [
        (lambda m: m.pop("tensors"), E.InvalidInputError, "manifest lacks tensors.sha256"),
        (lambda m: m["tensors"].__setitem__("sha256", 5), E.InvalidInputError, "manifest lacks tensors.sha256"),
        (lambda m: m["tensors"].__setitem__("sha256", "abc"), E.InvalidInputError, "not a lowercase hex sha256"),
        (lambda m: m["tensors"].__setitem__("file", "../../secret.safetensors"), E.UnsafeInputError,
         "tensors.file must be 'adapter_model.safetensors'"),
        (lambda m: m.__setitem__("format", "other"), E.InvalidInputError, "not a portllm manifest"),
        (lambda m: m.pop("format_version"), E.InvalidInputError, "'format_version' must be a positive integer"),
        (lambda m: m.__setitem__("format_version", "1"), E.InvalidInputError, "'format_version' must be a positive integer"),
        (lambda m: m.__setitem__("format_version", 99), E.UnsupportedError, "format version 99 is newer"),
        (lambda m: m.__setitem__("base", ["x"]), E.InvalidInputError, "'base' must be an object"),
        (lambda m: m["base"].__setitem__("model", {"x": 1}), E.InvalidInputError, "'model' must be a string"),
        (lambda m: m["base"].__setitem__("fingerprint", [1]), E.InvalidInputError, "'fingerprint' must be an object"),
        (lambda m: m["base"]["fingerprint"].__setitem__("vocab_size", "64"), E.InvalidInputError,
         "'vocab_size' must be an integer"),
        (lambda m: m["base"]["fingerprint"].__setitem__("modules", {"q": "6x8"}), E.InvalidInputError,
         "'modules' must map module names to integer shapes"),
        (lambda m: m["lora"].__setitem__("rank", "2"), E.InvalidInputError, "'rank' must be an integer"),
        (lambda m: m.__setitem__("ports", {}), E.InvalidInputError, "'ports' must be a list"),
    ],
)
def test_manifest_bad(patch_dir, fn, cls, words):
    edit_json(patch_dir / "portllm.json", fn)
    before = tree_state(patch_dir)
    with pytest.raises(E.PortllmError) as ei:
        read_patch(patch_dir)
    expect(ei, cls, 1, "portllm.json", words)
    assert tree_state(patch_dir) == before


def test_manifest_duplicate_tensors_key(patch_dir):
    # Two "tensors" objects: a lenient reader checks one digest while a tool trusts the other.
    m = patch_dir / "portllm.json"
    doc = json.loads(m.read_text())
    text = json.dumps(doc)
    m.write_text(text[:-1] + ', "tensors": {"file": "adapter_model.safetensors", "sha256": "' + "0" * 64 + '"}}')
    with pytest.raises(E.PortllmError) as ei:
        read_patch(patch_dir)
    expect(ei, E.InvalidInputError, 1, "duplicate key 'tensors'")


def test_patch_weights_missing_or_pickle(patch_dir):
    w = patch_dir / "adapter_model.safetensors"
    w.rename(patch_dir / "adapter_model.bin")
    with pytest.raises(E.PortllmError) as ei:
        read_patch(patch_dir)
    expect(ei, E.UnsupportedError, 1, "pickle file (adapter_model.bin)")
    (patch_dir / "adapter_model.bin").unlink()
    w.mkdir()
    with pytest.raises(E.PortllmError) as ei:
        read_patch(patch_dir)
    expect(ei, E.InvalidInputError, 1, "expected a file")


def test_patch_path_is_a_file(patch_dir):
    with pytest.raises(E.PortllmError) as ei:
        read_patch(patch_dir / "portllm.json")
    expect(ei, E.InvalidInputError, 1, "expected a patch directory, found a file")


def test_read_json_unreadable(tmp_path, monkeypatch):
    p = tmp_path / "x.json"
    p.write_text("{}")

    def deny(self):
        raise PermissionError(errno.EACCES, "Permission denied", str(self))

    monkeypatch.setattr(Path, "read_bytes", deny)
    with pytest.raises(E.PortllmError) as ei:
        read_json(p, "adapter config")
    expect(ei, E.InvalidInputError, 1, "cannot read the adapter config (Permission denied)")


# -- argument resolution ------------------------------------------------------------------------
def test_empty_model_argument():
    with pytest.raises(E.PortllmError) as ei:
        resolve("", kind="model")
    expect(ei, E.UsageError, 2, "empty model argument")


@pytest.mark.parametrize("rev", ["../../../etc", "main/../../x", "/abs", "a\\b", "-rf"])
def test_revision_traversal_refused(rev):
    with pytest.raises(E.PortllmError) as ei:
        resolve(f"user/repo@{rev}" if "\\" not in rev else "user/repo", kind="model", revision=rev)
    expect(ei, E.UnsafeInputError, 1, "refusing revision")


def test_revision_plain_names_pass():
    for rev in ("main", "v1.0", "refs/pr/1", "a" * 40):
        assert check_revision(rev) == rev


def test_dotdot_is_not_a_repo_id(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(E.PortllmError) as ei:
        resolve("user/..", kind="patch")
    expect(ei, E.NotFoundError, 1, "no such patch directory")


# -- output paths -------------------------------------------------------------------------------
def test_output_is_a_file(tmp_path, ckpt_dir):
    out = tmp_path / "out"
    out.write_text("precious")
    for overwrite in (False, True):
        with pytest.raises(E.PortllmError) as ei:
            with atomic_output_dir(out, overwrite=overwrite, inputs=(ckpt_dir,)):
                pytest.fail("the block must not run")
        expect(ei, E.OutputExistsError, 1, "exists and is not a directory")
    assert out.read_text() == "precious" and no_temp_dirs(tmp_path)


def test_output_equal_to_input(tmp_path, ckpt_dir, monkeypatch):
    before = tree_state(ckpt_dir)
    monkeypatch.chdir(tmp_path)
    link = tmp_path / "link"
    link.symlink_to(ckpt_dir)
    for out in (ckpt_dir, Path("model"), tmp_path / "x" / ".." / "model", link):
        for overwrite in (False, True):
            with pytest.raises(E.PortllmError) as ei:
                with atomic_output_dir(out, overwrite=overwrite, inputs=(ckpt_dir,)):
                    pytest.fail("the block must not run")
            expect(ei, E.OutputExistsError, 1, "the output is the same path as the input")
    assert tree_state(ckpt_dir) == before and no_temp_dirs(tmp_path)


def test_output_inside_input(tmp_path, ckpt_dir):
    before = tree_state(ckpt_dir)
    with pytest.raises(E.PortllmError) as ei:
        check_output(ckpt_dir / "merged", overwrite=False, inputs=(ckpt_dir,))
    expect(ei, E.OutputExistsError, 1, "the output lies inside the input")
    assert tree_state(ckpt_dir) == before and not (ckpt_dir / "merged").exists()


def test_output_containing_input_with_overwrite(tmp_path, ckpt_dir):
    before = tree_state(tmp_path)
    with pytest.raises(E.PortllmError) as ei:
        with atomic_output_dir(tmp_path, overwrite=True, inputs=(ckpt_dir,)):
            pytest.fail("the block must not run")
    expect(ei, E.OutputExistsError, 1, "overwriting it would delete the input")
    assert tree_state(tmp_path) == before


def test_output_cwd_never_overwritten(tmp_path, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    (work / "notes.txt").write_text("mine")
    monkeypatch.chdir(work)
    for out in (Path("."), work, tmp_path):
        with pytest.raises(E.PortllmError) as ei:
            check_output(out, overwrite=True)
        expect(ei, E.OutputExistsError, 1, "refusing to overwrite")
    assert (work / "notes.txt").read_text() == "mine"


def test_output_exists_without_overwrite(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep").write_text("1")
    with pytest.raises(E.PortllmError) as ei:
        with atomic_output_dir(out):
            pytest.fail("the block must not run")
    expect(ei, E.OutputExistsError, 1, "already exists")
    assert ei.value.hint == "pass --overwrite to replace it"
    assert tree_state(out) == {"keep": tree_state(out)["keep"]} and no_temp_dirs(tmp_path)


def test_output_overwrite_replaces(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old").write_text("1")
    with atomic_output_dir(out, overwrite=True) as tmp:
        (tmp / "new").write_text("2")
        assert not (out / "new").exists()  # nothing appears under the final name before the end
    assert sorted(p.name for p in out.iterdir()) == ["new"] and no_temp_dirs(tmp_path)


def test_output_parent_missing(tmp_path):
    with pytest.raises(E.PortllmError) as ei:
        check_output(tmp_path / "no" / "out", overwrite=False)
    expect(ei, E.OutputExistsError, 1, "parent directory does not exist")
    assert not (tmp_path / "no").exists()


def test_output_parent_unwritable(tmp_path, monkeypatch):
    parent = tmp_path / "ro"
    parent.mkdir()
    real_access = os.access
    # root ignores permission bits, so the kernel's answer is simulated for this one directory
    monkeypatch.setattr(atomic.os, "access", lambda p, mode: False if Path(p) == parent else real_access(p, mode))
    with pytest.raises(E.PortllmError) as ei:
        with atomic_output_dir(parent / "out"):
            pytest.fail("the block must not run")
    expect(ei, E.OutputExistsError, 1, "not writable")
    assert list(parent.iterdir()) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permission bits")
def test_output_parent_unwritable_for_real(tmp_path):
    parent = tmp_path / "ro"
    parent.mkdir()
    parent.chmod(0o500)
    try:
        with pytest.raises(E.PortllmError) as ei:
            with atomic_output_dir(parent / "out"):
                pytest.fail("the block must not run")
        expect(ei, E.OutputExistsError, 1, "not writable")
    finally:
        parent.chmod(0o700)
    assert list(parent.iterdir()) == []


def test_output_mkdir_fails(tmp_path, monkeypatch):
    real_mkdir = Path.mkdir

    def mkdir(self, *a, **k):
        if TMP_MARK in self.name:
            raise PermissionError(errno.EACCES, "Permission denied")
        return real_mkdir(self, *a, **k)

    monkeypatch.setattr(Path, "mkdir", mkdir)
    with pytest.raises(E.PortllmError) as ei:
        with atomic_output_dir(tmp_path / "out"):
            pytest.fail("the block must not run")
    expect(ei, E.OutputExistsError, 1, "cannot create the output (Permission denied)")
    assert list(tmp_path.iterdir()) == []


def test_output_appears_while_writing(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(E.PortllmError) as ei:
        with atomic_output_dir(out) as tmp:
            (tmp / "mine").write_text("1")
            out.mkdir()
            (out / "theirs").write_text("2")
    expect(ei, E.OutputExistsError, 1, "appeared while writing")
    assert [p.name for p in out.iterdir()] == ["theirs"] and no_temp_dirs(tmp_path)


# -- faults while writing: disk full, interrupts, I/O errors ----------------------------------
class _FullDisk:
    """A file object whose writes fail with ENOSPC after ``budget`` bytes, like a filling disk."""

    def __init__(self, fh, budget: int):
        self._fh, self._budget = fh, budget

    def write(self, data):
        n = len(memoryview(data).cast("B"))
        if n > self._budget:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), self._fh.name)
        self._budget -= n
        return self._fh.write(data)

    def __getattr__(self, name):
        return getattr(self._fh, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._fh.close()


def _multi_file_write(tmp: Path, n: int = 4) -> None:
    import torch

    for i in range(n):
        save_tensors(tmp / f"model-{i:05d}.safetensors", {"w": torch.full((64, 64), float(i))})


@pytest.mark.parametrize("overwrite", [False, True])
def test_disk_full_while_writing(tmp_path, monkeypatch, overwrite):
    import portllm_cli.io.safetensors as st

    out = tmp_path / "out"
    if overwrite:
        out.mkdir()
        (out / "previous").write_text("complete")
    (tmp_path / "neighbour").write_text("untouched")
    before = tree_state(tmp_path)
    budget = {"left": 40_000}  # the disk fills during the third file

    def full_open(path, mode="r", *a, **k):
        fh = open(path, mode, *a, **k)
        if "w" not in mode:
            return fh
        wrapped = _FullDisk(fh, budget["left"])
        budget["left"] = max(0, budget["left"] - 16_500)
        return wrapped

    monkeypatch.setattr(st, "open", full_open, raising=False)
    with pytest.raises(E.PortllmError) as ei:
        with atomic_output_dir(out, overwrite=overwrite) as tmp:
            _multi_file_write(tmp)
    msg = expect(ei, E.NoSpaceError, 1, "no space left on device", "partial output was removed")
    assert str(out) in msg
    assert tree_state(tmp_path) == before and no_temp_dirs(tmp_path)


def test_disk_full_wrapped_by_a_library(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(E.PortllmError) as ei:
        with atomic_output_dir(out) as tmp:
            (tmp / "part").write_text("x")
            try:
                raise OSError(errno.ENOSPC, "No space left on device")
            except OSError as exc:
                raise RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed") from exc
    expect(ei, E.NoSpaceError, 1, "no space left")
    assert list(tmp_path.iterdir()) == []


def test_other_io_error_is_one_line(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(E.PortllmError) as ei:
        with atomic_output_dir(out) as tmp:
            raise OSError(errno.EIO, os.strerror(errno.EIO), str(tmp / "model.safetensors"))
    expect(ei, E.PortllmError, 1, "model.safetensors: Input/output error;", f"the partial output {out} was removed")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("exc", [KeyboardInterrupt, SystemExit, ValueError])
@pytest.mark.parametrize("overwrite", [False, True])
def test_exception_inside_block_removes_temp(tmp_path, exc, overwrite):
    out = tmp_path / "out"
    if overwrite:
        out.mkdir()
        (out / "previous").write_text("complete")
    before = tree_state(tmp_path)
    seen = {}
    with pytest.raises(exc):
        with atomic_output_dir(out, overwrite=overwrite) as tmp:
            _multi_file_write(tmp, 2)
            seen["tmp"] = tmp
            raise exc()
    assert not seen["tmp"].exists()
    assert tree_state(tmp_path) == before and no_temp_dirs(tmp_path)


def test_failed_swap_restores_previous_output(tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "previous").write_text("complete")
    real_rename = os.rename

    def rename(src, dst):
        if Path(dst) == out and TMP_MARK in Path(src).name and "-old-" not in Path(src).name:
            raise OSError(errno.EIO, os.strerror(errno.EIO), str(src))
        return real_rename(src, dst)

    monkeypatch.setattr(atomic.os, "rename", rename)
    with pytest.raises(E.PortllmError) as ei:
        with atomic_output_dir(out, overwrite=True) as tmp:
            (tmp / "new").write_text("x")
    expect(ei, E.PortllmError, 1, "Input/output error; the partial output")
    assert [p.name for p in out.iterdir()] == ["previous"] and no_temp_dirs(tmp_path)


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _stale(tmp_path: Path, out: Path, pid: int, host: str | None = None, old: bool = False) -> Path:
    host = atomic._host_tag() if host is None else host
    name = f".{out.name}{TMP_MARK}{pid}-{host}-{'old-' if old else ''}deadbeef"
    d = tmp_path / name
    d.mkdir()
    (d / "model-00001-of-00002.safetensors").write_bytes(b"half")
    return d


def test_stale_temp_of_killed_run_is_cleaned(tmp_path):
    out = tmp_path / "out"
    stale = _stale(tmp_path, out, _dead_pid())
    legacy = tmp_path / f".{out.name}{TMP_MARK}{_dead_pid()}-0123abcd"  # a name without a host tag
    legacy.mkdir()
    with atomic_output_dir(out) as tmp:
        (tmp / "done").write_text("1")
    assert not stale.exists() and not legacy.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_live_or_foreign_temp_is_left_alone(tmp_path):
    out = tmp_path / "out"
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        live = _stale(tmp_path, out, sleeper.pid)
        foreign = _stale(tmp_path, out, _dead_pid(), host="00000000")  # another machine on a shared disk
        other_out = tmp_path / f".other{TMP_MARK}{_dead_pid()}-{atomic._host_tag()}-deadbeef"  # another output
        other_out.mkdir()
        assert clean_stale(out) == []
        with atomic_output_dir(out) as tmp:
            (tmp / "done").write_text("1")
        assert live.exists() and foreign.exists() and other_out.exists()
        assert (live / "model-00001-of-00002.safetensors").read_bytes() == b"half"
    finally:
        sleeper.kill()
        sleeper.wait()


def test_killed_between_swap_renames_recovers_previous(tmp_path):
    # SIGKILL after "out -> old" and before "tmp -> out": the next run puts the old output back.
    out = tmp_path / "out"
    pid = _dead_pid()
    old = _stale(tmp_path, out, pid, old=True)
    (old / "model-00001-of-00002.safetensors").write_bytes(b"complete")
    half = _stale(tmp_path, out, pid)
    removed = clean_stale(out)
    assert removed == [half]
    assert (out / "model-00001-of-00002.safetensors").read_bytes() == b"complete"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_stale_symlink_is_unlinked_not_followed(tmp_path):
    out = tmp_path / "out"
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "data").write_text("keep")
    link = tmp_path / f".{out.name}{TMP_MARK}{_dead_pid()}-{atomic._host_tag()}-deadbeef"
    link.symlink_to(victim)
    clean_stale(out)
    assert not link.is_symlink() and (victim / "data").read_text() == "keep"


def test_atomic_helpers_never_raise_on_odd_names(tmp_path):
    out = tmp_path / "out"
    for name in (f".out{TMP_MARK}", f".out{TMP_MARK}x-y", f".out{TMP_MARK}{10**30}-{atomic._host_tag()}-a", f".out{TMP_MARK}-1-a"):
        (tmp_path / name).mkdir()
    clean_stale(out)  # an absurd pid is dead; the unparsable names are not ours
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == sorted([f".out{TMP_MARK}", f".out{TMP_MARK}x-y", f".out{TMP_MARK}-1-a"])


# -- pickle policy ------------------------------------------------------------------------------
class _Evil:
    """Unpickling this runs code: it creates the marker file."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _pickle_model(d: Path, state: dict, *, legacy: bool = False, name: str = "pytorch_model.bin") -> Path:
    import torch

    d.mkdir(exist_ok=True)
    (d / "config.json").write_text('{"model_type": "llama"}')
    torch.save(state, d / name, _use_new_zipfile_serialization=not legacy)
    return d


def test_pickle_refused_without_allow_pickle(tmp_path):
    import torch

    marker = tmp_path / "pwned"
    d = _pickle_model(tmp_path / "m", {"w": torch.zeros(2), "x": _Evil(str(marker))})
    with pytest.raises(E.PortllmError) as ei:
        Checkpoint.open(d)
    expect(ei, E.UnsafeInputError, 1, "pickle files (pytorch_model.bin)", "does not unpickle by default")
    assert "--allow-pickle" in ei.value.hint
    assert not marker.exists()


@pytest.mark.parametrize("legacy", [False, True])
@pytest.mark.parametrize("name", ["pytorch_model.bin", "weights.pt"])
def test_malicious_pickle_not_executed_even_with_allow_pickle(tmp_path, legacy, name):
    import torch

    marker = tmp_path / "pwned"
    d = _pickle_model(tmp_path / "m", {"w": torch.zeros(2), "x": _Evil(str(marker))}, legacy=legacy, name=name)
    with pytest.raises(E.PortllmError) as ei:
        Checkpoint.open(d, allow_pickle=True)
    expect(ei, E.UnsafeInputError, 1, name, "refused by torch.load(weights_only=True)")
    assert not marker.exists()
    # The file really is dangerous: an unrestricted load runs the payload.
    torch.load(d / name, weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("legacy", [False, True])
def test_plain_state_dict_loads_with_allow_pickle(tmp_path, legacy):
    import torch

    state = {"model.embed_tokens.weight": torch.randn(5, 3), "lm_head.weight": torch.randn(5, 3).to(torch.bfloat16)}
    d = _pickle_model(tmp_path / "m", state, legacy=legacy)
    ck = Checkpoint.open(d, allow_pickle=True)
    assert ck.is_pickle and sorted(ck.names()) == sorted(state)
    for k, v in state.items():
        assert torch.equal(ck.tensor(k), v) and ck.dtype(k) == {torch.float32: "F32", torch.bfloat16: "BF16"}[v.dtype]


def test_garbage_pickle_is_one_line(tmp_path):
    d = tmp_path / "m"
    d.mkdir()
    (d / "config.json").write_text("{}")
    (d / "pytorch_model.bin").write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(E.PortllmError) as ei:
        Checkpoint.open(d, allow_pickle=True)
    expect(ei, E.InvalidInputError, 1, "not a readable torch checkpoint")


def test_pickle_of_non_tensors_refused(tmp_path):
    d = _pickle_model(tmp_path / "m", {"step": 3})
    with pytest.raises(E.PortllmError) as ei:
        Checkpoint.open(d, allow_pickle=True)
    expect(ei, E.InvalidInputError, 1, "not a state dict of named tensors")


def test_pickle_index_traversal(tmp_path):
    import torch

    d = _pickle_model(tmp_path / "m", {"w": torch.zeros(2)})
    (d / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": {"w": "../elsewhere.bin"}}))
    with pytest.raises(E.PortllmError) as ei:
        Checkpoint.open(d, allow_pickle=True)
    expect(ei, E.UnsafeInputError, 1, "refusing file name '../elsewhere.bin'")


def test_source_tree_policy():
    """Every torch.load in the package passes weights_only=True; remote code is never switched on by default."""
    import re

    root = Path(__file__).resolve().parents[1] / "portllm_cli"
    loads, remote = [], []
    for f in root.rglob("*.py"):
        text = f.read_text()
        for m in re.finditer(r"torch\.load\((.*?)\)\s*$", text, flags=re.M | re.S):
            loads.append((f.name, m.group(1)))
        for m in re.finditer(r"trust_remote_code\s*=\s*([^,)\n]+)", text):
            remote.append((f.name, m.group(1).strip()))
    assert loads, "the pickle loader must exist"
    for name, args in loads:
        assert "weights_only=True" in args, f"{name}: torch.load without weights_only=True"
    for name, value in remote:
        assert value != "True", f"{name}: trust_remote_code hard-coded to True"


# -- special files: a FIFO or a device would block or never end ---------------------------------
def test_config_is_a_device_or_fifo(ckpt_dir):
    cfg = ckpt_dir / "config.json"
    cfg.unlink()
    cfg.symlink_to("/dev/zero")  # an endless "file"
    with pytest.raises(E.PortllmError) as ei:
        Checkpoint.open(ckpt_dir)
    expect(ei, E.InvalidInputError, 1, "config.json", "not a regular file")
    cfg.unlink()
    os.mkfifo(cfg)  # no writer: reading would block forever
    with pytest.raises(E.PortllmError) as ei:
        Checkpoint.open(ckpt_dir)
    expect(ei, E.InvalidInputError, 1, "not a regular file")


def test_shard_is_a_fifo(ckpt_dir):
    shard = ckpt_dir / "model-00002-of-00002.safetensors"
    shard.unlink()
    os.mkfifo(shard)
    with pytest.raises(E.PortllmError) as ei:
        Checkpoint.open(ckpt_dir)
    expect(ei, E.InvalidInputError, 1, "model-00002-of-00002.safetensors: not a regular file")


def test_patch_weights_fifo(patch_dir):
    w = patch_dir / "adapter_model.safetensors"
    w.unlink()
    os.mkfifo(w)
    with pytest.raises(E.PortllmError) as ei:
        read_patch(patch_dir)
    expect(ei, E.InvalidInputError, 1, "expected a file")


def test_oversized_json_refused(patch_dir, monkeypatch):
    from portllm_cli.io import checkpoint

    monkeypatch.setattr(checkpoint, "MAX_JSON_BYTES", 100)
    with pytest.raises(E.PortllmError) as ei:
        read_patch(patch_dir)
    expect(ei, E.InvalidInputError, 1, "adapter_config.json", "more than the 100 portllm reads")


def test_hostile_names_cannot_flood_the_error_line(tmp_path):
    p = tmp_path / "bad.safetensors"
    p.write_bytes(raw_safetensors({"x" * 100_000: {"dtype": "Q" * 100_000, "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4))
    with pytest.raises(E.PortllmError) as ei:
        read_header(p)
    msg = expect(ei, E.InvalidInputError, 1, "unknown dtype 'QQQ")
    assert len(msg) < 400
    assert len(str(E.PortllmError("y" * 10**6))) == E.MAX_MESSAGE_CHARS
