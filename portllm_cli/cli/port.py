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
    revision: RevisionOpt = None,
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
    from portllm_cli.patch.format import read_patch
    from portllm_cli.resolve import resolve

    o = Output(json_mode=json_, quiet=quiet)
    cal_grid = _check_calibrate_flags(scale, calibrate, calibrate_grid, calibrate_limit, calibrate_metric, device)
    scale = core.check_scale(1.0 if scale is None else scale)
    patch_res = resolve(patch, kind="patch")
    target = resolve(to, kind="model", revision=revision)
    common = dict(scale=scale, overwrite=overwrite, verify=verify, allow_pickle=allow_pickle, patch_source=patch_res)
    cal_warnings: list[str] = []
    with o.progress() as progress:
        if calibrate is not None:  # the scale first, from the data; then the port as with --scale
            from portllm_cli.core.calibrate import calibrate_for_port

            cal = calibrate_for_port(
                read_patch(patch_res.path, verify=not no_verify), target, calibrate, out, grid=cal_grid,
                limit=calibrate_limit, metric=(calibrate_metric.value if calibrate_metric else "auto"),
                device=(device.value if device else "auto"), overwrite=overwrite, allow_pickle=allow_pickle,
                merging=not as_adapter, progress=progress,
            )
            cal_warnings = list(cal.warnings)
            common.update(scale=cal.scale, calibration=cal.as_dict())
        if as_adapter:
            p = read_patch(patch_res.path, verify=not no_verify)
            result = core.port_adapter(p, target, out, progress=progress, **common)
        else:
            # given the directory, core starts copying while it reads and verifies the factors
            result = core.port_merged(patch_res.path, target, out, progress=progress,
                                      verify_patch=not no_verify, **common)
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
