"""portllm diff: how far apart two models, two patches, or a patch and a model are."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Optional

import typer

from portllm_cli.cli._options import AllowPickleOpt, JsonOpt, NoVerifyOpt, QuietOpt
from portllm_cli.errors import EXIT_INCOMPATIBLE, UsageError

if TYPE_CHECKING:
    from portllm_cli.core.diff import DiffReport

EPILOG = """\
Examples:

  portllm diff ./llama-3-8b ./llama-3.1-8b                 # how far did it move?
  portllm diff ./llama-3-8b ./llama-3.1-8b --plot drift.png
  portllm diff ./sst2.patch ./sst2-v2.patch --json         # residual, angles
  portllm diff ./sst2.patch ./llama-3.1-8b                 # fits? exit 3 if not
  portllm diff ./sst2.patch ./llama-3.1-8b --base ./llama-3-8b --json   # the patch against the drift
  portllm diff team/sst2-patch ./llama-3.1-8b              # a Hub id: a patch or a model, by its files

Exit codes: 0 compared (differences are findings), 1 unreadable input,
3 patch and model incompatible, 4 corrupt or truncated weights.
"""

SpecA = Annotated[str, typer.Argument(help="First model or patch: a directory, user/repo or user/repo@revision.", metavar="A")]
SpecB = Annotated[str, typer.Argument(help="Second model or patch.", metavar="B")]
PlotOpt = Annotated[
    Optional[Path],
    typer.Option("--plot", help="Write a per-layer bar chart to this PNG file (needs matplotlib).", metavar="FILE.png"),
]
TopOpt = Annotated[int, typer.Option("--top", help="Rows in the table, largest difference first.", min=1)]
BaseOpt = Annotated[
    Optional[str],
    typer.Option(
        "--base",
        help="With a patch and a model: the model the patch was trained on (default: the base its manifest "
        "records). The model's drift from it is set against the patch, module by module.",
        metavar="OLD_MODEL",
    ),
]


def _pct(x: float | None) -> str:
    if x is None:
        return "n/a"
    if not math.isfinite(x):
        return "inf"
    return f"{x * 100:.3f}%"


def _cos(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.6f}"


def _angles(angles: list[float]) -> str:
    if not angles:
        return "n/a"
    return f"{angles[0]:.1f}..{angles[-1]:.1f}" if len(angles) > 1 else f"{angles[0]:.1f}"


def _tables(report: "DiffReport", top: int) -> list[Any]:
    from rich.table import Table

    from portllm_cli.core.diff import ModelDiff, PatchDiff

    r = report.result
    out: list[Any] = []
    if isinstance(r, PatchDiff):
        t = Table(title=f"patch vs patch: {len(r.modules)} common modules, largest residual first")
        for col in ("module", "residual", "cosine", "norm B/A", "column angles°", "row angles°"):
            t.add_column(col, justify="left" if col == "module" else "right", overflow="fold")
        for m in r.largest(top):
            t.add_row(m.module, _pct(m.residual), _cos(m.cosine), f"{m.norm_ratio:.4f}",
                      _angles(m.column_angles), _angles(m.row_angles))
        out.append(t)
        extra = [("only in A", n) for n in r.only_in_a] + [("only in B", n) for n in r.only_in_b]
        extra += [("shape mismatch", f"{s.name} {s.shape_a} vs {s.shape_b}") for s in r.shape_mismatches]
        if extra:
            e = Table(title="modules not compared")
            e.add_column("why")
            e.add_column("module")
            for why, n in extra[:top]:
                e.add_row(why, n)
            out.append(e)
        return out
    md = r if isinstance(r, ModelDiff) else r.drift
    if not isinstance(r, ModelDiff):
        c = Table(title="patch vs model: compatibility")
        c.add_column("finding")
        c.add_column("detail")
        for e in r.compat.errors:
            c.add_row("[red]error[/red]", e)
        for w in r.compat.warnings:
            c.add_row("[yellow]warning[/yellow]", w)
        c.add_row("targeted modules", f"{len(r.compat.key_map)} fit")
        c.add_row("recorded base", r.base_path or (r.base_spec or "none"))
        if r.base_note:
            c.add_row("note", r.base_note)
        out.append(c)
    if md is None or not (md.tensors or md.only_in_a or md.only_in_b or md.shape_mismatches):
        return out
    title = "model vs model" if isinstance(r, ModelDiff) else "targeted weights: patch's base vs model"
    t = Table(title=f"{title}: {len(md.tensors)} tensors compared, largest drift first")
    cols = ["tensor", "shape", "drift", "cosine"] + ([] if isinstance(r, ModelDiff) else ["drift / patch"])
    for col in cols:
        t.add_column(col, justify="left" if col == "tensor" else "right", overflow="fold")
    for td in md.largest(top):
        row = [td.name, "x".join(map(str, td.shape)), _pct(td.drift), _cos(td.cosine)]
        if not isinstance(r, ModelDiff):
            ratio = r.drift_over_patch(td)
            row.append("n/a" if ratio is None else f"{ratio:.3f}")
        t.add_row(*row)
    out.append(t)
    g = Table(title="by module kind and overall")
    for col in ("group", "tensors", "drift", "cosine"):
        g.add_column(col, justify="left" if col == "group" else "right")
    for grp in md.kinds + [md.overall]:
        g.add_row(grp.name, str(grp.n_tensors), _pct(grp.drift), _cos(grp.cosine))
    out.append(g)
    extra = [("only in A", n) for n in md.only_in_a] + [("only in B", n) for n in md.only_in_b]
    extra += [("shape mismatch", f"{s.name} {s.shape_a} vs {s.shape_b}") for s in md.shape_mismatches]
    if extra:
        e = Table(title=f"tensors not compared ({len(extra)})")
        e.add_column("why")
        e.add_column("tensor")
        for why, n in extra[:top]:
            e.add_row(why, n)
        out.append(e)
    port = getattr(r, "port", None)
    if port is not None and port.modules:
        out.extend(_port_tables(port, top))
    return out


def _num3(x: float | None, fmt: str = "{:.3f}") -> str:
    if x is None:
        return "n/a"
    return "inf" if not math.isfinite(x) else fmt.format(x)


def _port_tables(port: Any, top: int) -> list[Any]:
    """The patch against the drift of its weights: per module (smallest patch/drift first), per kind."""
    from rich.table import Table

    cols = ("drift", "patch/D", "cos", "col ovl", "row ovl", "top-r E")

    def cells(d: dict[str, Any]) -> list[str]:
        return [_pct(d["drift"]), _num3(d["patch_over_drift"], "{:.3g}"), _num3(d["cosine"]),
                _num3(d["column_overlap"]), _num3(d["row_overlap"]), _num3(d["drift_top_r_energy"])]

    t = Table(title=f"the patch sBA against the drift D = W_model - W_base: {len(port.modules)} modules, "
                    "smallest ||sBA||/||D|| (patch/D) first")
    t.add_column("module", overflow="fold")
    for c in cols:
        t.add_column(c, justify="right")
    for m in port.largest(top):
        t.add_row(m.module, *cells(m.as_dict()))
    g = Table(title="the patch against the drift, by module kind and overall; cos = cosine(sBA, D); "
                    "col/row ovl = overlap of B's/A's subspace with D's top-r (1 = same, chance ≈ r/dim); "
                    "top-r E = share of ||D||² in its top r")
    g.add_column("group")
    g.add_column("modules", justify="right")
    for c in cols:
        g.add_column(c, justify="right")
    for grp in port.kinds + [port.overall]:
        g.add_row(grp["name"], str(grp["n_modules"]), *cells(grp))
    return [t, g]


def diff(
    a: SpecA,
    b: SpecB,
    json_out: JsonOpt = False,
    plot: PlotOpt = None,
    top: TopOpt = 20,
    allow_pickle: AllowPickleOpt = False,
    no_verify: NoVerifyOpt = False,
    quiet: QuietOpt = False,
    base: BaseOpt = None,
) -> None:
    """Compare two models, two patches, or a patch and a model, from their weights alone.

    [bold]Model vs model[/bold]: relative drift ||W_B - W_A|| / ||W_A|| and cosine per tensor, per layer, per module kind and overall, streamed a block of rows at a time.

    [bold]Patch vs patch[/bold]: residual ||ΔB - ΔA|| / ||ΔA||, cosine, norm ratio and principal angles of the column and row spaces, computed from the low-rank factors.

    [bold]Patch vs model[/bold]: does the patch fit, and how far the targeted weights moved from the patch's recorded base (when that base is on this machine, or given with --base). Then, per patched module, the patch against that drift D: ||sBA|| / ||D||, the cosine of sBA and D, and the overlap of the patch's column and row spaces with D's top-r singular subspaces (randomized SVD, streamed). These are figures, not a forecast: in the drift experiment none of them predicted how much of a patch a port keeps (README, "The drift experiment").
    """
    from portllm_cli.cli._output import Output
    from portllm_cli.core.diff import diff_paths, plot_layers

    out = Output(json_mode=json_out, quiet=quiet)
    if plot is not None:
        import importlib.util

        if plot.suffix.lower() != ".png":
            raise UsageError(f"--plot {plot}: the chart is a PNG; give a file name ending in .png")
        if not plot.resolve().parent.is_dir():
            raise UsageError(f"--plot {plot}: the directory {plot.resolve().parent} does not exist")
        if importlib.util.find_spec("matplotlib") is None:
            from portllm_cli.errors import UnsupportedError

            raise UnsupportedError("--plot needs matplotlib", hint="pip install 'portllm-cli[plot]'")
    with out.progress() as progress:
        report = diff_paths(a, b, top=top, progress=progress, allow_pickle=allow_pickle, verify=not no_verify,
                            base=base)
    for w in report.warnings:
        out.warn(w)
    for t in _tables(report, top):
        out.stderr_renderable(t)
    doc = {"out": None, **report.as_dict()}
    if plot is not None:
        doc["out"] = str(plot_layers(report, plot))
        out.info(f"Wrote {plot}")
    out.result(doc, f"{report.verdict_text}")
    if report.incompatible:
        raise typer.Exit(EXIT_INCOMPATIBLE)
