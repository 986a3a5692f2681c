"""portllm finetune against a plain transformers Trainer + PEFT script, identical settings, one run.

Each side runs in its own subprocess (so peak memory is its own), on the same model, the same
tokenized examples in the same order of difficulty, the same LoRA config (r, alpha, dropout,
targets), AdamW with the same lr, linear schedule, no warmup, no weight decay, the same batch
size and number of optimizer steps, bf16 autocast on GPUs that support it, fp32 elsewhere.

Reported per side: tokens/s (non-padding tokens through the model per second of the training
loop, model loading excluded), peak memory (GPU: torch.cuda.max_memory_allocated; CPU: the
process's peak RSS, model loading included).

    python benchmarks/finetune_bench.py                      # a tiny random Llama, CPU-sized
    python benchmarks/finetune_bench.py --model ./smollm2 --steps 200 --batch-size 16 --max-length 256
    python benchmarks/finetune_bench.py --json               # one JSON document on stdout
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

WORDS = ("wonderful great dull boring film movie plot acting delight waste time fun terrible absolute the a and "
         "was with an of").split()


def make_data(path: Path, rows: int, words: int, seed: int) -> None:
    import random

    rng = random.Random(seed)
    with open(path, "w") as fh:
        for _ in range(rows):
            sentence = " ".join(rng.choice(WORDS) for _ in range(words))
            fh.write(json.dumps({"sentence": sentence, "label": rng.randint(0, 1)}) + "\n")


def _peak(device: str) -> tuple[int, str]:
    import torch

    from portllm_cli.core.train import peak_rss_bytes

    if device.startswith("cuda"):
        return int(torch.cuda.max_memory_allocated()), "cuda_max_allocated"
    return peak_rss_bytes(), "cpu_max_rss"


def run_portllm(a: argparse.Namespace) -> dict:
    from portllm_cli.core.train import finetune

    with tempfile.TemporaryDirectory() as tmp:
        r = finetune(a.model, "sst2", Path(tmp) / "p", data=Path(a.data), rank=a.rank, alpha=a.alpha,
                     dropout=a.dropout, lr=a.lr, max_steps=a.steps, batch_size=a.batch_size, max_length=a.max_length,
                     seed=a.seed, device=a.device, gradient_checkpointing=a.gradient_checkpointing)
    return {"tokens_per_s": r.tokens_per_s, "peak_memory_bytes": r.peak_memory_bytes,
            "peak_memory_kind": r.peak_memory_kind, "mean_loss": sum(r.losses) / len(r.losses), "steps": r.steps,
            "device": r.device}


def run_trainer(a: argparse.Namespace) -> dict:
    """The baseline: what a user writes with transformers.Trainer and PEFT."""
    import torch
    import transformers
    from peft import LoraConfig, get_peft_model

    from portllm_cli.core import models
    from portllm_cli.core.tasks import get_recipe, load_rows
    from portllm_cli.core.train import build_features, collate

    device = models.resolve_device(a.device)
    recipe = get_recipe("sst2")
    tok = models.load_tokenizer(Path(a.model))
    feats = build_features(recipe, load_rows(recipe, Path(a.data)), tok, a.max_length)
    torch.manual_seed(a.seed)
    model = models.load_causal_lm(Path(a.model), "float32", None)
    model = get_peft_model(model, LoraConfig(r=a.rank, lora_alpha=a.alpha, lora_dropout=a.dropout,
                                             target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    if a.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    counted = {"tokens": 0}

    class DS(torch.utils.data.Dataset):
        def __len__(self):
            return len(feats)

        def __getitem__(self, i):
            return feats[i]

    def collator(items):
        batch = collate(items, tok.pad_token_id)
        counted["tokens"] += int(batch["attention_mask"].sum())
        return batch

    clock: dict[str, float] = {}

    class Clock(transformers.TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            clock["t0"] = time.perf_counter()

        def on_train_end(self, args, state, control, **kw):
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            clock["t1"] = time.perf_counter()

    bf16 = models.bf16_supported(device)
    with tempfile.TemporaryDirectory() as tmp:
        args = transformers.TrainingArguments(
            output_dir=tmp, per_device_train_batch_size=a.batch_size, learning_rate=a.lr, max_steps=a.steps,
            lr_scheduler_type="linear", warmup_steps=0, weight_decay=0.0, optim="adamw_torch", seed=a.seed,
            bf16=bf16, use_cpu=device == "cpu", logging_steps=max(1, a.steps), save_strategy="no",
            report_to=[], dataloader_num_workers=0, remove_unused_columns=False, disable_tqdm=True,
        )
        trainer = transformers.Trainer(model=model, args=args, train_dataset=DS(), data_collator=collator,
                                       callbacks=[Clock()])
        out = trainer.train()
    elapsed = clock["t1"] - clock["t0"]
    peak, kind = _peak(device)
    return {"tokens_per_s": counted["tokens"] / elapsed, "peak_memory_bytes": peak, "peak_memory_kind": kind,
            "mean_loss": float(out.training_loss), "steps": int(out.global_step), "device": device}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="model directory (default: a tiny random Llama built on the fly)")
    p.add_argument("--device", default="auto")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--words", type=int, default=24, help="words per synthetic sentence")
    p.add_argument("--rows", type=int, default=512)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16)
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--json", action="store_true")
    p.add_argument("--only", choices=["portllm", "trainer"], help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.only:
        doc = run_portllm(a) if a.only == "portllm" else run_trainer(a)
        print(json.dumps(doc))
        return

    with tempfile.TemporaryDirectory() as tmp:
        tmp_p = Path(tmp)
        if a.model is None:
            from tests import tiny

            a.model = str(tmp_p / "tiny-llama")
            tiny.make_model(Path(a.model), seed=0)
        data = tmp_p / "bench.jsonl"
        make_data(data, a.rows, a.words, a.seed)
        base = [sys.executable, __file__, "--model", a.model, "--data", str(data), "--device", a.device,
                "--steps", str(a.steps), "--batch-size", str(a.batch_size), "--max-length", str(a.max_length),
                "--rank", str(a.rank), "--alpha", str(a.alpha), "--dropout", str(a.dropout), "--lr", str(a.lr),
                "--seed", str(a.seed)] + (["--gradient-checkpointing"] if a.gradient_checkpointing else [])
        results = {}
        for side in ("portllm", "trainer"):
            proc = subprocess.run(base + ["--only", side], capture_output=True, text=True,
                                  env=dict(os.environ, PYTHONPATH=str(ROOT)))
            if proc.returncode != 0:
                sys.stderr.write(proc.stderr[-4000:])
                raise SystemExit(f"{side} run failed")
            results[side] = json.loads(proc.stdout.strip().splitlines()[-1])
    settings = {k: getattr(a, k) for k in ("model", "device", "steps", "batch_size", "max_length", "rank", "alpha",
                                           "dropout", "lr", "seed", "gradient_checkpointing")}
    pl, tr = results["portllm"], results["trainer"]
    ratio = {"throughput_portllm_over_trainer": pl["tokens_per_s"] / tr["tokens_per_s"],
             "memory_portllm_over_trainer": pl["peak_memory_bytes"] / tr["peak_memory_bytes"]}
    if a.json:
        print(json.dumps({"settings": settings, "results": results, "ratio": ratio}, indent=2))
        return
    print(f"device: {pl['device']}   steps {a.steps}, batch {a.batch_size}, max-length {a.max_length}, "
          f"LoRA r={a.rank} alpha={a.alpha} on q_proj,v_proj")
    print(f"{'':22}{'portllm finetune':>20}{'Trainer + PEFT':>20}")
    print(f"{'tokens/s':22}{pl['tokens_per_s']:>20,.0f}{tr['tokens_per_s']:>20,.0f}")
    mem = "peak GPU memory (MiB)" if pl["peak_memory_kind"].startswith("cuda") else "peak RSS (MiB)"
    print(f"{mem:22}{pl['peak_memory_bytes'] / 2**20:>20,.0f}{tr['peak_memory_bytes'] / 2**20:>20,.0f}")
    print(f"{'mean training loss':22}{pl['mean_loss']:>20.4f}{tr['mean_loss']:>20.4f}")
    print(f"throughput ratio {ratio['throughput_portllm_over_trainer']:.2f}, "
          f"memory ratio {ratio['memory_portllm_over_trainer']:.2f}")


if __name__ == "__main__":
    main()
