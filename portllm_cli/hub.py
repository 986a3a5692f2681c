"""Every Hugging Face Hub call portllm makes goes through here.

- ``download``: a model or patch repo into the standard Hugging Face cache (``HF_HOME``), only the
  files portllm needs; a second use works offline.
- ``push_patch``: a patch directory plus a generated model card, in one commit.
- ``pull_patch``: download, verify against the manifest, optionally copy into ``--out``.

``huggingface_hub`` is imported inside the functions (``portllm --help`` stays fast). The
endpoint (``HF_ENDPOINT``), offline mode (``HF_HUB_OFFLINE``) and cache (``HF_HUB_CACHE`` /
``HF_HOME``) are read from the environment at call time and passed explicitly, so they hold even
when ``huggingface_hub`` was imported before they were set. The token is found the standard way
(``HF_TOKEN``, else what ``hf auth login`` stored) and never appears in a message.
"""

from __future__ import annotations

import json
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from portllm_cli.core.progress import ProgressFn
from portllm_cli.errors import (
    HubError,
    IntegrityError,
    NotFoundError,
    PortllmError,
    UsageError,
)
from portllm_cli.patch.format import ADAPTER_CONFIG, ADAPTER_WEIGHTS, MANIFEST
from portllm_cli.resolve import Resolved, looks_like_repo_id, split_revision

DEFAULT_ENDPOINT = "https://huggingface.co"
MODEL_CARD = "README.md"
PATCH_FILES = (ADAPTER_CONFIG, ADAPTER_WEIGHTS, MANIFEST, MODEL_CARD)
# What portllm reads from a model repo: config, tokenizer, generation config, safetensors weights
# and their index. Pickle weights and code only when the caller asks for them.
MODEL_PATTERNS = (
    "*.json",
    "*.safetensors",
    "tokenizer.model",
    "*.tiktoken",
    "merges.txt",
    "vocab.txt",
    "*.jinja",
)
PICKLE_PATTERNS = ("*.bin", "*.pt", "*.pth")
CODE_PATTERNS = ("*.py",)
LOGIN_HINT = "log in with 'hf auth login' or set HF_TOKEN"
_TOKEN_RE = re.compile(r"\bhf_[A-Za-z0-9]{30,}")  # user access tokens: hf_ + 34 letters/digits
_TRUE = {"1", "ON", "YES", "TRUE"}


# -- settings read at call time ------------------------------------------------------------
def endpoint() -> str:
    return (os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


def offline() -> bool:
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.upper() in _TRUE


def cache_dir() -> Path:
    explicit = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    if explicit:
        return Path(os.path.expandvars(os.path.expanduser(explicit)))
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.join(os.path.expanduser("~"), ".cache")), "huggingface"
    )
    return Path(os.path.expandvars(os.path.expanduser(home))) / "hub"


def _known_token() -> str | None:
    try:
        from huggingface_hub import get_token

        return get_token()
    except Exception:  # a broken token file is not a reason to fail here
        return os.environ.get("HF_TOKEN")


def scrub(text: str) -> str:
    """Remove anything that looks like a Hugging Face token from a message."""
    for secret in {_known_token(), os.environ.get("HF_TOKEN"), os.environ.get("HUGGING_FACE_HUB_TOKEN")}:
        if secret:
            text = text.replace(secret, "***")
    return _TOKEN_RE.sub("hf_***", text)


def _scrubbed(err: PortllmError) -> PortllmError:
    err.message = scrub(err.message)
    err.args = (err.message,)
    if err.hint:
        err.hint = scrub(err.hint)
    return err


# -- error mapping ---------------------------------------------------------------------------
def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    for line in text.splitlines():
        line = line.strip()
        if line and not re.match(r"^\d{3} (Client|Server) Error\.?$", line):
            return line.rstrip(".")
    return exc.__class__.__name__


def map_error(exc: BaseException, *, repo_id: str, revision: str | None, action: str) -> PortllmError:
    """Turn a huggingface_hub / transport exception into a PortllmError with a next step."""
    import httpx2
    from huggingface_hub import errors as hf

    if isinstance(exc, PortllmError):
        return _scrubbed(exc)
    target = f"{repo_id}@{revision}" if revision else repo_id
    status = None
    response = getattr(exc, "response", None)
    if response is not None:
        status = getattr(response, "status_code", None)
    server_message = (response.headers.get("X-Error-Message") if response is not None else None) or ""
    has_token = bool(_known_token())
    writing = action == "push"

    if isinstance(exc, hf.OfflineModeIsEnabled) or (isinstance(exc, hf.LocalEntryNotFoundError) and offline()):
        if writing:
            err: PortllmError = HubError("HF_HUB_OFFLINE is set: cannot push to the Hub",
                                         hint="unset HF_HUB_OFFLINE (or set it to 0) and run again")
        else:
            err = HubError(f"{target} is not in the local cache and HF_HUB_OFFLINE=1 forbids downloading it",
                           hint="unset HF_HUB_OFFLINE (or set it to 0) to download it once; later runs use the cache")
    elif status == 401:
        if server_message.startswith("Invalid credentials") or (has_token and not isinstance(exc, hf.RepositoryNotFoundError)):
            err = HubError(f"the Hub rejected your token (401 invalid credentials) while trying to {action} {target}",
                           hint=f"{LOGIN_HINT} to a valid token")
        elif writing:
            err = HubError(f"not logged in: pushing to {repo_id} needs a token with write access",
                           hint=LOGIN_HINT)
        else:
            err = NotFoundError(f"{target}: repo not found, or private and you are not logged in",
                                hint=f"check the id, or {LOGIN_HINT}")
    elif status == 403:
        if writing:
            err = HubError(f"your token lacks write access to {repo_id}",
                           hint=f"use a token with the 'write' role for this namespace ({endpoint()}/settings/tokens), "
                                "then 'hf auth login'")
        else:
            err = HubError(f"{target}: access denied (403)", hint=f"check your permissions, or {LOGIN_HINT}")
    elif isinstance(exc, hf.GatedRepoError):
        err = HubError(f"{target} is gated: your account has not been granted access",
                       hint=f"request access on {endpoint()}/{repo_id}, then {LOGIN_HINT}")
    elif isinstance(exc, hf.RevisionNotFoundError):
        err = NotFoundError(f"{repo_id}: revision {revision or 'main'!r} not found",
                            hint=f"check the branch, tag or commit on {endpoint()}/{repo_id}")
    elif isinstance(exc, hf.RepositoryNotFoundError):
        err = NotFoundError(f"{repo_id}: repo not found or private",
                            hint="check the id or log in: hf auth login")
    elif isinstance(exc, hf.RemoteEntryNotFoundError):
        err = NotFoundError(f"{target}: {_first_line(exc)}")
    elif isinstance(exc, hf.HFValidationError):
        err = UsageError(f"{repo_id!r} is not a valid Hub repo id: {_first_line(exc)}",
                         hint="use user/repo or user/repo@revision")
    elif isinstance(exc, (httpx2.RemoteProtocolError, httpx2.ReadError, httpx2.WriteError, httpx2.TimeoutException)) or (
        isinstance(exc, OSError) and "Consistency check failed" in str(exc)
    ):
        err = HubError(f"{action} of {target} interrupted: the connection dropped mid-transfer ({_first_line(exc)})",
                       hint="rerun to resume; files already complete are kept in the cache")
    elif isinstance(exc, (httpx2.ConnectError, hf.LocalEntryNotFoundError)):
        err = HubError(f"cannot reach the Hub at {endpoint()} and {target} is not in the local cache",
                       hint="check your connection and HF_ENDPOINT, or set HF_HUB_OFFLINE=1 to use cached files only")
    elif isinstance(exc, hf.HfHubHTTPError):
        err = HubError(f"the Hub answered {status or 'an error'} while trying to {action} {target}: {_first_line(exc)}",
                       hint="try again later; set PORTLLM_DEBUG=1 for details")
    elif isinstance(exc, httpx2.TransportError):
        err = HubError(f"network error while trying to {action} {target}: {_first_line(exc)}",
                       hint="check your connection and HF_ENDPOINT, then rerun")
    elif isinstance(exc, OSError):
        raise exc  # disk full, permissions: the entry point reports these with the file name
    else:
        err = HubError(f"could not {action} {target}: {exc.__class__.__name__}: {_first_line(exc)}",
                       hint="set PORTLLM_DEBUG=1 for the traceback")
    return _scrubbed(err)


# -- download --------------------------------------------------------------------------------
def _tqdm_bridge(progress: ProgressFn, label: str):
    """A tqdm class for huggingface_hub that draws nothing itself and reports bytes to ``progress``."""
    from huggingface_hub.utils import tqdm as hf_tqdm

    class _Bridge(hf_tqdm):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            self._report = kwargs.get("name") == "huggingface_hub.snapshot_download"
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)
            self._done = 0

        def update(self, n: float | None = 1) -> bool | None:
            if self._report and n:
                self._done += n
                progress(label, self._done, self.total or None)
            return None

    return _Bridge


def _no_progress(label: str, done: float, total: float | None) -> None:
    return None


def _evict(snapshot: Path, names: list[str]) -> None:
    """Remove files (and their cached blobs) from a cache snapshot so the next run downloads them again."""
    for name in names:
        link = snapshot / name
        try:
            blob = link.resolve()
            link.unlink(missing_ok=True)
            if blob != link and blob.exists():
                blob.unlink()
        except OSError:
            pass


def _check_patch_download(path: Path, repo_id: str, commit: str) -> None:
    """A downloaded patch must exist and match its manifest; a corrupted copy leaves the cache."""
    from portllm_cli.patch.format import read_manifest, sha256_file

    where = f"{repo_id}@{commit[:8]}"
    if not (path / ADAPTER_CONFIG).is_file():
        raise NotFoundError(
            f"{where} holds no patch (no {ADAPTER_CONFIG})",
            hint=f"check the repo id and revision; publish one with 'portllm hub push PATCH {repo_id}'",
        )
    manifest = read_manifest(path)
    weights = path / ADAPTER_WEIGHTS
    if manifest and weights.is_file():
        digest = sha256_file(weights)
        expected = manifest["tensors"]["sha256"]
        if digest != expected:
            _evict(path, [ADAPTER_WEIGHTS])
            raise IntegrityError(
                f"{where}: downloaded {ADAPTER_WEIGHTS} does not match its manifest "
                f"(sha256 {digest[:12]}…, expected {expected[:12]}…)",
                hint="the corrupted copy was removed from the cache; rerun to download it again "
                "(if it fails again, the repo itself is inconsistent)",
            )


def download(
    repo_id: str,
    *,
    revision: str | None = None,
    kind: str = "model",
    spec: str | None = None,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
    progress: ProgressFn | None = None,
) -> Resolved:
    """Download a model or patch repo into the Hugging Face cache and return where it is.

    Patches: only the patch files. Models: config, tokenizer, generation config and safetensors
    weights (+ index); pickle weights only with ``allow_pickle``, code only with
    ``trust_remote_code``. Under HF_HUB_OFFLINE=1 only the cache is used.
    ``Resolved.revision`` is the commit the revision resolved to.
    """
    if kind not in ("model", "patch"):
        raise ValueError(f"kind must be 'model' or 'patch', not {kind!r}")
    from huggingface_hub import snapshot_download

    if kind == "patch":
        patterns = list(PATCH_FILES)
    else:
        patterns = list(MODEL_PATTERNS) + (list(PICKLE_PATTERNS) if allow_pickle else []) + (
            list(CODE_PATTERNS) if trust_remote_code else []
        )
    kwargs: dict[str, Any] = {}
    if progress is None and not sys.stderr.isatty():
        progress = _no_progress  # huggingface_hub's own bars only where a person watches
    if progress is not None:
        kwargs["tqdm_class"] = _tqdm_bridge(progress, f"download {repo_id}")
    try:
        folder = snapshot_download(
            repo_id,
            revision=revision,
            allow_patterns=patterns,
            cache_dir=str(cache_dir()),
            endpoint=endpoint(),
            local_files_only=offline(),
            **kwargs,
        )
    except Exception as exc:
        raise map_error(exc, repo_id=repo_id, revision=revision, action="download") from exc
    path = Path(folder)
    commit = path.name  # the cache's snapshot folder is named by the commit id
    if kind == "patch":
        _check_patch_download(path, repo_id, commit)
    elif not (path / "config.json").is_file():
        raise NotFoundError(
            f"{repo_id}@{commit[:8]} has no config.json: not a transformers model repo",
            hint="check the repo id and revision",
        )
    return Resolved(spec or (f"{repo_id}@{revision}" if revision else repo_id), path, repo_id, commit)


# -- pull ----------------------------------------------------------------------------------------
@dataclass
class PullResult:
    path: Path  # where the patch is: --out, or the cache snapshot
    repo_id: str
    revision: str  # the commit it resolved to
    files: list[str]
    verified: bool  # sha256 checked against a manifest
    warnings: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"path": str(self.path), "repo_id": self.repo_id, "revision": self.revision,
                "files": self.files, "verified": self.verified, "warnings": self.warnings}


def parse_repo_spec(spec: str, revision: str | None = None) -> tuple[str, str | None]:
    """``user/repo[@rev]`` plus an optional --revision (which must agree) -> (repo_id, revision)."""
    if not looks_like_repo_id(spec):
        raise UsageError(f"{spec!r} is not a Hub repo id", hint="use user/repo or user/repo@revision")
    repo_id, rev = split_revision(spec)
    if revision and rev and revision != rev:
        raise UsageError(f"two revisions given: {spec!r} and --revision {revision!r}", hint="give only one")
    return repo_id, revision or rev


def pull_patch(
    spec: str,
    *,
    out: Path | None = None,
    revision: str | None = None,
    overwrite: bool = False,
    progress: ProgressFn | None = None,
) -> PullResult:
    """Download a patch (only its files), verify it, and optionally copy it into ``out``."""
    from portllm_cli.io.atomic import atomic_output_dir, copy_file
    from portllm_cli.patch.format import read_patch, sha256_file

    repo_id, rev = parse_repo_spec(spec, revision)
    if out is not None:
        from portllm_cli.io.atomic import check_output

        check_output(Path(out), overwrite=overwrite)  # fail before downloading anything
    res = download(repo_id, revision=rev, kind="patch", spec=spec, progress=progress)
    patch = read_patch(res.path, verify=True)
    files = [name for name in PATCH_FILES if (res.path / name).is_file()]
    path = res.path
    if out is not None:
        with atomic_output_dir(Path(out), overwrite=overwrite) as tmp:
            for name in files:
                copy_file(res.path / name, tmp / name)
            if patch.has_manifest and sha256_file(tmp / ADAPTER_WEIGHTS) != patch.manifest["tensors"]["sha256"]:
                raise IntegrityError(f"{out}: the copied {ADAPTER_WEIGHTS} does not match the manifest",
                                     hint="check the disk and rerun")
        path = Path(out)
    assert res.revision is not None
    return PullResult(path, repo_id, res.revision, files, patch.has_manifest, list(patch.warnings))


# -- push ----------------------------------------------------------------------------------------
@dataclass
class PushResult:
    url: str  # the repo page (the branch's tree for --revision)
    commit_id: str
    repo_id: str
    revision: str | None
    commit_url: str | None = None
    files: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"url": self.url, "commit_id": self.commit_id, "commit_url": self.commit_url,
                "repo_id": self.repo_id, "revision": self.revision, "files": self.files,
                "warnings": self.warnings}


def _yaml_str(value: str) -> str:
    return json.dumps(value)  # a JSON string is a valid YAML scalar, quoting included


def _task_name(manifest: dict[str, Any]) -> str | None:
    for holder in (manifest, manifest.get("training") or {}, manifest.get("source") or {}):
        task = holder.get("task") if isinstance(holder, dict) else None
        if isinstance(task, dict):
            task = task.get("name")
        if isinstance(task, str) and task:
            return task
    return None


def _flatten_scores(scores: Any, prefix: str = "") -> list[tuple[str, str]]:
    """Rows (label, value) from the manifest's free-form scores.

    Understands nested dicts ({"sst2": {"base": 0.5, "patched": 0.9}}), the ``portllm eval`` record
    ({"sst2": {"metric": "acc", "value": 0.9, "stderr": 0.01}}) and lists of such records.
    """
    if isinstance(scores, dict) and isinstance(scores.get("value"), (int, float)):
        label = prefix or "score"
        if scores.get("metric"):
            label += f" ({scores['metric']})"
        value = _fmt(scores["value"])
        if isinstance(scores.get("stderr"), (int, float)):
            value += f" ± {_fmt(scores['stderr'])}"
        return [(label, value)]
    if isinstance(scores, dict):
        rows: list[tuple[str, str]] = []
        for k, v in scores.items():
            rows.extend(_flatten_scores(v, f"{prefix} / {k}" if prefix else str(k)))
        return rows
    if isinstance(scores, list):
        rows = []
        for i, v in enumerate(scores):
            label = str((v.get("name") or v.get("task") or i) if isinstance(v, dict) else i)
            rest = {kk: vv for kk, vv in v.items() if kk not in ("name", "task")} if isinstance(v, dict) else v
            rows.extend(_flatten_scores(rest, f"{prefix} / {label}" if prefix else label))
        return rows
    return [(prefix or "score", _fmt(scores))]


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def base_repo_id(patch: Any) -> str | None:
    """The patch's base model when it is a Hub repo id (not a local path)."""
    base = patch.base_model
    if isinstance(base, str) and looks_like_repo_id(base) and "@" not in base:
        return base
    return None


def model_card(patch: Any, repo_id: str, revision: str | None = None) -> str:
    """README.md for a pushed patch: YAML front matter the Hub indexes, and a body people read."""
    from portllm_cli.patch.format import short_module_kind

    manifest = patch.manifest or {}
    cfg = patch.config
    base = base_repo_id(patch)
    lines = ["---", "library_name: peft"]
    if base:
        lines.append(f"base_model: {_yaml_str(base)}")
    lines += ["tags:", "- portllm", "- lora", "- peft", "---", ""]
    name = repo_id.split("/", 1)[1]
    task = _task_name(manifest)
    lines.append(f"# {name}")
    lines.append("")
    lines.append(
        "A LoRA patch in the portllm format (`pip install portllm-cli`): a PEFT adapter plus a manifest "
        "(`portllm.json`) that records the base model it was made on and the sha256 of its weights. "
        "`portllm port` carries it onto an updated version of the base model without retraining."
    )
    lines.append("")
    targets = cfg.get("target_modules")
    if isinstance(targets, list):
        targets_text = ", ".join(sorted(targets))
    elif isinstance(targets, str):
        targets_text = targets
    else:
        targets_text = ", ".join(sorted({short_module_kind(m.module) for m in patch.modules.values()}))
    rows = [
        ("Base model", base or (patch.base_model or "unknown")),
        ("Task", task or "not recorded"),
        ("Rank (r)", str(cfg.get("r"))),
        ("Alpha", _fmt(cfg.get("lora_alpha"))),
        ("Scaling", "rsLoRA (alpha/sqrt(r))" if cfg.get("use_rslora") else "alpha/r"),
        ("Target modules", targets_text),
        ("Adapted modules", str(len(patch.modules))),
    ]
    base_rev = (manifest.get("base") or {}).get("revision")
    if base_rev:
        rows.insert(1, ("Base revision", str(base_rev)))
    sha = (manifest.get("tensors") or {}).get("sha256")
    if sha:
        rows.append(("Weights sha256", f"`{sha}`"))
    lines += ["| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows] + [""]
    scores = manifest.get("scores")
    if scores:
        lines += ["## Scores", "", "| Metric | Value |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in _flatten_scores(scores)]
        lines.append("")
    patch_ref = f"{repo_id}@{revision}" if revision else repo_id
    peft_args = json.dumps(repo_id) + (f", revision={json.dumps(revision)}" if revision else "")
    out_name = f"./{name}-merged"
    lines += [
        "## Use it",
        "",
        "Merge it into its base model, or into any newer version of it (same architecture and shapes):",
        "",
        "```bash",
        f"portllm port --patch {patch_ref} --to {base or 'BASE_MODEL'} --out {out_name}",
        "```",
        "",
        f"Replace `{base or 'BASE_MODEL'}` with an evolved release of the base model (a Hub id or a local "
        "directory) to port the patch to it. The patch also loads directly with PEFT "
        f"(`PeftModel.from_pretrained(model, {peft_args})`).",
        "",
    ]
    return "\n".join(lines)


def _check_push_target(repo_id: str) -> None:
    if "@" in repo_id or not looks_like_repo_id(repo_id):
        raise UsageError(f"{repo_id!r} is not a Hub repo id", hint="use user/repo; pick a branch with --revision")
    if offline():
        raise HubError("HF_HUB_OFFLINE is set: cannot push to the Hub",
                       hint="unset HF_HUB_OFFLINE (or set it to 0) and run again")


def _commit(repo_id: str, ops: list[Any], message: str, *, private: bool, revision: str | None) -> PushResult:
    """Create the repo (and branch) if needed, then one commit with ``ops``."""
    from huggingface_hub import HfApi

    api = HfApi(endpoint=endpoint())
    try:
        api.create_repo(repo_id, private=True if private else None, exist_ok=True)
        if revision and revision != "main":
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        info = api.create_commit(repo_id, operations=ops, commit_message=message, revision=revision)
    except Exception as exc:
        raise map_error(exc, repo_id=repo_id, revision=revision, action="push") from exc
    url = f"{endpoint()}/{repo_id}" + (f"/tree/{revision}" if revision else "")
    files = [op.path_in_repo for op in ops]
    return PushResult(url, info.oid, repo_id, revision, info.commit_url, files)


def push_patch(
    patch_dir: Path,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
) -> PushResult:
    """Validate a patch, create the repo (and branch) if needed, upload the patch and its model card."""
    from portllm_cli.patch.format import read_patch

    patch = read_patch(Path(patch_dir), verify=True)
    _check_push_target(repo_id)
    from huggingface_hub import CommitOperationAdd

    files = [name for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS, MANIFEST) if (patch.path / name).is_file()]
    card = model_card(patch, repo_id, revision).encode()
    ops = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(patch.path / name)) for name in files]
    ops.append(CommitOperationAdd(path_in_repo=MODEL_CARD, path_or_fileobj=card))
    message = commit_message or f"Upload portllm patch (r={patch.rank}, {len(patch.modules)} modules)"
    res = _commit(repo_id, ops, message, private=private, revision=revision)
    res.warnings = list(patch.warnings)
    return res


def push_model(
    model_dir: Path,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
) -> PushResult:
    """Upload a model directory (e.g. ``port``'s merged output): the files ``download`` would fetch.

    Only config, tokenizer, generation and safetensors files go up (never pickles or stray files);
    the directory's README.md if it has one, else a short card tagged ``portllm``.
    """
    from fnmatch import fnmatch

    from portllm_cli.io.checkpoint import read_json

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise NotFoundError(f"{model_dir}: not a model directory (no config.json)")
    _check_push_target(repo_id)
    from huggingface_hub import CommitOperationAdd

    files = sorted(
        p.name for p in model_dir.iterdir() if p.is_file() and any(fnmatch(p.name, pat) for pat in MODEL_PATTERNS)
    )
    ops = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(model_dir / name)) for name in files]
    if (model_dir / MODEL_CARD).is_file():
        ops.append(CommitOperationAdd(path_in_repo=MODEL_CARD, path_or_fileobj=str(model_dir / MODEL_CARD)))
    else:
        cfg = read_json(model_dir / "config.json", "model config")
        arch = ", ".join(cfg.get("architectures") or []) if isinstance(cfg, dict) else ""
        card = "\n".join([
            "---", "library_name: transformers", "tags:", "- portllm", "---", "",
            f"# {repo_id.split('/', 1)[1]}", "",
            f"A model written by portllm (`pip install portllm-cli`){f': {arch}' if arch else ''}.", "",
        ])
        ops.append(CommitOperationAdd(path_in_repo=MODEL_CARD, path_or_fileobj=card.encode()))
    message = commit_message or "Upload model written by portllm"
    return _commit(repo_id, ops, message, private=private, revision=revision)


def push_result(path: Path, repo_id: str, **kwargs: Any) -> PushResult:
    """Push a finished output: a patch directory with push_patch, anything else as a model."""
    from portllm_cli.patch.format import is_patch_dir

    path = Path(path)
    if is_patch_dir(path):
        return push_patch(path, repo_id, **kwargs)
    return push_model(path, repo_id, **kwargs)
