"""Kill writers at several points with SIGINT, SIGTERM and SIGKILL: the output is absent or complete.

The writer (tests/kill_writer.py) writes a three-shard model through the real atomic_output_dir,
slowly, announcing each step. The test kills it right after a chosen step, then checks the
invariant: nothing under the final name unless it is complete and correct; after SIGINT/SIGTERM
no temporary directory is left; after SIGKILL the leftover is cleaned by the next run, which
succeeds. The same invariant is then checked on the real `portllm port` (a 7-shard tiny model,
killed after chosen merges) and on unmodified `portllm port` / `portllm extract` processes killed
the moment their temporary output appears.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from portllm_cli.io.atomic import TMP_MARK
from portllm_cli.io.checkpoint import Checkpoint
from tests import kill_writer

REPO = Path(__file__).resolve().parents[1]
SIGNALS = [signal.SIGINT, signal.SIGTERM, signal.SIGKILL]
POINTS = ["step 3", "block-done"]  # mid-shard (index unwritten), everything written but not yet renamed


def _sigint_default() -> None:
    """In the child: SIGINT to its default, so Python installs its KeyboardInterrupt handler even
    when the suite runs as a background job (where the shell starts it with SIGINT ignored)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def temp_dirs(parent: Path) -> list[Path]:
    return [p for p in parent.iterdir() if TMP_MARK in p.name]


def assert_complete(out: Path, generation: int | None = None) -> None:
    """The output holds exactly the expected shards, index and values (an independent check)."""
    import torch

    expected = kill_writer.expected_tensors()
    files = {p.name for p in out.iterdir()}
    assert files == set(expected) | {"model.safetensors.index.json", "config.json"}
    ck = Checkpoint.open(out)
    for fname, tensors in expected.items():
        for name, value in tensors.items():
            assert ck.locations[name][0].name == fname
            assert torch.equal(ck.tensor(name), torch.full(kill_writer.SHAPE, value))
    if generation is not None:
        assert json.loads((out / "config.json").read_text()).get("generation") == generation


def run_and_kill(out: Path, sig: int, point: str, *, overwrite: bool = False, watch_absent: bool = True):
    cmd = [sys.executable, "-m", "tests.kill_writer", str(out), "--delay", "0.25"]
    if overwrite:
        cmd.append("--overwrite")
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=_sigint_default)
    seen = []
    try:
        for line in proc.stdout:
            seen.append(line.strip())
            if watch_absent:
                # while the run is under way, nothing may appear under the final name
                assert not out.exists(), f"{out} exists during the run, after {seen[-1]!r}"
            if line.strip() == point:
                proc.send_signal(sig)
                break
        else:
            pytest.fail(f"writer ended before {point!r}: {seen} {proc.stderr.read()}")
        rest, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, seen + rest.split(), err


@pytest.mark.parametrize("point", POINTS)
@pytest.mark.parametrize("sig", SIGNALS, ids=lambda s: signal.Signals(s).name)
def test_killed_writer_leaves_nothing_partial(tmp_path, sig, point):
    out = tmp_path / "model-v2"
    code, lines, err = run_and_kill(out, sig, point)
    assert not out.exists(), f"partial output after {signal.Signals(sig).name} at {point!r}"
    if sig == signal.SIGKILL:
        assert code == -signal.SIGKILL
        assert len(temp_dirs(tmp_path)) == 1  # a SIGKILLed process cannot clean up...
    else:
        assert code == 130 and "interrupted" in lines, (code, lines, err)
        assert "Traceback" not in err
        assert temp_dirs(tmp_path) == []  # ...every other interruption does
    kill_writer.write(out)  # the rerun starts cleanly and removes the dead run's leftovers
    assert_complete(out)
    assert temp_dirs(tmp_path) == []


@pytest.mark.parametrize("sig", SIGNALS, ids=lambda s: signal.Signals(s).name)
def test_killed_overwrite_keeps_previous_output(tmp_path, sig):
    out = tmp_path / "model-v2"
    kill_writer.write(out)
    (out / "config.json").write_text(json.dumps({"model_type": "llama", "generation": 1}))
    code, _, _ = run_and_kill(out, sig, "block-done", overwrite=True, watch_absent=False)
    assert code != 0
    assert_complete(out, generation=1)  # the previous complete output, untouched
    kill_writer.write(out, overwrite=True)
    assert_complete(out)
    assert temp_dirs(tmp_path) == []


def test_unkilled_writer_completes(tmp_path):
    out = tmp_path / "model-v2"
    proc = subprocess.run(
        [sys.executable, "-m", "tests.kill_writer", str(out)], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0 and proc.stdout.split()[-1] == "complete", proc.stderr
    assert_complete(out)
    assert temp_dirs(tmp_path) == []
    assert os.listdir(tmp_path) == ["model-v2"]


# -- the real `portllm port` on a multi-shard tiny model -------------------------------------------
PORT_RECORD_NAMES = ("portllm_port.json", "portllm-port.json")


@pytest.fixture(scope="module")
def port_inputs(tmp_path_factory, tokenizer_dir):
    """A 7-shard tiny Llama, a LoRA for it, and the reference output of an uninterrupted port."""
    from portllm_cli.core.port import port_merged
    from portllm_cli.patch.format import read_patch
    from portllm_cli.resolve import resolve
    from tests import tiny

    root = tmp_path_factory.mktemp("kill-port")
    model = root / "model"
    tiny.make_model(model, max_shard_size="20KB", tokenizer_from=tokenizer_dir, seed=5)
    lora = root / "lora"
    tiny.make_lora(model, lora, seed=6)
    shards = sorted(p.name for p in model.glob("model-*.safetensors"))
    assert len(shards) >= 5, shards
    ref = root / "reference"
    port_merged(read_patch(lora), resolve(str(model), kind="model"), ref)
    return model, lora, ref, shards


def _port_args(model: Path, lora: Path, out: Path) -> list[str]:
    return ["port", "--patch", str(lora), "--to", str(model), "--out", str(out), "--quiet"]


def assert_same_as_reference(out: Path, ref: Path) -> None:
    """Every file of an uninterrupted run, byte for byte (the run record's timestamps aside)."""
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in ref.iterdir())
    for p in ref.iterdir():
        if p.name.startswith("portllm"):
            json.loads((out / p.name).read_text())  # a run record: complete JSON, contents vary by time
            continue
        assert (out / p.name).read_bytes() == p.read_bytes(), p.name


def _rerun(model: Path, lora: Path, out: Path) -> None:
    from typer.testing import CliRunner

    from portllm_cli.cli.app import app

    result = CliRunner().invoke(app, _port_args(model, lora, out))
    assert result.exit_code == 0, result.output


N_MERGES = 4  # q_proj and v_proj of two layers


@pytest.mark.parametrize(
    "sig, merge",
    [
        (signal.SIGINT, 1),
        (signal.SIGKILL, 3),
        (signal.SIGTERM, N_MERGES),  # the last merge: copies, index, tokenizer and run record still to come
    ],
    ids=lambda v: signal.Signals(v).name if isinstance(v, signal.Signals) else f"merge{v}",
)
def test_killed_port_leaves_nothing_partial(tmp_path, port_inputs, sig, merge):
    model, lora, ref, shards = port_inputs
    out = tmp_path / "model-v2-sst2"
    env = dict(os.environ, PORTLLM_TEST_MERGE_DELAY="0.3")
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.slow_port", *_port_args(model, lora, out)],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, preexec_fn=_sigint_default,
    )
    err_lines = []
    try:
        for line in proc.stderr:
            err_lines.append(line)
            assert not out.exists(), f"{out} exists during the run"
            if line.strip() == f"@@merge {merge}":
                proc.send_signal(sig)
                break
        else:
            pytest.fail(f"port ended before merge {merge}: {''.join(err_lines)}")
        stdout, rest = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    err = "".join(err_lines) + rest
    assert not out.exists(), f"partial output after {signal.Signals(sig).name} at merge {merge}"
    if sig == signal.SIGKILL:
        assert proc.returncode == -signal.SIGKILL
        assert len(temp_dirs(tmp_path)) == 1
    else:
        assert proc.returncode == 130, err
        assert "Error: interrupted; partial output was removed" in err and "Traceback" not in err
        assert stdout == ""
        assert temp_dirs(tmp_path) == []
    _rerun(model, lora, out)
    assert_same_as_reference(out, ref)
    assert temp_dirs(tmp_path) == []


def _extract_args(lora: Path, out: Path) -> list[str]:
    return ["extract", str(lora), "--out", str(out), "--quiet"]


@pytest.fixture(scope="module")
def extract_reference(port_inputs, tmp_path_factory):
    from typer.testing import CliRunner

    from portllm_cli.cli.app import app

    _, lora, _, _ = port_inputs
    ref = tmp_path_factory.mktemp("extract-ref") / "p.patch"
    res = CliRunner().invoke(app, _extract_args(lora, ref))
    assert res.exit_code == 0, res.output
    return ref


def assert_patch_like_reference(out: Path, ref: Path) -> None:
    from portllm_cli.patch.format import read_patch

    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in ref.iterdir())
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert (out / name).read_bytes() == (ref / name).read_bytes(), name
    read_patch(out)  # the manifest is complete and matches the weights


@pytest.mark.parametrize("command", ["port", "extract"])
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=lambda s: signal.Signals(s).name)
def test_killed_unmodified_command(tmp_path, port_inputs, extract_reference, command, sig):
    """`python -m portllm_cli port|extract` with no test hook, killed as soon as its temporary output appears."""
    import time

    from typer.testing import CliRunner

    from portllm_cli.cli.app import app

    model, lora, ref, _ = port_inputs
    out = tmp_path / "result"
    if command == "port":
        args, check = _port_args(model, lora, out), lambda: assert_same_as_reference(out, ref)
    else:
        args, check = _extract_args(lora, out), lambda: assert_patch_like_reference(out, extract_reference)
    proc = subprocess.Popen(
        [sys.executable, "-m", "portllm_cli", *args], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        preexec_fn=_sigint_default,
    )
    try:
        deadline = time.monotonic() + 120
        while proc.poll() is None and not temp_dirs(tmp_path) and time.monotonic() < deadline:
            time.sleep(0.001)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    # Wherever the signal landed, the invariant holds: absent, or complete and correct.
    if out.exists():
        check()
    else:
        assert proc.returncode in (130, -signal.SIGKILL), err
        if sig != signal.SIGKILL:
            assert temp_dirs(tmp_path) == [] and "Traceback" not in err
        res = CliRunner().invoke(app, args)  # the rerun starts cleanly
        assert res.exit_code == 0, res.output
    check()
    assert temp_dirs(tmp_path) == []
