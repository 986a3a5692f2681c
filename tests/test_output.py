"""The one JSON writer behind every --json document and eval's --output file: standard JSON only."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest


def _strict(text: str):
    """Parse as a standard JSON parser would: the bare words NaN / Infinity are refused."""

    def refuse(name: str):
        raise ValueError(f"non-standard JSON constant {name}")

    return json.loads(text, parse_constant=refuse)


DOC = {
    "loss": float("nan"),
    "ratio": float("inf"),
    "nested": {"low": float("-inf"), "ok": 0.5, "rows": [1.0, float("nan"), (2, float("inf"))]},
    "path": Path("/tmp/x"),
    "n": 3,
    "flag": True,
}


def test_json_output_has_null_for_non_finite_numbers(capsys):
    from portllm_cli.cli._output import Output

    Output(json_mode=True).result(DOC, "human text")
    out = capsys.readouterr().out
    assert "NaN" not in out and "Infinity" not in out
    doc = _strict(out)
    assert doc == {"loss": None, "ratio": None,
                   "nested": {"low": None, "ok": 0.5, "rows": [1.0, None, [2, None]]},
                   "path": "/tmp/x", "n": 3, "flag": True}


def test_json_output_still_refuses_unknown_objects(capsys):
    from portllm_cli.cli._output import Output

    with pytest.raises(TypeError):
        Output(json_mode=True).result({"x": object()})


def test_eval_output_file_has_null_for_non_finite_numbers(tmp_path):
    from portllm_cli.core.evaluate import write_report

    path = tmp_path / "results.json"
    write_report({"scores": {"sst2": {"value": float("nan"), "stderr": math.inf}}}, path)
    assert _strict(path.read_text()) == {"scores": {"sst2": {"value": None, "stderr": None}}}


def test_dumps_cleans_what_default_returns():
    from portllm_cli.io.strict_json import dumps

    class Odd:
        pass

    text = dumps({"x": Odd()}, default=lambda o: [float("nan"), "odd"])
    assert _strict(text) == {"x": [None, "odd"]}


# -- atomic single-file writes (plots, results files, cached downloads) ---------------------------
def test_atomic_output_file_replaces_only_when_complete(tmp_path):
    from portllm_cli.io.atomic import TMP_MARK, _host_tag, atomic_output_file, write_file_atomic

    target = tmp_path / "results.json"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_output_file(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed mid-write")
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]
    write_file_atomic(target, "new")
    assert target.read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]
    # what a killed run (a process that is gone) left is removed by the next write
    stale = tmp_path / f".results.json{TMP_MARK}999999999-{_host_tag()}-0000"
    stale.write_text("left by a killed run")
    write_file_atomic(target, b"bytes")
    assert target.read_bytes() == b"bytes" and not stale.exists()


# -- one scheme of top-level keys for every command's --json (README: "Conventions") -------------
def test_every_command_result_has_out_seconds_and_warnings(tmp_path):
    from portllm_cli.core.evaluate import EvalReport
    from portllm_cli.core.extract import ExtractResult
    from portllm_cli.core.port import PortResult
    from portllm_cli.core.train import FinetuneResult
    from portllm_cli.demo.run import DemoResult, DemoSizes
    from portllm_cli.hub import PullResult

    out = tmp_path / "out"
    docs = {
        "finetune": FinetuneResult(out=out, steps=1, epochs=1.0, final_loss=0.5, losses=[0.5], tokens_per_s=1.0,
                                   peak_memory_bytes=1, peak_memory_kind="cpu_max_rss", wall_s=2.0, examples=1,
                                   trainable_params=1, full=True).summary(),
        "port": PortResult(out, "merged", "p", "t", 1, 1, 2.0, 1.0).as_dict(),
        "extract": ExtractResult(out, "adapter", 1, 4, {"m": 4}, "base").as_dict(),
        "hub pull": PullResult(out, "alice/p", "0" * 40, [], True).as_dict(),
        "eval": EvalReport([], [], ["sst2"], elapsed_s=2.0).as_dict(),
        "demo": DemoResult([], None, None, None, DemoSizes.for_device("cpu"), {}, {}, [], 2.0, out).as_dict(),
    }
    for command, doc in docs.items():
        assert isinstance(doc["warnings"], list), command
        if command != "eval":  # eval's "out" is its --output file, set by the command line
            assert doc["out"] == str(out), command
        if command not in ("extract", "hub pull"):
            assert doc["seconds"] == 2.0, command
        for old in ("path", "wall_s", "elapsed_s", "workdir", "plot"):
            assert old not in doc, (command, old)
    assert docs["finetune"]["full"] is True and "model" not in docs["finetune"]
