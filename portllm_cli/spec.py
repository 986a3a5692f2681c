"""What a --model / --patch / --to / SOURCE argument names, before anything is read or downloaded.

A spec is a local path, ``user/repo`` or ``user/repo@revision``. This module holds the parts of
that idea that both ``portllm_cli.resolve`` (which turns a spec into a local directory) and
``portllm_cli.hub`` (which downloads one) need: the result type, revision splitting, repo-id
detection, and the one rule that says whether a set of files is a patch or a model. It sits below
both, so neither imports the other for them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from portllm_cli.errors import UnsafeInputError
from portllm_cli.io.checkpoint import WEIGHT_SUFFIXES
from portllm_cli.patch.format import ADAPTER_CONFIG

PATCH = "patch"
MODEL = "model"
MODEL_CONFIG = "config.json"
_REPO_RE = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+(@[\w.\-/]+)?$")


# -- patch or model: one rule for a local directory and a Hub repo's file list ----------------------
def classify(names: Iterable[str]) -> str | None:
    """"patch", "model" or None for the file names at the top of a directory or repo.

    A patch has ``adapter_config.json`` (a PEFT adapter, with or without portllm's manifest); a
    model has ``config.json`` or weight files (safetensors, pickles, GGUF). A directory with both
    is a patch: adapter repos sometimes carry their base's config, models never an adapter config.
    """
    top = {n for n in names if "/" not in n}
    if ADAPTER_CONFIG in top:
        return PATCH
    if MODEL_CONFIG in top or any(n.endswith(WEIGHT_SUFFIXES) for n in top):
        return MODEL
    return None


def classify_dir(path: Path) -> str | None:
    """:func:`classify` for a local directory's files; None for a missing or unreadable path or a file."""
    try:
        return classify(p.name for p in Path(path).iterdir() if p.is_file())
    except OSError:
        return None


def describe_dir(path: Path, limit: int = 8) -> str:
    """What a directory holds, for an error about it."""
    try:
        entries = sorted(p.name + ("/" if p.is_dir() else "") for p in Path(path).iterdir())
    except OSError as exc:
        return f"unreadable ({exc.strerror})"
    if not entries:
        return "an empty directory"
    shown = ", ".join(entries[:limit])
    more = f" and {len(entries) - limit} more" if len(entries) > limit else ""
    return f"{shown}{more}"


# -- the resolved argument ------------------------------------------------------------------------
@dataclass(frozen=True)
class Resolved:
    spec: str  # what the user typed
    path: Path  # local directory
    repo_id: str | None = None  # set when it came from the Hub
    revision: str | None = None  # the commit it resolved to, for Hub specs

    @property
    def display(self) -> str:
        if self.repo_id:
            return f"{self.repo_id}@{self.revision}" if self.revision else self.repo_id
        return str(self.path)

    @property
    def record_id(self) -> str:
        """What a manifest records as the model: the repo id, or the absolute local path."""
        return self.repo_id or str(self.path.resolve())

    @property
    def kind(self) -> str | None:
        """"patch", "model" or None (see :func:`classify`). A Hub download holds only the files of
        the kind its repo listing was classified as, so the answer is the listing's."""
        return classify_dir(self.path)


# -- spelling of Hub ids ----------------------------------------------------------------------------
def split_revision(spec: str) -> tuple[str, str | None]:
    if "@" in spec:
        repo, rev = spec.split("@", 1)
        return repo, rev or None
    return spec, None


def looks_like_repo_id(spec: str) -> bool:
    if not _REPO_RE.match(spec) or spec.startswith((".", "/", "~")):
        return False
    repo, _ = split_revision(spec)
    return not any(part in (".", "..") or part.startswith(".") for part in repo.split("/"))


def check_revision(revision: str) -> str:
    """A branch, tag or commit name; refuses names that would climb out of a cache directory."""
    if (
        not revision
        or revision.startswith(("/", "-"))
        or "\\" in revision
        or "\x00" in revision
        or any(part in ("", ".", "..") for part in revision.split("/"))
    ):
        raise UnsafeInputError(f"refusing revision {revision!r} (not a plain branch, tag or commit name)")
    return revision
