"""Turn a --model / --patch / --to / SOURCE argument into a local directory, in one place for every command.

A spec is a local path, ``user/repo`` or ``user/repo@revision``. Local paths win when they
exist; anything else that looks like a repo id goes to the Hub (see portllm_cli.hub), which
downloads only what the repo is (a patch or a model).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

from portllm_cli.core.progress import ProgressFn
from portllm_cli.errors import InvalidInputError, NotFoundError, UsageError
from portllm_cli.patch.format import ADAPTER_CONFIG
from portllm_cli.spec import Resolved, check_revision, describe_dir, looks_like_repo_id, split_revision

__all__ = ["Resolved", "check_revision", "looks_like_repo_id", "resolve", "split_revision"]


def resolve(
    spec: str,
    *,
    kind: str | None = None,
    revision: str | None = None,
    progress: ProgressFn | None = None,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
) -> Resolved:
    """Resolve an argument to a local directory, once, by what it is.

    ``kind`` is what the caller needs: "model", "patch", or None for either. A Hub id's file list
    decides what the repo is (``spec.classify``, the rule local directories are judged by) and only
    the files of that kind are downloaded, reporting bytes to ``progress``; pickle weights and
    model code only with ``allow_pickle`` / ``trust_remote_code``. With ``kind=None`` a local
    directory that is neither a model nor a patch is refused here; with a kind, the reader of
    that kind (``read_patch``, ``Checkpoint.open``) reports what is missing. ``Resolved.kind``
    says what was found.
    """
    what = kind or "model or patch"
    if not isinstance(spec, str) or not spec.strip():
        raise UsageError(f"empty {what} argument: give a local directory or a Hub repo id")
    if "\x00" in spec:
        raise UsageError(f"{spec!r}: not a valid {what} path")
    local = Path(os.path.expanduser(spec))
    if local.exists() or not looks_like_repo_id(spec):
        if not local.exists():
            raise NotFoundError(f"{spec}: no such {what} directory")
        res = Resolved(spec, local)
        if kind is None and res.kind is None:
            _refuse_unknown(spec, local)
        return res
    repo_id, rev = split_revision(spec)
    rev = revision or rev
    if rev is not None:
        check_revision(rev)
    from portllm_cli import hub

    return hub.download(repo_id, revision=rev, kind=kind, spec=spec, progress=progress,
                        allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)


def _refuse_unknown(spec: str, path: Path) -> None:
    if not path.is_dir():
        raise InvalidInputError(
            f"{spec}: expected a model or patch directory, found a file ({path.name})",
            hint="pass the directory that holds it",
        )
    raise InvalidInputError(
        f"{spec}: neither a model (no config.json or weights) nor a patch (no {ADAPTER_CONFIG}); "
        f"found: {describe_dir(path)}",
        hint="pass a directory written by model.save_pretrained or PeftModel.save_pretrained",
    )


# -- content hashes of local models (cached: hashing a large model is not free) ----------------
def _cache_dir() -> Path:
    root = os.environ.get("PORTLLM_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "portllm"
    )
    return Path(root)


_HEX64 = re.compile(r"^[0-9a-f]{64}$")


def file_sha256(path: Path) -> str:
    """sha256 of a file, cached by (path, size, mtime) under the portllm cache directory."""
    try:
        st = path.stat()
        key = hashlib.sha256(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()
    except OSError as exc:
        raise InvalidInputError(f"{path}: cannot read ({exc.strerror or exc.__class__.__name__})") from None
    cache = _cache_dir() / "hashes" / key
    try:
        cached = cache.read_text().strip()
        if _HEX64.match(cached):  # a damaged cache entry is recomputed, never trusted
            return cached
    except (OSError, UnicodeDecodeError):
        pass
    h = hashlib.sha256()
    try:
        with open(path, "rb") as fh:
            while block := fh.read(16 << 20):
                h.update(block)
    except OSError as exc:
        raise InvalidInputError(f"{path}: cannot read ({exc.strerror or exc.__class__.__name__})") from None
    digest = h.hexdigest()
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(digest)
    except OSError:
        pass  # a read-only home is no reason to fail
    return digest


def content_hash(files: list[Path]) -> str:
    """A hash of a model's weights: sha256 over the sorted (file name, file sha256) pairs."""
    h = hashlib.sha256()
    for f in sorted(files, key=lambda p: p.name):
        h.update(f"{f.name}:{file_sha256(f)}\n".encode())
    return "sha256:" + h.hexdigest()


def model_record(res: Resolved, ckpt: Any, module_shapes: dict[str, list[int]] | None = None, *, hash_weights: bool = True) -> dict[str, Any]:
    """The manifest's record of a model: id, revision or content hash, architecture fingerprint."""
    from portllm_cli.io.checkpoint import architecture_fingerprint

    rec: dict[str, Any] = {"model": res.record_id, "revision": res.revision}
    rec["content_hash"] = content_hash(list(ckpt.files)) if hash_weights else None
    rec["fingerprint"] = architecture_fingerprint(ckpt.config, module_shapes)
    return rec


def dumps(doc: Any) -> str:
    return json.dumps(doc, indent=2, sort_keys=False)
