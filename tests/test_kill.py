"""Kill a writer at several points with SIGINT, SIGTERM and SIGKILL: the output is absent or complete.

The writer (tests/kill_writer.py) writes a three-shard model through the real atomic_output_dir,
slowly, announcing each step. The test kills it right after a chosen step, then checks the
invariant: nothing under the final name unless it is complete and correct; after SIGINT/SIGTERM
no temporary directory is left; after SIGKILL the leftover is cleaned by the next run, which
succeeds.
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
POINTS = ["step 1", "step 4", "block-done"]  # mid-shard, between shards (index unwritten), before the rename


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
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
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
