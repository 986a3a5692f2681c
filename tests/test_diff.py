"""portllm diff: every figure checked against an independent dense numpy computation."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from portllm_cli.cli.app import app
from portllm_cli.core import diff as core
from portllm_cli.io.checkpoint import Checkpoint
from portllm_cli.io.safetensors import load_tensors
from portllm_cli.patch.format import LoraModule, adapter_config, build_manifest, read_patch, write_patch_files
from tests import tiny

runner = CliRunner()
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
PERTURBED = {  # tensor -> eps; E is a fixed random direction per tensor
    "model.layers.0.self_attn.q_proj.weight": 1e-2,
    "model.layers.1.mlp.down_proj.weight": 3e-3,
    "model.embed_tokens.weight": 5e-2,
}


def invoke(*args: str):
    return runner.invoke(app, ["diff", *map(str, args)])



def np64(t: torch.Tensor) -> np.ndarray:
    return t.to(torch.float64).numpy()


# -- model vs model ----------------------------------------------------------------------------
@pytest.fixture(scope="module", params=["float32", "bfloat16"])
def model_pair(request, llama_dir, tmp_path_factory) -> tuple[Path, Path]:
    """The tiny model (in float32, or cast to bfloat16) and a copy with PERTURBED moved by eps*E."""
    dtype = getattr(torch, request.param)
    sd = {k: v.to(dtype) for k, v in load_tensors(llama_dir / "model.safetensors").items()}
    root = tmp_path_factory.mktemp(f"pair-{request.param}")
    a = tiny.copy_model(llama_dir, root / "a", sd) if dtype != torch.float32 else llama_dir
    gen = torch.Generator().manual_seed(7)
    out = dict(sd)
    for name, eps in PERTURBED.items():
        out[name] = (sd[name].float() + eps * torch.randn(sd[name].shape, generator=gen)).to(dtype)
    return a, tiny.copy_model(llama_dir, root / "b", out)


def test_model_against_itself_is_identical(llama_dir):
    ckpt = Checkpoint.open(llama_dir)
    rep = core.diff_models(ckpt, Checkpoint.open(llama_dir))
    assert len(rep.tensors) == len(ckpt.names())
    for t in rep.tensors:
        assert t.dd == 0.0 and t.drift == 0.0
        assert t.cosine == pytest.approx(1.0, abs=1e-12)
    for g in rep.layers + rep.kinds + [rep.overall]:
        assert g.drift == 0.0 and g.cosine == pytest.approx(1.0, abs=1e-12)
    assert rep.verdict == "identical" and not rep.only_in_a and not rep.shape_mismatches


@pytest.mark.parametrize("chunk", [None, 37])  # 37 elements: every tensor read in many row blocks
def test_known_perturbation_figures(model_pair, monkeypatch, chunk):
    if chunk:
        monkeypatch.setattr(core, "CHUNK_ELEMENTS", chunk)
    a_dir, b_dir = model_pair
    rep = core.diff_models(Checkpoint.open(a_dir), Checkpoint.open(b_dir))
    A = {k: np64(v) for k, v in load_tensors(a_dir / "model.safetensors").items()}
    B = {k: np64(v) for k, v in load_tensors(b_dir / "model.safetensors").items()}

    def sums(names):
        aa = sum(float(np.sum(A[n] ** 2)) for n in names)
        bb = sum(float(np.sum(B[n] ** 2)) for n in names)
        ab = sum(float(np.sum(A[n] * B[n])) for n in names)
        dd = sum(float(np.sum((B[n] - A[n]) ** 2)) for n in names)
        return math.sqrt(dd / aa), ab / math.sqrt(aa * bb)

    by_name = {t.name: t for t in rep.tensors}
    assert set(by_name) == set(A)
    for name in A:
        drift, cos = sums([name])
        assert by_name[name].drift == pytest.approx(drift, abs=1e-6, rel=1e-6)
        assert by_name[name].cosine == pytest.approx(cos, abs=1e-6)
        if name not in PERTURBED:
            assert by_name[name].dd == 0.0
    for name, eps in PERTURBED.items():  # and the perturbation's own size, eps*||E||/||W||
        assert by_name[name].drift > 0.5 * eps * math.sqrt(A[name].size) / np.linalg.norm(A[name])
    for g in rep.layers:
        drift, cos = sums([n for n in A if f"layers.{g.name}." in n])
        assert g.drift == pytest.approx(drift, abs=1e-6) and g.cosine == pytest.approx(cos, abs=1e-6)
    kinds = {g.name: g for g in rep.kinds}
    assert kinds["mlp"].drift == pytest.approx(sums([n for n in A if ".mlp." in n])[0], abs=1e-6)
    assert kinds["q_proj"].drift == pytest.approx(sums([n for n in A if "q_proj" in n])[0], abs=1e-6)
    assert kinds["embeddings"].drift == pytest.approx(sums(["model.embed_tokens.weight"])[0], abs=1e-6)
    assert kinds["norms"].drift == 0.0 and kinds["lm_head"].drift == 0.0
    drift, cos = sums(list(A))
    assert rep.overall.drift == pytest.approx(drift, abs=1e-6) and rep.overall.cosine == pytest.approx(cos, abs=1e-6)
    assert rep.verdict == "drifted" and f"{drift * 100:.2f}%" in rep.verdict_text
    assert rep.largest(1)[0].name == "model.embed_tokens.weight"


def test_missing_extra_and_reshaped_tensors_are_findings(llama_dir, tmp_path):
    sd = load_tensors(llama_dir / "model.safetensors")
    sd.pop("lm_head.weight")
    sd["extra.bias"] = torch.ones(3)
    sd["model.layers.0.self_attn.q_proj.weight"] = torch.zeros(16, 32)
    other = tiny.copy_model(llama_dir, tmp_path / "m", sd)
    rep = core.diff_models(Checkpoint.open(llama_dir), Checkpoint.open(other))
    assert rep.only_in_a == ["lm_head.weight"] and rep.only_in_b == ["extra.bias"]
    assert [(s.name, s.shape_a, s.shape_b) for s in rep.shape_mismatches] == [
        ("model.layers.0.self_attn.q_proj.weight", (32, 32), (16, 32))
    ]
    assert rep.verdict == "drifted" and rep.overall.drift == 0.0
    assert "1 tensor only in A" in rep.verdict_text and "1 shape mismatch" in rep.verdict_text


def test_different_architectures_are_a_finding(llama_dir, tmp_path):
    tiny.make_model(tmp_path / "gemma", arch="gemma", seed=0, tokenizer_from=llama_dir)
    res = invoke(llama_dir, tmp_path / "gemma", "--json")
    assert res.exit_code == 0, res.stderr
    doc = json.loads(res.stdout)
    assert doc["kind"] == "model-model" and doc["verdict"] == "different architectures"
    assert doc["architecture_differences"]["model_type"] == ["llama", "gemma3_text"]
    assert "lm_head.weight" in doc["only_in_a"]


# -- patch vs patch ------------------------------------------------------------------------------
def rotated_pair(n: int, angles_deg: list[float], gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Two n x r bases whose principal angles are exactly `angles_deg`, in a random frame."""
    r = len(angles_deg)
    frame, _ = torch.linalg.qr(torch.randn(n, 2 * r, generator=gen, dtype=torch.float64))
    x = frame[:, :r]
    th = torch.tensor([math.radians(a) for a in angles_deg], dtype=torch.float64)
    y = frame[:, :r] * torch.cos(th) + frame[:, r:] * torch.sin(th)
    return x, y


def mixed(basis: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """The same column space, hidden behind a random invertible r x r mix."""
    r = basis.shape[1]
    return basis @ (torch.randn(r, r, generator=gen, dtype=torch.float64) + 3 * torch.eye(r, dtype=torch.float64))


def test_principal_angles_of_known_subspaces():
    gen = torch.Generator().manual_seed(0)
    col, row = [10.0, 35.0, 70.0], [5.0, 50.0, 80.0]
    xa, xb = rotated_pair(20, col, gen)
    ya, yb = rotated_pair(24, row, gen)
    ma = LoraModule("model.layers.0.self_attn.q_proj", mixed(ya, gen).T, mixed(xa, gen), alpha=6.0)
    mb = LoraModule("model.layers.0.self_attn.q_proj", mixed(yb, gen).T, mixed(xb, gen), alpha=6.0)
    d = core.diff_lora_modules(ma, mb)
    assert d.column_angles == pytest.approx(col, abs=1e-6)
    assert d.row_angles == pytest.approx(row, abs=1e-6)
    same = core.diff_lora_modules(ma, ma)
    assert same.column_angles == pytest.approx([0, 0, 0], abs=1e-5) and same.residual == pytest.approx(0, abs=1e-12)
    assert same.cosine == pytest.approx(1.0)


def _dense(m: LoraModule) -> np.ndarray:
    """The delta in the model weight's layout, in float64."""
    d = m.scale * (np64(m.B) @ np64(m.A))
    return d.T if m.kind == "embedding" or m.fan_in_fan_out else d


def _angles(x: np.ndarray, y: np.ndarray, rx: int, ry: int) -> list[float]:
    """Principal angles between the rank-rx and rank-ry column spaces of two dense matrices."""
    ux = np.linalg.svd(x, full_matrices=False)[0][:, :rx]
    uy = np.linalg.svd(y, full_matrices=False)[0][:, :ry]
    s = np.clip(np.linalg.svd(ux.T @ uy, compute_uv=False), -1, 1)
    return sorted(math.degrees(math.acos(v)) for v in s)


@pytest.mark.parametrize(
    "ra, rb, rslora, kind",
    [(4, 4, False, "linear"), (3, 6, True, "linear"), (2, 5, False, "embedding")],
)
def test_lowrank_figures_match_dense(ra, rb, rslora, kind):
    gen = torch.Generator().manual_seed(ra * 10 + rb)
    out_dim, in_dim = 12, 9

    def module(r, alpha):
        return LoraModule("m", torch.randn(r, in_dim, generator=gen), torch.randn(out_dim, r, generator=gen),
                          alpha=alpha, use_rslora=rslora, kind=kind)

    ma, mb = module(ra, 8.0), module(rb, 3.0)
    d = core.diff_lora_modules(ma, mb)
    Da, Db = _dense(ma), _dense(mb)
    na, nb = np.linalg.norm(Da), np.linalg.norm(Db)
    assert d.residual == pytest.approx(np.linalg.norm(Db - Da) / na, rel=1e-9)
    assert d.cosine == pytest.approx(float(np.sum(Da * Db)) / (na * nb), abs=1e-9)
    assert d.norm_ratio == pytest.approx(nb / na, rel=1e-9)
    assert len(d.column_angles) == min(ra, rb)
    assert d.column_angles == pytest.approx(_angles(Da, Db, ra, rb), abs=1e-5)
    assert d.row_angles == pytest.approx(_angles(Da.T, Db.T, ra, rb), abs=1e-5)
    # a near-copy: the residual keeps its digits (QR of the stacked factors, not a Gram difference)
    mc = LoraModule("m", ma.A.double() * (1 + 1e-9), ma.B.double(), alpha=8.0, use_rslora=rslora, kind=kind)
    assert core.diff_lora_modules(ma, mc).residual == pytest.approx(1e-9, rel=1e-4)


def write_patch(out: Path, modules: dict[str, LoraModule], base: str = "unknown/base") -> Path:
    from portllm_cli.patch.format import patch_tensors

    r = next(iter(modules.values())).rank
    cfg = adapter_config(base_model=base, rank=r, alpha=next(iter(modules.values())).alpha,
                         target_modules=sorted({n.rsplit(".", 1)[-1] for n in modules}))
    manifest = build_manifest(base={"model": base}, lora={"r": r}, source={"kind": "test"})
    tensors = {k: v.to(torch.float32).contiguous() for k, v in patch_tensors(modules).items()}
    write_patch_files(out, tensors, cfg, manifest)
    return out


def test_patch_vs_patch_cli_uses_factors_only(tmp_path, monkeypatch):
    gen = torch.Generator().manual_seed(1)
    names = ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.v_proj", "model.layers.1.mlp.up_proj"]

    def mods(which):
        return {n: LoraModule(n, torch.randn(4, 32, generator=gen), torch.randn(16, 4, generator=gen), alpha=8.0)
                for n in which}

    pa = write_patch(tmp_path / "a", mods(names[:2]))
    pb = write_patch(tmp_path / "b", mods([names[0], names[1], names[2]]))
    monkeypatch.setattr(LoraModule, "delta", lambda *a, **k: pytest.fail("dense delta formed"))
    res = invoke(pa, pb, "--json", "--top", "1")
    assert res.exit_code == 0, res.stderr
    doc = json.loads(res.stdout)
    assert doc["kind"] == "patch-patch" and doc["verdict"] == "compatible"
    assert doc["only_in_b"] == [names[2]] and doc["only_in_a"] == []
    A, B = read_patch(pa), read_patch(pb)
    dense = {n: (_dense(A.modules[n]), _dense(B.modules[n])) for n in names[:2]}
    rows = {m["module"]: m for m in doc["modules"]}
    for n, (da, db) in dense.items():
        assert rows[n]["residual"] == pytest.approx(np.linalg.norm(db - da) / np.linalg.norm(da), rel=1e-6)
        assert len(rows[n]["column_angles_deg"]) == 4
    tot = math.sqrt(sum(np.linalg.norm(db - da) ** 2 for da, db in dense.values()) /
                    sum(np.linalg.norm(da) ** 2 for da, _ in dense.values()))
    assert doc["overall"]["residual"] == pytest.approx(tot, rel=1e-6)
    worst = max(rows.values(), key=lambda m: m["residual"])["module"]
    assert doc["top"] == [worst]
    same = invoke(pa, pa)
    assert same.exit_code == 0 and same.stdout.startswith("identical")


# -- patch vs model ------------------------------------------------------------------------------
def test_patch_vs_evolved_model_reports_drift_from_base(llama_dir, llama_evolved_dir, llama_lora_dir):
    res = invoke(llama_lora_dir, llama_evolved_dir, "--json")
    assert res.exit_code == 0, res.stderr
    doc = json.loads(res.stdout)
    assert doc["kind"] == "patch-model" and doc["verdict"] == "compatible"
    assert Path(doc["base"]["path"]) == llama_dir  # base_model_name_or_path of the adapter
    A = load_tensors(llama_dir / "model.safetensors")
    B = load_tensors(llama_evolved_dir / "model.safetensors")
    rows = {t["name"]: t for t in doc["base_drift"]["tensors"]}
    assert set(rows) == set(doc["targeted"].values()) and len(rows) == 4
    for name, row in rows.items():
        a, b = np64(A[name]), np64(B[name])
        assert row["drift"] == pytest.approx(np.linalg.norm(b - a) / np.linalg.norm(a), abs=1e-6)
        assert row["drift_over_patch"] > 0
    flipped = invoke(llama_evolved_dir, llama_lora_dir, "--json")
    assert flipped.exit_code == 0 and json.loads(flipped.stdout)["kind"] == "model-patch"


def test_patch_vs_incompatible_model_exits_3(llama_dir, llama_lora_dir, tmp_path):
    sd = load_tensors(llama_dir / "model.safetensors")
    sd["model.layers.0.self_attn.q_proj.weight"] = torch.zeros(16, 32)
    other = tiny.copy_model(llama_dir, tmp_path / "m", sd)
    res = invoke(llama_lora_dir, other, "--json")
    assert res.exit_code == 3
    doc = json.loads(res.stdout)  # the report is printed before the exit
    assert doc["verdict"] == "incompatible"
    assert any("q_proj" in e and "(16, 32)" in e for e in doc["compatibility"]["errors"])
    human = invoke(llama_lora_dir, other)
    assert human.exit_code == 3 and human.stdout.startswith("incompatible:")


# -- output and bad input ------------------------------------------------------------------------
def test_plot_is_a_valid_png(llama_dir, llama_evolved_dir, tmp_path):
    import matplotlib.image

    png = tmp_path / "drift.png"
    res = invoke(llama_dir, llama_evolved_dir, "--plot", png, "--json")
    assert res.exit_code == 0, res.stderr
    assert json.loads(res.stdout)["out"] == str(png)  # the key was "plot" before one scheme for all commands
    assert png.read_bytes()[:8] == PNG_MAGIC
    img = matplotlib.image.imread(png)
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100
    assert sorted(p.name for p in tmp_path.iterdir()) == ["drift.png"]  # no temporary left behind
    bad = invoke(llama_dir, llama_evolved_dir, "--plot", tmp_path / "drift.jpg")
    assert bad.exit_code == 2 and "Error:" in bad.stderr


def test_human_output_and_top(llama_dir, llama_evolved_dir):
    res = invoke(llama_dir, llama_evolved_dir, "--top", "3")
    assert res.exit_code == 0
    assert res.stdout.startswith("drifted by ") and res.stdout.count("\n") == 1
    full = json.loads(invoke(llama_dir, llama_evolved_dir, "--json", "--top", "3").stdout)
    assert len(full["top"]) == 3 and len(full["tensors"]) == 21  # JSON keeps every figure
    drifts = [t["drift"] for t in full["tensors"]]
    assert drifts == sorted(drifts, reverse=True) and full["top"] == [t["name"] for t in full["tensors"][:3]]
    assert {k["name"] for k in full["kinds"]} >= {"q_proj", "k_proj", "v_proj", "o_proj", "mlp", "norms"}
    assert [layer["layer"] for layer in full["layers"]] == [0, 1]


def test_a_dir_that_is_neither(llama_dir, tmp_path):
    (tmp_path / "notes.txt").write_text("hi")
    (tmp_path / "sub").mkdir()
    res = invoke(llama_dir, tmp_path)
    assert res.exit_code == 1
    assert res.stderr.startswith("Error:") and "neither a model" in res.stderr and "notes.txt, sub/" in res.stderr
    missing = invoke(llama_dir, tmp_path / "nope")
    assert missing.exit_code == 1 and "no such model or patch directory" in missing.stderr


def test_truncated_safetensors_is_one_error_line(llama_dir, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(llama_dir, broken)
    f = broken / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    res = invoke(llama_dir, broken)
    assert res.exit_code in (1, 4)
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert [ln for ln in lines if not ln.startswith("Hint:")] == [lines[0]] and lines[0].startswith("Error:")
    assert "truncated" in lines[0] and "Traceback" not in res.stderr


def test_sharded_and_pickle_copies_are_identical(llama_dir, tmp_path):
    tiny.make_model(tmp_path / "sharded", seed=0, max_shard_size="20KB", tokenizer_from=llama_dir)
    assert len(list((tmp_path / "sharded").glob("*.safetensors"))) > 1
    res = invoke(llama_dir, tmp_path / "sharded", "--json")
    assert res.exit_code == 0 and json.loads(res.stdout)["verdict"] == "identical"
    pkl = tmp_path / "pickle"
    pkl.mkdir()
    shutil.copy(llama_dir / "config.json", pkl / "config.json")
    torch.save(load_tensors(llama_dir / "model.safetensors"), pkl / "pytorch_model.bin")
    refused = invoke(llama_dir, pkl)
    assert refused.exit_code == 1 and "--allow-pickle" in refused.stderr
    res = invoke(pkl, llama_dir, "--json", "--allow-pickle")
    assert res.exit_code == 0 and json.loads(res.stdout)["verdict"] == "identical"


def test_transposed_layouts_compare_in_weight_layout():
    """An embedding-style module (delta = (BA)^T) against a plain one holding the same weight delta."""
    gen = torch.Generator().manual_seed(5)
    A, B = torch.randn(3, 10, generator=gen), torch.randn(6, 3, generator=gen)
    emb = LoraModule("model.embed_tokens", A, B, alpha=3.0, kind="embedding")  # weight (10, 6)
    lin = LoraModule("model.embed_tokens", B.T.contiguous(), A.T.contiguous(), alpha=3.0)  # same delta
    assert emb.weight_shape == lin.weight_shape == (10, 6)
    d = core.diff_lora_modules(emb, lin)
    assert d.residual == pytest.approx(0.0, abs=1e-12) and d.cosine == pytest.approx(1.0)
    assert d.column_angles == pytest.approx([0, 0, 0], abs=1e-5)
    np.testing.assert_allclose(emb.delta().double().numpy(), lin.delta().double().numpy(), atol=1e-5)


def test_patch_whose_base_cannot_be_found(llama_dir, tmp_path):
    gen = torch.Generator().manual_seed(2)
    name = "model.layers.1.self_attn.v_proj"
    patch = write_patch(tmp_path / "p", {name: LoraModule(name, torch.randn(4, 32, generator=gen),
                                                          torch.randn(16, 4, generator=gen), alpha=8.0)},
                        base=str(tmp_path / "gone"))
    res = invoke(llama_dir, patch, "--json")
    assert res.exit_code == 0, res.stderr
    doc = json.loads(res.stdout)
    assert doc["kind"] == "model-patch" and doc["verdict"] == "compatible"
    assert doc["base_drift"] is None and doc["base"]["path"] is None and "gone" in doc["base"]["note"]
    assert doc["targeted"] == {name: name + ".weight"}
    plot = invoke(patch, llama_dir, "--plot", tmp_path / "x.png")
    assert plot.exit_code == 1 and "base model was not found" in plot.stderr
    assert not (tmp_path / "x.png").exists()


def test_tampered_patch_exit_4_unless_no_verify(tmp_path):
    gen = torch.Generator().manual_seed(3)
    name = "model.layers.0.self_attn.q_proj"
    mod = LoraModule(name, torch.randn(2, 8, generator=gen), torch.randn(8, 2, generator=gen), alpha=2.0)
    pa = write_patch(tmp_path / "a", {name: mod})
    pb = tmp_path / "b"
    shutil.copytree(pa, pb)
    w = pb / "adapter_model.safetensors"
    raw = bytearray(w.read_bytes())
    raw[-4:] = np.float32(0.5).tobytes()  # one factor entry changed, layout intact
    w.write_bytes(bytes(raw))
    res = invoke(pa, pb)
    assert res.exit_code == 4 and res.stderr.startswith("Error:") and "sha256" in res.stderr
    res = invoke(pa, pb, "--no-verify", "--json")
    assert res.exit_code == 0 and json.loads(res.stdout)["verdict"] == "compatible"
    assert json.loads(res.stdout)["overall"]["residual"] > 0


def test_hub_patch_against_a_local_model(hub, llama_dir, llama_evolved_dir, llama_lora_dir):
    """`portllm diff user/patch-repo ./model`: the Hub id is resolved by what it is (a patch here)."""
    from huggingface_hub import HfApi

    HfApi().create_repo("alice/diff-patch")
    HfApi().upload_folder(repo_id="alice/diff-patch", folder_path=llama_lora_dir)
    res = invoke("alice/diff-patch", llama_evolved_dir, "--json")
    assert res.exit_code == 0, res.stderr
    doc = json.loads(res.stdout)
    local = json.loads(invoke(llama_lora_dir, llama_evolved_dir, "--json").stdout)
    assert doc["kind"] == "patch-model" and doc["verdict"] == "compatible"
    assert doc["a"].startswith("alice/diff-patch@") and doc["targeted"] == local["targeted"]
    # a model on the Hub against a local one: a model-model diff with the local figures
    HfApi().create_repo("alice/diff-model")
    HfApi().upload_folder(repo_id="alice/diff-model", folder_path=llama_dir)
    res = invoke(llama_evolved_dir, "alice/diff-model", "--json")
    assert res.exit_code == 0, res.stderr
    doc = json.loads(res.stdout)
    local = json.loads(invoke(llama_evolved_dir, llama_dir, "--json").stdout)
    assert doc["kind"] == "model-model" and doc["overall"] == local["overall"]
