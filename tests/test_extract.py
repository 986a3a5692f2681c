"""portllm extract: adapter copy and SVD extraction, checked against independent computations."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from portllm_cli.cli.app import app
from portllm_cli.core.extract import extract_adapter, extract_svd
from portllm_cli.errors import UsageError
from portllm_cli.patch.format import read_patch
from portllm_cli.resolve import Resolved
from tests import tiny

runner = CliRunner()

LOWRANK_MODULES = [
    "model.layers.0.self_attn.q_proj",
    "model.layers.1.self_attn.q_proj",
    "model.layers.0.self_attn.o_proj",
    "model.layers.1.mlp.down_proj",
]


def cli(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def load_weights(model_dir: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        out.update(load_file(f))
    return out


def logits(model_dir: Path, adapter: Path | None = None) -> torch.Tensor:
    import transformers as tf
    from peft import PeftModel

    model = tf.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter)
    model.eval()
    ids = torch.arange(3, 19).reshape(2, 8)
    with torch.no_grad():
        return model(input_ids=ids).logits


def merged_weights(model_dir: Path, adapter: Path) -> dict[str, torch.Tensor]:
    import transformers as tf
    from peft import PeftModel

    model = tf.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    return {k: v.detach().clone() for k, v in merged.state_dict().items()}


@pytest.fixture(scope="module")
def lowrank_ft_dir(tmp_path_factory, llama_dir) -> Path:
    """llama_dir plus a known rank-3 delta on LOWRANK_MODULES and the embeddings; all else unchanged."""
    import transformers as tf

    d = tmp_path_factory.mktemp("llama-ft-lowrank")
    model = tf.AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32)
    gen = torch.Generator().manual_seed(7)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for m in [*LOWRANK_MODULES, "model.embed_tokens"]:
            w = params[f"{m}.weight"]
            u = torch.randn(w.shape[0], 3, generator=gen)
            v = torch.randn(3, w.shape[1], generator=gen)
            w.add_(0.05 * u @ v)
    model.save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def odd_shape_dir(tmp_path_factory) -> Path:
    """A llama whose MLP is wider than llama_dir's: same architecture, different shapes."""
    import transformers as tf

    cfg = tiny.tiny_config("llama")
    cfg.intermediate_size = 48
    d = tmp_path_factory.mktemp("llama-odd")
    tf.AutoModelForCausalLM.from_config(cfg).save_pretrained(d)
    return d


def copy_adapter(src: Path, dst: Path, **config_changes) -> Path:
    shutil.copytree(src, dst)
    cfg_path = dst / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.update(config_changes)
    cfg_path.write_text(json.dumps(cfg))
    return dst


# -- adapter mode -------------------------------------------------------------------------------
def test_adapter_patch_loads_in_peft_with_same_logits(tmp_path, llama_dir, llama_lora_dir):
    out = tmp_path / "p"
    r = cli("extract", llama_lora_dir, "--out", out, "--task", "sst2", "--json")
    assert r.exit_code == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["mode"] == "adapter" and doc["modules"] == 4 and doc["rank"] == 4
    assert doc["out"] == str(out) and doc["relative_error"] is None
    # factors copied bit for bit, same dtype
    orig = load_file(llama_lora_dir / "adapter_model.safetensors")
    new = load_file(out / "adapter_model.safetensors")
    assert orig.keys() == new.keys()
    for k in orig:
        assert new[k].dtype == orig[k].dtype and torch.equal(new[k], orig[k])
    base_logits = logits(llama_dir)
    want = logits(llama_dir, llama_lora_dir)
    got = logits(llama_dir, out)
    assert not torch.allclose(want, base_logits)  # the adapter does something
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert not list(tmp_path.glob(".p.portllm-tmp-*"))


def test_adapter_manifest_records_base(tmp_path, llama_dir, llama_lora_dir):
    out = tmp_path / "p"
    assert cli("extract", llama_lora_dir, "--out", out, "--task", "sst2", "-q").exit_code == 0
    man = json.loads((out / "portllm.json").read_text())
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert man["format"] == "portllm-patch" and man["format_version"] == 1
    assert man["tensors"]["sha256"] == hashlib.sha256((out / "adapter_model.safetensors").read_bytes()).hexdigest()
    base = man["base"]
    assert base["model"] == str(llama_dir.resolve()) == cfg["base_model_name_or_path"]
    weights = llama_dir / "model.safetensors"
    file_hash = hashlib.sha256(weights.read_bytes()).hexdigest()
    want_hash = "sha256:" + hashlib.sha256(f"model.safetensors:{file_hash}\n".encode()).hexdigest()
    assert base["content_hash"] == want_hash
    fp = base["fingerprint"]
    model_cfg = json.loads((llama_dir / "config.json").read_text())
    assert fp["model_type"] == "llama" and fp["hidden_size"] == model_cfg["hidden_size"]
    assert fp["vocab_size"] == model_cfg["vocab_size"] and fp["num_hidden_layers"] == 2
    with safe_open(weights, "pt") as f:
        want_shapes = {
            k[: -len(".weight")]: list(f.get_slice(k).get_shape())
            for k in f.keys()
            if k.endswith(("q_proj.weight", "v_proj.weight"))
        }
    assert fp["modules"] == want_shapes and len(want_shapes) == 4
    lora = man["lora"]
    assert (lora["rank"], lora["alpha"], lora["modules"], lora["use_rslora"]) == (4, 8, 4, False)
    assert sorted(lora["target_modules"]) == ["q_proj", "v_proj"]
    assert man["source"] == {"kind": "peft-adapter", "path": str(llama_lora_dir.resolve())}
    assert man["task"] == "sst2"
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["lora_alpha"] == 8
    read_patch(out, verify=True)  # the integrity check passes


def test_adapter_rank_and_alpha_patterns_kept(tmp_path, llama_dir):
    src = tmp_path / "lora-pattern"
    tiny.make_lora(
        llama_dir, src, targets=("q_proj", "v_proj", "down_proj"), rank=4, alpha=8, seed=5,
        rank_pattern={"v_proj": 2}, alpha_pattern={"down_proj": 3},
    )
    out = tmp_path / "p"
    res = extract_adapter(Resolved(str(src), src), out)
    assert res.ranks["model.layers.0.self_attn.v_proj"] == 2
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["rank_pattern"] == {"v_proj": 2} and cfg["alpha_pattern"] == {"down_proj": 3}
    torch.testing.assert_close(logits(llama_dir, out), logits(llama_dir, src), rtol=0, atol=0)


def test_adapter_base_override_and_missing_base(tmp_path, llama_dir, llama_lora_dir):
    src = copy_adapter(llama_lora_dir, tmp_path / "lora", base_model_name_or_path=str(tmp_path / "gone"))
    out = tmp_path / "p"
    r = cli("extract", src, "--out", out)
    assert r.exit_code == 1
    assert r.stderr.startswith("Error: ") and "not found" in r.stderr and "--no-base-check" in r.stderr
    assert not out.exists()

    r = cli("extract", src, "--base", llama_dir, "--out", out, "--json")
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout)["base"] == str(llama_dir.resolve())
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == str(llama_dir.resolve())

    out2 = tmp_path / "p2"
    r = cli("extract", src, "--no-base-check", "--out", out2, "--json")
    assert r.exit_code == 0, r.stderr
    doc = json.loads(r.stdout)
    assert any("not found" in w for w in doc["warnings"])
    base = json.loads((out2 / "portllm.json").read_text())["base"]
    assert base["model"] == str(tmp_path / "gone") and base["content_hash"] is None
    assert base["fingerprint"]["modules"]["model.layers.1.self_attn.q_proj"] == [32, 32]
    assert base["fingerprint"]["modules"]["model.layers.1.self_attn.v_proj"] == [16, 32]


def test_adapter_without_any_base_is_a_usage_error(tmp_path, llama_lora_dir):
    src = copy_adapter(llama_lora_dir, tmp_path / "lora", base_model_name_or_path=None)
    r = cli("extract", src, "--out", tmp_path / "p")
    assert r.exit_code == 2 and "Error: " in r.stderr and "--base" in r.stderr
    assert not (tmp_path / "p").exists()


def test_adapter_that_does_not_fit_its_base_exits_3(tmp_path, llama_lora_dir):
    src = shutil.copytree(llama_lora_dir, tmp_path / "lora")
    t = load_file(src / "adapter_model.safetensors")
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    t[key] = t[key][:, :16].contiguous()  # in_features 16, the model has 32
    save_file(t, src / "adapter_model.safetensors", metadata={"format": "pt"})
    r = cli("extract", src, "--out", tmp_path / "p")
    assert r.exit_code == 3, r.stderr
    assert "model.layers.0.self_attn.q_proj" in r.stderr and "(32, 16)" in r.stderr and "(32, 32)" in r.stderr
    assert not (tmp_path / "p").exists()


def test_adapter_bad_inputs(tmp_path, llama_lora_dir):
    out = tmp_path / "p"
    # missing directory
    r = cli("extract", tmp_path / "nope", "--out", out)
    assert r.exit_code == 1 and r.stderr.startswith("Error: ")
    # neither adapter nor model
    (tmp_path / "empty").mkdir()
    r = cli("extract", tmp_path / "empty", "--out", out)
    # (one rule and one message for every command since patch-or-model detection was unified)
    assert r.exit_code == 1 and "neither a model" in r.stderr and "adapter_config.json" in r.stderr
    # adapter without its weights
    src = shutil.copytree(llama_lora_dir, tmp_path / "noweights")
    (src / "adapter_model.safetensors").unlink()
    r = cli("extract", src, "--out", out)
    assert r.exit_code == 1 and "adapter_model.safetensors" in r.stderr
    # NaN in a factor is an integrity failure
    src = shutil.copytree(llama_lora_dir, tmp_path / "nan")
    t = load_file(src / "adapter_model.safetensors")
    key = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"
    t[key][0, 0] = float("nan")
    save_file(t, src / "adapter_model.safetensors", metadata={"format": "pt"})
    r = cli("extract", src, "--out", out)
    assert r.exit_code == 4 and "NaN" in r.stderr
    # SVD-only flags on an adapter
    r = cli("extract", llama_lora_dir, "--rank", "4", "--out", out)
    assert r.exit_code == 2 and "--rank" in r.stderr
    assert not out.exists()


def test_existing_out_needs_overwrite(tmp_path, llama_lora_dir):
    out = tmp_path / "p"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    r = cli("extract", llama_lora_dir, "--out", out)
    assert r.exit_code == 1 and "already exists" in r.stderr and "--overwrite" in r.stderr
    assert (out / "keep.txt").read_text() == "mine"
    r = cli("extract", llama_lora_dir, "--out", out, "--overwrite", "-q")
    assert r.exit_code == 0
    assert not (out / "keep.txt").exists() and (out / "portllm.json").exists()


def test_reextracting_a_patch_verifies_its_manifest(tmp_path, llama_lora_dir):
    first = tmp_path / "p1"
    assert cli("extract", llama_lora_dir, "--out", first, "--task", "boolq", "-q").exit_code == 0
    second = tmp_path / "p2"
    assert cli("extract", first, "--out", second, "-q").exit_code == 0
    assert json.loads((second / "portllm.json").read_text())["task"] == "boolq"  # free fields carried
    with open(first / "adapter_model.safetensors", "r+b") as fh:  # tamper with one data byte
        fh.seek(-1, 2)
        last = fh.read(1)
        fh.seek(-1, 2)
        fh.write(bytes([last[0] ^ 1]))
    r = cli("extract", first, "--out", tmp_path / "p3")
    assert r.exit_code == 4 and "sha256" in r.stderr
    assert not (tmp_path / "p3").exists()


# -- SVD mode -----------------------------------------------------------------------------------
def test_svd_of_lowrank_delta_is_exact(tmp_path, llama_dir, lowrank_ft_dir):
    out = tmp_path / "p"
    r = cli("extract", lowrank_ft_dir, "--base", llama_dir, "--rank", "3", "--out", out, "--json")
    assert r.exit_code == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["mode"] == "svd" and doc["rank"] == 3 and doc["modules"] == len(LOWRANK_MODULES)
    assert set(doc["per_module"]) == set(LOWRANK_MODULES)
    assert doc["relative_error"] < 1e-5
    assert all(v["relative_error"] < 1e-5 and v["rank"] == 3 for v in doc["per_module"].values())
    # the unchanged projections are skipped and the changed embedding is reported, not silently dropped
    assert "model.layers.0.self_attn.k_proj" in doc["skipped"]
    assert any("model.embed_tokens.weight" in w for w in doc["warnings"])

    ft, base = load_weights(lowrank_ft_dir), load_weights(llama_dir)
    patch = read_patch(out)
    assert set(patch.modules) == set(LOWRANK_MODULES)
    for m in LOWRANK_MODULES:
        lm = patch.modules[m]
        assert lm.A.dtype == torch.float32 and lm.scale == 1.0
        want = ft[f"{m}.weight"] - base[f"{m}.weight"]
        torch.testing.assert_close(lm.delta(), want, rtol=0, atol=1e-5)

    # PEFT merge of the patch onto the base reproduces the fine-tuned weights
    merged = merged_weights(llama_dir, out)
    for m in LOWRANK_MODULES:
        torch.testing.assert_close(merged[f"{m}.weight"], ft[f"{m}.weight"], rtol=0, atol=1e-5)
    # target_modules selects exactly the extracted modules (not every q_proj, say)
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert sorted(cfg["target_modules"]) == sorted(LOWRANK_MODULES)
    assert cfg["r"] == 3 and cfg["lora_alpha"] == 3

    man = json.loads((out / "portllm.json").read_text())
    assert man["source"]["kind"] == "svd" and man["source"]["rank"] == 3
    assert man["source"]["finetuned"]["model"] == str(lowrank_ft_dir.resolve())
    assert set(man["source"]["errors"]) == set(LOWRANK_MODULES)
    assert man["base"]["fingerprint"]["modules"]["model.layers.1.mlp.down_proj"] == [32, 64]


def test_svd_above_the_true_rank_and_embeddings(tmp_path, llama_dir, lowrank_ft_dir):
    out = tmp_path / "p"
    res = extract_svd(
        Resolved(str(lowrank_ft_dir), lowrank_ft_dir), Resolved(str(llama_dir), llama_dir), out,
        rank=5, target_modules=["q_proj", "embed_tokens"],
    )
    assert set(res.ranks) == {"model.embed_tokens", *LOWRANK_MODULES[:2]}
    assert all(k == 5 for k in res.ranks.values()) and res.relative_error < 1e-5
    ft = load_weights(lowrank_ft_dir)
    merged = merged_weights(llama_dir, out)
    for m in res.ranks:
        torch.testing.assert_close(merged[f"{m}.weight"], ft[f"{m}.weight"], rtol=0, atol=1e-5)


def _optimal_errors(ft: dict, base: dict, modules, rank: int):
    """Eckart-Young: the best rank-R error is the tail of the singular values (float64 here)."""
    errs, tail2, total2 = {}, 0.0, 0.0
    for m in modules:
        s = torch.linalg.svdvals((ft[f"{m}.weight"].double() - base[f"{m}.weight"].double()))
        t2, a2 = float((s[rank:] ** 2).sum()), float((s**2).sum())
        errs[m] = (t2 / a2) ** 0.5
        tail2, total2 = tail2 + t2, total2 + a2
    return errs, (tail2 / total2) ** 0.5


def test_svd_full_rank_delta_matches_eckart_young(tmp_path, llama_dir, llama_evolved_dir):
    out = tmp_path / "p"
    r = cli("extract", llama_evolved_dir, "--base", llama_dir, "--rank", "2", "--out", out, "--json")
    assert r.exit_code == 0, r.stderr
    doc = json.loads(r.stdout)
    ft, base = load_weights(llama_evolved_dir), load_weights(llama_dir)
    modules = list(doc["per_module"])
    # default selection: every *_proj in the layers, 7 per layer
    assert len(modules) == 14 and not any("embed" in m or "norm" in m for m in modules)
    want, want_overall = _optimal_errors(ft, base, modules, 2)
    assert 0.3 < want_overall < 1  # a genuinely full-rank delta
    patch = read_patch(out)
    for m in modules:
        assert doc["per_module"][m]["relative_error"] == pytest.approx(want[m], rel=1e-4)
        delta = ft[f"{m}.weight"] - base[f"{m}.weight"]
        actual = float(torch.linalg.norm(delta - patch.modules[m].delta()) / torch.linalg.norm(delta))
        assert actual == pytest.approx(want[m], rel=1e-4)
    assert doc["relative_error"] == pytest.approx(want_overall, rel=1e-4)
    # the evolved copy also moved norms and embeddings: reported as changes the patch cannot carry
    joined = " ".join(doc["warnings"])
    assert "input_layernorm" in joined and "embed_tokens" in joined


def test_svd_energy_picks_the_expected_rank(tmp_path, llama_dir, llama_evolved_dir):
    out = tmp_path / "p"
    r = cli("extract", llama_evolved_dir, "--base", llama_dir, "--energy", "0.9", "--out", out, "--json")
    assert r.exit_code == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["energy"] == 0.9 and "rank" not in doc
    ft, base = load_weights(llama_evolved_dir), load_weights(llama_dir)
    want = {}
    for m in doc["ranks"]:
        s2 = torch.linalg.svdvals(ft[f"{m}.weight"].double() - base[f"{m}.weight"].double()) ** 2
        share = torch.cumsum(s2, 0) / s2.sum()
        want[m] = next(i + 1 for i, v in enumerate(share.tolist()) if v >= 0.9 - 1e-12)
        assert share[want[m] - 1] >= 0.9 and (want[m] == 1 or share[want[m] - 2] < 0.9)
    assert doc["ranks"] == want
    assert len(set(want.values())) > 1  # per-module ranks differ: exercises rank_pattern
    assert all(v["relative_error"] <= (0.1 ** 0.5) + 1e-6 for v in doc["per_module"].values())

    # PEFT loads the patterns and builds each module at its own rank; merging reproduces base + B@A
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["lora_alpha"] == cfg["r"] and cfg["rank_pattern"] == cfg["alpha_pattern"]
    import transformers as tf
    from peft import PeftModel

    model = tf.AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32)
    pm = PeftModel.from_pretrained(model, out)
    mods = dict(pm.base_model.model.named_modules())
    for m, k in want.items():
        assert mods[m].lora_A["default"].weight.shape[0] == k
        assert mods[m].scaling["default"] == 1.0
    merged = {k: v for k, v in pm.merge_and_unload().state_dict().items()}
    patch = read_patch(out)
    for m in want:
        torch.testing.assert_close(merged[f"{m}.weight"], base[f"{m}.weight"] + patch.modules[m].delta(), rtol=0, atol=1e-5)


def test_svd_energy_one_and_bf16_factors(tmp_path, llama_dir, lowrank_ft_dir):
    out = tmp_path / "p"
    res = extract_svd(
        Resolved(str(lowrank_ft_dir), lowrank_ft_dir), Resolved(str(llama_dir), llama_dir), out,
        energy=1.0, dtype="bfloat16", target_modules=["q_proj"],
    )
    patch = read_patch(out)
    assert all(m.A.dtype == torch.bfloat16 and m.B.dtype == torch.bfloat16 for m in patch.modules.values())
    ft, base = load_weights(lowrank_ft_dir), load_weights(llama_dir)
    for m, lm in patch.modules.items():
        delta = ft[f"{m}.weight"] - base[f"{m}.weight"]
        actual = float(torch.linalg.norm(delta - lm.delta()) / torch.linalg.norm(delta))
        # the reported error includes bf16 rounding of the factors
        assert res.per_module_error[m] == pytest.approx(actual, rel=1e-3)
        assert 0 < actual < 2e-2


def test_svd_bad_inputs(tmp_path, llama_dir, lowrank_ft_dir, odd_shape_dir, llama_lora_dir):
    out = tmp_path / "p"
    for args in (
        ["--rank", "0"],
        ["--rank", "-2"],
        ["--energy", "0"],
        ["--energy", "1.5"],
        ["--rank", "2", "--energy", "0.9"],
        [],
    ):
        r = cli("extract", lowrank_ft_dir, "--base", llama_dir, *args, "--out", out)
        assert r.exit_code == 2, (args, r.stderr)
        assert r.stderr.startswith("Error: "), r.stderr
    r = cli("extract", lowrank_ft_dir, "--rank", "2", "--out", out)  # no --base
    assert r.exit_code == 2 and "--base" in r.stderr
    # different shapes between fine-tune and base: exit 3, naming the module and both shapes
    r = cli("extract", lowrank_ft_dir, "--base", odd_shape_dir, "--rank", "2", "--out", out)
    assert r.exit_code == 3 and "mlp." in r.stderr and "(32, 64)" in r.stderr and "(32, 48)" in r.stderr
    # different architecture
    mistral = tmp_path / "mistral"
    tiny.make_model(mistral, arch="mistral", tokenizer_from=llama_dir)
    r = cli("extract", lowrank_ft_dir, "--base", mistral, "--rank", "2", "--out", out)
    assert r.exit_code == 3 and "'mistral'" in r.stderr
    # base missing, base an adapter, nothing matching --target-modules, a model dir without weights
    r = cli("extract", lowrank_ft_dir, "--base", tmp_path / "gone", "--rank", "2", "--out", out)
    assert r.exit_code == 1 and "gone" in r.stderr
    r = cli("extract", lowrank_ft_dir, "--base", llama_lora_dir, "--rank", "2", "--out", out)
    assert r.exit_code == 1 and r.stderr.startswith("Error: ")
    r = cli("extract", lowrank_ft_dir, "--base", llama_dir, "--rank", "2", "-t", "nothing_here", "--out", out)
    assert r.exit_code == 1 and "nothing_here" in r.stderr
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(llama_dir / "config.json", bare / "config.json")
    r = cli("extract", bare, "--base", llama_dir, "--rank", "2", "--out", out)
    assert r.exit_code == 1 and "no weight files" in r.stderr
    # an identical "fine-tune" has nothing to extract
    r = cli("extract", llama_dir, "--base", llama_dir, "--rank", "2", "--out", out)
    assert r.exit_code == 1 and "nothing to extract" in r.stderr
    assert not out.exists()
    assert not list(tmp_path.glob(".p.portllm-tmp-*"))


def test_svd_core_validates_arguments(tmp_path, llama_dir, lowrank_ft_dir):
    ft, base = Resolved(str(lowrank_ft_dir), lowrank_ft_dir), Resolved(str(llama_dir), llama_dir)
    with pytest.raises(UsageError):
        extract_svd(ft, base, tmp_path / "p", energy=float("nan"))
    with pytest.raises(UsageError):
        extract_svd(ft, base, tmp_path / "p", rank=2, dtype="int8")
    assert not (tmp_path / "p").exists()


def test_svd_existing_out_needs_overwrite(tmp_path, llama_dir, lowrank_ft_dir):
    out = tmp_path / "p"
    out.mkdir()
    r = cli("extract", lowrank_ft_dir, "--base", llama_dir, "--rank", "3", "--out", out)
    assert r.exit_code == 1 and "already exists" in r.stderr
    assert list(out.iterdir()) == []
    r = cli("extract", lowrank_ft_dir, "--base", llama_dir, "--rank", "3", "--out", out, "--overwrite")
    assert r.exit_code == 0, r.stderr
    assert "Wrote" in r.stdout and "relative error" in r.stdout


def test_svd_rank_clamped_per_module_uses_rank_pattern(tmp_path, llama_dir, llama_evolved_dir):
    out = tmp_path / "p"
    res = extract_svd(
        Resolved(str(llama_evolved_dir), llama_evolved_dir), Resolved(str(llama_dir), llama_dir), out,
        rank=20, target_modules=["q_proj", "k_proj"],
    )
    # k_proj is 16 x 32: rank 20 is clamped to 16, which is exact
    k0, q0 = "model.layers.0.self_attn.k_proj", "model.layers.0.self_attn.q_proj"
    assert res.ranks[k0] == 16 and res.ranks[q0] == 20 and res.rank == 20
    assert res.per_module_error[k0] < 1e-5 and res.per_module_error[q0] > 1e-3
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["r"] == 20 and cfg["rank_pattern"] == {m: 16 for m in res.ranks if "k_proj" in m}
    ft = load_weights(llama_evolved_dir)
    merged = merged_weights(llama_dir, out)
    torch.testing.assert_close(merged[f"{k0}.weight"], ft[f"{k0}.weight"], rtol=0, atol=1e-5)


def test_adapter_factors_keep_their_dtype(tmp_path, llama_dir, llama_lora_dir):
    src = shutil.copytree(llama_lora_dir, tmp_path / "lora-bf16")
    t = {k: v.to(torch.bfloat16) for k, v in load_file(src / "adapter_model.safetensors").items()}
    save_file(t, src / "adapter_model.safetensors", metadata={"format": "pt"})
    calls = []
    extract_adapter(Resolved(str(src), src), tmp_path / "p", progress=lambda *a: calls.append(a))
    new = load_file(tmp_path / "p" / "adapter_model.safetensors")
    assert all(new[k].dtype == torch.bfloat16 and torch.equal(new[k], t[k]) for k in t)
    assert calls[-1] == ("extract", 1, 1)


def test_svd_reads_sharded_checkpoints(tmp_path, llama_dir, lowrank_ft_dir):
    import transformers as tf

    sharded = tmp_path / "ft-sharded"
    tf.AutoModelForCausalLM.from_pretrained(lowrank_ft_dir, dtype=torch.float32).save_pretrained(
        sharded, max_shard_size="40KB"
    )
    assert (sharded / "model.safetensors.index.json").exists()
    calls = []
    res = extract_svd(
        Resolved(str(sharded), sharded), Resolved(str(llama_dir), llama_dir), tmp_path / "p",
        rank=3, progress=lambda *a: calls.append(a),
    )
    assert set(res.ranks) == set(LOWRANK_MODULES) and res.relative_error < 1e-5
    assert calls[0] == ("extract", 0, 14) and calls[-1] == ("extract", 14, 14)
    ft, base = load_weights(lowrank_ft_dir), load_weights(llama_dir)
    patch = read_patch(tmp_path / "p")
    for m in LOWRANK_MODULES:
        torch.testing.assert_close(patch.modules[m].delta(), ft[f"{m}.weight"] - base[f"{m}.weight"], rtol=0, atol=1e-5)


def test_svd_extract_of_a_finetuned_model_on_the_hub(hub, lowrank_ft_dir, llama_dir, tmp_path):
    """`portllm extract user/full-finetune --base ...`: a Hub id is resolved by what it is (a model here)."""
    from huggingface_hub import HfApi

    HfApi().create_repo("alice/ft-full")
    HfApi().upload_folder(repo_id="alice/ft-full", folder_path=lowrank_ft_dir)
    r = cli("extract", "alice/ft-full", "--base", llama_dir, "--rank", "3", "--out", tmp_path / "hub.patch", "--json")
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout)["mode"] == "svd"
    r = cli("extract", lowrank_ft_dir, "--base", llama_dir, "--rank", "3", "--out", tmp_path / "local.patch")
    assert r.exit_code == 0, r.stderr
    got = load_file(tmp_path / "hub.patch" / "adapter_model.safetensors")
    want = load_file(tmp_path / "local.patch" / "adapter_model.safetensors")
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)
    finetuned = json.loads((tmp_path / "hub.patch" / "portllm.json").read_text())["source"]["finetuned"]
    assert finetuned["model"] == "alice/ft-full" and finetuned["revision"] == hub.head("alice/ft-full")
