"""The drift experiment of benchmarks/paper_table.py (``--experiment drift``): which `portllm diff`
figure predicts how much of a patch survives a port, and does `port --calibrate` keep more of it?

Several evolutions of one base model, of increasing drift (continued pretraining on the Python docs
at the small table's setting, on the same corpus with 4x the steps and 2x the learning rate, and on
another kind of text, Jane Austen's novels), times several seeds. Per (evolution, seed) run:

    evolved, zero-shot | plain port (the base's patch at scale 1) |
    calibrated port (the scale `port --calibrate` chooses on held-out labelled examples) |
    evolved + a LoRA retrained on it

and the drift figures of `portllm diff PATCH EVOLVED --base BASE` (patch/drift ratio, cosine,
subspace overlaps, drift). Per evolution the share of the retrained gain each port keeps,
(acc - acc_evolved) / (acc_retrained - acc_evolved), mean +- sd over seeds; across all runs the
Spearman rank correlation of each diff figure with the plain port's share, and a least-squares line
of the share on each figure (the raw material for a forecast; none is printed here).

The three data sets are disjoint by text: LoRA training rows, calibration rows (the first rows of
the training pool after those used to train) and test rows (the held-out split). Every step is
portllm's own code: core.train (finetune, continued pretraining), core.calibrate (calibrate_loaded,
ScaledPatch: the merge `port` writes, applied in memory), core.evaluate (score_loaded: lm-eval on
the live model) and core.diff (diff_paths). The evolved model is loaded once per run for the
calibration and the four evaluations.

Results are cached per stage and per run under --workdir (a finished run is one JSON file), so an
interrupted experiment resumes where it stopped; a finished run's evolved model is deleted unless
--keep-models (the run's JSON holds everything the table needs).
"""

from __future__ import annotations

import json
import math
import random
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

from bench_common import cached_json, log, markdown_end

SCALES: dict[str, dict[str, Any]] = {
    # sized for an idle 2-core CPU: about 2 hours for 3 seeds (measured: benchmarks/results/paper_table-drift-small-cpu.md)
    "small": dict(
        train=480, calibration=200, test=1000, corpus_bytes=400_000, cpt_batch=4, cpt_seq=128,
        lora_epochs=1, lora_batch=8, lora_max_length=64, lora_lr=1e-3, eval_batch=16,
        evolutions=[
            {"name": "docs", "corpus": "corpus", "steps": 12, "lr": 2e-4},  # the small table's evolution
            {"name": "docs-4x", "corpus": "corpus", "steps": 48, "lr": 4e-4},  # the same text, moved further
            {"name": "fiction", "corpus": "other", "steps": 48, "lr": 4e-4},  # another kind of text
        ],
    ),
    # the whole pipeline in minutes (tiny models in the tests, or SmolLM2 to check the wiring)
    "smoke": dict(
        train=16, calibration=16, test=16, corpus_bytes=20_000, cpt_batch=2, cpt_seq=32,
        lora_epochs=1, lora_batch=8, lora_max_length=64, lora_lr=1e-3, eval_batch=16,
        evolutions=[
            {"name": "docs", "corpus": "corpus", "steps": 1, "lr": 2e-4},
            {"name": "docs-4x", "corpus": "corpus", "steps": 3, "lr": 4e-4},
            {"name": "fiction", "corpus": "other", "steps": 3, "lr": 4e-4},
        ],
    ),
}
LORA = dict(rank=8, alpha=16.0, dropout=0.1, target_modules=("q_proj", "v_proj"))
FIGURES = [  # (key in a run's "figures", label)
    ("model_drift", "drift of the whole model ‖W_new − W_old‖/‖W_old‖"),
    ("drift", "drift of the patched weights"),
    ("patch_over_drift", "‖sBA‖ / ‖D‖ (patch to drift)"),
    ("cosine", "cosine(sBA, D)"),
    ("column_overlap", "overlap of B's columns with D's top-r"),
    ("row_overlap", "overlap of A's rows with D's top-r"),
    ("drift_top_r_energy", "share of ‖D‖² in its top r"),
]
ACC_ROWS = [
    ("base", "base, zero-shot"),
    ("base+patch", "base + its LoRA patch"),
    ("evolved", "evolved, zero-shot"),
    ("plain", "evolved + the base's patch, plain port (scale 1)"),
    ("calibrated", "evolved + the base's patch, calibrated port"),
    ("retrained", "evolved + a LoRA retrained on it"),
]


# -- data -------------------------------------------------------------------------------------
def _write_rows(path: Path, rows: list[tuple[str, int]]) -> Path:
    tmp = path.with_name(path.name + ".part")
    tmp.write_text("".join(json.dumps({"sentence": t, "label": y}, ensure_ascii=False) + "\n" for t, y in rows),
                   encoding="utf-8")
    tmp.replace(path)
    return path


def read_text_label_jsonl(path: Path) -> list[tuple[str, int]]:
    """``{"text": ..., "label": ...}`` rows (``sentence`` also accepted; labels 0/1 or negative/positive)."""
    rows = []
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        doc = json.loads(line)
        text = doc.get("text", doc.get("sentence"))
        label = doc.get("label")
        if not isinstance(text, str) or not text.strip():
            raise SystemExit(f"{path}: line {n} has no 'text'")
        if isinstance(label, str) and label.strip().lower() in ("negative", "positive"):
            label = ("negative", "positive").index(label.strip().lower())
        if label not in (0, 1) or isinstance(label, bool):
            raise SystemExit(f"{path}: line {n}: label {label!r} is not 0/1 or negative/positive")
        rows.append((text.strip(), int(label)))
    return rows


def split_three(train_pool: list[tuple[str, int]], test_pool: list[tuple[str, int]], n_train: int, n_cal: int,
                n_test: int) -> tuple[list, list, list]:
    """train = the first n_train of the training pool, calibration = the next n_cal rows whose text
    is in neither train nor test, test = the first n_test of the test pool: disjoint by text."""
    test = test_pool[:n_test]
    train = train_pool[:n_train]
    seen = {t for t, _ in test} | {t for t, _ in train}
    cal = []
    for t, y in train_pool[n_train:]:
        if len(cal) == n_cal:
            break
        if t not in seen:
            cal.append((t, y))
            seen.add(t)
    train_texts = {t for t, _ in train}
    if len(train) < n_train or len(cal) < n_cal or len(test) < n_test or train_texts & {t for t, _ in test}:
        raise SystemExit(f"not enough distinct rows for {n_train} train / {n_cal} calibration / {n_test} test "
                         f"(got {len(train)} / {len(cal)} / {len(test)}, train and test sharing "
                         f"{len(train_texts & {t for t, _ in test})} texts)")
    return train, cal, test


def task_splits(work: Path, sc: dict[str, Any], task_data: Path | None, notify: Any) -> dict[str, Any]:
    """train / calibration / test JSONL files (sst2 recipe fields) and their provenance."""
    if task_data is not None:
        rows = list(dict.fromkeys(read_text_label_jsonl(task_data)))  # exact duplicates once
        random.Random(0).shuffle(rows)
        n_test = sc["test"]
        train, cal, test = split_three(rows[n_test:], rows[:n_test], sc["train"], sc["calibration"], n_test)
        source = {"task_data": str(Path(task_data).resolve())}
    else:
        from portllm_cli.demo import material

        pol = material.polarity_data(notify, n_test=1000, seed=0)

        def read(p: Path) -> list[tuple[str, int]]:
            return [(d["sentence"], int(d["label"])) for d in map(json.loads, p.read_text().splitlines()) if d]

        train, cal, test = split_three(read(pol.train), read(pol.test), sc["train"], sc["calibration"], sc["test"])
        source = {"task_data": "Pang & Lee sentence polarity v1.0 (portllm demo material, split seed 0)"}
    d = work / "data"
    d.mkdir(parents=True, exist_ok=True)
    tag = f"{sc['train']}-{sc['calibration']}-{sc['test']}"
    return {
        "train": str(_write_rows(d / f"train-{tag}.jsonl", train)),
        "calibration": str(_write_rows(d / f"calibration-{tag}.jsonl", cal)),
        "test": str(_write_rows(d / f"test-{tag}.jsonl", test)),
        "n": {"train": len(train), "calibration": len(cal), "test": len(test)},
        **source,
    }


# -- one run ----------------------------------------------------------------------------------
def _key(*parts: Any) -> str:
    from portllm_cli.demo.run import _key as demo_key

    return demo_key(*parts)


def _sha(path: str) -> str:
    from portllm_cli.io.hashing import sha256_file

    return sha256_file(Path(path))[:16]


def _train_lora(model: Path, out: Path, data: str, sc: dict[str, Any], seed: int, device: str,
                use_dora: bool = False) -> dict[str, Any]:
    from portllm_cli.core.train import finetune

    t = time.perf_counter()
    r = finetune(str(model), "sst2", out, data=Path(data), epochs=sc["lora_epochs"], batch_size=sc["lora_batch"],
                 max_length=sc["lora_max_length"], lr=sc["lora_lr"], seed=seed, device=device, rank=LORA["rank"],
                 alpha=LORA["alpha"], dropout=LORA["dropout"], target_modules=LORA["target_modules"],
                 use_dora=use_dora, overwrite=True)
    return {**r.summary(), "stage_s": time.perf_counter() - t}


def _evaluate(model: Any, tok: Any, test: str, sc: dict[str, Any], patches: list | None = None) -> list[dict[str, Any]]:
    """sst2 accuracy of the live model alone, then with each (name, patch, _) merged in turn."""
    import contextlib
    import tempfile

    from portllm_cli.core import harness
    from portllm_cli.core.config import EvalConfig
    from portllm_cli.core.evaluate import score_loaded

    data = {"sst2": Path(test)}
    cfg = EvalConfig(data=data, batch_size=sc["eval_batch"])
    todo = [(None, None, None)] + [(n, p, None) for n, p, _ in (patches or [])]
    with tempfile.TemporaryDirectory(prefix="portllm-eval-") as tmp, contextlib.ExitStack() as stack:
        plan = harness.plan_offline(stack, ["sst2"], data, None, Path(tmp))
        with harness.quiet_lm_eval():
            rows = score_loaded(model, tok, "model", todo, plan, cfg)
    return [r.scores["sst2"] for r in rows]


def _load(path: Path, device: str) -> tuple[Any, Any]:
    from portllm_cli.core.evaluate import load_model

    return load_model(path, dtype="auto", device=device, trust_remote_code=False, allow_pickle=False)


def share(acc: float, evolved: float, retrained: float) -> float | None:
    """The share of the retrained LoRA's gain over the evolved model that ``acc`` keeps."""
    gain = retrained - evolved
    return (acc - evolved) / gain if gain > 0 else None


def base_scores(seed: int, base: Path, patch_base: Path, mat: dict[str, Any], sc: dict[str, Any], work: Path,
                device: str) -> dict[str, Any]:
    """Base zero-shot and base + its patch (per seed: the patch depends on it)."""
    from portllm_cli.patch.format import read_patch

    def make() -> dict[str, Any]:
        log(f"seed {seed}: eval base and base + patch")
        t = time.perf_counter()
        model, tok = _load(base, device)
        p = read_patch(patch_base)
        s0, s1 = _evaluate(model, tok, mat["test"], sc, [("patch", p, None)])
        return {"base": s0, "base+patch": s1, "stage_s": time.perf_counter() - t}

    return cached_json(work / f"eval-base-s{seed}-{_key(str(base), patch_base.name, _sha(mat['test']))}.json", make)


def evolved_dir(evo: dict[str, Any], seed: int, base: Path, mat: dict[str, Any], sc: dict[str, Any], work: Path,
                device: str) -> Path:
    """Where the (evolution, seed) model lives: one name for every experiment sharing --workdir."""
    corpus = mat["corpora"][evo["corpus"]]
    return work / f"evolved-{evo['name']}-s{seed}-" \
                  f"{_key(str(base), _sha(corpus), evo['steps'], evo['lr'], sc['cpt_batch'], sc['cpt_seq'], device)}"


def evolve(evo: dict[str, Any], seed: int, base: Path, mat: dict[str, Any], sc: dict[str, Any], work: Path,
           device: str) -> dict[str, Any]:
    """The (evolution, seed) model on disk (made by continued pretraining unless it is there) and
    the record of its making (cached next to it)."""
    from portllm_cli.core.train import continued_pretraining

    evolved = evolved_dir(evo, seed, base, mat, sc, work, device)
    corpus = mat["corpora"][evo["corpus"]]

    def train_cpt() -> dict[str, Any]:
        log(f"{evo['name']} seed {seed}: continued pretraining, {evo['steps']} steps at lr {evo['lr']:g} -> {evolved.name}")
        t = time.perf_counter()
        r = continued_pretraining(str(base), Path(corpus), evolved, lr=evo["lr"], max_steps=evo["steps"],
                                  batch_size=sc["cpt_batch"], max_length=sc["cpt_seq"], seed=seed, device=device,
                                  overwrite=True)
        return {**r.summary(), "stage_s": time.perf_counter() - t}

    record = work / f"{evolved.name}.result.json"
    if record.exists() and not evolved.is_dir():  # the JSON outlived its model (deleted): make it again
        record.unlink()
    return cached_json(record, train_cpt)


def run_one(evo: dict[str, Any], seed: int, base: Path, patch_base: Path, mat: dict[str, Any], sc: dict[str, Any],
            work: Path, device: str, grid: list[float], keep_models: bool) -> dict[str, Any]:
    """One (evolution, seed): evolve, retrain, diff, calibrate, evaluate. Cached as one JSON."""
    evolved = evolved_dir(evo, seed, base, mat, sc, work, device)
    lora_key = _key(_sha(mat["train"]), sc["lora_epochs"], sc["lora_batch"], sc["lora_max_length"], sc["lora_lr"],
                    LORA, device)
    patch_evo = work / f"patch-{evolved.name}-{lora_key}"
    run_file = work / f"run-{evolved.name}-{_key(patch_base.name, patch_evo.name, _sha(mat['test']), _sha(mat['calibration']), grid)}.json"

    def make() -> dict[str, Any]:
        from portllm_cli.core.calibrate import ScaledPatch, calibrate_loaded, load_data
        from portllm_cli.core.diff import diff_paths
        from portllm_cli.patch.format import read_patch

        stages: dict[str, float] = {}
        cpt = evolve(evo, seed, base, mat, sc, work, device)
        stages["continued_pretraining"] = cpt["stage_s"]

        def retrain() -> dict[str, Any]:
            log(f"{evo['name']} seed {seed}: LoRA retrained on the evolved model")
            return _train_lora(evolved, patch_evo, mat["train"], sc, seed, device)

        ft = cached_json(work / f"{patch_evo.name}.result.json", retrain)
        stages["retrain"] = ft["stage_s"]

        log(f"{evo['name']} seed {seed}: diff")
        t = time.perf_counter()
        pm = diff_paths(str(patch_base), str(evolved), base=str(base), verify=True).result
        whole = diff_paths(str(base), str(evolved)).result.overall.drift
        port_doc = pm.port.as_dict()
        figures = {"model_drift": whole, **{k: port_doc["overall"][k] for k in
                                             ("drift", "patch_over_drift", "cosine", "column_overlap", "row_overlap",
                                              "drift_top_r_energy")}}
        stages["diff"] = time.perf_counter() - t

        log(f"{evo['name']} seed {seed}: calibrate and evaluate (the evolved model loaded once)")
        t = time.perf_counter()
        model, tok = _load(evolved, device)
        pb, pe = read_patch(patch_base), read_patch(patch_evo)
        data = load_data("sst2", Path(mat["calibration"]))
        cal = calibrate_loaded(model, tok, pb, data, grid=grid)
        stages["calibrate"] = time.perf_counter() - t
        t = time.perf_counter()
        zero, retrained = _evaluate(model, tok, mat["test"], sc, [("retrained", pe, None)])
        sp = ScaledPatch(model, pb)
        try:
            sp.set(1.0)
            (plain,) = _evaluate(model, tok, mat["test"], sc)
            if cal.scale == 1.0:
                calibrated = plain
            else:
                sp.set(cal.scale)
                (calibrated,) = _evaluate(model, tok, mat["test"], sc)
        finally:
            sp.restore()
        stages["evaluate"] = time.perf_counter() - t
        del model, tok
        other = "loglik" if cal.metric == "choice" else "choice"
        other_pick = None
        if all(s.choice_loglik is not None for s in cal.scores):
            from portllm_cli.core.calibrate import choose

            other_pick = choose(cal.scores, other).scale
        return {
            "evolution": evo, "seed": seed, "evolved": evolved.name,
            "scores": {"evolved": zero, "plain": plain, "calibrated": calibrated, "retrained": retrained},
            "calibration": {**cal.as_dict(), "other_metric": other, "other_metric_scale": other_pick},
            "figures": figures, "port_figures": port_doc, "continued_pretraining": cpt, "retrain": ft,
            "stages_s": stages,
        }

    doc = cached_json(run_file, make)
    if not keep_models and evolved.is_dir():
        shutil.rmtree(evolved)  # the run's JSON holds what the table needs; 0.5 GB each for SmolLM2
    return doc


# -- the experiment ----------------------------------------------------------------------------
def run_experiment(*, scale: str, seeds: list[int], device: str, work: Path, model: Path, mat: dict[str, Any],
                   grid: list[float], keep_models: bool) -> dict[str, Any]:
    sc = SCALES[scale]
    runs, bases = [], {}
    for seed in seeds:
        lora_key = _key(_sha(mat["train"]), sc["lora_epochs"], sc["lora_batch"], sc["lora_max_length"],
                        sc["lora_lr"], LORA, device)
        patch_base = work / f"patch-base-s{seed}-{_key(str(model), lora_key)}"

        def train_base(_seed: int = seed, _out: Path = patch_base) -> dict[str, Any]:
            log(f"seed {_seed}: LoRA on the base model")
            return _train_lora(model, _out, mat["train"], sc, _seed, device)

        cached_json(work / f"{patch_base.name}.result.json", train_base)
        bases[seed] = base_scores(seed, model, patch_base, mat, sc, work, device)
        for evo in sc["evolutions"]:
            r = run_one(evo, seed, model, patch_base, mat, sc, work, device, grid, keep_models)
            r["scores"]["base"], r["scores"]["base+patch"] = bases[seed]["base"], bases[seed]["base+patch"]
            runs.append(r)
    for r in runs:
        acc = {k: r["scores"][k]["value"] for k, _ in ACC_ROWS}
        r["accuracy"] = acc
        r["share_plain"] = share(acc["plain"], acc["evolved"], acc["retrained"])
        r["share_calibrated"] = share(acc["calibrated"], acc["evolved"], acc["retrained"])
    return {"runs": runs, "analysis": analyse(runs, [e["name"] for e in sc["evolutions"]])}


# -- statistics --------------------------------------------------------------------------------
def _ranks(xs: list[float]) -> list[float]:
    order = sorted(range(len(xs)), key=lambda i: xs[i])
    ranks = [0.0] * len(xs)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and xs[order[j + 1]] == xs[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1  # ties share their mean rank
        i = j + 1
    return ranks


def _pearson(x: list[float], y: list[float]) -> float | None:
    mx, my = statistics.fmean(x), statistics.fmean(y)
    sx = math.sqrt(sum((a - mx) ** 2 for a in x))
    sy = math.sqrt(sum((b - my) ** 2 for b in y))
    if sx == 0 or sy == 0:
        return None
    return sum((a - mx) * (b - my) for a, b in zip(x, y)) / (sx * sy)


def spearman(x: list[float], y: list[float]) -> dict[str, Any]:
    """Spearman's rho (Pearson on average ranks) with a two-sided p-value from scipy when present."""
    n = len(x)
    rho = _pearson(_ranks(x), _ranks(y)) if n >= 3 else None
    p = None
    if rho is not None:
        try:
            from scipy.stats import spearmanr

            p = float(spearmanr(x, y).pvalue)
        except ImportError:
            pass
    return {"rho": rho, "p": p, "n": n}


def linear_fit(x: list[float], y: list[float]) -> dict[str, Any] | None:
    """y ~ a + b x by least squares: a, b, residual sd (n - 2 dof) and the leave-one-out RMSE."""
    n = len(x)
    if n < 3:
        return None

    def fit(xs: list[float], ys: list[float]) -> tuple[float, float] | None:
        mx, my = statistics.fmean(xs), statistics.fmean(ys)
        sxx = sum((a - mx) ** 2 for a in xs)
        if sxx == 0:
            return None
        b = sum((a - mx) * (c - my) for a, c in zip(xs, ys)) / sxx
        return my - b * mx, b

    ab = fit(x, y)
    if ab is None:
        return None
    a, b = ab
    resid = [c - (a + b * v) for v, c in zip(x, y)]
    loo = []
    for i in range(n):
        f = fit(x[:i] + x[i + 1:], y[:i] + y[i + 1:])
        if f is None:
            return None
        loo.append(y[i] - (f[0] + f[1] * x[i]))
    return {"intercept": a, "slope": b, "residual_sd": math.sqrt(sum(e * e for e in resid) / (n - 2)) if n > 2 else None,
            "loo_rmse": math.sqrt(sum(e * e for e in loo) / n), "n": n}


def _mean_sd(vals: list[float | None]) -> dict[str, Any]:
    v = [x for x in vals if x is not None]
    return {"mean": statistics.fmean(v) if v else None, "sd": statistics.stdev(v) if len(v) > 1 else None,
            "n": len(v)}


def by_evolution(runs: list[dict[str, Any]], evolutions: list[str]) -> list[tuple[str, list[dict[str, Any]]]]:
    """The runs of each evolution, in the evolutions' order (evolutions without runs left out)."""
    return [(name, rs) for name in evolutions if (rs := [r for r in runs if r["evolution"]["name"] == name])]


def analyse(runs: list[dict[str, Any]], evolutions: list[str]) -> dict[str, Any]:
    per_evo = {}
    for name, rs in by_evolution(runs, evolutions):
        per_evo[name] = {
            "accuracy": {k: _mean_sd([r["accuracy"][k] for r in rs]) for k, _ in ACC_ROWS},
            "share_plain": _mean_sd([r["share_plain"] for r in rs]),
            "share_calibrated": _mean_sd([r["share_calibrated"] for r in rs]),
            "calibrated_minus_plain": _mean_sd([r["accuracy"]["calibrated"] - r["accuracy"]["plain"] for r in rs]),
            "scales": [r["calibration"]["scale"] for r in rs],
            "figures": {k: _mean_sd([r["figures"][k] for r in rs]) for k, _ in FIGURES},
        }
    usable = [r for r in runs if r["share_plain"] is not None]
    predict = {}
    for k, _ in FIGURES:
        pts = [(r["figures"][k], r["share_plain"], r["share_calibrated"]) for r in usable if r["figures"][k] is not None]
        xs = [p[0] for p in pts]
        cal_pts = [(p[0], p[2]) for p in pts if p[2] is not None]
        predict[k] = {
            "plain": spearman(xs, [p[1] for p in pts]),
            "calibrated": spearman([c[0] for c in cal_pts], [c[1] for c in cal_pts]),
            "fit_plain": linear_fit(xs, [p[1] for p in pts]),
        }
    cal_shares = [per_evo[e]["share_calibrated"]["mean"] for e in per_evo if per_evo[e]["share_calibrated"]["mean"] is not None]
    plain_shares = [per_evo[e]["share_plain"]["mean"] for e in per_evo if per_evo[e]["share_plain"]["mean"] is not None]
    return {
        "per_evolution": per_evo,
        "predictors": predict,
        "goal": {
            "calibrated_share_mean_over_evolutions": statistics.fmean(cal_shares) if cal_shares else None,
            "plain_share_mean_over_evolutions": statistics.fmean(plain_shares) if plain_shares else None,
            "target": 0.9,
        },
    }


# -- markdown ---------------------------------------------------------------------------------
def _f(v: float | None, pct: bool = False, digits: int = 3) -> str:
    if v is None:
        return "n/a"
    return f"{v * 100:.0f}%" if pct else f"{v:.{digits}f}"


def _ms(d: dict[str, Any], pct: bool = False, digits: int = 3) -> str:
    if d["mean"] is None:
        return "n/a"
    if d["sd"] is None:
        return _f(d["mean"], pct, digits)
    return (f"{d['mean'] * 100:.0f}% ± {d['sd'] * 100:.0f}" if pct
            else f"{d['mean']:.{digits}f} ± {d['sd']:.{digits}f}")


def _g(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.3g}"


def markdown(doc: dict[str, Any]) -> str:
    an = doc["analysis"]
    evos = list(an["per_evolution"])
    runs = doc["runs"]
    head = "| | " + " | ".join(evos) + " |"
    sep = "|---|" + "---|" * len(evos)
    lines = [
        f"# Drift experiment: {doc['model_name']}, {doc['task_name']}",
        "",
        f"Device: **{doc['device']}**. Command: `{doc['command']}`. Date: {doc['date']}. "
        f"Wall time: {doc['wall_s'] / 60:.1f} min (this invocation; cached stages are not re-timed).",
        "",
        "Settings: " + ", ".join(f"{k}={v}" for k, v in doc["settings"].items() if k != "evolutions") + ".",
        "",
        "Evolutions (continued pretraining of the base, batch "
        f"{doc['settings']['cpt_batch']} × {doc['settings']['cpt_seq']} tokens): "
        + "; ".join(f"**{e['name']}** = {doc['corpora'][e['corpus']]}, {e['steps']} steps at lr {e['lr']:g}"
                    for e in doc["settings"]["evolutions"]) + ".",
        "",
        f"Data (disjoint by text): {doc['data']['n']['train']} training, {doc['data']['n']['calibration']} "
        f"calibration and {doc['data']['n']['test']} test sentences; seeds {', '.join(map(str, doc['seeds']))}. "
        f"Calibration grid {', '.join(f'{g:g}' for g in doc['grid'])} (metric: "
        f"{runs[0]['calibration']['metric'] if runs else 'n/a'}).",
        "",
        "## Accuracy and the share of the retrained gain kept (mean ± sd over seeds)",
        "",
        head.replace("| |", "| model |", 1), sep,
    ]
    pe = an["per_evolution"]
    for k, label in ACC_ROWS:
        lines.append(f"| {label} | " + " | ".join(_ms(pe[e]["accuracy"][k]) for e in evos) + " |")
    lines.append("| share of the retrained gain kept: plain port | " + " | ".join(_ms(pe[e]["share_plain"], True) for e in evos) + " |")
    lines.append("| share of the retrained gain kept: calibrated port | "
                 + " | ".join(_ms(pe[e]["share_calibrated"], True) for e in evos) + " |")
    lines.append("| calibrated − plain (accuracy) | " + " | ".join(_ms(pe[e]["calibrated_minus_plain"]) for e in evos) + " |")
    lines.append("| calibrated scale λ per seed | " + " | ".join(", ".join(f"{s:g}" for s in pe[e]["scales"]) for e in evos) + " |")
    goal = an["goal"]
    lines += ["", f"Mean over evolutions of the share kept: plain port {_f(goal['plain_share_mean_over_evolutions'], True)}, "
              f"calibrated port {_f(goal['calibrated_share_mean_over_evolutions'], True)} (goal: ≥ 90%).", "",
              "## Drift figures (`portllm diff PATCH EVOLVED --base BASE`, mean ± sd over seeds)", "",
              head.replace("| |", "| figure |", 1), sep]
    for k, label in FIGURES:
        pct = k in ("model_drift", "drift")
        lines.append(f"| {label} | " + " | ".join(
            (_ms({"mean": pe[e]["figures"][k]["mean"] * 100 if pe[e]["figures"][k]["mean"] is not None else None,
                  "sd": pe[e]["figures"][k]["sd"] * 100 if pe[e]["figures"][k]["sd"] is not None else None}, False, 2) + "%")
            if pct else _ms(pe[e]["figures"][k], False, 3) for e in evos) + " |")
    lines += ["", "## Which figure predicts the plain port's share? (all runs)", "",
              "| figure | Spearman ρ with the plain port's share | p | ρ with the calibrated port's share | "
              "line share = a + b·x: a, b | residual sd | leave-one-out RMSE |",
              "|---|---|---|---|---|---|---|"]
    for k, label in FIGURES:
        p = an["predictors"][k]
        fit = p["fit_plain"]
        cal = p["calibrated"]
        lines.append(f"| {label} | {_f(p['plain']['rho'], digits=2)} (n={p['plain']['n']}) | {_g(p['plain']['p'])} | "
                     f"{_f(cal['rho'], digits=2)} | "
                     + (f"{fit['intercept']:.3g}, {fit['slope']:.3g} | {fit['residual_sd']:.3f} | {fit['loo_rmse']:.3f} |"
                        if fit else "n/a | n/a | n/a |"))
    lines += ["", "## Every run", "",
              "| evolution | seed | evolved | plain | calibrated (λ) | retrained | share plain | share calibrated | "
              "drift | patch/drift | cosine | col. overlap | row overlap |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        a, f = r["accuracy"], r["figures"]
        lines.append(
            f"| {r['evolution']['name']} | {r['seed']} | {a['evolved']:.3f} | {a['plain']:.3f} | "
            f"{a['calibrated']:.3f} ({r['calibration']['scale']:g}) | {a['retrained']:.3f} | "
            f"{_f(r['share_plain'], True)} | {_f(r['share_calibrated'], True)} | {f['drift'] * 100:.2f}% | "
            f"{_g(f['patch_over_drift'])} | {_f(f['cosine'])} | {_f(f['column_overlap'])} | {_f(f['row_overlap'])} |")
    return markdown_end(lines, doc)
