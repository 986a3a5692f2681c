"""The progress callback every long core function accepts; the CLI draws it with rich."""

from __future__ import annotations

from typing import Any, Callable, Optional

# progress(label, completed, total): label names the current phase ("port", "shard 2/4" ...);
# total is None when unknown. Called often; implementations must be cheap.
ProgressFn = Callable[[str, float, Optional[float]], None]


def no_progress(label: str, completed: float, total: float | None) -> None:
    return None


def silenced_tqdm(bar: type) -> type:
    """A subclass of the tqdm class ``bar`` that never draws, for libraries that pass disable=False
    (or draw whatever their settings say). A class, so that code importing it meanwhile may still
    subclass it."""

    class Silent(bar):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)

    return Silent
