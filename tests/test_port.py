"""portllm port: the merge math against an independent computation and PEFT, the layout
guarantees, --as-adapter, and the command-line contract (exit codes, JSON, error lines)."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from portllm_cli.cli.app import app
from tests import tiny

runner = CliRunner()


# -- an independent reference: plain safetensors + plain torch, no portllm code ------------------
def _load(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path))


def _model_tensors(model_dir: Path) -> dict:
    out = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        out.update(_load(f))
    return out


def _raw_header(path: Path) -> tuple[int, dict]:
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    return 8 + n, json.loads(raw[8 : 8 + n])


def _pattern(patterns: dict, module: str, default):
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def expected_merge(target_dir: Path, lora_dir: Path, extra: float = 1.0) -> dict:
    """{weight key: merged tensor} from the adapter files, computed with the one-rounding formula."""
    cfg = json.loads((lora_dir / "adapter_config.json").read_text())
    factors = _load(lora_dir / "adapter_model.safetensors")
    weights = _model_tensors(target_dir)
    out = {}
    for key in factors:
        if ".lora_A." not in key:
            continue
        module = key.removeprefix("base_model.model.").split(".lora_A.")[0]
        A = factors[key].float()
        B = factors[key.replace(".lora_A.", ".lora_B.")].float()
        r = _pattern(cfg.get("rank_pattern") or {}, module, cfg["r"])
        alpha = _pattern(cfg.get("alpha_pattern") or {}, module, cfg["lora_alpha"])
        assert A.shape[0] == r
        s = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
        W = weights[f"{module}.weight"]
        out[f"{module}.weight"] = (W.float() + (B @ A) * (s * extra)).to(W.dtype)
    return out


def peft_merged(target_dir: Path, lora_dir: Path, **peft_kw) -> dict:
    import transformers as tf
    from peft import PeftModel

    model = tf.AutoModelForCausalLM.from_pretrained(target_dir, dtype="auto")
    merged = PeftModel.from_pretrained(model, str(lora_dir), **peft_kw).merge_and_unload()
    return {k: v.detach().clone() for k, v in merged.state_dict().items()}


def run(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def port_cli(patch: Path, target: Path, out: Path, *extra: str):
    res = run("port", "--patch", patch, "--to", target, "--out", out, "--json", *extra)
    assert res.exit_code == 0, res.stderr
    return json.loads(res.stdout)


# -- fixtures: each architecture built once per module ------------------------------------------
CASES = [
    ("llama", "float32", None),
    ("llama", "bfloat16", "20KB"),
    ("mistral", "float32", "20KB"),
    ("qwen2", "bfloat16", None),
    ("gemma", "float32", "20KB"),
    ("gemma", "bfloat16", None),
]


@pytest.fixture(scope="module")
def built(tmp_path_factory, tokenizer_dir):
    """built(arch, dtype, shard, **lora_kw) -> {base, target, lora}: each model and adapter built once."""
    models: dict = {}
    loras: dict = {}

    def model(arch, dtype, shard, seed):
        key = (arch, dtype, shard, seed)
        if key not in models:
            d = tmp_path_factory.mktemp(f"{arch}-{dtype}-{seed}")
            tiny.make_model(d, arch, dtype=dtype, seed=seed, max_shard_size=shard, tokenizer_from=tokenizer_dir)
            models[key] = d
        return models[key]

    def get(arch: str, dtype: str, shard: str | None, **lora_kw):
        base = model(arch, dtype, None, 0)  # the old version the LoRA was trained on
        target = model(arch, dtype, shard, 1)  # the evolved version
        key = (arch, dtype, tuple(sorted((k, repr(v)) for k, v in lora_kw.items())))
        if key not in loras:
            loras[key] = tmp_path_factory.mktemp(f"lora-{arch}-{dtype}") / "lora"
            tiny.make_lora(base, loras[key], seed=3, **lora_kw)
        return {"base": base, "target": target, "lora": loras[key]}

    return get


@pytest.fixture(scope="module")
def llama(built):
    return built("llama", "float32", "20KB")


@pytest.fixture(scope="module")
def manifest_patch(tmp_path_factory, llama):
    """The llama LoRA as a portllm patch with a manifest (sha256 + base fingerprint)."""
    from portllm_cli.io.checkpoint import Checkpoint, architecture_fingerprint
    from portllm_cli.patch.format import build_manifest, read_patch, write_patch_files

    out = tmp_path_factory.mktemp("patch") / "llama.patch"
    p = read_patch(llama["lora"])
    ckpt = Checkpoint.open(llama["base"])
    shapes = {m: list(ckpt.shape(f"{m}.weight")) for m in p.modules}
    tensors = _load(llama["lora"] / "adapter_model.safetensors")
    manifest = build_manifest(
        base={"model": str(llama["base"]), "revision": None, "content_hash": None,
              "fingerprint": architecture_fingerprint(ckpt.config, shapes)},
        lora={"r": p.rank, "lora_alpha": p.alpha},
        source={"kind": "test"},
    )
    write_patch_files(out, tensors, p.config, manifest)
    return out


# -- the math -----------------------------------------------------------------------------------
@pytest.mark.parametrize("arch,dtype,shard", CASES, ids=[f"{a}-{d}-{'sharded' if s else 'single'}" for a, d, s in CASES])
def test_merged_equals_independent_and_peft(built, tmp_path, arch, dtype, shard):
    import torch

    case = built(arch, dtype, shard)
    target, lora = case["target"], case["lora"]
    out = tmp_path / "out"
    doc = port_cli(lora, target, out, "--verify")
    assert doc["mode"] == "merged" and doc["modules_merged"] == 4  # q_proj, v_proj x 2 layers
    assert doc["verified"] is True

    got = _model_tensors(out)
    src = _model_tensors(target)
    want = expected_merge(target, lora)
    assert set(got) == set(src)
    for key, w in want.items():
        assert got[key].dtype == w.dtype
        assert torch.equal(got[key].view(torch.uint8), w.contiguous().view(torch.uint8)), key
        assert not torch.equal(got[key], src[key]), f"{key} was not changed"

    # PEFT's merge_and_unload on the same inputs
    ref = peft_merged(target, lora)
    for key, w in want.items():
        if dtype == "float32":
            torch.testing.assert_close(got[key], ref[key], rtol=0, atol=1e-6)
        else:
            # PEFT keeps these float32 factors in float32 and `bf16 += fp32` rounds once, as we do
            assert torch.equal(got[key], ref[key]), key
    for key in src:
        if key not in want and key in ref:
            assert torch.equal(got[key], ref[key]), key

    # untargeted bytes identical, same files, same headers, same index
    shard_files = sorted(p.name for p in target.glob("*.safetensors"))
    assert sorted(p.name for p in out.glob("*.safetensors")) == shard_files
    for name in shard_files:
        a, b = (target / name).read_bytes(), (out / name).read_bytes()
        assert len(a) == len(b)
        start, header = _raw_header(target / name)
        assert a[:start] == b[:start], f"{name}: header changed"
        for tname, spec in header.items():
            if tname == "__metadata__" or tname in want:
                continue
            lo, hi = (start + o for o in spec["data_offsets"])
            assert a[lo:hi] == b[lo:hi], f"{name}: untargeted {tname} changed"
    for side in target.iterdir():
        if not side.name.endswith(".safetensors"):
            assert (out / side.name).read_bytes() == side.read_bytes(), side.name
    assert (out / "model.safetensors.index.json").exists() == (shard is not None)
    record = json.loads((out / "portllm_port.json").read_text())
    assert record["mode"] == "merged" and len(record["merged_modules"]) == 4

    # and the output loads as the same kind of model
    import transformers as tf

    model = tf.AutoModelForCausalLM.from_pretrained(out, dtype="auto")
    assert next(model.parameters()).dtype == getattr(torch, dtype)


def test_bf16_factors_one_rounding_beats_peft_two(built, tmp_path):
    """bf16 factors kept in bf16 (autocast_adapter_dtype=False): PEFT rounds the delta to bf16,
    then the sum; we round once. The two differ by at most the delta's rounding (half a bf16 ulp
    of the delta) plus one ulp of the result, and ours is the closer to the exact value."""
    import torch
    from safetensors.torch import save_file

    case = built("llama", "bfloat16", "20KB")
    lora = tmp_path / "bf16.lora"
    shutil.copytree(case["lora"], lora)
    t = {k: v.to(torch.bfloat16) for k, v in _load(lora / "adapter_model.safetensors").items()}
    save_file(t, str(lora / "adapter_model.safetensors"))
    port_cli(lora, case["target"], tmp_path / "out")
    got = _model_tensors(tmp_path / "out")
    ref = peft_merged(case["target"], lora, autocast_adapter_dtype=False)
    src = _model_tensors(case["target"])
    cfg = json.loads((lora / "adapter_config.json").read_text())
    ours_err = peft_err = 0.0
    differ = 0
    for key, w in expected_merge(case["target"], lora).items():
        assert torch.equal(got[key], w), key
        module = key.removesuffix(".weight")
        A = t[f"base_model.model.{module}.lora_A.weight"].double()
        B = t[f"base_model.model.{module}.lora_B.weight"].double()
        delta = (B @ A) * (cfg["lora_alpha"] / cfg["r"])
        exact = src[key].double() + delta
        bound = delta.abs() * 2.0**-8 + got[key].double().abs() * 2.0**-7 + 1e-12
        assert bool(((got[key].double() - ref[key].double()).abs() <= bound).all()), key
        differ += int((got[key] != ref[key]).sum())
        ours_err += float((got[key].double() - exact).abs().sum())
        peft_err += float((ref[key].double() - exact).abs().sum())
    assert differ > 0  # the two roundings do show up
    assert ours_err < peft_err


@pytest.mark.parametrize(
    "lora_kw",
    [
        {"use_rslora": True},
        {"rank_pattern": {"v_proj": 2}, "alpha_pattern": {"q_proj": 32.0}},
        {"targets": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"), "rank": 8},
    ],
    ids=["rslora", "rank-alpha-pattern", "all-linear"],
)
def test_lora_variants(built, tmp_path, lora_kw):
    import torch

    case = built("llama", "float32", "20KB", **lora_kw)
    port_cli(case["lora"], case["target"], tmp_path / "out")
    got = _model_tensors(tmp_path / "out")
    want = expected_merge(case["target"], case["lora"])
    ref = peft_merged(case["target"], case["lora"])
    assert want
    for key, w in want.items():
        assert torch.equal(got[key], w), key
        torch.testing.assert_close(got[key], ref[key], rtol=0, atol=1e-6)


def test_scale(llama, tmp_path):
    import torch

    doc = port_cli(llama["lora"], llama["target"], tmp_path / "half", "--scale", "0.5")
    assert doc["scale"] == 0.5
    got = _model_tensors(tmp_path / "half")
    for key, w in expected_merge(llama["target"], llama["lora"], extra=0.5).items():
        assert torch.equal(got[key], w), key
    # a negative scale undoes the patch (up to fp32 rounding)
    port_cli(llama["lora"], tmp_path / "half", tmp_path / "back", "--scale", "-0.5")
    back, src = _model_tensors(tmp_path / "back"), _model_tensors(llama["target"])
    for key in expected_merge(llama["target"], llama["lora"]):
        torch.testing.assert_close(back[key], src[key], rtol=0, atol=1e-6)


def test_merge_in_place_matches_port(llama, tmp_path):
    """eval's in-memory patching and port use the same merge: same bits."""
    import torch

    from portllm_cli.core.compat import check_compatibility
    from portllm_cli.core.merge import LoraEdit, merge_in_place
    from portllm_cli.io.checkpoint import Checkpoint
    from portllm_cli.patch.format import read_patch

    patch = read_patch(llama["lora"])
    sd = _model_tensors(llama["target"])
    report = check_compatibility(patch, Checkpoint.open(llama["target"]))
    for module, key in report.key_map.items():
        merge_in_place(sd[key], [LoraEdit(patch.modules[module])])
    want = expected_merge(llama["target"], llama["lora"])
    assert sorted(report.key_map.values()) == sorted(want)
    for key, w in want.items():
        assert torch.equal(sd[key], w)


# -- --as-adapter -------------------------------------------------------------------------------
@pytest.mark.parametrize("scale", ["1.0", "2.0"])
def test_as_adapter_matches_merged_logits(llama, manifest_patch, tmp_path, scale):
    import torch
    import transformers as tf
    from peft import PeftModel

    target = llama["target"]
    doc = port_cli(manifest_patch, target, tmp_path / "adapter", "--as-adapter", "--scale", scale, "--verify")
    assert doc["mode"] == "adapter" and doc["verified"] is True
    port_cli(manifest_patch, target, tmp_path / "merged", "--scale", scale)

    adapter = tmp_path / "adapter"
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str(target.resolve())
    man = json.loads((adapter / "portllm.json").read_text())
    old = json.loads((manifest_patch / "portllm.json").read_text())
    assert man["base"] == old["base"]  # where it was trained is kept
    assert man["target"]["model"] == str(target.resolve())
    assert man["target"]["fingerprint"]["modules"]["model.layers.0.self_attn.q_proj"] == [32, 32]
    assert man["ports"][-1]["scale"] == float(scale) and man["ports"][-1]["from_patch_sha256"] == old["tensors"]["sha256"]
    import hashlib

    assert man["tensors"]["sha256"] == hashlib.sha256((adapter / "adapter_model.safetensors").read_bytes()).hexdigest()

    ids = torch.tensor([[0, 5, 17, 42, 99, 200, 3, 7]])
    model = tf.AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32)
    with torch.no_grad():
        served = PeftModel.from_pretrained(model, str(adapter))(ids).logits
        merged = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)(ids).logits
        plain = tf.AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32)(ids).logits
    torch.testing.assert_close(served, merged, rtol=0, atol=1e-5)
    assert (served - plain).abs().max() > 1e-3  # the patch really does something

    # the retargeted adapter is itself a valid patch: porting it again gives the same weights
    port_cli(adapter, target, tmp_path / "again")
    a, b = _model_tensors(tmp_path / "again"), _model_tensors(tmp_path / "merged")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6)


def test_as_adapter_drops_base_layer_weights(llama, tmp_path):
    from safetensors.torch import save_file

    lora = tmp_path / "with-base-layer"
    shutil.copytree(llama["lora"], lora)
    t = _load(lora / "adapter_model.safetensors")
    import torch

    t["base_model.model.model.embed_tokens.base_layer.weight"] = torch.zeros(320, 32)
    save_file(t, str(lora / "adapter_model.safetensors"))
    port_cli(lora, llama["target"], tmp_path / "adapter", "--as-adapter")
    keys = _load(tmp_path / "adapter" / "adapter_model.safetensors")
    assert not any("base_layer" in k for k in keys) and len(keys) == 8


# -- --verify -----------------------------------------------------------------------------------
def test_verify_passes_and_detects_a_bad_write(llama, tmp_path, monkeypatch):
    from portllm_cli.core import port as core

    doc = port_cli(llama["lora"], llama["target"], tmp_path / "ok", "--verify")
    assert doc["verified"] is True

    real = core.pwrite_all

    def flip_one_bit(fd, data, offset):
        b = bytearray(memoryview(data).cast("B"))
        b[0] ^= 1
        real(fd, memoryview(b), offset)

    monkeypatch.setattr(core, "pwrite_all", flip_one_bit)
    out = tmp_path / "bad"
    # without --verify the corruption would go unnoticed; with it the run fails and nothing is left
    res = run("port", "-p", llama["lora"], "--to", llama["target"], "-o", out, "--verify")
    assert res.exit_code == 4, res.stderr
    assert res.stderr.startswith("Error: ") and "does not equal base + scale*B@A" in res.stderr
    assert res.stdout == ""
    assert not out.exists() and not list(tmp_path.glob(".bad*"))


# -- pickle targets -----------------------------------------------------------------------------
def test_pickle_target_needs_allow_pickle(llama, tmp_path):
    import torch

    pk = tmp_path / "pickled"
    pk.mkdir()
    shutil.copy(llama["target"] / "config.json", pk / "config.json")
    torch.save(_model_tensors(llama["target"]), pk / "pytorch_model.bin")

    res = run("port", "-p", llama["lora"], "--to", pk, "-o", tmp_path / "o1")
    assert res.exit_code == 1 and "pickle" in res.stderr and not (tmp_path / "o1").exists()

    doc = port_cli(llama["lora"], pk, tmp_path / "o2", "--allow-pickle", "--verify")
    assert doc["verified"] is True
    got = _model_tensors(tmp_path / "o2")
    assert (tmp_path / "o2" / "model.safetensors").exists()
    want = expected_merge(llama["target"], llama["lora"])
    src = _model_tensors(llama["target"])
    for key in src:
        assert torch.equal(got[key], want.get(key, src[key])), key


# -- the command-line contract and bad input ----------------------------------------------------
def test_human_output_is_the_path(llama, tmp_path):
    out = tmp_path / "o"
    res = run("port", "-p", llama["lora"], "--to", llama["target"], "-o", out)
    assert res.exit_code == 0, res.stderr
    assert res.stdout == f"{out}\n"
    assert "patch modules merged into" in res.stderr


def test_json_document(llama, tmp_path):
    doc = port_cli(llama["lora"], llama["target"], tmp_path / "o")
    assert set(doc) >= {"out", "mode", "patch", "target", "modules_merged", "bytes_written", "seconds", "warnings"}
    assert doc["bytes_written"] >= sum(p.stat().st_size for p in llama["target"].glob("*.safetensors"))
    assert any("no portllm.json" in w for w in doc["warnings"])  # a plain PEFT adapter


def test_existing_out_refused_without_overwrite(llama, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    res = run("port", "-p", llama["lora"], "--to", llama["target"], "-o", out)
    assert res.exit_code == 1
    assert res.stderr.splitlines()[0].startswith("Error: ") and "already exists" in res.stderr
    assert "--overwrite" in res.stderr
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and sorted(p.name for p in tmp_path.iterdir()) == ["o"]

    doc = port_cli(llama["lora"], llama["target"], out, "--overwrite")
    assert not (out / "keep.txt").exists() and (out / "portllm_port.json").exists() and doc["out"] == str(out)


def test_missing_inputs(llama, tmp_path):
    res = run("port", "-p", tmp_path / "nope", "--to", llama["target"], "-o", tmp_path / "o")
    assert res.exit_code == 1 and res.stderr.startswith("Error: ") and "nope" in res.stderr

    no_weights = tmp_path / "no-weights"
    no_weights.mkdir()
    shutil.copy(llama["lora"] / "adapter_config.json", no_weights)
    res = run("port", "-p", no_weights, "--to", llama["target"], "-o", tmp_path / "o")
    assert res.exit_code == 1 and "adapter_model.safetensors" in res.stderr

    broken = tmp_path / "broken-model"
    shutil.copytree(llama["target"], broken)
    next(broken.glob("model-*.safetensors")).unlink()
    res = run("port", "-p", llama["lora"], "--to", broken, "-o", tmp_path / "o")
    assert res.exit_code == 1 and "missing" in res.stderr

    res = run("port", "-p", llama["lora"], "--to", tmp_path / "nope-model", "-o", tmp_path / "o")
    assert res.exit_code == 1 and "nope-model" in res.stderr
    assert not (tmp_path / "o").exists()
    assert "Traceback" not in res.stderr


def test_shape_mismatch_exit_3(llama, tmp_path):
    import torch
    from safetensors.torch import save_file

    bad = tmp_path / "wide.patch"
    shutil.copytree(llama["lora"], bad)
    t = _load(bad / "adapter_model.safetensors")
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    t[key] = torch.randn(4, 48)
    save_file(t, str(bad / "adapter_model.safetensors"))
    out = tmp_path / "o"
    for extra in ([], ["--as-adapter"]):
        res = run("port", "-p", bad, "--to", llama["target"], "-o", out, *extra)
        assert res.exit_code == 3, res.stderr
        line = res.stderr.splitlines()[0]
        assert line.startswith("Error: ")
        assert "model.layers.0.self_attn.q_proj" in line and "(32, 48)" in line and "(32, 32)" in line
        assert not out.exists() and not list(tmp_path.glob(".o*"))


def test_wrong_architecture_exit_3(built, manifest_patch, tmp_path):
    mistral = built("mistral", "float32", "20KB")  # same shapes as the llama, another architecture
    res = run("port", "-p", manifest_patch, "--to", mistral["target"], "-o", tmp_path / "o")
    assert res.exit_code == 3
    assert "architecture" in res.stderr and "'llama'" in res.stderr and "'mistral'" in res.stderr
    assert not (tmp_path / "o").exists()


def test_tampered_patch_exit_4_unless_no_verify(llama, manifest_patch, tmp_path):
    tampered = tmp_path / "tampered.patch"
    shutil.copytree(manifest_patch, tampered)
    man = json.loads((tampered / "portllm.json").read_text())
    man["tensors"]["sha256"] = "0" * 64
    (tampered / "portllm.json").write_text(json.dumps(man))
    res = run("port", "-p", tampered, "--to", llama["target"], "-o", tmp_path / "o")
    assert res.exit_code == 4 and "sha256" in res.stderr and not (tmp_path / "o").exists()
    port_cli(tampered, llama["target"], tmp_path / "o", "--no-verify")


@pytest.mark.parametrize("scale", ["nan", "inf", "0"])
def test_bad_scale_is_a_usage_error(llama, tmp_path, scale):
    res = run("port", "-p", llama["lora"], "--to", llama["target"], "-o", tmp_path / "o", "--scale", scale)
    assert res.exit_code == 2 and res.stderr.startswith("Error: ") and "--scale" in res.stderr
    assert not (tmp_path / "o").exists()


def test_out_inside_the_target_is_refused(llama, tmp_path):
    res = run("port", "-p", llama["lora"], "--to", llama["target"], "-o", llama["target"] / "merged")
    assert res.exit_code == 1 and "inside the input" in res.stderr
    assert not (llama["target"] / "merged").exists()


def test_help_does_not_import_torch():
    code = (
        "import sys; from typer.testing import CliRunner; from portllm_cli.cli.app import app;"
        "r = CliRunner().invoke(app, ['port', '--help']); assert r.exit_code == 0, r.output;"
        "assert '--as-adapter' in r.stdout;"
        "bad = [m for m in ('torch', 'transformers', 'peft', 'lm_eval') if m in sys.modules]; assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1],
                   env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})


def test_embedding_and_lm_head_targets(built, tmp_path):
    """lora_embedding_A/B (delta transposed into the embedding's layout) and lm_head, against PEFT."""
    import torch

    case = built("llama", "float32", "20KB", targets=("embed_tokens", "q_proj", "lm_head"))
    keys = _load(case["lora"] / "adapter_model.safetensors")
    assert any("lora_embedding_A" in k for k in keys)
    doc = port_cli(case["lora"], case["target"], tmp_path / "out")
    assert doc["modules_merged"] == 4  # embed_tokens, lm_head, q_proj x 2
    got = _model_tensors(tmp_path / "out")
    # PEFT saved the OLD base's full embedding matrices next to the factors (save_embedding_layers);
    # loading them would replace the evolved model's embeddings. portllm drops them, so the
    # reference is PEFT on the factors alone.
    from safetensors.torch import save_file

    factors_only = tmp_path / "factors-only"
    shutil.copytree(case["lora"], factors_only)
    assert any(".base_layer." in k for k in keys)
    save_file({k: v for k, v in keys.items() if ".base_layer." not in k}, str(factors_only / "adapter_model.safetensors"))
    ref = peft_merged(case["target"], factors_only)
    src = _model_tensors(case["target"])
    for key in ("model.embed_tokens.weight", "lm_head.weight", "model.layers.1.self_attn.q_proj.weight"):
        assert not torch.equal(got[key], src[key]), key
        torch.testing.assert_close(got[key], ref[key], rtol=0, atol=1e-6)


def _with_fingerprint_vocab(patch: Path, dest: Path, vocab: int) -> Path:
    shutil.copytree(patch, dest)
    man = json.loads((dest / "portllm.json").read_text())
    man["base"]["fingerprint"]["vocab_size"] = vocab  # the manifest's sha256 covers the tensors only
    (dest / "portllm.json").write_text(json.dumps(man))
    return dest


def test_vocab_change_is_a_warning(llama, manifest_patch, tmp_path):
    patch = _with_fingerprint_vocab(manifest_patch, tmp_path / "p", 400)
    doc = port_cli(patch, llama["target"], tmp_path / "o")
    assert any("vocabulary size changed: 400" in w for w in doc["warnings"])
    res = run("port", "-p", patch, "--to", llama["target"], "-o", tmp_path / "o2")
    assert res.exit_code == 0 and "Warning: " in res.stderr and "vocabulary" in res.stderr


def test_vocab_change_with_embedding_patch_exit_3(built, tmp_path):
    from portllm_cli.io.checkpoint import Checkpoint, architecture_fingerprint
    from portllm_cli.patch.format import build_manifest, read_patch, write_patch_files

    case = built("llama", "float32", "20KB", targets=("embed_tokens", "q_proj", "lm_head"))
    p = read_patch(case["lora"])
    fp = architecture_fingerprint(Checkpoint.open(case["base"]).config)
    fp["vocab_size"] = 400
    manifest = build_manifest(base={"model": "x", "fingerprint": fp}, lora={}, source={"kind": "test"})
    out = tmp_path / "emb.patch"
    write_patch_files(out, _load(case["lora"] / "adapter_model.safetensors"), p.config, manifest)
    res = run("port", "-p", out, "--to", case["target"], "-o", tmp_path / "o")
    assert res.exit_code == 3 and "vocabulary size changed" in res.stderr and "embeddings" in res.stderr
    assert not (tmp_path / "o").exists()


def test_core_api_with_a_patch_object_or_a_directory(llama, tmp_path):
    """port_merged takes a read Patch (no overlap) or a directory (copies start before the
    factors are read): both give the same bytes, and the same as the independent formula."""
    import torch

    from portllm_cli.core.port import port_merged
    from portllm_cli.patch.format import read_patch
    from portllm_cli.resolve import resolve

    seen = []
    target = resolve(str(llama["target"]), kind="model")
    r1 = port_merged(read_patch(llama["lora"]), target, tmp_path / "a", progress=lambda *a: seen.append(a))
    r2 = port_merged(llama["lora"], target, tmp_path / "b", scale=1.0)
    assert r1.modules_merged == r2.modules_merged == 4
    assert seen and seen[-1][1] == seen[-1][2] == sum(f.stat().st_size for f in llama["target"].glob("*.safetensors"))
    for f in llama["target"].glob("*.safetensors"):
        assert (tmp_path / "a" / f.name).read_bytes() == (tmp_path / "b" / f.name).read_bytes()
    got = _model_tensors(tmp_path / "a")
    for key, w in expected_merge(llama["target"], llama["lora"]).items():
        assert torch.equal(got[key], w)
