"""portllm port: carry a patch onto an evolved model (merged weights, or a retargeted adapter)."""

from __future__ import annotations

from enum import Enum
from typing import Annotated, Optional

import typer

from portllm_cli.cli._options import (
    AllowPickleOpt,
    Device,
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

  # the scale chosen on 200 held-out labelled examples of the patch's task (no training)
  portllm port -p ./sst2.patch --to ./llama-v2 -o ./out --calibrate sst2=calib.jsonl --calibrate-limit 200

  # a patch from the Hub onto a model from the Hub; publish the retargeted adapter
  portllm port -p team/sst2-patch@v1 --to mistralai/Mistral-7B-v0.3 --as-adapter -o ./a --push-to-hub me/sst2-v0.3

  # llama.cpp / Ollama: the patch as a GGUF LoRA for a GGUF model (written as ./sst2-lora/sst2-lora.gguf)
  portllm port -p ./sst2.patch --to ./model-v2.Q4_K_M.gguf --as-adapter --format gguf -o ./sst2-lora
  llama-cli -m ./model-v2.Q4_K_M.gguf --lora ./sst2-lora/sst2-lora.gguf

  # a merged GGUF (4-bit tensors the patch touches become Q8_0; everything else copied byte for byte)
  portllm port -p ./sst2.patch --to user/model-v2-GGUF --gguf-file model-v2.Q4_K_M.gguf -o ./v2-sst2

  # PiSSA saved unconverted, or modules_to_save: name the base it was trained on
  portllm port -p ./pissa-lora --to ./llama-v2 --base ./llama-v1 -o ./out

  # DoRA keeping the relative change of each norm; saved modules copied as PEFT does
  portllm port -p ./dora --to ./llama-v2 -b ./llama-v1 --dora relative \
      --modules-to-save copy -o ./out

Every tensor of the patch must change the model (merged) or land on a module
of it (adapter); the count is printed. A patch that would change nothing, or a
tensor of it that lands nowhere, exits 3.

Exit codes: 0 ok, 1 failure, 2 usage, 3 patch does not fit the model, 4 integrity check failed
(also: a GGUF file that is truncated or lies about its layout).
"""

ToOpt = Annotated[
    str, typer.Option("--to", help="The evolved model to port onto: a local directory, user/repo or user/repo@revision.")
]
AsAdapterOpt = Annotated[
    bool,
    typer.Option("--as-adapter", help="Write the patch retargeted to --to (a PEFT adapter) instead of a merged model."),
]
ScaleOpt = Annotated[
    Optional[float],
    typer.Option(
        "--scale",
        help="Multiply the patch's own alpha/r by this (finite, non-zero; negative subtracts the patch). "
        "Default 1; not with --calibrate.",
    ),
]
CalibrateOpt = Annotated[
    Optional[str],
    typer.Option(
        "--calibrate",
        help="Choose the scale from labelled examples of the patch's task (TASK=FILE, read as finetune and eval "
        "read it): the evolved model is scored with the patch at each scale of --calibrate-grid by the "
        "log-likelihood of the gold answers, and the best is ported. No training.",
        metavar="TASK=FILE",
    ),
]
CalibrateGridOpt = Annotated[
    Optional[str],
    typer.Option(
        "--calibrate-grid",
        help="Scales to try: a list (0.5,1,1.5) or START:STOP:STEP (0.25:2:0.25). "
        "Default 0.5,0.75,1,1.25,1.5,1.75,2; the evolved model alone (0) is always scored for reference.",
        metavar="GRID",
    ),
]
CalibrateLimitOpt = Annotated[
    Optional[int], typer.Option("--calibrate-limit", help="Use only the first N rows of the calibration file.",
                                metavar="N")
]


class CalibrateMetric(str, Enum):
    auto = "auto"
    choice = "choice"
    loglik = "loglik"


CalibrateMetricOpt = Annotated[
    Optional[CalibrateMetric],
    typer.Option(
        "--calibrate-metric",
        help="choice: mean log-likelihood of the gold answer among the task's answers (choice tasks); "
        "loglik: mean log P(gold answer | prompt); auto (default): choice where the task has choices, else loglik.",
    ),
]
CalibrateDeviceOpt = Annotated[
    Optional[Device], typer.Option("--device", help="Where --calibrate scores the model (auto picks cuda when available).")
]
FormatOpt = Annotated[
    str,
    typer.Option(
        "--format",
        help="Adapter format for --as-adapter: 'peft' (adapter_config.json + safetensors) or 'gguf' (a GGUF "
        "LoRA for llama.cpp --lora / Ollama ADAPTER). Default: gguf when --to is a GGUF, else peft.",
        metavar="peft|gguf",
    ),
]
GgufFileOpt = Annotated[
    Optional[str],
    typer.Option("--gguf-file", help="The GGUF file inside --to (a directory or user/repo), like transformers' "
                 "gguf_file=; for a split set, its first part (NAME-00001-of-0000N.gguf).", metavar="NAME"),
]
GgufMergedTypeOpt = Annotated[
    str,
    typer.Option(
        "--gguf-merged-type",
        help="Type of the merged tensors in a merged GGUF: 'auto' keeps F32/F16/BF16/Q8_0 and writes lower-bit "
        "types as Q8_0 (a 4-bit type rounds most of a LoRA's change away); 'keep' writes each in its own type; "
        "or q8_0, f16, bf16, f32.",
        metavar="auto|keep|q8_0|f16|bf16|f32",
    ),
]
GgufLoraTypeOpt = Annotated[
    str,
    typer.Option("--gguf-lora-type", help="Type of the GGUF LoRA's factors (f32 is exact; q8_0 rows shorter "
                 "than 32 fall back to f16, as llama.cpp's converter does).", metavar="f32|f16|bf16|q8_0"),
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
    scale: ScaleOpt = None,
    overwrite: OverwriteOpt = False,
    verify: VerifyOpt = False,
    no_verify: NoVerifyOpt = False,
    allow_pickle: AllowPickleOpt = False,
    base: BaseOpt = None,
    dora: DoraOpt = DoraPolicy.absolute,
    modules_to_save: WholeOpt = WholePolicy.delta,
    revision: RevisionOpt = None,
    format_: FormatOpt = "",
    gguf_file: GgufFileOpt = None,
    gguf_merged_type: GgufMergedTypeOpt = "auto",
    gguf_lora_type: GgufLoraTypeOpt = "f32",
    push_to_hub: PushToHubOpt = None,
    json_: JsonOpt = False,
    quiet: QuietOpt = False,
    calibrate: CalibrateOpt = None,
    calibrate_grid: CalibrateGridOpt = None,
    calibrate_limit: CalibrateLimitOpt = None,
    calibrate_metric: CalibrateMetricOpt = None,
    device: CalibrateDeviceOpt = None,
) -> None:
    """Apply a patch to an evolved model: write the merged model, or the patch retargeted to it.

    With --calibrate TASK=FILE the scale is chosen first: the evolved model is loaded once and scored on
    the labelled examples with the patch merged in memory at each scale of the grid; the best is
    ported (folded into B with --as-adapter) and recorded, with the grid, the scores and the data's
    sha256, as the `calibration` object of the output's record and of --json.
    """
    from portllm_cli.core import port as core
    from portllm_cli.core.config import PortConfig
    from portllm_cli.errors import UsageError
    from portllm_cli.patch.format import read_patch
    from portllm_cli.resolve import resolve

    o = Output(json_mode=json_, quiet=quiet)
    cal_grid = _check_calibrate_flags(scale, calibrate, calibrate_grid, calibrate_limit, calibrate_metric, device)
    # every setting of the port, once (the calibrated scale replaces the default below)
    cfg = PortConfig.build(None, dict(
        scale=1.0 if scale is None else scale, dora=dora, modules_to_save=modules_to_save, overwrite=overwrite,
        verify=verify, verify_patch=not no_verify, allow_pickle=allow_pickle,
    ))
    if format_ not in ("", "peft", "gguf"):
        raise UsageError(f"--format {format_!r}: expected peft or gguf")
    if format_ and not as_adapter:
        raise UsageError("--format applies to --as-adapter", hint="add --as-adapter, or drop --format")
    with o.progress() as progress:
        patch_res = resolve(patch, kind="patch", progress=progress)
        target = _resolve_target(to, revision, gguf_file, progress=progress, allow_pickle=allow_pickle)
        base_res = resolve(base, kind="model", progress=progress, allow_pickle=allow_pickle) if base else None
    cfg = PortConfig.build(cfg, dict(patch_source=patch_res, base=base_res))
    gguf_target = target.path.suffix == ".gguf"
    if as_adapter and format_ == "gguf" or gguf_target:
        if calibrate is not None:
            raise UsageError(
                "--calibrate scores a transformers model in memory; it does not run on GGUF targets or outputs",
                hint="calibrate against the safetensors model (portllm port --calibrate ... --as-adapter), "
                "then port onto the GGUF with --scale set to the chosen value",
            )
        _port_gguf(o, patch_res, target, out, cfg, as_adapter=as_adapter, format_=format_ or "gguf",
                   merged_type=gguf_merged_type, lora_type=gguf_lora_type, push_to_hub=push_to_hub)
        return
    cal_warnings: list[str] = []
    with o.progress() as progress:
        if calibrate is not None:  # the scale first, from the data; then the port as with --scale
            from portllm_cli.core.calibrate import calibrate_for_port

            cal = calibrate_for_port(
                read_patch(patch_res.path, verify=not no_verify), target, calibrate, out, grid=cal_grid,
                limit=calibrate_limit, metric=(calibrate_metric.value if calibrate_metric else "auto"),
                device=(device.value if device else "auto"), overwrite=overwrite, allow_pickle=allow_pickle,
                merging=not as_adapter, dora=cfg.dora, modules_to_save=cfg.modules_to_save, base=base_res,
                progress=progress,
            )
            cal_warnings = list(cal.warnings)
            cfg = PortConfig.build(cfg, dict(scale=cal.scale, calibration=cal.as_dict()))
        if as_adapter:
            p = read_patch(patch_res.path, verify=not no_verify)
            result = core.port_adapter(p, target, out, cfg, progress=progress)
        else:
            # given the directory, core starts copying while it reads and verifies the factors
            result = core.port_merged(patch_res.path, target, out, cfg, progress=progress)
    result.warnings = cal_warnings + list(result.warnings)
    for w in result.warnings:
        o.warn(w)
    if result.calibration is not None:
        o.info(_calibration_summary(result.calibration))
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


def _check_calibrate_flags(scale, calibrate, grid, limit, metric, device) -> list[float] | None:
    """--calibrate's flags make sense only together, and --scale not with them: usage errors (exit 2)."""
    from portllm_cli.errors import UsageError

    if calibrate is None:
        given = [n for n, v in (("--calibrate-grid", grid), ("--calibrate-limit", limit),
                                ("--calibrate-metric", metric), ("--device", device)) if v is not None]
        if given:
            raise UsageError(f"{given[0]} is for --calibrate", hint="add --calibrate TASK=FILE, or drop it")
        return None
    if scale is not None:
        raise UsageError("--scale and --calibrate both set the scale; give one",
                         hint="--calibrate chooses it from the data (use --calibrate-grid to set the values tried)")
    if limit is not None and limit < 1:
        raise UsageError(f"--calibrate-limit must be at least 1, got {limit}")
    from portllm_cli.core.calibrate import parse_grid, parse_spec

    parse_spec(calibrate)  # a bad TASK=FILE fails before anything is read
    return parse_grid(grid)


def _calibration_summary(cal: dict) -> str:
    key = "loglik" if cal["metric"] == "loglik" else "choice_loglik"
    pick = next((s for s in cal["scores"] if s["scale"] == cal["scale"]), None)
    one = next((s for s in cal["scores"] if s["scale"] == 1.0), None)
    figs = [f"{key} {pick[key]:.4f}"] if pick is not None else []
    if one is not None and cal["scale"] != 1.0:
        figs.append(f"at scale 1: {one[key]:.4f}")
    figs.append(f"patch off: {cal['reference'][key]:.4f}")
    return f"calibrated on {cal['data']['rows_used']} {cal['task']} examples: scale {cal['scale']:g} ({'; '.join(figs)})"


def _resolve_target(to: str, revision: str | None, gguf_file: str | None, *, progress=None, allow_pickle: bool = False):
    """--to as a Resolved: a safetensors model directory, or a GGUF file (local, in a directory, in
    a Hub repo with --gguf-file)."""
    import dataclasses
    import os
    from pathlib import Path

    from portllm_cli.resolve import looks_like_repo_id, resolve

    local = Path(os.path.expanduser(to))
    if gguf_file is not None and not local.exists() and looks_like_repo_id(to):
        from portllm_cli import hub

        return hub.download_gguf(to, gguf_file, revision=revision, progress=progress)
    target = resolve(to, kind="model", revision=revision, progress=progress, allow_pickle=allow_pickle)
    if target.path.is_file():
        if gguf_file is not None:
            from portllm_cli.errors import UsageError

            raise UsageError(f"--gguf-file {gguf_file}: --to {to} is already a file")
        return target
    from portllm_cli.core.gguf_port import gguf_in_dir

    found = gguf_in_dir(target.path, gguf_file)
    return dataclasses.replace(target, path=found) if found is not None else target


def _port_gguf(o, patch_res, target, out, cfg, *, as_adapter, format_, merged_type, lora_type, push_to_hub) -> None:
    from pathlib import Path

    from portllm_cli.core import gguf_port
    from portllm_cli.errors import UsageError
    from portllm_cli.patch.format import read_patch

    if Path(out).suffix == ".gguf":
        name = gguf_port.adapter_file_name(Path(out).with_suffix("")) if as_adapter else "the model's own file names"
        raise UsageError(f"--out {out}: --out is a directory; the GGUF goes inside it",
                         hint=f"drop the .gguf suffix (the file inside will be named {name})")
    if as_adapter and format_ == "peft":
        raise UsageError("--format peft onto a GGUF target: a PEFT adapter needs a transformers model",
                         hint="use --format gguf (a GGUF LoRA for llama.cpp), or --to the safetensors model")
    from portllm_cli.core.plan import prepare_patch

    # PiSSA / OLoRA saved unconverted become their plain change first; other variants are refused there
    p, _ = prepare_patch(read_patch(patch_res.path, verify=cfg.verify_patch), base=cfg.base,
                         allow_pickle=cfg.allow_pickle)
    with o.progress() as progress:
        if as_adapter:
            result = gguf_port.port_gguf_adapter(p, target, Path(out), cfg, factor_type=lora_type, progress=progress)
        else:
            result = gguf_port.port_gguf_merged(p, target, Path(out), cfg, merged_type=merged_type, progress=progress)
    for w in result.warnings:
        o.warn(w)
    if as_adapter:
        adapter = result.extra["adapter_file"]
        o.info(f"{result.modules_merged} patch modules written as a GGUF LoRA ({result.extra['architecture']}, "
               f"{lora_type}): {adapter}" + (" (verified)" if result.verified else ""))
        if target.path.suffix == ".gguf":
            o.info(f"llama.cpp:  llama-cli -m {target.path} --lora {adapter}")
            o.info(f"Ollama:     FROM {target.path}  +  ADAPTER {adapter}   (in a Modelfile)")
    else:
        kinds = sorted({f"{r['source_type']}->{r['written_type']}" for r in result.tensors})
        kept = [r["change_kept"] for r in result.tensors if r["change_kept"] is not None]
        worst = f"; patch change kept (cosine): worst {min(kept):.4f}" if kept else ""
        o.info(f"{result.modules_merged} patch modules merged into {result.target} ({', '.join(kinds)}){worst}")
        o.info(f"{result.bytes_written / 1e6:.1f} MB in {result.seconds:.1f} s: "
               + ", ".join(str(Path(out) / f) for f in result.files) + (" (verified)" if result.verified else ""))
    doc = result.as_dict()
    pushed = push_result_if_requested(result.out, push_to_hub, o)
    if pushed is not None:
        doc["hub"] = pushed
    o.result(doc, str(result.out))
