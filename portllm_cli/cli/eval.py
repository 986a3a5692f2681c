"""portllm eval: one table for base, evolved and patched models, scored by lm-evaluation-harness."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from portllm_cli.cli._options import (
    AllowPickleOpt,
    Device,
    DeviceOpt,
    Dtype,
    DtypeOpt,
    JsonOpt,
    QuietOpt,
    TrustRemoteCodeOpt,
)
from portllm_cli.cli._output import Output

EPILOG = """\
Examples:

  # the PortLLM table: old and new model, each alone and with the patch, on local SST-2 data
  portllm eval --model ./base --model ./base-v2 --patch ./sst2.patch --tasks sst2 --data sst2=test.jsonl

  # quick check on 100 examples, JSON on stdout, per-example predictions kept
  portllm eval -m ./base-v2 -p ./sst2.patch -t sst2,boolq --data ./data/ --limit 100 --json --log-samples ./samples

  # only two configurations, written to a file
  portllm eval -m ./base -m ./base-v2 -p ./sst2.patch -t sst2 --data sst2=test.jsonl \\
      --only ./base --only ./base-v2+./sst2.patch --output results.json

  # an lm-eval task by name (needs its data on the Hub or in the datasets cache)
  portllm eval -m ./base-v2 -p ./sst2.patch -t winogrande --num-fewshot 5

Configurations: every model alone, then every model with every patch that fits it (a patch that
does not fit a model is skipped with a note). Names are MODEL or MODEL+PATCH, as typed.
Local tasks (--data): sst2, boolq, mrpc, rte, wnli, winogrande, gsm8k, completion; files are JSONL,
JSON, CSV or Parquet with the fields `portllm finetune` reads. A directory given as --data DIR
holds files named by task (DIR/sst2.jsonl ...).

Exit codes: 0 ok, 1 failure (missing or malformed data, a model that cannot be loaded, unreachable
task data), 2 usage (unknown task, --limit 0, bad --only), 3 a patch fits none of the models,
130 interrupted.
"""

ModelsOpt = Annotated[
    list[str],
    typer.Option("--model", "-m", help="Model: a local directory, user/repo or user/repo@revision. Repeat for several."),
]
PatchesOpt = Annotated[
    Optional[list[str]],
    typer.Option("--patch", "-p", help="Patch: a directory or user/repo or user/repo@revision. Repeat for several."),
]
TasksOpt = Annotated[
    list[str], typer.Option("--tasks", "-t", help="Comma-separated task names (recipe or lm-eval names); repeatable.")
]
DataOpt = Annotated[
    Optional[list[str]],
    typer.Option("--data", help="Local data: TASK=FILE, or a directory of files named by task. Runs offline.",
                 metavar="TASK=PATH"),
]
LimitOpt = Annotated[Optional[int], typer.Option("--limit", help="Score only the first N examples of each task.")]
FewshotOpt = Annotated[Optional[int], typer.Option("--num-fewshot", help="Few-shot examples in each prompt.")]
BatchOpt = Annotated[str, typer.Option("--batch-size", help="Batch size, or 'auto'.")]
OnlyOpt = Annotated[
    Optional[list[str]],
    typer.Option("--only", help="Evaluate only this configuration: MODEL or MODEL+PATCH, as typed. Repeatable."),
]
OutputOpt = Annotated[Optional[Path], typer.Option("--output", help="Also write the JSON document to this file.")]
OverwriteOpt = Annotated[bool, typer.Option("--overwrite", help="Replace --output and --log-samples if they exist.")]
LogSamplesOpt = Annotated[
    Optional[Path],
    typer.Option("--log-samples", help="Directory for per-example predictions (JSONL per configuration and task)."),
]


def _split_tasks(values: list[str]) -> list[str]:
    out: list[str] = []
    for v in values:
        out += [t.strip() for t in v.split(",") if t.strip()]
    return out


def _fmt(score: dict[str, Any]) -> str:
    v = score.get("value")
    if v is None:
        return "–"
    se = score.get("stderr")
    return f"{v:.3f} ± {se:.3f}" if se is not None else f"{v:.3f}"


def _table(report: Any) -> Any:
    from rich.table import Table

    metrics = {t: next((m for r in report.rows if (m := r.scores.get(t, {}).get("metric"))), "") for t in report.tasks}
    table = Table(title="portllm eval", title_justify="left")
    table.add_column("configuration", overflow="fold")
    for t in report.tasks:
        table.add_column(f"{t}\n[dim]{metrics[t]}[/dim]", justify="right")
    gains = {(g.model, g.patch, g.task): g.gain for g in report.gains}
    best = {t: report.best(t) for t in report.tasks}
    for row in report.rows:
        cells = []
        for t in report.tasks:
            text = _fmt(row.scores.get(t, {}))
            g = gains.get((row.model, row.patch, t))
            if g is not None:
                text += f" [dim]({g:+.3f})[/dim]"
            if row.name in best[t]:
                text = f"[bold green]{text} ★[/bold green]"
            cells.append(text)
        table.add_row(row.name, *cells)
    table.caption = "★ best per task; (±x) change from the same model without the patch"
    return table


def eval_command(
    model: ModelsOpt,
    tasks: TasksOpt,
    patch: PatchesOpt = None,
    data: DataOpt = None,
    limit: LimitOpt = None,
    num_fewshot: FewshotOpt = None,
    batch_size: BatchOpt = "8",
    device: DeviceOpt = Device.auto,
    dtype: DtypeOpt = Dtype.auto,
    only: OnlyOpt = None,
    output: OutputOpt = None,
    log_samples: LogSamplesOpt = None,
    overwrite: OverwriteOpt = False,
    json_: JsonOpt = False,
    quiet: QuietOpt = False,
    allow_pickle: AllowPickleOpt = False,
    trust_remote_code: TrustRemoteCodeOpt = False,
) -> None:
    """Score models alone and with patches on the same tasks, in one process: the PortLLM table."""
    from portllm_cli.core import evaluate as core
    from portllm_cli.core.config import EvalConfig

    out = Output(json_mode=json_, quiet=quiet)
    task_list = _split_tasks(tasks)
    data_map, data_dir = core.parse_data_specs(data or [])
    if output is not None:
        core.check_report_path(output, overwrite=overwrite)
    options = dict(locals(), data=data_map, data_dir=data_dir, log_samples_dir=log_samples)
    config = EvalConfig.from_options(options)  # every option that names a setting, built once
    with out.progress() as progress:
        report = core.evaluate(model, patch or [], task_list, config, progress=progress)
    for s in report.skipped:
        out.info(f"skipped {s['model']}+{s['patch']}: {s['reason']}")
    doc = {"out": str(output) if output is not None else None, **report.as_dict()}
    if output is not None:
        core.write_report(doc, output, overwrite=overwrite)
        out.info(f"wrote {output}")
    if report.log_samples_dir is not None:
        out.info(f"per-example predictions in {report.log_samples_dir}")
    out.stderr_renderable(_table(report))

    def human(console: Any) -> None:
        for t in report.tasks:
            names = report.best(t)
            if not names:
                continue
            s = next(r for r in report.rows if r.name == names[0]).scores[t]
            console.print(f"{t}: best {', '.join(names)} {s['metric']} {s['value']:.4f}", markup=False,
                          highlight=False)
        for g in report.gains:
            if g.gain is not None:
                console.print(f"{g.task}: {g.patch} on {g.model} {g.metric} {g.base:.4f} -> {g.patched:.4f} "
                              f"({g.gain:+.4f})", markup=False, highlight=False)

    out.result(doc, human)
