"""What a --model / --patch / --to / SOURCE argument names, before anything is read or downloaded.

A spec is a local path, ``user/repo`` or ``user/repo@revision``. This module holds the parts of
that idea that both ``portllm_cli.resolve`` (which turns a spec into a local directory) and
``portllm_cli.hub`` (which downloads one) need: the result type, revision splitting and repo-id
detection. It sits below both, so neither imports the other for them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from portllm_cli.errors import UnsafeInputError

_REPO_RE = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+(@[\w.\-/]+)?$")


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
