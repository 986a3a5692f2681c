"""The PortLLM table on SmolLM2-135M-Instruct and real sentence-polarity data, with portllm's own commands.

Protocol (the reference in ../shared/REAL_MATERIAL.md, `--scale reference`): 3,000 training and
1,000 test sentences (Pang & Lee v1.0, sst2 prompt), an evolved model made by 1,000 steps of
continued pretraining (batch 16 x 256 tokens, AdamW lr 3e-5) on 3 MB of the Python 3.11 docs, LoRA
r=8 alpha=16 dropout 0.1 on q_proj,v_proj, lr 3e-4, 2 epochs, batch 16. Per seed (the seed changes
the continued-pretraining sample and the LoRA initialisation; the data split is fixed):

    base, zero-shot | base + its LoRA patch | evolved, zero-shot |
    evolved + the base's patch, ported (no training) | evolved + a LoRA retrained on the evolved model

Every step is portllm's real code path: core.train.continued_pretraining (finetune --task text
--full), core.train.finetune (finetune --task sst2), core.port.port_merged (port), core.evaluate
(eval) and core.diff.diff_paths (diff). Also measured: wall time and peak memory of `portllm port`
(in-process: peak CUDA memory allocated; as a subprocess: its own peak resident memory) against
`portllm finetune` on the evolved model (run as its own process; its own peak figure: CUDA
max allocated on a GPU, max resident memory on a CPU), and the residual between the old patch and the retrained
one (`portllm diff PATCH_A PATCH_B`).

    python benchmarks/paper_table.py --seeds 0 1 2                 # reference scale; needs a GPU
    python benchmarks/paper_table.py --scale small --seeds 0       # a CPU-sized version of the same protocol
    python benchmarks/paper_table.py --scale medium --seeds 0      # reference data sizes, short CPT: ~1 h a seed on a CPU

Your own material: ``--task-data FILE`` (JSONL with ``text`` and ``label``, 0/1 or negative/positive:
shuffled with seed 0, then test rows first, the rest for training) and ``--corpus FILE`` (plain text
for the continued pretraining) replace the polarity data and the Python docs; ``--model DIR`` the
base model.

``--experiment drift`` (benchmarks/drift_table.py) runs the drift experiment instead: several
evolutions of increasing drift, plain port vs calibrated port (`port --calibrate`) vs a retrained
LoRA, and which `portllm diff` figure predicts how much of the patch survives:

    python benchmarks/paper_table.py --experiment drift --seeds 0 1 2            # ~2 h on an idle 2-core CPU (measured)
    python benchmarks/paper_table.py --experiment drift --scale smoke --seeds 0  # the wiring, in minutes

``--other-corpus FILE`` replaces Jane Austen's novels (the third evolution's text).

``--experiment dora`` (benchmarks/dora_table.py) compares the two readings of a DoRA patch on an
evolved model, `port --dora absolute` (the trained magnitudes) and `--dora relative` (rescaled by
||W_new|| / ||W_old||), on the drift experiment's evolutions, data and seeds; its default --workdir is
the drift experiment's, so that the evolved models (and data splits) are shared:

    python benchmarks/paper_table.py --experiment dora --seeds 0 1 2            # on an idle 2-core CPU: see README
    python benchmarks/paper_table.py --experiment dora --scale smoke --seeds 0  # the wiring, in minutes

Writes benchmarks/results/paper_table-<scale>-<device>.{md,json} (paper_table-drift-<scale>-<device>
and paper_table-dora-<scale>-<device> for the other experiments); stages are cached under --workdir
(default ~/.cache/portllm/paper-table), so an interrupted run resumes.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench_common import cached_json, cpu_count, cpu_name, log, markdown_end  # noqa: E402

SCALES: dict[str, dict[str, Any]] = {
    "reference": dict(train=3000, test=1000, corpus_bytes=3_000_000, cpt_steps=1000, cpt_batch=16, cpt_seq=256,
                      cpt_lr=3e-5, lora_epochs=2, lora_batch=16, lora_max_length=128, lora_lr=3e-4, eval_batch=64),
    # the reference's data sizes and LoRA recipe (3,000/1,000 sentences, 2 epochs of batch 16) with a
    # continued pretraining a CPU can do (60 steps of 8 x 256 tokens at a higher lr): about an hour
    # per seed on an idle 2-core CPU
    "medium": dict(train=3000, test=1000, corpus_bytes=3_000_000, cpt_steps=60, cpt_batch=8, cpt_seq=256,
                   cpt_lr=2e-4, lora_epochs=2, lora_batch=16, lora_max_length=128, lora_lr=3e-4, eval_batch=32),
    # the demo's CPU sizes (portllm demo), plus the fifth row and the measurements: about 5 minutes
    # per seed on an idle 2-core CPU
    "small": dict(train=480, test=300, corpus_bytes=400_000, cpt_steps=12, cpt_batch=4, cpt_seq=128,
                  cpt_lr=2e-4, lora_epochs=1, lora_batch=8, lora_max_length=64, lora_lr=1e-3, eval_batch=16),
}
LORA = dict(rank=8, alpha=16.0, dropout=0.1, target_modules=("q_proj", "v_proj"))
ROWS = [
    ("base", "base, zero-shot"),
    ("base+patch", "base + its LoRA patch"),
    ("evolved", "evolved, zero-shot"),
    ("evolved+ported", "evolved + the base's patch, ported (no training)"),
    ("evolved+retrained", "evolved + a LoRA retrained on the evolved model"),
]


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        import torch

        return torch.cuda.get_device_name(0)
    return f"CPU ({cpu_count()} cores, {cpu_name()})"


# Runs `portllm ARGS...` in a fresh interpreter and reports, at exit, that process's own peak
# resident memory (VmHWM). Neither getrusage(RUSAGE_CHILDREN) (the largest child so far) nor
# os.wait4 would do here: a child forked from this process, which holds models in memory by
# then, is charged with the fork's copy of it until it execs.
_MEASURE = (
    "import atexit, sys\n"
    "from portllm_cli.core.train import peak_rss_bytes\n"
    "atexit.register(lambda: sys.stderr.write(f'\\nportllm-peak-rss-bytes {peak_rss_bytes()}\\n'))\n"
    "sys.argv = ['portllm', *sys.argv[1:]]\n"
    "from portllm_cli.cli.app import main\n"
    "main()\n"
)


def run_measured(args: list[str]) -> tuple[subprocess.CompletedProcess, float, int]:
    """`portllm ARGS` as its own process: (result, wall seconds, its own peak resident memory in bytes)."""
    t = time.perf_counter()
    res = subprocess.run([sys.executable, "-c", _MEASURE, *args], capture_output=True, text=True, cwd=REPO)
    wall = time.perf_counter() - t
    peaks = [int(line.split()[1]) for line in res.stderr.splitlines() if line.startswith("portllm-peak-rss-bytes ")]
    if res.returncode == 0 and not peaks:
        raise SystemExit(f"no peak memory reported by: portllm {' '.join(args)}")
    return res, wall, (peaks[-1] if peaks else 0)


def port_subprocess(patch: Path, target: Path, out: Path) -> dict[str, Any]:
    """`portllm port` as its own process: wall time and its own peak resident memory."""
    import shutil

    if out.exists():
        shutil.rmtree(out)
    res, wall, peak = run_measured(["port", "--patch", str(patch), "--to", str(target), "--out", str(out), "--json"])
    if res.returncode != 0:
        raise SystemExit(f"portllm port failed: {res.stderr.strip()}")
    shutil.rmtree(out)
    return {"wall_s": wall, "peak_rss_bytes": peak}


def run_seed(seed: int, sc: dict[str, Any], mat: Any, work: Path, device: str) -> dict[str, Any]:
    import torch

    from portllm_cli.demo.run import _key
    from portllm_cli.core.diff import diff_paths
    from portllm_cli.core.evaluate import config_name, evaluate
    from portllm_cli.core.port import port_merged
    from portllm_cli.core.train import continued_pretraining, finetune
    from portllm_cli.patch.format import read_patch
    from portllm_cli.resolve import resolve

    cuda = device.startswith("cuda")
    base = mat["model"]
    evolved = work / f"evolved-s{seed}-{_key(str(base), mat['corpus'], sc['cpt_steps'], sc['cpt_batch'], sc['cpt_seq'], sc['cpt_lr'], device)}"
    lora_key = _key(mat["train"], sc["lora_epochs"], sc["lora_batch"], sc["lora_max_length"], sc["lora_lr"], LORA, device)
    patch_base = work / f"patch-base-s{seed}-{_key(str(base), lora_key)}"
    patch_evo = work / f"patch-evolved-s{seed}-{_key(evolved.name, lora_key)}"
    ported = work / f"ported-s{seed}-{_key(evolved.name, patch_base.name)}"

    def train_cpt() -> dict[str, Any]:
        log(f"seed {seed}: continued pretraining, {sc['cpt_steps']} steps -> {evolved}")
        r = continued_pretraining(str(base), Path(mat["corpus"]), evolved, lr=sc["cpt_lr"], max_steps=sc["cpt_steps"],
                                  batch_size=sc["cpt_batch"], max_length=sc["cpt_seq"], seed=seed, device=device)
        return r.summary()

    def train_lora(model: Path, out: Path) -> dict[str, Any]:
        log(f"seed {seed}: LoRA on {model.name}, {sc['lora_epochs']} epochs -> {out}")
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        r = finetune(str(model), "sst2", out, data=Path(mat["train"]), epochs=sc["lora_epochs"], batch_size=sc["lora_batch"],
                     max_length=sc["lora_max_length"], lr=sc["lora_lr"], seed=seed, device=device,
                     rank=LORA["rank"], alpha=LORA["alpha"], dropout=LORA["dropout"], target_modules=LORA["target_modules"])
        return r.summary()

    cpt = cached_json(work / f"{evolved.name}.result.json", train_cpt)
    ft_base = cached_json(work / f"{patch_base.name}.result.json", lambda: train_lora(base, patch_base))

    def finetune_subprocess(model: Path, out: Path) -> dict[str, Any]:
        """`portllm finetune` on the evolved model as its own process, so its peak memory is its own."""
        log(f"seed {seed}: portllm finetune on {model.name} (subprocess), {sc['lora_epochs']} epochs -> {out}")
        cmd = ["finetune", "--model", str(model), "--task", "sst2",
               "--data", str(mat["train"]), "--out", str(out), "--epochs", str(sc["lora_epochs"]),
               "--batch-size", str(sc["lora_batch"]), "--max-length", str(sc["lora_max_length"]),
               "--lr", str(sc["lora_lr"]), "--seed", str(seed), "--device", device.split(":")[0],
               "--rank", str(LORA["rank"]), "--alpha", str(LORA["alpha"]), "--dropout", str(LORA["dropout"]),
               "--target-modules", ",".join(LORA["target_modules"]), "--overwrite", "--json"]
        res, wall, peak = run_measured(cmd)
        if res.returncode != 0:
            raise SystemExit(f"portllm finetune failed: {res.stderr.strip()}")
        doc = json.loads(res.stdout)
        doc["process_wall_s"] = wall
        doc["process_peak_rss_bytes"] = peak
        return doc

    ft_evo = cached_json(work / f"{patch_evo.name}.result.json", lambda: finetune_subprocess(evolved, patch_evo))

    def do_port() -> dict[str, Any]:
        log(f"seed {seed}: port -> {ported}")
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            gpu_before = torch.cuda.max_memory_allocated()
        t = time.perf_counter()
        r = port_merged(read_patch(patch_base), resolve(str(evolved), kind="model"), ported)
        wall = time.perf_counter() - t
        gpu_peak = (torch.cuda.max_memory_allocated() - gpu_before) if cuda else None
        sub = port_subprocess(patch_base, evolved, work / f"port-measure-s{seed}")
        return {"in_process": {"wall_s": wall, "peak_cuda_allocated_bytes": gpu_peak, **r.as_dict()},
                "subprocess": sub}

    port = cached_json(work / f"{ported.name}.result.json", do_port)

    def do_eval() -> dict[str, Any]:
        log(f"seed {seed}: eval, 5 configurations on {mat['n_test']} sentences")
        specs = {"base": str(base), "evolved": str(evolved), "ported": str(ported),
                 "pb": str(patch_base), "pe": str(patch_evo)}
        names = {
            "base": config_name(specs["base"], None), "base+patch": config_name(specs["base"], specs["pb"]),
            "evolved": config_name(specs["evolved"], None), "evolved+ported": config_name(specs["ported"], None),
            "evolved+retrained": config_name(specs["evolved"], specs["pe"]),
        }
        rep = evaluate([specs["base"], specs["evolved"], specs["ported"]], [specs["pb"], specs["pe"]], ["sst2"],
                       data={"sst2": Path(mat["test"])}, batch_size=sc["eval_batch"], device=device,
                       only=list(names.values()))
        by = {r.name: r.scores["sst2"] for r in rep.rows}
        return {k: by[n] for k, n in names.items()}

    scores = cached_json(work / f"eval-s{seed}-{_key(ported.name, patch_evo.name, mat['test'])}.json", do_eval)

    def do_diff() -> dict[str, Any]:
        log(f"seed {seed}: diff")
        drift = diff_paths(str(base), str(evolved)).result.overall.drift
        pp = diff_paths(str(patch_base), str(patch_evo))
        return {"evolved_drift": drift, "patch_vs_patch": pp.result.overall, "patch_vs_patch_verdict": pp.verdict_text}

    diffs = cached_json(work / f"diff-s{seed}-{_key(evolved.name, patch_base.name, patch_evo.name)}.json", do_diff)
    acc = {k: scores[k]["value"] for k, _ in ROWS}
    kept_retrained = ((acc["evolved+ported"] - acc["evolved"]) / (acc["evolved+retrained"] - acc["evolved"])
                      if acc["evolved+retrained"] > acc["evolved"] else None)
    kept_patch = ((acc["evolved+ported"] - acc["evolved"]) / (acc["base+patch"] - acc["base"])
                  if acc["base+patch"] > acc["base"] else None)
    ft_mem = ft_evo["peak_memory_bytes"]
    port_mem = port["in_process"]["peak_cuda_allocated_bytes"] if cuda else port["subprocess"]["peak_rss_bytes"]
    return {
        "seed": seed, "accuracy": acc, "stderr": {k: scores[k]["stderr"] for k, _ in ROWS},
        "n_test": scores["base"].get("n"),
        "share_of_retrained_gain_kept": kept_retrained, "share_of_patch_gain_kept": kept_patch,
        "evolved_drift": diffs["evolved_drift"], "patch_vs_patch": diffs["patch_vs_patch"],
        "continued_pretraining": cpt, "finetune_base": ft_base, "finetune_evolved": ft_evo, "port": port,
        "memory": {
            "finetune_evolved_peak_bytes": ft_mem, "finetune_peak_kind": ft_evo["peak_memory_kind"],
            "port_peak_bytes": port_mem,
            "port_peak_kind": "cuda_max_allocated" if cuda else "cpu_max_rss (whole process)",
            "port_peak_rss_bytes": port["subprocess"]["peak_rss_bytes"],
            # on a GPU the port allocates no CUDA memory at all (it streams shards on the CPU): the
            # ratio is then infinite, and the fairer figure is finetune's GPU peak over port's RSS
            "ratio_finetune_over_port": (ft_mem / port_mem) if port_mem else ("inf" if cuda else None),
            "ratio_finetune_over_port_rss": ft_mem / port["subprocess"]["peak_rss_bytes"],
            "finetune_wall_s": ft_evo.get("process_wall_s", ft_evo.get("seconds")), "port_wall_s": port["subprocess"]["wall_s"],
        },
    }


def _fmt(v: float | None, pct: bool = False) -> str:
    if v is None:
        return "n/a"
    return f"{v * 100:.0f}%" if pct else f"{v:.3f}"


def _mean_sd(vals: list[float | None], pct: bool = False) -> str:
    vals = [v for v in vals if v is not None]
    if not vals:
        return "n/a"
    if len(vals) == 1:
        return _fmt(vals[0], pct)
    m, s = statistics.mean(vals), statistics.stdev(vals)
    return f"{m * 100:.0f}% ± {s * 100:.0f}" if pct else f"{m:.3f} ± {s:.3f}"


def _gib(b: float | None) -> str:
    return "n/a" if not b else f"{b / 2**30:.2f} GiB" if b >= 2**28 else f"{b / 2**20:.0f} MiB"


def markdown(doc: dict[str, Any]) -> str:
    runs = doc["runs"]
    seeds = [r["seed"] for r in runs]
    head = "| model | " + " | ".join(f"seed {s}" for s in seeds) + (" | mean ± sd |" if len(runs) > 1 else " |")
    sep = "|---|" + "---|" * len(seeds) + ("---|" if len(runs) > 1 else "")
    lines = [
        f"# PortLLM table: {doc.get('model_name', 'SmolLM2-135M-Instruct')}, {doc.get('task_name', 'sentence polarity')} "
        f"({doc['scale']} scale)", "",
        f"Device: **{doc['device']}**. Command: `{doc['command']}`. Date: {doc['date']}. Wall time: {doc['wall_s'] / 60:.1f} min.", "",
        "Settings: " + ", ".join(f"{k}={v}" for k, v in doc["settings"].items()) + ".", "",
        head, sep,
    ]
    for key, label in ROWS:
        vals = [r["accuracy"][key] for r in runs]
        lines.append(f"| {label} | " + " | ".join(_fmt(v) for v in vals) + (f" | {_mean_sd(vals)} |" if len(runs) > 1 else " |"))
    for key, label in (("share_of_retrained_gain_kept", "share of the retrained gain that the port keeps"),
                       ("share_of_patch_gain_kept", "share of the patch's own gain that the port keeps")):
        vals = [r[key] for r in runs]
        lines.append(f"| {label} | " + " | ".join(_fmt(v, True) for v in vals) + (f" | {_mean_sd(vals, True)} |" if len(runs) > 1 else " |"))
    lines += ["", f"Test sentences per row: {runs[0]['n_test']}.", "",
              "| per seed | " + " | ".join(f"seed {s}" for s in seeds) + " |", "|---|" + "---|" * len(seeds)]
    lines.append("| continued pretraining moved the weights by (rel. Frobenius) | "
                 + " | ".join(f"{r['evolved_drift'] * 100:.2f}%" for r in runs) + " |")
    lines.append("| old patch vs retrained patch: residual ‖ΔB−ΔA‖/‖ΔA‖ (portllm diff) | "
                 + " | ".join(_fmt(r["patch_vs_patch"].get("residual")) for r in runs) + " |")
    lines.append("| old patch vs retrained patch: cosine | "
                 + " | ".join(_fmt(r["patch_vs_patch"].get("cosine")) for r in runs) + " |")
    lines.append(f"| `portllm finetune` on the evolved model: peak memory ({runs[0]['memory']['finetune_peak_kind']}) | "
                 + " | ".join(_gib(r["memory"]["finetune_evolved_peak_bytes"]) for r in runs) + " |")
    lines.append(f"| `portllm port`: peak memory ({runs[0]['memory']['port_peak_kind']}) | "
                 + " | ".join(_gib(r["memory"]["port_peak_bytes"]) for r in runs) + " |")
    lines.append("| `portllm port` as a process: peak resident memory | "
                 + " | ".join(_gib(r["memory"]["port_peak_rss_bytes"]) for r in runs) + " |")
    def ratio(v: Any) -> str:
        return "n/a" if v is None else "∞ (no GPU memory used)" if v == "inf" else f"{v:.1f}×"

    lines.append("| memory ratio finetune / port (same kind of memory) | "
                 + " | ".join(ratio(r["memory"]["ratio_finetune_over_port"]) for r in runs) + " |")
    lines.append("| memory ratio finetune peak / port process RSS | "
                 + " | ".join(ratio(r["memory"]["ratio_finetune_over_port_rss"]) for r in runs) + " |")
    lines.append("| wall time: finetune on the evolved model / port (process) | " + " | ".join(
        f"{r['memory']['finetune_wall_s']:.0f} s / {r['memory']['port_wall_s']:.1f} s" for r in runs) + " |")
    return markdown_end(lines, doc)


def _existing_file(value: str) -> Path:
    p = Path(value).expanduser()
    if not p.is_file():
        raise argparse.ArgumentTypeError(f"{value}: no such file")
    return p.resolve()


def main(argv: list[str] | None = None) -> int:
    import drift_table

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--experiment", choices=("table", "drift", "dora"), default="table",
                    help="table: the PortLLM table (default); drift: the drift experiment (drift_table.py); "
                         "dora: port --dora absolute vs relative (dora_table.py)")
    ap.add_argument("--scale", default=None,
                    help=f"table: {', '.join(sorted(SCALES))} (default reference); "
                         f"drift, dora: {', '.join(drift_table.SCALES)} (default small)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--device", default="auto", help="auto, cpu or cuda")
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--out-dir", type=Path, default=REPO / "benchmarks" / "results")
    ap.add_argument("--task-data", type=_existing_file, default=None, metavar="FILE",
                    help="your task: JSONL with 'text' and 'label' (0/1 or negative/positive), scored with the "
                         "sst2 prompt; default the Pang & Lee polarity sentences")
    ap.add_argument("--corpus", type=_existing_file, default=None, metavar="FILE",
                    help="plain text for the continued pretraining (default: the Python 3.11 docs)")
    ap.add_argument("--other-corpus", type=_existing_file, default=None, metavar="FILE",
                    help="drift, dora: the text of the third evolution (default: Jane Austen's novels)")
    ap.add_argument("--model", type=Path, default=None, metavar="DIR",
                    help="the base model directory (default: SmolLM2-135M-Instruct from the demo material)")
    ap.add_argument("--calibrate-grid", default=None, metavar="GRID",
                    help="drift: the scales `port --calibrate` tries (default its own grid)")
    ap.add_argument("--keep-models", action="store_true",
                    help="drift, dora: keep each run's evolved model on disk (dora never deletes one it found there)")
    args = ap.parse_args(argv)
    scales = SCALES if args.experiment == "table" else drift_table.SCALES
    args.scale = args.scale or ("reference" if args.experiment == "table" else "small")
    if args.scale not in scales:
        ap.error(f"--scale {args.scale!r}: choose from {', '.join(scales)} for --experiment {args.experiment}")
    if args.experiment == "table" and (args.other_corpus or args.calibrate_grid or args.keep_models):
        ap.error("--other-corpus, --calibrate-grid and --keep-models are for --experiment drift or dora")
    if args.experiment == "dora" and args.calibrate_grid:
        ap.error("--calibrate-grid is for --experiment drift")

    from portllm_cli.demo import material
    from portllm_cli.demo.run import _quiet_libraries, head_jsonl
    from portllm_cli.io.home import portllm_home
    from portllm_cli.core.models import resolve_device

    _quiet_libraries()
    t0 = time.perf_counter()
    device = resolve_device(args.device)
    sc = scales[args.scale]
    if args.scale == "reference" and not device.startswith("cuda"):
        log("warning: the reference scale on a CPU takes days; use --scale small or medium here")
    # the dora experiment shares the drift experiment's workdir: the same evolved models and data splits
    work = args.workdir or portllm_home() / "paper-table" / (args.scale if args.experiment == "table"
                                                             else f"drift-{args.scale}")
    work.mkdir(parents=True, exist_ok=True)

    def notify(n: Any) -> None:
        log(f"{n.what}" + (f" — licence: {n.licence}" if n.licence else ""))

    model = args.model.resolve() if args.model else material.smollm2_dir(notify)
    model_name = model.name if args.model else "SmolLM2-135M-Instruct"
    task_name = f"{args.task_data.name} (sst2 prompt)" if args.task_data else "sentence polarity"
    corpus = args.corpus or material.python_docs_corpus(sc["corpus_bytes"], notify)
    corpus_name = args.corpus.name if args.corpus else "the Python 3.11 docs"
    if args.experiment in ("drift", "dora"):
        return _main_drift(args, sc, device, work, model, model_name, task_name, corpus, corpus_name, notify, t0, argv)
    if args.task_data:
        rows = list(dict.fromkeys(drift_table.read_text_label_jsonl(args.task_data)))
        import random

        random.Random(0).shuffle(rows)
        tr, _, te = drift_table.split_three(rows[sc["test"]:], rows[: sc["test"]], sc["train"], 0, sc["test"])
        train = drift_table._write_rows(work / f"train-{sc['train']}-{args.task_data.stem}.jsonl", tr)
        test = drift_table._write_rows(work / f"test-{sc['test']}-{args.task_data.stem}.jsonl", te)
        n_train, n_test = len(tr), len(te)
    else:
        pol = material.polarity_data(notify, n_test=1000, seed=0)
        train = work / f"train-{sc['train']}.jsonl"
        test = work / f"test-{sc['test']}.jsonl"
        n_train = head_jsonl(pol.train, sc["train"], train)
        n_test = head_jsonl(pol.test, sc["test"], test)
    mat = {"model": model, "corpus": str(corpus), "train": str(train), "test": str(test), "n_test": n_test}
    runs = [run_seed(s, sc, mat, work, device) for s in args.seeds]

    cmd = "python benchmarks/paper_table.py " + " ".join(argv if argv is not None else sys.argv[1:])
    import torch
    import transformers

    doc = {
        "scale": args.scale, "device": device_name(device), "command": cmd.strip(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "wall_s": time.perf_counter() - t0,
        "settings": {**sc, "train": n_train, "test": n_test, **{k: (",".join(v) if isinstance(v, tuple) else v) for k, v in LORA.items()}},
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version()},
        "runs": runs, "model_name": model_name, "task_name": task_name, "corpus": corpus_name,
        "notes": ([] if args.scale == "reference" else
                  [f"'{args.scale}' scale: a shrunken protocol for a CPU, NOT the reference scale; the numbers are "
                   "not comparable with the reference table."]),
    }
    args.out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"paper_table-{args.scale}-{'cuda' if device.startswith('cuda') else 'cpu'}"
    (args.out_dir / f"{stem}.json").write_text(json.dumps(doc, indent=2, default=str) + "\n")
    md = markdown(doc)
    (args.out_dir / f"{stem}.md").write_text(md)
    print(md)
    log(f"wrote {args.out_dir / stem}.md and .json")
    return 0


def _main_drift(args: Any, sc: dict[str, Any], device: str, work: Path, model: Path, model_name: str,
                task_name: str, corpus: Path, corpus_name: str, notify: Any, t0: float, argv: list[str] | None) -> int:
    """--experiment drift and dora: the same evolutions, data splits and workdir; different runs."""
    import drift_table

    from portllm_cli.core.calibrate import parse_grid
    from portllm_cli.errors import PortllmError

    try:
        grid = parse_grid(args.calibrate_grid)
    except PortllmError as exc:
        raise SystemExit(f"--calibrate-grid: {exc}") from None
    dora = args.experiment == "dora"
    if args.other_corpus:
        other, other_name = args.other_corpus, args.other_corpus.name
    else:
        from austen import austen_corpus

        other, other_name = austen_corpus(sc["corpus_bytes"], notify), "Jane Austen's novels"
    data = drift_table.task_splits(work, sc, args.task_data, notify)
    mat = {**data, "corpora": {"corpus": str(corpus), "other": str(other)}}
    if dora:
        import dora_table

        result = dora_table.run_experiment(scale=args.scale, seeds=args.seeds, device=device, work=work, model=model,
                                           mat=mat, keep_models=args.keep_models)
    else:
        result = drift_table.run_experiment(scale=args.scale, seeds=args.seeds, device=device, work=work,
                                            model=model, mat=mat, grid=grid, keep_models=args.keep_models)
    cmd = "python benchmarks/paper_table.py " + " ".join(argv if argv is not None else sys.argv[1:])
    import torch
    import transformers

    doc = {
        "experiment": args.experiment, "scale": args.scale, "device": device_name(device), "command": cmd.strip(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "wall_s": time.perf_counter() - t0,
        "model_name": model_name, "task_name": task_name, "seeds": args.seeds, **({} if dora else {"grid": grid}),
        "corpora": {"corpus": f"{corpus_name} ({sc['corpus_bytes']:,} bytes)" if not args.corpus else corpus_name,
                    "other": f"{other_name} ({sc['corpus_bytes']:,} bytes)" if not args.other_corpus else other_name},
        "data": {k: data[k] for k in ("n", "task_data")},
        "settings": {**sc, **{f"lora_{k}": (",".join(v) if isinstance(v, tuple) else v)
                              for k, v in drift_table.LORA.items()}},
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "python": platform.python_version()},
        **result,
        "notes": ([f"'{args.scale}' scale: a smoke test of the wiring, not a measurement"] if args.scale == "smoke"
                  else []),
    }
    args.out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"paper_table-{args.experiment}-{args.scale}-{'cuda' if device.startswith('cuda') else 'cpu'}"
    (args.out_dir / f"{stem}.json").write_text(json.dumps(doc, indent=2, default=str) + "\n")
    md = dora_table.markdown(doc) if dora else drift_table.markdown(doc)
    (args.out_dir / f"{stem}.md").write_text(md)
    print(md)
    log(f"wrote {args.out_dir / stem}.md and .json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
