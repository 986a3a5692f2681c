"""portllm diff PATCH NEW --base OLD: the patch against the drift, checked against a dense computation.

The reference here forms everything densely in float64 with torch: D = W_new - W_old, the delta
s * B @ A, and torch.linalg.svd of D for its top-r singular subspaces; the code under test streams
row blocks, never forms s*B@A, and finds the subspaces by randomized subspace iteration.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from portllm_cli.cli.app import app
from portllm_cli.core import diff as core
from portllm_cli.io.safetensors import load_tensors
from portllm_cli.patch.format import read_patch
from tests import tiny

runner = CliRunner()
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"



def lowrank_drift(w: torch.Tensor, gen: torch.Generator, sigmas=(1.0, 0.8, 0.6, 0.5, 0.4, 0.3), noise=1e-4):
    """A drift with a clear top spectrum: sum_i sigma_i u_i v_i^T (times 0.1 ||W||) plus small noise."""
    out, inn = w.shape
    u = torch.linalg.qr(torch.randn(out, len(sigmas), generator=gen, dtype=torch.float64)).Q
    v = torch.linalg.qr(torch.randn(inn, len(sigmas), generator=gen, dtype=torch.float64)).Q
    d = (u * (torch.tensor(sigmas, dtype=torch.float64) * 0.1 * float(w.double().norm()))) @ v.T
    return d + noise * torch.randn(out, inn, generator=gen, dtype=torch.float64)


@pytest.fixture(scope="module")
def setup(llama_dir, tmp_path_factory):
    """base, a flat-spectrum evolved model (random noise), a low-rank-drift one, and two patches."""
    root = tmp_path_factory.mktemp("drift")
    sd = load_tensors(llama_dir / "model.safetensors")
    gen = torch.Generator().manual_seed(11)
    lowrank = {k: (v.double() + lowrank_drift(v, gen)).to(v.dtype) if v.dim() == 2 and ("proj" in k or "embed" in k) else v
               for k, v in sd.items()}
    noisy = {k: (v.double() + 0.03 * v.double().std() * torch.randn(v.shape, generator=gen, dtype=torch.float64)
                 ).to(v.dtype) for k, v in sd.items()}
    lora = root / "lora"
    tiny.make_lora(llama_dir, lora, targets=("q_proj", "v_proj", "down_proj"), rank=4, alpha=8.0, seed=5,
                   rank_pattern={"down_proj": 2}, alpha_pattern={"down_proj": 3.0})
    emb = root / "lora-emb"
    tiny.make_lora(llama_dir, emb, targets=("embed_tokens", "o_proj"), rank=3, alpha=6.0, seed=6)
    return {
        "base": llama_dir,
        "lowrank": tiny.copy_model(llama_dir, root / "lowrank", lowrank),
        "noisy": tiny.copy_model(llama_dir, root / "noisy", noisy),
        "lora": lora,
        "lora-emb": emb,
    }


def dense_reference(patch_dir: Path, base: Path, new: Path) -> dict[str, dict[str, float]]:
    """Every figure per module, dense: explicit s*B@A, D, torch.linalg.svd(D)."""
    patch = read_patch(patch_dir, verify=False)
    wa = load_tensors(base / "model.safetensors")
    wb = load_tensors(new / "model.safetensors")
    out = {}
    for name, m in patch.modules.items():
        key = f"{name}.weight"
        a, b = wa[key].double(), wb[key].double()
        d = b - a
        delta = m.scale * (m.B.double() @ m.A.double())
        if m.kind == "embedding":
            delta = delta.T
        r = m.rank
        U, S, Vh = torch.linalg.svd(d)
        Ud, _, Vhd = torch.linalg.svd(delta)  # delta has rank r: its first r singular vectors span it
        qb, qa = Ud[:, :r], Vhd[:r].T
        out[name] = {
            "drift": float(d.norm() / a.norm()),
            "patch_over_drift": float(delta.norm() / d.norm()),
            "cosine": float((delta * d).sum() / (delta.norm() * d.norm())),
            "column_overlap": float(((qb.T @ U[:, :r]) ** 2).sum()) / r,
            "row_overlap": float(((qa.T @ Vh[:r].T) ** 2).sum()) / r,
            "drift_top_r_energy": float((S[:r] ** 2).sum() / (d.norm() ** 2)),
            "dd": float((d * d).sum()), "aa": float((a * a).sum()), "pp": float((delta * delta).sum()),
            "pd": float((delta * d).sum()),
        }
    return out


def run_diff(patch, new, base, **kw):
    return core.diff_paths(str(patch), str(new), base=str(base), verify=False, **kw).result


@pytest.mark.parametrize("chunk", [None, 37])  # 37 elements: every weight read in many row blocks
@pytest.mark.parametrize("which", ["lora", "lora-emb"])
def test_figures_match_dense_computation(setup, monkeypatch, chunk, which):
    if chunk:
        monkeypatch.setattr(core, "CHUNK_ELEMENTS", chunk)
    res = run_diff(setup[which], setup["lowrank"], setup["base"])
    ref = dense_reference(setup[which], setup["base"], setup["lowrank"])
    assert res.port is not None and {m.module for m in res.port.modules} == set(ref)
    for m in res.port.modules:
        want, got = ref[m.module], m.as_dict()
        for fig in ("drift", "patch_over_drift", "cosine"):
            assert got[fig] == pytest.approx(want[fig], rel=1e-9, abs=1e-12), (m.module, fig)
        # the drift's top spectrum is clear: the randomized subspaces agree with the dense SVD's
        for fig in ("column_overlap", "row_overlap", "drift_top_r_energy"):
            assert got[fig] == pytest.approx(want[fig], abs=1e-6), (m.module, fig)
    # pooled from sums, checked against the dense sums
    tot = {k: sum(r[k] for r in ref.values()) for k in ("aa", "dd", "pp", "pd")}
    ov = res.port.overall
    assert ov["drift"] == pytest.approx((tot["dd"] / tot["aa"]) ** 0.5, rel=1e-9)
    assert ov["patch_over_drift"] == pytest.approx((tot["pp"] / tot["dd"]) ** 0.5, rel=1e-9)
    assert ov["cosine"] == pytest.approx(tot["pd"] / (tot["pp"] * tot["dd"]) ** 0.5, rel=1e-9, abs=1e-12)
    ranks = {name: m.rank for name, m in read_patch(setup[which], verify=False).modules.items()}
    col = sum(ref[n]["column_overlap"] * ranks[n] for n in ref) / sum(ranks.values())
    assert ov["column_overlap"] == pytest.approx(col, abs=1e-6)
    # the plain drift figures of the same reads equal diff_models' (one computation, two callers)
    from portllm_cli.io.checkpoint import Checkpoint

    md = core.diff_models(Checkpoint.open(setup["base"]), Checkpoint.open(setup["lowrank"]),
                          names=[(t.name, t.name) for t in res.drift.tensors])
    for t1, t2 in zip(res.drift.tensors, md.tensors):
        assert t1.name == t2.name and t1.drift == pytest.approx(t2.drift, rel=1e-12)


def test_rank_pattern_sets_the_top_r(setup):
    res = run_diff(setup["lora"], setup["lowrank"], setup["base"])
    by = {m.module: m for m in res.port.modules}
    assert by["model.layers.0.mlp.down_proj"].rank == 2 and len(by["model.layers.0.mlp.down_proj"].singular_values) == 2
    assert by["model.layers.0.self_attn.q_proj"].rank == 4


def test_flat_spectrum_exact_when_the_sketch_holds_all_of_d(setup, monkeypatch):
    """A noise drift has no clear top-r subspace; with oversampling past the matrix's width the
    streamed SVD is exact and every figure equals the dense one."""
    monkeypatch.setattr(core, "OVERSAMPLE", 200)
    res = run_diff(setup["lora"], setup["noisy"], setup["base"])
    ref = dense_reference(setup["lora"], setup["base"], setup["noisy"])
    for m in res.port.modules:
        assert m.exact
        for fig in ("column_overlap", "row_overlap", "drift_top_r_energy", "cosine"):
            assert m.as_dict()[fig] == pytest.approx(ref[m.module][fig], abs=1e-9), (m.module, fig)


def test_randomized_singular_values_on_a_flat_spectrum_are_close(setup):
    """Default sketch on a noise drift: not exact, but the top singular values are within a few %."""
    res = run_diff(setup["lora"], setup["noisy"], setup["base"])
    wa, wb = load_tensors(setup["base"] / "model.safetensors"), load_tensors(setup["noisy"] / "model.safetensors")
    for m in res.port.modules:
        s = torch.linalg.svdvals(wb[m.key].double() - wa[m.key].double())[: m.rank]
        assert not m.exact or m.shape[1] <= m.rank + core.OVERSAMPLE
        for got, want in zip(m.singular_values, s.tolist()):
            assert want * 0.85 <= got <= want * (1 + 1e-9)  # a sketch never overshoots


def test_model_is_its_own_base_gives_no_overlaps(setup):
    res = run_diff(setup["lora"], setup["base"], setup["base"])
    ov = res.port.overall
    assert ov["drift"] == 0.0 and ov["cosine"] is None and ov["column_overlap"] is None
    assert all(m.singular_values == [] for m in res.port.modules)


def test_base_from_the_manifest(setup, tmp_path):
    """Without --base the patch's recorded base (adapter config here) is used: the same figures."""
    res = core.diff_paths(str(setup["lora"]), str(setup["lowrank"]), verify=False).result
    given = run_diff(setup["lora"], setup["lowrank"], setup["base"])
    assert res.port is not None
    assert json.dumps(res.port.as_dict()) == json.dumps(given.port.as_dict())


def test_cli_json_table_and_plot(setup, tmp_path):
    png = tmp_path / "d.png"
    r = runner.invoke(app, ["diff", str(setup["lora"]), str(setup["lowrank"]), "--base", str(setup["base"]),
                            "--json", "--plot", str(png)])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    pf = doc["port_figures"]
    assert set(pf) == {"method", "overall", "layers", "kinds", "modules"}
    assert pf["method"]["power_iterations"] == core.POWER_ITERATIONS
    assert [g["layer"] for g in pf["layers"]] == [0, 1]
    assert {g["name"] for g in pf["kinds"]} == {"q_proj", "v_proj", "mlp"}
    assert len(pf["modules"]) == 6 and doc["base"]["path"] == str(setup["base"])
    assert png.read_bytes().startswith(PNG_MAGIC)
    # the human output: the figures table on stderr, the verdict (with the pooled figures) on stdout
    r = runner.invoke(app, ["diff", str(setup["lora"]), str(setup["lowrank"]), "--base", str(setup["base"])])
    assert r.exit_code == 0, r.output
    assert "patch/drift" in r.stdout and "column overlap" in r.stdout
    assert "the patch sBA against the drift" in r.stderr


@pytest.mark.parametrize("args", [
    lambda s: [str(s["base"]), str(s["lowrank"]), "--base", str(s["base"])],  # two models
    lambda s: [str(s["lora"]), str(s["lora-emb"]), "--base", str(s["base"])],  # two patches
    lambda s: [str(s["lora"]), str(s["lowrank"]), "--base", str(s["lora-emb"])],  # a patch as --base
])
def test_base_refusals_are_usage_errors(setup, args, tmp_path):
    png = tmp_path / "never.png"
    r = runner.invoke(app, ["diff", *args(setup), "--plot", str(png)])
    assert r.exit_code == 2, r.output
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("Error:")]
    assert len(lines) == 1 and "--base" in lines[0]
    assert r.stdout == "" and not png.exists()


def test_missing_base_is_exit_1(setup, tmp_path):
    r = runner.invoke(app, ["diff", str(setup["lora"]), str(setup["lowrank"]), "--base", str(tmp_path / "nope")])
    assert r.exit_code == 1 and r.stderr.startswith("Error:") and r.stdout == ""
