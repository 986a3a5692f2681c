"""What the benchmark scripts share: a log line, resumable cached stages, the machine's name."""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any, Callable


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def cached_json(path: Path, make: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """make() -> dict, stored in path; an existing file is reused (stages are resumable)."""
    if path.exists():
        return json.loads(path.read_text())
    doc = make()
    tmp = path.with_name(path.name + ".part")
    tmp.write_text(json.dumps(doc, indent=2, default=str))
    tmp.replace(path)
    return doc


def cpu_name() -> str:
    """The CPU's model name (from /proc/cpuinfo where there is one)."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return cpu


def cpu_count() -> int:
    return os.cpu_count() or 1


def markdown_end(lines: list[str], doc: dict[str, Any]) -> str:
    """A results document's markdown lines, its notes appended, as one text."""
    if doc.get("notes"):
        lines = lines + [""] + [f"Note: {n}" for n in doc["notes"]]
    return "\n".join(lines) + "\n"
