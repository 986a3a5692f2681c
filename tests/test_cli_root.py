"""The command-line contract shared by every command: help, version, errors, exit codes, imports."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from portllm_cli import __version__
from portllm_cli.cli.app import PortllmGroup, app
from portllm_cli.errors import IncompatibleError, IntegrityError, InvalidInputError

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "transformers", "peft", "lm_eval", "matplotlib", "datasets")


def _runner() -> CliRunner:
    return CliRunner()


def test_version():
    r = _runner().invoke(app, ["--version"])
    assert r.exit_code == 0
    assert r.stdout.strip() == f"portllm {__version__}"


def test_help_lists_registered_commands():
    r = _runner().invoke(app, ["--help"])
    assert r.exit_code == 0
    names = sorted(typer.main.get_command(app).commands)  # type: ignore[attr-defined]
    for name in names:
        assert name in r.stdout
    assert "Exit codes" in r.stdout


def test_no_args_shows_help():
    r = _runner().invoke(app, [])
    assert "Usage" in r.stdout + r.stderr


def test_unknown_command_is_usage_error():
    r = _runner().invoke(app, ["no-such-command"])
    assert r.exit_code == 2
    lines = r.stderr.strip().splitlines()
    assert lines[0].startswith("Error:")
    assert "no-such-command" in lines[0]
    assert all(line.startswith(("Error:", "Hint:")) for line in lines)
    assert r.stdout == ""


def _toy_app(exc: BaseException) -> typer.Typer:
    toy = typer.Typer(cls=PortllmGroup)

    @toy.command()
    def boom() -> None:
        raise exc

    @toy.command()
    def ok(json_out: bool = typer.Option(False, "--json")) -> None:
        typer.echo(json.dumps({"ok": True}))

    return toy


@pytest.mark.parametrize(
    "exc, code",
    [
        (IncompatibleError("module x: shape (4, 4) vs (8, 4)", hint="run portllm diff"), 3),
        (IntegrityError("sha256 mismatch"), 4),
        (InvalidInputError("bad json\nsecond line"), 1),
        (KeyboardInterrupt(), 130),
        (RuntimeError("a bug"), 1),
    ],
)
def test_errors_become_one_line_and_exit_code(exc, code):
    r = _runner().invoke(_toy_app(exc), ["boom"])
    assert r.exit_code == code
    lines = r.stderr.strip().splitlines()
    assert lines[0].startswith("Error: ")
    assert len(lines) <= 2 and all(line.startswith(("Error:", "Hint:")) for line in lines)
    assert "Traceback" not in r.stderr
    assert r.stdout == ""


def test_debug_env_shows_traceback(monkeypatch):
    monkeypatch.setenv("PORTLLM_DEBUG", "1")
    r = _runner().invoke(_toy_app(RuntimeError("a bug")), ["boom"])
    assert r.exit_code == 1
    assert "Traceback" in r.stderr


def _subprocess_modules(argv: list[str]) -> list[str]:
    code = (
        "import sys\n"
        f"sys.argv = {['portllm', *argv]!r}\n"
        "from portllm_cli.cli.app import main\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
        f"print('MODULES:' + ','.join(m for m in {HEAVY!r} if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    marker = [line for line in out.stdout.splitlines() if line.startswith("MODULES:")]
    assert marker, out.stderr
    return [m for m in marker[-1][len("MODULES:"):].split(",") if m]


def test_help_does_not_import_heavy_libraries():
    assert _subprocess_modules(["--help"]) == []


def test_every_command_help_is_light_and_has_examples():
    group = typer.main.get_command(app)
    for name, cmd in group.commands.items():  # type: ignore[attr-defined]
        argv = [name, "--help"]
        r = _runner().invoke(app, argv)
        assert r.exit_code == 0, (name, r.stderr)
        if hasattr(cmd, "commands"):  # a group such as `hub`: check its subcommands
            for sub in cmd.commands:
                rs = _runner().invoke(app, [name, sub, "--help"])
                assert rs.exit_code == 0
                assert "Example" in rs.stdout, f"{name} {sub} --help has no examples"
            continue
        assert "Example" in r.stdout, f"{name} --help has no examples"
        assert _subprocess_modules(argv) == [], f"{name} --help imports heavy modules"


@pytest.mark.parametrize("shell", ["bash", "zsh", "fish"])
def test_completions_are_current(shell):
    env = dict(os.environ, _PORTLLM_COMPLETE=f"source_{shell}")
    out = subprocess.run(
        [sys.executable, "-m", "portllm_cli"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    expected = (ROOT / "completions" / f"portllm.{shell}").read_text()
    assert out.stdout == expected, (
        f"completions/portllm.{shell} is stale; regenerate with: "
        f"_PORTLLM_COMPLETE=source_{shell} portllm > completions/portllm.{shell}"
    )
