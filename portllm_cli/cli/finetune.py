"""portllm finetune: parse flags, call core.train.finetune, render the result."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from portllm_cli.cli._options import (
    DeviceOpt,
    DtypeOpt,
    JsonOpt,
    OverwriteOpt,
    PushToHubOpt,
    QuietOpt,
    RevisionOpt,
    TrustRemoteCodeOpt,
)
from portllm_cli.cli._output import Output
from portllm_cli.cli.hub import push_result_if_requested
from portllm_cli.core.config import FinetuneConfig

D = FinetuneConfig()  # the defaults, written once in core.config

EPILOG = """\
Examples:

  # LoRA patch for SST-2 on a local file, the paper's settings (rank 8, alpha 16, lr 1e-4, 10 epochs)
  portllm finetune --model ./smollm2 --task sst2 --data sst2.jsonl --out ./sst2.patch

  # a CSV without a header row (label,sentence with labels -1/1): name columns by position
  portllm finetune --model ./smollm2 --task sst2 --data polarity.csv --text-field 1 --label-field 0 \\
      --label-map=-1=negative,1=positive --epochs 2 --lr 3e-4 --out ./polarity.patch

  # a DoRA patch: 'port --dora relative' needs no --base later (the base's norms are recorded)
  portllm finetune --model ./smollm2 --task sst2 --data sst2.jsonl --use-dora --out ./sst2-dora.patch

  # generic prompt/completion pairs, checkpoint every 200 steps; continue after Ctrl-C with --resume
  portllm finetune --model ./llama --task completion --data pairs.jsonl --save-every 200 --out ./p
  portllm finetune --model ./llama --task completion --data pairs.jsonl --save-every 200 --out ./p --resume

  # several GPUs, data-parallel (same flags)
  accelerate launch -m portllm_cli finetune --model ./llama --task boolq --data boolq.jsonl --out ./boolq.patch

  # an 'evolved' model by full continued pretraining on a plain-text corpus (writes a model, not a patch)
  portllm finetune --model ./smollm2 --task text --data corpus.txt --full --lr 3e-5 --batch-size 16 \\
      --max-steps 1000 --out ./smollm2-evolved

Tasks: boolq sst2 mrpc rte wnli winogrande gsm8k (prompts exactly as lm-eval's tasks), completion, text.
Exit codes: 0 ok, 1 bad input, 2 usage, 130 interrupted (a checkpoint is saved; rerun with --resume).
"""


def finetune(
    model: Annotated[str, typer.Option("--model", "-m", help="Base model: a local directory, user/repo or user/repo@revision.")],
    task: Annotated[str, typer.Option("--task", "-t", help="boolq, sst2, mrpc, rte, wnli, winogrande, gsm8k, completion or text.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="The patch directory (with --full: the model directory) to write.")],
    data: Annotated[Optional[Path], typer.Option("--data", "-d", help="Local training data: JSONL, CSV, Parquet (or .txt for --task text). Without it the task's Hub dataset is used.")] = None,
    text_field: Annotated[Optional[str], typer.Option("--text-field", help="Column holding the task's text (a name, a 0-based position for header-less CSV, or FIELD=COLUMN pairs).")] = None,
    label_field: Annotated[Optional[str], typer.Option("--label-field", help="Column holding the label.")] = None,
    label_map: Annotated[Optional[str], typer.Option("--label-map", help="Map label values to choices, e.g. -1=negative,1=positive.")] = None,
    rank: Annotated[int, typer.Option("--rank", "-r", help="LoRA rank.")] = D.rank,
    alpha: Annotated[float, typer.Option("--alpha", help="LoRA alpha (scale = alpha / rank).")] = D.alpha,
    dropout: Annotated[float, typer.Option("--dropout", help="LoRA dropout.")] = D.dropout,
    use_dora: Annotated[bool, typer.Option("--use-dora", help="Train DoRA (PEFT's use_dora: a learned magnitude per output feature); the patch records the base's weight norms for 'port --dora relative'.")] = D.use_dora,
    lr: Annotated[float, typer.Option("--lr", help="Peak learning rate (AdamW, linear decay to 0).")] = D.lr,
    epochs: Annotated[int, typer.Option("--epochs", help="Passes over the data.")] = D.epochs,
    max_steps: Annotated[Optional[int], typer.Option("--max-steps", help="Stop after this many optimizer steps (overrides --epochs).")] = D.max_steps,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", help="Sequences per batch (per device).")] = D.batch_size,
    grad_accum: Annotated[int, typer.Option("--grad-accum", help="Batches per optimizer step.")] = D.grad_accum,
    max_length: Annotated[int, typer.Option("--max-length", help="Tokens per sequence (prompts are cut from the left; text chunk length).")] = D.max_length,
    target_modules: Annotated[str, typer.Option("--target-modules", help="Comma-separated module names to adapt, or all-linear.")] = ",".join(D.target_modules),
    seed: Annotated[int, typer.Option("--seed", help="Seed for LoRA init, dropout and data order.")] = D.seed,
    warmup_steps: Annotated[int, typer.Option("--warmup-steps", help="Linear warmup steps (none by default).")] = D.warmup_steps,
    weight_decay: Annotated[float, typer.Option("--weight-decay", help="AdamW weight decay.")] = D.weight_decay,
    dtype: DtypeOpt = D.dtype,  # type: ignore[assignment]
    device: DeviceOpt = D.device,  # type: ignore[assignment]
    save_every: Annotated[Optional[int], typer.Option("--save-every", help="Checkpoint every N steps into OUT.portllm-ckpt/.")] = D.save_every,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the last checkpoint in OUT.portllm-ckpt/.")] = D.resume,
    keep_checkpoints: Annotated[bool, typer.Option("--keep-checkpoints", help="Keep OUT.portllm-ckpt/ after a successful run.")] = D.keep_checkpoints,
    gradient_checkpointing: Annotated[bool, typer.Option("--gradient-checkpointing", help="Recompute activations in the backward pass (less memory, ~30% slower).")] = D.gradient_checkpointing,
    full: Annotated[bool, typer.Option("--full", help="Train every weight and write a model directory instead of a patch.")] = D.full,
    revision: RevisionOpt = None,
    overwrite: OverwriteOpt = False,
    trust_remote_code: TrustRemoteCodeOpt = False,
    push_to_hub: PushToHubOpt = None,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Fine-tune a LoRA patch (or, with --full, a whole model) on a task."""
    import warnings

    from portllm_cli.core import train
    from portllm_cli.core.progress import silence_library_bars

    silence_library_bars()  # our own bar shows each phase
    warnings.filterwarnings("ignore", category=FutureWarning)  # library deprecation notes are not for users
    config = FinetuneConfig.from_options(locals())  # every option that names a setting, built once
    o = Output(json_mode=json_out, quiet=quiet)
    with o.progress() as progress:
        result = train.finetune(model, task, out, config, progress=progress)
    if not result.is_main_process:
        return  # under accelerate launch only the main process reports
    summary = result.summary()
    what = "model" if result.full else "patch"
    mem = result.peak_memory_bytes / 2**20
    mem_kind = "GPU" if result.peak_memory_kind.startswith("cuda") else "RSS"
    human = (
        f"Wrote {what} {result.out}\n"
        f"  {result.steps} steps ({result.epochs:.2f} epochs, {result.examples} examples), "
        f"loss {summary['first_loss']:.4f} -> {result.final_loss:.4f}\n"
        f"  {result.tokens_per_s:,.0f} tokens/s on {result.device}"
        f"{f' x{result.num_processes}' if result.num_processes > 1 else ''}, peak memory {mem:,.0f} MiB ({mem_kind}), "
        f"{result.wall_s:.1f} s"
    )
    if result.checkpoint_dir is not None:
        human += f"\n  checkpoints kept in {result.checkpoint_dir}"
    pushed = push_result_if_requested(result.out, push_to_hub, o)
    if pushed is not None:
        summary["hub"] = pushed
    o.result(summary, human)
