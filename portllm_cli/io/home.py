"""portllm's own cache directory, in one place: the hash cache, and the demo's material and runs."""

from __future__ import annotations

import os
from pathlib import Path


def portllm_home() -> Path:
    """$PORTLLM_HOME, else $XDG_CACHE_HOME/portllm, else ~/.cache/portllm (read at call time)."""
    root = os.environ.get("PORTLLM_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "portllm"
    )
    return Path(root)
