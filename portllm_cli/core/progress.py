"""Progress, in one place: the callback every long core function accepts (the CLI draws it with
rich), and the silencing of the bars libraries would draw themselves."""

from __future__ import annotations

import sys
from typing import Any, Callable, Optional

# progress(label, completed, total): label names the current phase ("port", "shard 2/4" ...);
# total is None when unknown. Called often; implementations must be cheap.
ProgressFn = Callable[[str, float, Optional[float]], None]


def no_progress(label: str, completed: float, total: float | None) -> None:
    return None


def counter(progress: ProgressFn, label: str, total: float | None) -> Callable[[float], None]:
    """tick(n): add n to a running count and report it as ``label`` of ``total``; safe to call
    from several threads (a port's copy and merge workers tick side by side). Reports 0 at once."""
    import threading

    lock = threading.Lock()
    done = 0.0

    def tick(n: float) -> None:
        nonlocal done
        with lock:
            done += n
            progress(label, done, total)

    progress(label, 0, total)
    return tick


def silenced_tqdm(bar: type) -> type:
    """A subclass of the tqdm class ``bar`` that never draws, for libraries that pass disable=False
    (or draw whatever their settings say). A class, so that code importing it meanwhile may still
    subclass it."""

    class Silent(bar):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)

    return Silent


def silence_library_bars() -> None:
    """Turn off, process-wide, the progress bars transformers (loading shards) and datasets (when
    already imported) draw themselves: portllm reports through ProgressFn, or shows nothing under
    --json / --quiet. Bars that ignore those switches are swapped for :func:`silenced_tqdm`
    (lm-eval's, transformers' GGUF dequantization, huggingface_hub's downloads)."""
    try:
        import transformers

        transformers.utils.logging.disable_progress_bar()
    except ImportError:
        pass
    datasets = sys.modules.get("datasets")
    if datasets is not None and hasattr(datasets, "disable_progress_bars"):
        datasets.disable_progress_bars()
