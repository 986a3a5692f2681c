"""portllm port: carry a patch onto an evolved model (merged weights, or a retargeted adapter)."""

from __future__ import annotations

from enum import Enum
from typing import Annotated, Optional

import typer

from portllm_cli.cli._options import (
    AllowPickleOpt,
    JsonOpt,
    NoVerifyOpt,
    OutOpt,
    OverwriteOpt,
    PatchOpt,
    PushToHubOpt,
    QuietOpt,
    RevisionOpt,
)
from portllm_cli.cli._output import Output
from portllm_cli.cli.hub import push_result_if_requested

EPILOG = """\
Examples:

  # the evolved model with the patch merged in (same shards, dtype, index, tokenizer)
  portllm port --patch ./sst2.patch --to ./llama-v2 --out ./llama-v2-sst2

  # the patch retargeted to the new model, for PEFT or vLLM serving
  portllm port --patch ./sst2.patch --to ./llama-v2 --as-adapter --out ./sst2-for-v2.patch

  # half strength, reread and check every written byte, machine-readable result
  portllm port -p ./sst2.patch --to ./llama-v2 -o ./out --scale 0.5 --verify --json

  # a patch from the Hub onto a model from the Hub; publish the retargeted adapter
  portllm port -p team/sst2-patch@v1 --to mistralai/Mistral-7B-v0.3 --as-adapter -o ./a --push-to-hub me/sst2-v0.3

  # PiSSA saved unconverted, or modules_to_save: name the base it was trained on
  portllm port -p ./pissa-lora --to ./llama-v2 --base ./llama-v1 -o ./out

  # DoRA keeping the relative change of each norm; saved modules copied as PEFT does
  portllm port -p ./dora --to ./llama-v2 -b ./llama-v1 --dora relative \
      --modules-to-save copy -o ./out

Every tensor of the patch must change the model (merged) or land on a module
of it (adapter); the count is printed. A patch that would change nothing, or a
tensor of it that lands nowhere, exits 3.

Exit codes: 0 ok, 1 failure, 2 usage, 3 patch does not fit the model, 4 integrity check failed.
"""

ToOpt = Annotated[
    str, typer.Option("--to", help="The evolved model to port onto: a local directory, user/repo or user/repo@revision.")
]
AsAdapterOpt = Annotated[
    bool,
    typer.Option("--as-adapter", help="Write the patch retargeted to --to (a PEFT adapter) instead of a merged model."),
]
ScaleOpt = Annotated[
    float,
    typer.Option(
        "--scale",
        help="Multiply the patch's own alpha/r by this (finite, non-zero; negative subtracts the patch).",
    ),
]
BaseOpt = Annotated[
    Optional[str],
    typer.Option(
        "--base",
        "-b",
        help="The model the patch was trained on (default: the one it records, when on this machine). Needed "
        "for PiSSA/OLoRA adapters saved unconverted, modules_to_save / biases / trainable tokens ported as "
        "a change, and --dora relative without recorded norms.",
    ),
]


class DoraPolicy(str, Enum):
    absolute = "absolute"
    relative = "relative"


class WholePolicy(str, Enum):
    delta = "delta"
    copy = "copy"


DoraOpt = Annotated[
    DoraPolicy,
    typer.Option(
        "--dora",
        help="DoRA magnitudes on the new weights: 'absolute' keeps the trained magnitudes m (what PEFT does "
        "when the adapter is loaded on the new model); 'relative' keeps the fine-tune's relative change, "
        "m * ||W_new|| / ||W_old|| per output feature.",
    ),
]
WholeOpt = Annotated[
    WholePolicy,
    typer.Option(
        "--modules-to-save",
        help="Whole tensors the adapter stores (modules_to_save, bias='all'/'lora_only', trainable token "
        "rows): 'delta' adds what training changed, new + (saved - old base); 'copy' writes the saved "
        "tensors over the new model's, as PEFT does.",
    ),
]
VerifyOpt = Annotated[
    bool,
    typer.Option(
        "--verify",
        help="After writing, reread the output: patched tensors must equal base + scale*B@A bit for bit, "
        "every other byte must equal the target's.",
    ),
]


def port(
    patch: PatchOpt,
    to: ToOpt,
    out: OutOpt,
    as_adapter: AsAdapterOpt = False,
    scale: ScaleOpt = 1.0,
    overwrite: OverwriteOpt = False,
    verify: VerifyOpt = False,
    no_verify: NoVerifyOpt = False,
    allow_pickle: AllowPickleOpt = False,
    base: BaseOpt = None,
    dora: DoraOpt = DoraPolicy.absolute,
    modules_to_save: WholeOpt = WholePolicy.delta,
    revision: RevisionOpt = None,
    push_to_hub: PushToHubOpt = None,
    json_: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Apply a patch to an evolved model: write the merged model, or the patch retargeted to it."""
    from portllm_cli.core import port as core
    from portllm_cli.patch.format import read_patch
    from portllm_cli.resolve import resolve

    o = Output(json_mode=json_, quiet=quiet)
    core.check_scale(scale)
    patch_res = resolve(patch, kind="patch")
    target = resolve(to, kind="model", revision=revision)
    base_res = resolve(base, kind="model") if base is not None else None
    common = dict(scale=scale, overwrite=overwrite, verify=verify, allow_pickle=allow_pickle, patch_source=patch_res,
                  dora=dora.value, modules_to_save=modules_to_save.value, base=base_res)
    with o.progress() as progress:
        if as_adapter:
            p = read_patch(patch_res.path, verify=not no_verify)
            result = core.port_adapter(p, target, out, progress=progress, **common)
        else:
            # given the directory, core starts copying while it reads and verifies the factors
            result = core.port_merged(patch_res.path, target, out, progress=progress,
                                      verify_patch=not no_verify, **common)
    for w in result.warnings:
        o.warn(w)
    what = "retargeted to" if as_adapter else "merged into"
    o.info(
        f"{result.modules_merged} patch modules {what} {result.target}: "
        f"{result.bytes_written / 1e6:.1f} MB in {result.seconds:.1f} s"
        + (" (verified)" if result.verified else "")
    )
    o.info(f"{result.tensors_applied} of {result.tensors_total} patch tensors "
           + ("applied" if not as_adapter else "land on modules of the target"))
    doc = result.as_dict()
    pushed = push_result_if_requested(result.out, push_to_hub, o)
    if pushed is not None:
        doc["hub"] = pushed
    o.result(doc, str(result.out))
