"""CLI-level variants of test_robustness.py: `portllm port` and `portllm extract` on bad input.

Each asserts the exit code, that stderr's first line is the one `Error:` line with the
expected words (no traceback), that stdout stays empty, and the state of the disk afterwards.
The core-level tests cover every input class; these check that the command maps them to the
documented exit codes end to end.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from portllm_cli.cli.app import app
from portllm_cli.io.atomic import TMP_MARK
from tests.adversarial import tree_state

runner = CliRunner()


def cli(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def expect_error(res, code: int, *words: str) -> str:
    assert res.exit_code == code, (res.exit_code, res.stderr)
    first = res.stderr.splitlines()[0]
    assert first.startswith("Error: "), res.stderr
    for w in words:
        assert w in first, (w, first)
    assert "Traceback" not in res.stderr and res.stdout == ""
    return first


@pytest.fixture
def lora(tmp_path, llama_lora_dir) -> Path:
    d = tmp_path / "lora"
    shutil.copytree(llama_lora_dir, d)
    return d


def _port(lora: Path, to: Path, out: Path, *extra: str):
    return cli("port", "--patch", lora, "--to", to, "--out", out, "--json", *extra)


def _no_temp(parent: Path) -> bool:
    return not [p for p in parent.iterdir() if TMP_MARK in p.name]


@pytest.mark.parametrize(
    "edit, words",
    [
        (lambda c: c.__setitem__("r", 0), "'r' must be a positive integer, got 0"),
        (lambda c: c.__setitem__("r", -8), "'r' must be a positive integer, got -8"),
        (lambda c: c.pop("lora_alpha"), "'lora_alpha' is missing"),
        (lambda c: c.__setitem__("init_lora_weights", "loftq"), "LoftQ"),
    ],
)
def test_port_bad_adapter_config(tmp_path, llama_dir, lora, edit, words):
    cfg = json.loads((lora / "adapter_config.json").read_text())
    edit(cfg)
    (lora / "adapter_config.json").write_text(json.dumps(cfg))
    before = tree_state(llama_dir)
    expect_error(_port(lora, llama_dir, tmp_path / "out"), 1, "adapter_config.json", words)
    assert not (tmp_path / "out").exists() and _no_temp(tmp_path) and tree_state(llama_dir) == before


def test_port_duplicate_config_key(tmp_path, llama_dir, lora):
    cfg = lora / "adapter_config.json"
    cfg.write_text(cfg.read_text().replace('"r": 4', '"r": 4, "r": 64', 1))
    expect_error(_port(lora, llama_dir, tmp_path / "out"), 1, "duplicate key 'r'")
    assert not (tmp_path / "out").exists()


def test_port_nan_patch_exit_4(tmp_path, llama_dir, lora):
    from portllm_cli.io.safetensors import load_tensors, save_tensors

    w = lora / "adapter_model.safetensors"
    t = load_tensors(w)
    key = next(k for k in sorted(t) if "layers.1.self_attn.q_proj.lora_B" in k)
    t[key][0, 0] = float("inf")
    w.unlink()
    save_tensors(w, t)
    first = expect_error(_port(lora, llama_dir, tmp_path / "out"), 4, "model.layers.1.self_attn.q_proj", "NaN or Inf")
    assert "lora_B" in first and not (tmp_path / "out").exists()


def test_port_lora_a_without_b(tmp_path, llama_dir, lora):
    from portllm_cli.io.safetensors import load_tensors, save_tensors

    w = lora / "adapter_model.safetensors"
    t = load_tensors(w)
    key = next(k for k in sorted(t) if "layers.0.self_attn.v_proj.lora_B" in k)
    del t[key]
    w.unlink()
    save_tensors(w, t)
    expect_error(_port(lora, llama_dir, tmp_path / "out"), 1, "has no lora_B")


def test_port_truncated_target_shard_exit_4(tmp_path, llama_dir, lora):
    target = tmp_path / "target"
    shutil.copytree(llama_dir, target)
    shard = next(iter(sorted(target.glob("*.safetensors"))))
    shard.write_bytes(shard.read_bytes()[:-100])
    expect_error(_port(lora, target, tmp_path / "out"), 4, shard.name, "truncated file or lying header")
    assert not (tmp_path / "out").exists()


def test_port_index_traversal_in_target(tmp_path, llama_dir, lora):
    target = tmp_path / "target"
    shutil.copytree(llama_dir, target)
    names = sorted(p.name for p in target.glob("*.safetensors"))
    shutil.move(str(target / names[0]), str(tmp_path / names[0]))  # the shard now sits outside
    weight_map = {}
    from portllm_cli.io.safetensors import read_header

    for n in names[1:]:
        weight_map.update({k: n for k in read_header(target / n).tensors})
    for k in read_header(tmp_path / names[0]).tensors:
        weight_map[k] = f"../{names[0]}"
    (target / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    expect_error(_port(lora, target, tmp_path / "out"), 1, "refusing file name", f"../{names[0]}")
    assert not (tmp_path / "out").exists()


def test_port_out_equals_target(tmp_path, llama_dir, lora):
    before = tree_state(llama_dir)
    for extra in ((), ("--overwrite",)):
        expect_error(_port(lora, llama_dir, llama_dir, *extra), 1, "the output is the same path as the input")
    assert tree_state(llama_dir) == before and _no_temp(llama_dir.parent)


def test_port_out_equals_patch(tmp_path, llama_dir, lora):
    before = tree_state(lora)
    expect_error(_port(lora, llama_dir, lora, "--overwrite"), 1, "the output is the same path as the input")
    assert tree_state(lora) == before


def test_port_out_is_a_file(tmp_path, llama_dir, lora):
    out = tmp_path / "out"
    out.write_text("keep")
    expect_error(_port(lora, llama_dir, out, "--overwrite"), 1, "exists and is not a directory")
    assert out.read_text() == "keep"


def test_port_disk_full(tmp_path, llama_dir, lora, monkeypatch):
    import portllm_cli.io.shards as st

    real = st.copy_range
    calls = {"n": 0}

    def filling(src_fd, dst_fd, offset, length, **kw):
        calls["n"] += 1
        if calls["n"] >= 3:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(src_fd, dst_fd, offset, length, **kw)

    monkeypatch.setattr(st, "copy_range", filling)
    (tmp_path / "neighbour").write_text("untouched")
    before_parent, before_model = tree_state(tmp_path), tree_state(llama_dir)
    res = _port(lora, llama_dir, tmp_path / "out")
    first = expect_error(res, 1, "no space left on device", "partial output was removed")
    assert str(tmp_path / "out") in first and "Hint: free some space" in res.stderr
    assert calls["n"] >= 3
    assert tree_state(tmp_path) == before_parent and tree_state(llama_dir) == before_model


def test_port_pickle_target_malicious(tmp_path, llama_dir, lora):
    import torch

    from portllm_cli.io.safetensors import load_tensors

    class Evil:
        def __reduce__(self):
            return (open, (str(tmp_path / "pwned"), "w"))

    target = tmp_path / "target"
    target.mkdir()
    shutil.copy(llama_dir / "config.json", target / "config.json")
    state = {}
    for f in sorted(llama_dir.glob("*.safetensors")):
        state.update(load_tensors(f))
    state["evil"] = Evil()
    torch.save(state, target / "pytorch_model.bin")
    expect_error(_port(lora, target, tmp_path / "out"), 1, "does not unpickle by default")
    expect_error(_port(lora, target, tmp_path / "out", "--allow-pickle"), 1, "refused by torch.load(weights_only=True)")
    assert not (tmp_path / "pwned").exists() and not (tmp_path / "out").exists()


@pytest.mark.parametrize("spec, code, words", [("", 2, "empty model argument"), ("user/repo@../../x", 1, "refusing revision")])
def test_port_bad_target_spec(tmp_path, lora, spec, code, words):
    expect_error(_port(lora, spec, tmp_path / "out"), code, words)


def test_extract_nan_adapter_exit_4(tmp_path, lora):
    from portllm_cli.io.safetensors import load_tensors, save_tensors

    w = lora / "adapter_model.safetensors"
    t = load_tensors(w)
    key = next(k for k in sorted(t) if "layers.0.self_attn.q_proj.lora_A" in k)
    t[key][1, 2] = float("nan")
    w.unlink()
    save_tensors(w, t)
    res = cli("extract", lora, "--out", tmp_path / "p.patch", "--json")
    expect_error(res, 4, "model.layers.0.self_attn.q_proj", "NaN or Inf")
    assert not (tmp_path / "p.patch").exists() and _no_temp(tmp_path)


def test_extract_out_inside_input(tmp_path, lora):
    before = tree_state(lora)
    res = cli("extract", lora, "--out", lora / "p.patch", "--json")
    expect_error(res, 1, "the output lies inside the input")
    assert tree_state(lora) == before
