"""Turn a --model / --patch / --to / SOURCE argument into a local directory, in one place for every command.

A spec is a local path, ``user/repo`` or ``user/repo@revision``. Local paths win when they
exist; anything else that looks like a repo id goes to the Hub (see portllm_cli.hub), which
downloads only what the repo is (a patch or a model).
"""

from __future__ import annotations

import os
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


# -- the manifest's record of a model ----------------------------------------------------------
def model_record(res: Resolved, ckpt: Any, module_shapes: dict[str, list[int]] | None = None, *, hash_weights: bool = True) -> dict[str, Any]:
    """The manifest's record of a model: id, revision or content hash, architecture fingerprint."""
    from portllm_cli.io.checkpoint import architecture_fingerprint
    from portllm_cli.io.hashing import content_hash

    rec: dict[str, Any] = {"model": res.record_id, "revision": res.revision}
    rec["content_hash"] = content_hash(list(ckpt.files)) if hash_weights else None
    rec["fingerprint"] = architecture_fingerprint(ckpt.config, module_shapes)
    return rec
