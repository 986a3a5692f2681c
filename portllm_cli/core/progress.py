"""The progress callback every long core function accepts; the CLI draws it with rich."""

from __future__ import annotations

from typing import Callable, Optional

# progress(label, completed, total): label names the current phase ("port", "shard 2/4" ...);
# total is None when unknown. Called often; implementations must be cheap.
ProgressFn = Callable[[str, float, Optional[float]], None]


def no_progress(label: str, completed: float, total: float | None) -> None:
    return None
