"""Root command: wiring, --version, and the one place where errors become a line and an exit code."""

from __future__ import annotations

import os
import signal
import sys
import traceback
from typing import Annotated, Any, Optional

import typer
from typer._click import exceptions as _click_exc
from typer.core import TyperGroup

from portllm_cli import __version__
from portllm_cli.errors import EXIT_FAILURE, EXIT_INTERRUPTED, EXIT_USAGE, PortllmError

EPILOG = """\
Examples:

  portllm demo
  portllm extract ./my-lora --out ./sst2.patch
  portllm port --patch ./sst2.patch --to ./model-v2 --out ./v2-sst2
  portllm port --patch user/sst2-patch --to ./model-v2 --as-adapter --out ./v2-adapter

Exit codes: 0 ok, 1 failure, 2 usage, 3 incompatible patch and model,
4 integrity check failed, 130 interrupted. PORTLLM_DEBUG=1 shows tracebacks.
"""


def _error_line(message: str, hint: str | None = None) -> None:
    first = " ".join(str(message).split()) or "unknown error"
    sys.stderr.write(f"Error: {first}\n")
    if hint:
        sys.stderr.write(f"Hint: {' '.join(hint.split())}\n")
    sys.stderr.flush()


def _debug() -> bool:
    return os.environ.get("PORTLLM_DEBUG", "") not in ("", "0", "false", "False")


class PortllmGroup(TyperGroup):
    """Runs the command non-standalone so every failure is mapped here, for CliRunner and console alike."""

    def main(self, args: Any = None, prog_name: str | None = None, complete_var: str | None = None,
             standalone_mode: bool = True, **extra: Any) -> Any:
        code = 0
        try:
            rv = super().main(args=args, prog_name=prog_name or "portllm", complete_var=complete_var,
                              standalone_mode=False, **extra)
            code = rv if isinstance(rv, int) else 0
            if code == EXIT_INTERRUPTED:  # typer turns KeyboardInterrupt into Exit(130)
                _error_line("interrupted; partial output was removed")
        except PortllmError as exc:
            if _debug():
                traceback.print_exc()
            _error_line(exc.message, exc.hint)
            code = exc.exit_code
        except _click_exc.UsageError as exc:
            cmd = exc.ctx.command_path if exc.ctx is not None else "portllm"
            _error_line(exc.format_message(), f"run '{cmd} --help' for usage")
            code = EXIT_USAGE
        except _click_exc.ClickException as exc:
            _error_line(exc.format_message())
            code = exc.exit_code
        except (typer.Abort, KeyboardInterrupt):
            _error_line("interrupted; partial output was removed")
            code = EXIT_INTERRUPTED
        except typer.Exit as exc:
            code = exc.exit_code
        except OSError as exc:
            if _debug():
                traceback.print_exc()
            import errno

            if exc.errno == errno.ENOSPC:
                _error_line("no space left on device; partial output was removed", "free some space and run again")
            else:
                where = f"{exc.filename}: " if exc.filename else ""
                _error_line(f"{where}{exc.strerror or exc}")
            code = EXIT_FAILURE
        except Exception as exc:  # an unexpected bug: still one line, traceback on request
            if _debug():
                traceback.print_exc()
            _error_line(f"unexpected {exc.__class__.__name__}: {exc}", "set PORTLLM_DEBUG=1 for the traceback and report it")
            code = EXIT_FAILURE
        if standalone_mode:
            sys.exit(code)
        return code


app = typer.Typer(
    name="portllm",
    cls=PortllmGroup,
    help="Carry a fine-tuned LoRA patch from one version of an LLM to the next, without retraining.",
    epilog=EPILOG,
    no_args_is_help=True,
    context_settings={"help_option_names": ["-h", "--help"]},
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"portllm {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: Annotated[
        Optional[bool],
        typer.Option("--version", "-V", help="Print the version and exit.", callback=_version, is_eager=True),
    ] = None,
) -> None:
    """Carry a fine-tuned LoRA patch from one version of an LLM to the next, without retraining."""


def _register() -> None:
    # Command modules import only typer at import time; torch and friends load inside the bodies.
    from portllm_cli.cli import demo as demo_cmd
    from portllm_cli.cli import diff as diff_cmd
    from portllm_cli.cli import eval as eval_cmd
    from portllm_cli.cli import extract, port
    from portllm_cli.cli import finetune as finetune_cmd
    from portllm_cli.cli.hub import hub_app

    app.command("demo", epilog=demo_cmd.EPILOG)(demo_cmd.demo)
    app.command("finetune", epilog=finetune_cmd.EPILOG)(finetune_cmd.finetune)
    app.command("extract", epilog=extract.EPILOG)(extract.extract)
    app.command("port", epilog=port.EPILOG)(port.port)
    app.command("eval", epilog=eval_cmd.EPILOG)(eval_cmd.eval_command)
    app.command("diff", epilog=diff_cmd.EPILOG)(diff_cmd.diff)
    app.add_typer(hub_app, name="hub")


_register()


def _on_sigterm(signum: int, frame: Any) -> None:
    # Turn SIGTERM into the same path as Ctrl-C so temporary outputs are cleaned up.
    raise KeyboardInterrupt


def main() -> None:
    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        app()
    finally:
        # With torch loaded, the interpreter's final garbage collection takes about a second and
        # frees nothing we need: move every live object out of the collector's reach at exit.
        import gc

        gc.freeze()
