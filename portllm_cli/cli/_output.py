"""One output object: results to stdout (human or --json), progress, messages and errors to stderr."""

from __future__ import annotations

import contextlib
import sys
from typing import Any, Callable, Iterator

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


class Output:
    def __init__(self, *, json_mode: bool = False, quiet: bool = False) -> None:
        self.json_mode = json_mode
        self.quiet = quiet
        self.err = Console(stderr=True, highlight=False, soft_wrap=True)
        self.out = Console(file=sys.stdout, highlight=False, soft_wrap=True)
        self._progress: Progress | None = None

    @property
    def show_progress(self) -> bool:
        return not (self.json_mode or self.quiet) and sys.stderr.isatty()

    # -- messages (stderr) -------------------------------------------------------------------
    def info(self, message: str) -> None:
        if not (self.json_mode or self.quiet):
            self.err.print(message, markup=False)

    def warn(self, message: str) -> None:
        if not self.quiet:
            self.err.print(f"Warning: {message}", markup=False, style="yellow")

    def stderr_renderable(self, renderable: Any) -> None:
        """A table or panel for people; never under --json/--quiet."""
        if not (self.json_mode or self.quiet):
            self.err.print(renderable)

    # -- results (stdout) --------------------------------------------------------------------
    def result(self, data: dict[str, Any], human: str | Callable[[Console], None] | None = None) -> None:
        if self.json_mode:
            from portllm_cli.io.strict_json import dumps

            sys.stdout.write(dumps(data) + "\n")
            sys.stdout.flush()
            return
        if human is None:
            return
        if callable(human):
            human(self.out)
        else:
            self.out.print(human, markup=False)

    # -- progress (stderr) -------------------------------------------------------------------
    @contextlib.contextmanager
    def progress(self) -> Iterator[Callable[[str, float, float | None], None]]:
        """Yield a core-compatible progress callback drawing one rich bar per label."""
        if not self.show_progress:
            yield lambda label, done, total: None
            return
        tasks: dict[str, Any] = {}
        with Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=self.err,
            transient=False,
        ) as prog:

            def update(label: str, done: float, total: float | None) -> None:
                key = label.split(" · ", 1)[0]
                if key not in tasks:
                    tasks[key] = prog.add_task(label, total=total)
                prog.update(tasks[key], completed=done, total=total, description=label)

            yield update
