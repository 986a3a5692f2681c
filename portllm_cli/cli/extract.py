"""portllm extract: a portable patch from a PEFT adapter, or by SVD from a fully fine-tuned model."""

from __future__ import annotations

from enum import Enum
from typing import Annotated, Any, Optional

import typer

from portllm_cli.cli._options import (
    AllowPickleOpt,
    JsonOpt,
    OutOpt,
    OverwriteOpt,
    PushToHubOpt,
    QuietOpt,
    RevisionOpt,
)
from portllm_cli.cli._output import Output
from portllm_cli.cli.hub import push_result_if_requested
from portllm_cli.errors import UsageError

EPILOG = """\
Examples:

  # a PEFT LoRA adapter -> a patch (base taken from adapter_config.json, checked against it)
  portllm extract ./my-lora --out ./sst2.patch

  # the adapter's base lives somewhere else on this machine
  portllm extract ./my-lora --base ./SmolLM2-135M --task sst2 --out ./sst2.patch

  # a full fine-tune -> a rank-16 LoRA patch by truncated SVD of W_ft - W_base
  portllm extract ./smollm2-sst2-full --base ./SmolLM2-135M --rank 16 --out ./sst2.patch

  # the smallest rank per module that keeps 99% of each delta's spectrum, only q/v projections
  portllm extract ./ft --base ./base --energy 0.99 --target-modules q_proj,v_proj --json --out ./p

  # a fine-tuned model on the Hub (its file list says it is a model, not an adapter)
  portllm extract someone/smollm2-sst2-full --base ./SmolLM2-135M --rank 16 --out ./sst2.patch

  # extract and publish in one go
  portllm extract ./my-lora --out ./sst2.patch --push-to-hub me/sst2-patch

  # a PiSSA/OLoRA adapter saved unconverted: converted against its base (rank 2r)
  portllm extract ./pissa-lora --base ./SmolLM2-135M --out ./sst2.patch

DoRA, lora_bias, modules_to_save, biases, trainable tokens and MoE experts keep
their config fields; a DoRA patch records its base's weight norms (for
'portllm port --dora relative'). What cannot be ported exactly is refused.
"""


class SvdDtype(str, Enum):
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


def extract(
    source: Annotated[
        str,
        typer.Argument(
            metavar="SOURCE",
            help="A PEFT LoRA adapter, or a fully fine-tuned model (then --base and --rank/--energy): a directory, "
            "user/repo or user/repo@revision.",
            show_default=False,
        ),
    ],
    out: OutOpt,
    base: Annotated[
        Optional[str],
        typer.Option(
            "--base",
            "-b",
            help="Base model (a directory, user/repo or user/repo@rev). Adapter: overrides base_model_name_or_path. Fine-tune: required.",
        ),
    ] = None,
    rank: Annotated[
        Optional[int], typer.Option("--rank", "-r", help="SVD mode: keep this rank per module (clamped to the weight's size).")
    ] = None,
    energy: Annotated[
        Optional[float],
        typer.Option("--energy", help="SVD mode: per module, the smallest rank keeping this share (0, 1] of sum(S^2)."),
    ] = None,
    target_modules: Annotated[
        Optional[str],
        typer.Option(
            "--target-modules",
            "-t",
            help="SVD mode: comma-separated module names (PEFT suffix rule). Default: every *_proj linear in the layers.",
        ),
    ] = None,
    dtype: Annotated[SvdDtype, typer.Option("--dtype", help="SVD mode: dtype of the stored factors.")] = SvdDtype.float32,
    task: Annotated[Optional[str], typer.Option("--task", help="Record this task name in the manifest.")] = None,
    no_base_check: Annotated[
        bool,
        typer.Option("--no-base-check", help="Adapter mode: if the base cannot be found, record its id unchecked (warns)."),
    ] = False,
    revision: RevisionOpt = None,
    allow_pickle: AllowPickleOpt = False,
    overwrite: OverwriteOpt = False,
    push_to_hub: PushToHubOpt = None,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Make a portable patch from a PEFT LoRA adapter, or by truncated SVD from a fully fine-tuned model."""
    from portllm_cli.core import extract as core
    from portllm_cli.resolve import resolve

    o = Output(json_mode=json_out, quiet=quiet)
    with o.progress() as progress:
        # one resolution: a Hub id's file list says whether it is an adapter or a model
        res = resolve(source, revision=revision, progress=progress, allow_pickle=allow_pickle)
        if res.kind == "patch":
            given = [f for f, v in (("--rank", rank), ("--energy", energy), ("--target-modules", target_modules))
                     if v is not None]
            if given:
                raise UsageError(
                    f"{', '.join(given)} only apply to a fine-tuned model; {source} is a LoRA adapter",
                    hint="drop them: an adapter's factors are copied as they are",
                )
            result = core.extract_adapter(
                res, out, base=base, overwrite=overwrite, base_check=not no_base_check, task=task,
                allow_pickle=allow_pickle, progress=progress,
            )
        else:
            if base is None:
                raise UsageError(f"{source} is a full model: --base is required to take the difference",
                                 hint="pass --base BASE_MODEL --rank R")
            if (rank is None) == (energy is None):
                raise UsageError("give exactly one of --rank and --energy", hint="e.g. --rank 16 or --energy 0.99")
            if no_base_check:
                raise UsageError("--no-base-check applies to adapters only; SVD extraction reads the base")
            base_res = resolve(base, kind="model", progress=progress, allow_pickle=allow_pickle)
            targets = target_modules.split(",") if target_modules is not None else None
            result = core.extract_svd(
                res, base_res, out, rank=rank, energy=energy, target_modules=targets, dtype=dtype.value,
                overwrite=overwrite, task=task, allow_pickle=allow_pickle, progress=progress,
            )
    for w in result.warnings:
        o.warn(w)
    doc = result.as_dict()
    pushed = push_result_if_requested(result.out, push_to_hub, o)
    if pushed is not None:
        doc["hub"] = pushed
    o.result(doc, lambda console: _human(console, result))


def _human(console: Any, result: Any) -> None:
    if result.mode == "adapter":
        console.print(
            f"Wrote {result.out}: {result.modules} LoRA modules, rank {result.rank}, base {result.base}", markup=False
        )
        return
    from rich.table import Table

    table = Table(title=None, show_edge=False, pad_edge=False)
    table.add_column("module")
    table.add_column("rank", justify="right")
    table.add_column("rel. error", justify="right")
    for m, r in result.ranks.items():
        table.add_row(m, str(r), f"{result.per_module_error[m]:.3e}")
    console.print(table)
    ranks = sorted(set(result.ranks.values()))
    shown = str(ranks[0]) if len(ranks) == 1 else f"{ranks[0]}..{ranks[-1]}"
    console.print(
        f"Wrote {result.out}: {result.modules} LoRA modules by SVD, rank {shown}, "
        f"overall relative error {result.relative_error:.3e}"
        + (f", {len(result.skipped)} unchanged module(s) skipped" if result.skipped else ""),
        markup=False,
    )
