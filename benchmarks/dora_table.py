"""The DoRA experiment of benchmarks/paper_table.py (``--experiment dora``): which `port --dora`
policy keeps more of a DoRA patch on an evolved model?

A DoRA patch (PEFT's ``use_dora``) carries a magnitude m per output feature; merged, W' = m / ||V|| * V
with V = W + s*B@A. On an evolved model portllm offers two readings (README, *Adapter variants*):
``absolute`` keeps the trained m (what PEFT does when the old adapter is loaded on the new base),
``relative`` keeps the fine-tune's relative change of each feature's norm, m' = m * ||W_new|| / ||W_old||
(the old norms recorded in the patch by `finetune --use-dora`).

The protocol is the drift experiment's (benchmarks/drift_table.py), on the same data splits, scales,
evolutions (docs, docs-4x, fiction) and seeds. Per seed: a DoRA patch trained on the base with exactly
the drift experiment's LoRA recipe plus ``use_dora``. Per (evolution, seed), on the sst2 test split:

    base, zero-shot | base + the DoRA patch | evolved, zero-shot |
    evolved + the patch, --dora absolute | evolved + the patch, --dora relative

The ports are applied in memory with the merge `port` writes (core.plan.build_plan on Layout.live
under Policy(dora=...), core.merge.merge_in_place, through core.evaluate.score_loaded), and removed
and checked bitwise before the next. Reported per evolution, mean +- sd over seeds: each accuracy,
relative - absolute, and the share of the patch's own gain each port keeps,
(acc_port - acc_evolved) / (acc_base+patch - acc_base); the test sentences on which the two ports
disagree (pooled over seeds, with McNemar's exact test); and how far the evolution moved the norms
that ``relative`` rescales by (mean |‖W_new‖/‖W_old‖ - 1|) against how far the fine-tune moved the
magnitudes (mean |m/‖W_old‖ - 1|).

The evolved models are the drift experiment's: the same directory name under the same --workdir, so
one kept by ``--experiment drift --keep-models`` is used as it is (and left in place); one that is
missing is made by the same function with the same key (identical weights) and deleted after its run
unless --keep-models. Every stage is cached under --workdir; an interrupted run resumes.
"""

from __future__ import annotations

import math
import shutil
import time
from pathlib import Path
from typing import Any

import drift_table
from bench_common import cached_json, log, markdown_end
from drift_table import _key, _load, _mean_sd, _ms, _sha, by_evolution

SCALES = drift_table.SCALES  # the same scales, so that the evolved models and data splits are shared
LORA = drift_table.LORA
POLICIES = ("absolute", "relative")
ACC_ROWS = [
    ("base", "base, zero-shot"),
    ("base+patch", "base + its DoRA patch"),
    ("evolved", "evolved, zero-shot"),
    ("absolute", "evolved + the patch, `--dora absolute` (trained m kept; PEFT's reading)"),
    ("relative", "evolved + the patch, `--dora relative` (m·‖W_new‖/‖W_old‖)"),
]
ALPHA = 0.05  # the significance level of the verdict


# -- scoring ------------------------------------------------------------------------------------
def _correct(samples: list[dict[str, Any]]) -> str:
    """Per test sentence (in doc_id order), '1' where the answer was right: for paired comparisons."""
    return "".join("1" if float(s["acc"]) else "0" for s in sorted(samples, key=lambda s: s["doc_id"]))


def _score(model: Any, tok: Any, test: str, sc: dict[str, Any], todo: list[tuple[str | None, Any]],
           policy: str = "absolute") -> list[dict[str, Any]]:
    """sst2 on the test file of the live model, for each (name, patch) (None: the model alone), the
    patch merged under ``--dora policy``; the score and which sentences were right."""
    import contextlib
    import tempfile

    from portllm_cli.core import harness
    from portllm_cli.core.config import EvalConfig
    from portllm_cli.core.evaluate import score_loaded
    from portllm_cli.core.plan import Policy

    data = {"sst2": Path(test)}
    cfg = EvalConfig(data=data, batch_size=sc["eval_batch"])
    with tempfile.TemporaryDirectory(prefix="portllm-eval-") as tmp, contextlib.ExitStack() as stack:
        plan = harness.plan_offline(stack, ["sst2"], data, None, Path(tmp))
        with harness.quiet_lm_eval():
            rows = score_loaded(model, tok, "model", [(n, p, None) for n, p in todo], plan, cfg, log_samples=True,
                                policy=Policy(dora=policy))
    out = []
    for r in rows:
        score, correct = dict(r.scores["sst2"]), _correct(r.samples["sst2"])
        if len(correct) != score["n"] or abs(correct.count("1") / len(correct) - score["value"]) > 1e-9:
            raise SystemExit(f"internal: per-sentence results ({correct.count('1')}/{len(correct)}) do not give "
                             f"the score {score}")
        out.append({**score, "correct": correct})
    return out


def norm_figures(model: Any, patch: Any) -> dict[str, Any]:
    """What ``relative`` changes: per output feature of every DoRA module, r = ‖W_new‖/‖W_old‖ (the
    factor m is rescaled by; W_new the live model's weight, ‖W_old‖ recorded in the patch), against
    the fine-tune's own change of the magnitudes, m/‖W_old‖. Means over all features."""
    import torch

    from portllm_cli.core.plan import decode_norms, dora_norms, feature_norms

    recorded = dora_norms(patch)
    ratio, mag = [], []
    with torch.no_grad():
        for name, m in sorted(patch.modules.items()):
            if m.magnitude is None:
                continue
            W = model.get_submodule(m.module).weight.detach()
            transposed = m.kind == "embedding" or m.fan_in_fan_out
            n = int(m.magnitude.shape[0])
            new = feature_norms(lambda r0, r1, W=W: W[r0:r1].cpu(), int(W.shape[0]), transposed).double()
            old = decode_norms(recorded[name], n, f"module {name}").double()
            ratio.append(new / old)
            mag.append(m.magnitude.double() / old)
    r, g = torch.cat(ratio), torch.cat(mag)
    return {"modules": len(ratio), "features": int(r.numel()),
            "norm_ratio_mean_abs_dev": float((r - 1).abs().mean()), "norm_ratio_max_abs_dev": float((r - 1).abs().max()),
            "magnitude_mean_abs_dev": float((g - 1).abs().mean()), "magnitude_max_abs_dev": float((g - 1).abs().max())}


# -- stages -------------------------------------------------------------------------------------
def dora_patch_dir(seed: int, base: Path, mat: dict[str, Any], sc: dict[str, Any], work: Path, device: str) -> Path:
    lora_key = _key(_sha(mat["train"]), sc["lora_epochs"], sc["lora_batch"], sc["lora_max_length"], sc["lora_lr"],
                    LORA, device, "use_dora")
    return work / f"patch-dora-base-s{seed}-{_key(str(base), lora_key)}"


def train_patch(seed: int, base: Path, mat: dict[str, Any], sc: dict[str, Any], work: Path, device: str) -> Path:
    out = dora_patch_dir(seed, base, mat, sc, work, device)

    def make() -> dict[str, Any]:
        log(f"seed {seed}: DoRA patch on the base model")
        return drift_table._train_lora(base, out, mat["train"], sc, seed, device, use_dora=True)

    record = work / f"{out.name}.result.json"
    if record.exists() and not out.is_dir():  # the record outlived its patch (deleted): train it again
        record.unlink()
    cached_json(record, make)
    return out


def base_scores(seed: int, base: Path, patch_dir: Path, mat: dict[str, Any], sc: dict[str, Any], work: Path,
                device: str) -> dict[str, Any]:
    """Base zero-shot (once for all seeds) and base + the seed's DoRA patch; the model loaded at most once."""
    from portllm_cli.patch.format import read_patch

    test = _sha(mat["test"])
    zero_file = work / f"eval-dora-zero-{_key(str(base), test)}.json"
    patch_file = work / f"eval-dora-base-s{seed}-{_key(str(base), patch_dir.name, test)}.json"
    loaded: list[Any] = []

    def model() -> tuple[Any, Any]:
        if not loaded:
            loaded.extend(_load(base, device))
        return loaded[0], loaded[1]

    def zero() -> dict[str, Any]:
        log("eval base, zero-shot")
        t = time.perf_counter()
        (s,) = _score(*model(), mat["test"], sc, [(None, None)])
        return {"score": s, "stage_s": time.perf_counter() - t}

    def patched() -> dict[str, Any]:
        log(f"seed {seed}: eval base + DoRA patch")
        t = time.perf_counter()
        (s,) = _score(*model(), mat["test"], sc, [("patch", read_patch(patch_dir))])
        return {"score": s, "stage_s": time.perf_counter() - t}

    z, p = cached_json(zero_file, zero), cached_json(patch_file, patched)
    return {"base": z["score"], "base+patch": p["score"]}


def run_one(evo: dict[str, Any], seed: int, base: Path, patch_dir: Path, mat: dict[str, Any], sc: dict[str, Any],
            work: Path, device: str, keep_models: bool) -> dict[str, Any]:
    """One (evolution, seed): the evolved model zero-shot and with the patch under each policy. One JSON."""
    evolved = drift_table.evolved_dir(evo, seed, base, mat, sc, work, device)
    run_file = work / f"dora-run-{evolved.name}-{_key(patch_dir.name, _sha(mat['test']))}.json"
    made: list[Path] = []

    def make() -> dict[str, Any]:
        from portllm_cli.patch.format import read_patch

        found = evolved.is_dir()
        if found:
            log(f"{evo['name']} seed {seed}: the evolved model {evolved.name} is on disk: used as it is")
        cpt = drift_table.evolve(evo, seed, base, mat, sc, work, device)
        if not found:
            made.append(evolved)
        log(f"{evo['name']} seed {seed}: eval evolved zero-shot, --dora absolute, --dora relative")
        t = time.perf_counter()
        model, tok = _load(evolved, device)
        patch = read_patch(patch_dir)
        norms = norm_figures(model, patch)
        zero, absolute = _score(model, tok, mat["test"], sc, [(None, None), ("absolute", patch)], "absolute")
        (relative,) = _score(model, tok, mat["test"], sc, [("relative", patch)], "relative")
        del model, tok
        return {"evolution": evo, "seed": seed, "evolved": evolved.name, "evolved_made_here": not found,
                "scores": {"evolved": zero, "absolute": absolute, "relative": relative}, "norms": norms,
                "continued_pretraining": cpt, "stages_s": {"evaluate": time.perf_counter() - t}}

    doc = cached_json(run_file, make)
    if made and not keep_models and evolved.is_dir():
        shutil.rmtree(evolved)  # made here for this run; 0.5 GB each for SmolLM2
    return doc


# -- the experiment ------------------------------------------------------------------------------
def share(acc: float, evolved: float, base: float, base_patch: float) -> float | None:
    """The share of the patch's own gain on its base that the port keeps on the evolved model."""
    gain = base_patch - base
    return (acc - evolved) / gain if gain > 0 else None


def disagreements(a: str, b: str) -> tuple[int, int]:
    """(sentences a got right and b wrong, sentences b got right and a wrong)."""
    if len(a) != len(b):
        raise ValueError("per-sentence results of different lengths")
    return (sum(x == "1" and y == "0" for x, y in zip(a, b)), sum(x == "0" and y == "1" for x, y in zip(a, b)))


def mcnemar_exact(b: int, c: int) -> float | None:
    """Two-sided exact McNemar p-value: under no difference each disagreement goes either way with
    probability 1/2, so min(b, c) is Binomial(b + c, 1/2). None when there is no disagreement."""
    n = b + c
    if n == 0:
        return None
    tail = sum(math.comb(n, k) for k in range(min(b, c) + 1))
    return min(1.0, 2 * tail / 2**n)


def run_experiment(*, scale: str, seeds: list[int], device: str, work: Path, model: Path, mat: dict[str, Any],
                   keep_models: bool) -> dict[str, Any]:
    sc = SCALES[scale]
    runs = []
    for seed in seeds:
        patch_dir = train_patch(seed, model, mat, sc, work, device)
        bases = base_scores(seed, model, patch_dir, mat, sc, work, device)
        for evo in sc["evolutions"]:
            r = run_one(evo, seed, model, patch_dir, mat, sc, work, device, keep_models)
            r["scores"] = {**bases, **r["scores"]}
            r["patch"] = patch_dir.name
            runs.append(r)
    for r in runs:
        acc = {k: r["scores"][k]["value"] for k, _ in ACC_ROWS}
        r["accuracy"] = acc
        r["relative_minus_absolute"] = acc["relative"] - acc["absolute"]
        for p in POLICIES:
            r[f"share_{p}"] = share(acc[p], acc["evolved"], acc["base"], acc["base+patch"])
        r["relative_only_right"], r["absolute_only_right"] = disagreements(r["scores"]["relative"]["correct"],
                                                                           r["scores"]["absolute"]["correct"])
    return {"runs": runs, "analysis": analyse(runs, [e["name"] for e in sc["evolutions"]])}


def _paired(rs: list[dict[str, Any]]) -> dict[str, Any]:
    b = sum(r["relative_only_right"] for r in rs)
    c = sum(r["absolute_only_right"] for r in rs)
    return {"relative_only_right": b, "absolute_only_right": c, "mcnemar_p": mcnemar_exact(b, c),
            "sentences": sum(len(r["scores"]["relative"]["correct"]) for r in rs)}


def verdict(paired: dict[str, Any], diff: dict[str, Any]) -> str:
    """The rule, stated with the result: a policy is favoured when the pooled paired test rejects
    'no difference' at ALPHA and the mean accuracy difference over runs points the same way."""
    p, b, c = paired["mcnemar_p"], paired["relative_only_right"], paired["absolute_only_right"]
    if p is None:
        return "no difference: the two policies gave the same answer on every test sentence"
    if p < ALPHA and diff["mean"] is not None and (b > c) == (diff["mean"] > 0) and b != c:
        return f"favours `--dora {'relative' if b > c else 'absolute'}` (McNemar p = {p:.2g} < {ALPHA:g})"
    return f"no significant difference (McNemar p = {p:.2g} ≥ {ALPHA:g})"


def analyse(runs: list[dict[str, Any]], evolutions: list[str]) -> dict[str, Any]:
    per_evo = {}
    for name, rs in by_evolution(runs, evolutions):
        diff = _mean_sd([r["relative_minus_absolute"] for r in rs])
        paired = _paired(rs)
        per_evo[name] = {
            "accuracy": {k: _mean_sd([r["accuracy"][k] for r in rs]) for k, _ in ACC_ROWS},
            "relative_minus_absolute": diff,
            **{f"share_{p}": _mean_sd([r[f"share_{p}"] for r in rs]) for p in POLICIES},
            "paired": paired, "verdict": verdict(paired, diff),
            "norms": {k: _mean_sd([r["norms"][k] for r in rs])
                      for k in ("norm_ratio_mean_abs_dev", "magnitude_mean_abs_dev")},
        }
    diff = _mean_sd([r["relative_minus_absolute"] for r in runs])
    paired = _paired(runs)
    return {"per_evolution": per_evo,
            "overall": {"relative_minus_absolute": diff, "paired": paired, "verdict": verdict(paired, diff),
                        "runs": len(runs), "alpha": ALPHA}}


# -- markdown -----------------------------------------------------------------------------------
def _f(v: float | None, pct: bool = False, digits: int = 3) -> str:
    if v is None:
        return "n/a"
    return f"{v * 100:.0f}%" if pct else f"{v:.{digits}f}"


def _signed(d: dict[str, Any]) -> str:
    if d["mean"] is None:
        return "n/a"
    return f"{d['mean']:+.3f}" + (f" ± {d['sd']:.3f}" if d["sd"] is not None else "")


def _pct(d: dict[str, Any]) -> str:
    if d["mean"] is None:
        return "n/a"
    return f"{d['mean'] * 100:.2g}%" + (f" ± {d['sd'] * 100:.1g}" if d["sd"] is not None else "")


def _pair(p: dict[str, Any]) -> str:
    pv = "n/a" if p["mcnemar_p"] is None else f"{p['mcnemar_p']:.2g}"
    return f"{p['relative_only_right']} / {p['absolute_only_right']} (p = {pv})"


def markdown(doc: dict[str, Any]) -> str:
    an = doc["analysis"]
    pe = an["per_evolution"]
    evos = list(pe)
    runs = doc["runs"]
    s = doc["settings"]
    head = "| | " + " | ".join(evos) + " |"
    sep = "|---|" + "---|" * len(evos)
    n_test = doc["data"]["n"]["test"]
    lines = [
        f"# DoRA experiment: `port --dora absolute` vs `relative`, {doc['model_name']}, {doc['task_name']}",
        "",
        f"Device: **{doc['device']}**. Command: `{doc['command']}`. Date: {doc['date']}. "
        f"Wall time: {doc['wall_s'] / 60:.1f} min (this invocation; cached stages are not re-timed).",
        "",
        "Settings: " + ", ".join(f"{k}={v}" for k, v in s.items() if k != "evolutions") + ".",
        "",
        f"The DoRA patch: r {s['lora_rank']}, α {s['lora_alpha']:g}, dropout {s['lora_dropout']:g} on "
        f"{s['lora_target_modules']} with PEFT's `use_dora`, {s['lora_epochs']} epoch(s) of {doc['data']['n']['train']} "
        f"sentences at lr {s['lora_lr']:g}, batch {s['lora_batch']} (the drift experiment's LoRA recipe), one per seed "
        f"({', '.join(map(str, doc['seeds']))}), trained on the base. Ported in memory with the merge `port` writes.",
        "",
        "Evolutions (the drift experiment's; continued pretraining of the base, batch "
        f"{s['cpt_batch']} × {s['cpt_seq']} tokens): "
        + "; ".join(f"**{e['name']}** = {doc['corpora'][e['corpus']]}, {e['steps']} steps at lr {e['lr']:g}"
                    for e in s["evolutions"]) + ".",
        "",
        f"Test: {n_test} held-out sentences (disjoint by text from the training sentences).",
        "",
        "## Accuracy and the share of the patch's own gain kept (mean ± sd over seeds)",
        "",
        head.replace("| |", "| model |", 1), sep,
    ]
    for k, label in ACC_ROWS:
        lines.append(f"| {label} | " + " | ".join(_ms(pe[e]["accuracy"][k]) for e in evos) + " |")
    lines.append("| **relative − absolute** (accuracy) | " + " | ".join(_signed(pe[e]["relative_minus_absolute"])
                                                                        for e in evos) + " |")
    for p in POLICIES:
        lines.append(f"| share of the patch's gain kept, (acc − evolved) / (base+patch − base): {p} | "
                     + " | ".join(_ms(pe[e][f"share_{p}"], True) for e in evos) + " |")
    lines.append("| sentences where they disagree: only relative right / only absolute right, all seeds "
                 "(McNemar exact p) | " + " | ".join(_pair(pe[e]["paired"]) for e in evos) + " |")
    lines.append("| what relative rescales m by: mean \\|‖W_new‖/‖W_old‖ − 1\\| | "
                 + " | ".join(_pct(pe[e]["norms"]["norm_ratio_mean_abs_dev"]) for e in evos) + " |")
    lines.append("| what the fine-tune did to the magnitudes: mean \\|m/‖W_old‖ − 1\\| | "
                 + " | ".join(_pct(pe[e]["norms"]["magnitude_mean_abs_dev"]) for e in evos) + " |")
    lines.append("| verdict | " + " | ".join(pe[e]["verdict"] for e in evos) + " |")
    ov = an["overall"]
    lines += [
        "",
        f"**Over all {ov['runs']} runs**: relative − absolute = {_signed(ov['relative_minus_absolute'])} accuracy "
        f"(mean ± sd over runs); where the two ports disagree, relative alone is right on "
        f"{ov['paired']['relative_only_right']} sentences and absolute alone on {ov['paired']['absolute_only_right']} "
        f"(of {ov['paired']['sentences']:,} sentence-runs; McNemar exact p = "
        f"{'n/a' if ov['paired']['mcnemar_p'] is None else format(ov['paired']['mcnemar_p'], '.2g')}). "
        f"**Verdict: {ov['verdict']}.**",
        "",
        f"The rule: a policy is favoured when McNemar's exact test on the pooled disagreements rejects "
        f"'no difference' at {ov['alpha']:g} and the mean accuracy difference points the same way. The seeds "
        f"share their test sentences, so pooling them treats repeated sentences as independent: a rough test.",
        "",
        "## Every run",
        "",
        "| evolution | seed | base | base + patch | evolved | absolute | relative | relative − absolute | "
        "share kept: absolute | share kept: relative | disagree: only rel. / only abs. right | "
        "mean \\|‖W_new‖/‖W_old‖ − 1\\| |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        a = r["accuracy"]
        lines.append(
            f"| {r['evolution']['name']} | {r['seed']} | {a['base']:.3f} | {a['base+patch']:.3f} | {a['evolved']:.3f} | "
            f"{a['absolute']:.3f} | {a['relative']:.3f} | {r['relative_minus_absolute']:+.3f} | "
            f"{_f(r['share_absolute'], True)} | {_f(r['share_relative'], True)} | "
            f"{r['relative_only_right']} / {r['absolute_only_right']} | {r['norms']['norm_ratio_mean_abs_dev'] * 100:.2g}% |")
    return markdown_end(lines, doc)
