"""A small Hugging Face Hub-compatible HTTP server for the test suite (standard library only).

It implements the part of the Hub API that the real ``huggingface_hub`` client (2.x) uses for
portllm's push and pull, and that ``datasets.load_dataset`` (5.x) uses to read a dataset repo:
create repo, whoami, repo info, tree listing, paths-info, refs, branch creation, preupload, commit
(NDJSON), YAML validation, and file resolve (HEAD and GET, with Range).

Model and dataset repos live side by side, as on the Hub (a model and a dataset may share a name):

    model                                   dataset
    POST /api/repos/create {"type": ...}    (same, "type": "dataset")
    GET  /api/models/{id}[/revision/{rev}]  GET  /api/datasets/{id}[/revision/{rev}]
    GET  /api/models/{id}/tree/{rev}/{path} GET  /api/datasets/{id}/tree/{rev}/{path}
    POST /api/models/{id}/paths-info/{rev}  POST /api/datasets/{id}/paths-info/{rev}
    .../refs, preupload/{rev}, commit/{rev}, branch/{rev}: likewise under /api/datasets/{id}/
    HEAD/GET /{id}/resolve/{rev}/{path}     HEAD/GET /datasets/{id}/resolve/{rev}/{path}

``load_dataset("nyu-mll/glue", "sst2")`` asks for README.md (its YAML ``configs:`` block maps
configs to data files), the repo info at the README's commit, probes ``glue.py``,
``.huggingface.yaml`` and ``dataset_infos.json`` (404 here, as for most Hub datasets), lists the
tree, then resolves each Parquet file of the config. Two things it also tries live elsewhere on the
real Hub and are not served: the dataset viewer's Parquet export (another host) and a
download-count ping (s3); tests/hub_fixtures.py switches both off in ``datasets.config``.

Every upload is steered to the "regular" (base64-in-the-commit) path: preupload answers
``uploadMode: "regular"`` for every file and nothing advertises Xet (no ``xetHash`` in the tree,
no ``X-Xet-*`` headers), so neither LFS uploads nor ``hf_xet`` ever get involved.

Downloads of weight and data files (``*.safetensors``, ``*.bin``, ``*.parquet`` ...) go the way
the Hub serves LFS files: HEAD/GET resolve answer 302 with ``X-Linked-Etag`` (the sha256),
``X-Linked-Size`` and a ``Location`` on another origin (``localhost`` rather than ``127.0.0.1``, a
stand-in CDN: ``/cdn/[datasets/]{id}/{sha256}/{path}``), which the client fetches without its token
(the server refuses one) using a signed URL. Other files are
served directly with ``ETag`` (git blob sha1), ``X-Repo-Commit`` and ``Content-Length``. GET
honours ``Range: bytes=N-`` so the client can resume.

Blobs are stored content-addressed under a root directory; commits are kept in memory as
``{path: sha256}`` snapshots with a parent, one history per branch. ``HubState.repos`` is keyed as
the URL path names a repo: ``user/name`` for a model, ``datasets/user/name`` for a dataset (see
``repo_key``); the test helpers take ``repo_type="dataset"``.

Auth mirrors the Hub: a token maps to a user with a "read" or "write" role. An unknown token gets
401 on every endpoint; a write without a token gets 401, a write with a read-only token (or to a
namespace the user does not own) gets 403; a private repo is 401 (anonymous) or 404 (another
user) with ``X-Error-Code: RepoNotFound``.

Fault injection for download tests: ``corrupt(repo_id, path)`` serves altered bytes of the same
length (headers still describe the true file), ``drop(repo_id, path, at=N, times=K)`` closes the
connection after byte N of the file body, K times (None: every time).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import socket
import threading
import time
from dataclasses import dataclass, field
from fnmatch import fnmatch
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlsplit

DEFAULT_BRANCH = "main"


def git_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class User:
    name: str
    role: str = "write"  # "read" or "write"
    orgs: tuple[str, ...] = ()

    def can_write_to(self, namespace: str) -> bool:
        return self.role == "write" and (namespace == self.name or namespace in self.orgs)

    def can_see(self, repo_id: str) -> bool:
        namespace = repo_id.split("/", 1)[0]
        return namespace == self.name or namespace in self.orgs


@dataclass
class Commit:
    id: str
    parent: str | None
    files: dict[str, str]  # path -> sha256 of the blob
    message: str
    date: str


@dataclass
class Repo:
    repo_id: str
    private: bool
    created: str
    repo_type: str = "model"  # "model" or "dataset"
    branches: dict[str, str] = field(default_factory=dict)  # branch -> commit id
    commits: dict[str, Commit] = field(default_factory=dict)

    def resolve(self, rev: str) -> Commit | None:
        if rev in self.branches:
            return self.commits[self.branches[rev]]
        if rev in self.commits:
            return self.commits[rev]
        if len(rev) >= 7:
            hits = [c for cid, c in self.commits.items() if cid.startswith(rev)]
            if len(hits) == 1:
                return hits[0]
        return None


@dataclass
class Fault:
    kind: str  # "corrupt" or "drop"
    at: int = 0
    times: int | None = None  # None: every time


class HubError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.code = status, message, code
        self.headers = headers or {}


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime())


class HubState:
    """Repos, blobs, tokens and faults; every method takes the lock."""

    def __init__(self, root: Path, tokens: dict[str, User]) -> None:
        self.root = Path(root)
        (self.root / "blobs").mkdir(parents=True, exist_ok=True)
        self.tokens = dict(tokens)
        # keyed by repo_key(): "user/name" for a model, "datasets/user/name" for a dataset
        self.repos: dict[str, Repo] = {}
        self.faults: dict[tuple[str, str], Fault] = {}  # (repo_key, path) -> fault
        self.requests: list[tuple[str, str]] = []  # (method, path) of every request, for assertions
        self.lock = threading.RLock()
        self._counter = 0
        # Files served like the Hub serves LFS files: HEAD/GET resolve answer 302 to a "CDN" on
        # another origin (localhost instead of 127.0.0.1) with X-Linked-Etag / X-Linked-Size.
        self.lfs_patterns: tuple[str, ...] = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.parquet")
        self.secret = hashlib.sha256(str(time.time_ns()).encode()).hexdigest()

    def is_lfs(self, path: str) -> bool:
        return any(fnmatch(path.rsplit("/", 1)[-1], pat) for pat in self.lfs_patterns)

    def sign(self, *parts: str) -> str:
        return hmac.new(self.secret.encode(), "\0".join(parts).encode(), "sha256").hexdigest()

    # -- blobs -----------------------------------------------------------------------------
    def put_blob(self, data: bytes) -> str:
        digest = hashlib.sha256(data).hexdigest()
        path = self.root / "blobs" / digest
        if not path.exists():
            tmp = path.with_suffix(".tmp")
            tmp.write_bytes(data)
            tmp.rename(path)
        return digest

    def blob(self, digest: str) -> bytes:
        return (self.root / "blobs" / digest).read_bytes()

    # -- commits ---------------------------------------------------------------------------
    def new_commit(self, repo: Repo, parent: str | None, files: dict[str, str], message: str) -> Commit:
        self._counter += 1
        h = hashlib.sha1()
        h.update(f"{repo.repo_id}\n{parent}\n{message}\n{self._counter}\n{time.time_ns()}\n".encode())
        for p in sorted(files):
            h.update(f"{p}\0{files[p]}\n".encode())
        commit = Commit(h.hexdigest(), parent, dict(files), message, _now())
        repo.commits[commit.id] = commit
        return commit

    def create_repo(self, repo_id: str, private: bool, repo_type: str = "model") -> Repo:
        repo = Repo(repo_id, private, _now(), repo_type)
        lfs = b"*.safetensors" if repo_type == "model" else b"*.parquet"
        gitattributes = self.put_blob(lfs + b" filter=lfs diff=lfs merge=lfs -text\n")
        first = self.new_commit(repo, None, {".gitattributes": gitattributes}, "initial commit")
        repo.branches[DEFAULT_BRANCH] = first.id
        self.repos[repo_key(repo_type, repo_id)] = repo
        return repo


def repo_key(repo_type: str, repo_id: str) -> str:
    """Where a repo lives in HubState.repos: as its URL path names it ("datasets/" before a dataset)."""
    return repo_id if repo_type == "model" else f"{repo_type}s/{repo_id}"


def _pointer(digest: str, size: int) -> bytes:
    """The git-lfs pointer file a Hub repo stores for an LFS file."""
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{digest}\nsize {size}\n".encode()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: "_Server"

    def log_message(self, format: str, *args: Any) -> None:  # keep test output clean
        pass

    # -- plumbing --------------------------------------------------------------------------
    @property
    def state(self) -> HubState:
        return self.server.state

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().strip() or b"0", 16)
                if size == 0:
                    self.rfile.readline()
                    break
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            return b"".join(chunks)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None,
              content_type: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, doc: Any, headers: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps(doc).encode(), headers)

    def _error(self, err: HubError) -> None:
        headers = dict(err.headers)
        if err.code:
            headers["X-Error-Code"] = err.code
        headers["X-Error-Message"] = err.message
        self._json(err.status, {"error": err.message}, headers)

    def _user(self) -> User | None:
        auth = self.headers.get("Authorization") or ""
        if not auth:
            return None
        token = auth[7:] if auth.lower().startswith("bearer ") else auth
        user = self.state.tokens.get(token.strip())
        if user is None:
            raise HubError(401, "Invalid credentials in Authorization header")
        return user

    def _base(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"

    def _repo_for_read(self, key: str, user: User | None) -> Repo:
        """The repo at ``key`` (see repo_key: "user/name", "datasets/user/name") if the caller may read it."""
        repo = self.state.repos.get(key)
        if repo is None or (repo.private and not (user and user.can_see(repo.repo_id))):
            # The Hub answers 401 to anonymous callers and 404 to others, never revealing the repo.
            raise HubError(401 if user is None else 404, "Repository not found", "RepoNotFound")
        return repo

    def _repo_for_write(self, key: str, user: User | None) -> Repo:
        if user is None:
            raise HubError(401, "You must be authenticated to access this resource")
        repo = self._repo_for_read(key, user)
        if not user.can_write_to(repo.repo_id.split("/", 1)[0]):
            raise HubError(403, "You don't have the rights to write to this repository; a write token is needed")
        return repo

    @staticmethod
    def _commit(repo: Repo, rev: str) -> Commit:
        commit = repo.resolve(rev)
        if commit is None:
            raise HubError(404, f"Invalid rev id: {rev}", "RevisionNotFound")
        return commit

    # -- dispatch --------------------------------------------------------------------------
    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def _dispatch(self, method: str) -> None:
        url = urlsplit(self.path)
        raw = [unquote(p) for p in url.path.split("/")[1:]]
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        body = self._body() if method == "POST" else b""
        with self.state.lock:
            self.state.requests.append((method, url.path))
        try:
            with self.state.lock:
                user = self._user()
                reply = self._route(method, raw, query, body, user)
        except HubError as err:
            self._error(err)
            return
        if reply is not None:
            reply()

    def _route(self, method: str, seg: list[str], query: dict[str, str], body: bytes, user: User | None):
        """Return a callable that writes the response (called outside the lock)."""
        if seg[:2] == ["api", "whoami-v2"] and method == "GET":
            if user is None:
                raise HubError(401, "You must be authenticated to access this resource")
            doc = {"type": "user", "name": user.name, "orgs": [{"name": o} for o in user.orgs],
                   "auth": {"type": "access_token", "accessToken": {"displayName": "test", "role": user.role}}}
            return lambda: self._json(200, doc)
        if seg[:2] == ["api", "validate-yaml"] and method == "POST":
            return lambda: self._json(*self._validate_yaml(body))
        if seg[:3] == ["api", "repos", "create"] and method == "POST":
            return self._create_repo(json.loads(body or b"{}"), user)
        if len(seg) >= 4 and seg[0] == "api" and seg[1] in ("models", "datasets"):
            repo_type = seg[1][:-1]
            key, rest = repo_key(repo_type, f"{seg[2]}/{seg[3]}"), seg[4:]
            if not rest and method == "GET":
                return self._info(key, DEFAULT_BRANCH, user)
            if rest[:1] == ["revision"] and len(rest) >= 2 and method == "GET":
                return self._info(key, "/".join(rest[1:]), user)
            if rest[:1] == ["tree"] and len(rest) >= 2 and method == "GET":
                return self._tree(key, rest[1], "/".join(rest[2:]), query, user)
            if rest[:1] == ["paths-info"] and len(rest) >= 2 and method == "POST":
                return self._paths_info(key, "/".join(rest[1:]), body, user)
            if rest == ["refs"] and method == "GET":
                return self._refs(key, user)
            if rest[:1] == ["preupload"] and len(rest) == 2 and method == "POST":
                return self._preupload(key, rest[1], json.loads(body or b"{}"), user)
            if rest[:1] == ["commit"] and len(rest) == 2 and method == "POST":
                return self._do_commit(key, rest[1], body, user)
            if rest[:1] == ["branch"] and len(rest) == 2 and method == "POST":
                return self._branch(key, rest[1], json.loads(body or b"{}"), user)
        if len(seg) >= 6 and seg[0] == "cdn" and seg[1] == "datasets" and method in ("GET", "HEAD"):
            return self._cdn(repo_key("dataset", f"{seg[2]}/{seg[3]}"), seg[4], "/".join(seg[5:]), query)
        if len(seg) >= 5 and seg[0] == "cdn" and method in ("GET", "HEAD"):
            return self._cdn(f"{seg[1]}/{seg[2]}", seg[3], "/".join(seg[4:]), query)
        if len(seg) >= 6 and seg[0] == "datasets" and seg[3] == "resolve" and method in ("GET", "HEAD"):
            return self._resolve(repo_key("dataset", f"{seg[1]}/{seg[2]}"), seg[4], "/".join(seg[5:]), user)
        if len(seg) >= 5 and seg[2] == "resolve" and method in ("GET", "HEAD"):
            return self._resolve(f"{seg[0]}/{seg[1]}", seg[3], "/".join(seg[4:]), user)
        raise HubError(404, f"no route for {method} /{'/'.join(seg)}")

    # -- endpoints -------------------------------------------------------------------------
    def _validate_yaml(self, body: bytes) -> tuple[int, dict[str, Any]]:
        content = json.loads(body or b"{}").get("content", "")
        if content.startswith("---"):
            try:
                import yaml

                end = content.index("\n---", 3)
                meta = yaml.safe_load(content[3:end])
                if meta is not None and not isinstance(meta, dict):
                    raise ValueError("metadata must be a mapping")
            except Exception as exc:  # the Hub answers 400 with the reason
                return 400, {"error": f"Invalid metadata in README.md: {exc}"}
        return 200, {"errors": [], "warnings": []}

    def _create_repo(self, payload: dict[str, Any], user: User | None):
        if user is None:
            raise HubError(401, "You must be authenticated to access this resource")
        name, org = payload.get("name"), payload.get("organization") or user.name
        repo_type = payload.get("type") or "model"
        if repo_type not in ("model", "dataset"):
            raise HubError(400, "this test hub only holds model and dataset repos")
        if not user.can_write_to(org):
            raise HubError(403, f"You don't have the rights to create a {repo_type} under the namespace {org!r}")
        repo_id = f"{org}/{name}"
        key = repo_key(repo_type, repo_id)
        url = f"{self._base()}/{key}"
        if key in self.state.repos:
            # Like the Hub, the 409 body still carries the url (create_repo(exist_ok=True) reads it).
            doc = {"error": f"You already created this {repo_type} repo", "url": url}
            return lambda: self._json(409, doc, {"X-Error-Message": doc["error"]})
        self.state.create_repo(repo_id, payload.get("visibility") == "private" or bool(payload.get("private")),
                               repo_type)
        doc = {"url": url, "name": repo_id, "id": repo_id}
        return lambda: self._json(200, doc)

    def _info(self, key: str, rev: str, user: User | None):
        repo = self._repo_for_read(key, user)
        commit = self._commit(repo, rev)
        repo_id = repo.repo_id
        doc = {
            "_id": hashlib.sha1(key.encode()).hexdigest()[:24],
            "id": repo_id,
            "author": repo_id.split("/")[0],
            "sha": commit.id,
            "lastModified": commit.date,
            "createdAt": repo.created,
            "private": repo.private,
            "gated": False,
            "disabled": False,
            "tags": [],
            "downloads": 0,
            "likes": 0,
            "siblings": [{"rfilename": p} for p in sorted(commit.files)],
        }
        if repo.repo_type == "model":
            doc["modelId"] = repo_id
        return lambda: self._json(200, doc)

    def _tree(self, key: str, rev: str, path: str, query: dict[str, str], user: User | None):
        repo = self._repo_for_read(key, user)
        commit = self._commit(repo, rev)
        recursive = query.get("recursive", "false").lower() in ("1", "true")
        prefix = f"{path.strip('/')}/" if path.strip("/") else ""
        files = {p: d for p, d in commit.files.items() if p.startswith(prefix)}
        if prefix and not files:
            raise HubError(404, f"{path} does not exist at {rev}", "EntryNotFound",
                           {"X-Repo-Commit": commit.id})
        entries: dict[str, dict[str, Any]] = {}
        for p, digest in sorted(files.items()):
            rel = p[len(prefix):]
            parts = rel.split("/")
            # directories between the listed path and the file
            for i in range(1, len(parts)):
                d = prefix + "/".join(parts[:i])
                if recursive or i == 1:
                    entries.setdefault(d, {"type": "directory", "oid": hashlib.sha1(d.encode()).hexdigest(),
                                           "size": 0, "path": d})
                if not recursive:
                    break
            if recursive or len(parts) == 1:
                entries[p] = self._file_entry(p, digest)
        doc = list(entries.values())
        return lambda: self._json(200, doc)

    def _file_entry(self, path: str, digest: str) -> dict[str, Any]:
        """A file as the tree and paths-info listings describe it (LFS files by their pointer)."""
        data = self.state.blob(digest)
        entry: dict[str, Any] = {"type": "file", "oid": git_sha1(data), "size": len(data), "path": path}
        if self.state.is_lfs(path):
            entry["lfs"] = {"oid": digest, "size": len(data), "pointerSize": len(_pointer(digest, len(data)))}
            entry["oid"] = git_sha1(_pointer(digest, len(data)))
        return entry

    def _paths_info(self, key: str, rev: str, body: bytes, user: User | None):
        """POST paths-info: the client sends a form (``paths=a&paths=b&expand=False``); unknown paths
        are left out of the answer, a folder is listed as a directory."""
        repo = self._repo_for_read(key, user)
        commit = self._commit(repo, rev)
        form = parse_qs(body.decode(), keep_blank_values=True)
        doc = []
        for path in form.get("paths", []):
            path = path.strip("/")
            if path in commit.files:
                doc.append(self._file_entry(path, commit.files[path]))
            elif any(p.startswith(path + "/") for p in commit.files):
                doc.append({"type": "directory", "oid": hashlib.sha1(path.encode()).hexdigest(), "size": 0,
                            "path": path})
        return lambda: self._json(200, doc)

    def _refs(self, key: str, user: User | None):
        repo = self._repo_for_read(key, user)
        doc = {"branches": [{"name": b, "ref": f"refs/heads/{b}", "targetCommit": c} for b, c in repo.branches.items()],
               "tags": [], "converts": []}
        return lambda: self._json(200, doc)

    def _branch(self, key: str, branch: str, payload: dict[str, Any], user: User | None):
        repo = self._repo_for_write(key, user)
        if branch in repo.branches:
            raise HubError(409, f"Reference refs/heads/{branch} already exists")
        start = self._commit(repo, payload.get("startingPoint") or DEFAULT_BRANCH)
        repo.branches[branch] = start.id
        return lambda: self._json(200, {})

    def _preupload(self, key: str, rev: str, payload: dict[str, Any], user: User | None):
        repo = self._repo_for_write(key, user)
        commit = self._commit(repo, rev)
        files = []
        for f in payload.get("files", []):
            digest = commit.files.get(f["path"])
            oid = git_sha1(self.state.blob(digest)) if digest else None
            files.append({"path": f["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": oid})
        return lambda: self._json(200, {"files": files, "commitOid": commit.id})

    def _do_commit(self, key: str, rev: str, body: bytes, user: User | None):
        repo = self._repo_for_write(key, user)
        if rev not in repo.branches:
            raise HubError(404, f"Invalid rev id: {rev} (commits go to a branch; create it first)", "RevisionNotFound")
        head = repo.commits[repo.branches[rev]]
        files = dict(head.files)
        header: dict[str, Any] = {}
        for line in body.splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            op, value = item.get("key"), item.get("value") or {}
            if op == "header":
                header = value
            elif op == "file":
                if value.get("encoding", "base64") != "base64":
                    raise HubError(400, "only base64 file content is supported")
                files[value["path"]] = self.state.put_blob(base64.b64decode(value["content"]))
            elif op == "deletedFile":
                if value["path"] not in files:
                    raise HubError(404, "A file with this name doesn't exist", "EntryNotFound")
                del files[value["path"]]
            elif op == "deletedFolder":
                folder = value["path"].rstrip("/") + "/"
                files = {p: d for p, d in files.items() if not p.startswith(folder)}
            else:
                raise HubError(400, f"unsupported commit operation {op!r} (this hub takes regular uploads only)")
        parent = header.get("parentCommit")
        if parent and parent != head.id:
            raise HubError(412, f"parent commit {parent} is not the head of {rev}")
        if not header.get("summary"):
            raise HubError(400, "a commit needs a summary")
        commit = self.state.new_commit(repo, head.id, files, header["summary"])
        repo.branches[rev] = commit.id
        doc = {"commitUrl": f"{self._base()}/{key}/commit/{commit.id}", "commitOid": commit.id,
               "pullRequestUrl": None}
        return lambda: self._json(200, doc)

    def _resolve(self, key: str, rev: str, path: str, user: User | None):
        repo = self._repo_for_read(key, user)
        commit = self._commit(repo, rev)
        digest = commit.files.get(path)
        if digest is None:
            raise HubError(404, f"Entry not found: {path}", "EntryNotFound", {"X-Repo-Commit": commit.id})
        data = self.state.blob(digest)
        if self.state.is_lfs(path):
            port = self.server.server_address[1]
            sig = self.state.sign(key, digest, path)
            location = f"http://localhost:{port}/cdn/{key}/{digest}/{quote(path)}?sig={sig}"
            headers = {"X-Repo-Commit": commit.id, "ETag": f'"{git_sha1(_pointer(digest, len(data)))}"',
                       "X-Linked-Etag": f'"{digest}"', "X-Linked-Size": str(len(data)), "Location": location}
            return lambda: self._send(302, b"", headers, content_type="text/plain")
        headers = {"X-Repo-Commit": commit.id, "ETag": f'"{git_sha1(data)}"', "Accept-Ranges": "bytes"}
        fault = self._take_fault(key, path)  # under the lock
        return lambda: self._serve_file(data, headers, fault)

    def _take_fault(self, key: str, path: str) -> Fault | None:
        fault = self.state.faults.get((key, path)) if self.command == "GET" else None
        if fault is not None and fault.times is not None:
            fault.times -= 1
            if fault.times <= 0:
                del self.state.faults[(key, path)]
        return fault

    def _cdn(self, key: str, digest: str, path: str, query: dict[str, str]):
        """The signed "CDN" URL an LFS file redirects to: no auth header, a signature instead."""
        if self.headers.get("Authorization"):
            raise HubError(400, "the CDN must not receive the Hub token")
        if not hmac.compare_digest(query.get("sig", ""), self.state.sign(key, digest, path)):
            raise HubError(403, "bad signature")
        data = self.state.blob(digest)
        headers = {"ETag": f'"{digest}"', "Accept-Ranges": "bytes"}
        fault = self._take_fault(key, path)  # under the lock
        return lambda: self._serve_file(data, headers, fault)

    def _serve_file(self, data: bytes, headers: dict[str, str], fault: Fault | None) -> None:
        start = 0
        rng = self.headers.get("Range")
        if rng and rng.startswith("bytes=") and self.command == "GET":
            first, _, last = rng[6:].partition("-")
            start = int(first or 0)
            end = int(last) + 1 if last else len(data)
            if start >= len(data):
                self._send(416, b"", {**headers, "Content-Range": f"bytes */{len(data)}"})
                return
            headers = {**headers, "Content-Range": f"bytes {start}-{end - 1}/{len(data)}"}
            status, body = 206, data[start:end]
        else:
            status, body = 200, data
        if fault is not None and fault.kind == "corrupt":
            mid = len(body) // 2
            body = body[:mid] + bytes(b ^ 0xFF for b in body[mid:mid + 8]) + body[mid + 8:]
        if fault is not None and fault.kind == "drop":
            cut = max(0, fault.at - start)
            self.send_response(status)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(len(body)))
            for k, v in headers.items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(body[:cut])
            self.wfile.flush()
            self.close_connection = True
            try:
                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            return
        self._send(status, body, headers, content_type="application/octet-stream")


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    state: HubState


class HubServer:
    """Start with ``.start()`` (127.0.0.1, a free port); ``.url`` is the HF_ENDPOINT to use."""

    def __init__(self, root: Path, tokens: dict[str, User]) -> None:
        self.state = HubState(root, tokens)
        self._httpd: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        assert self._httpd is not None
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> "HubServer":
        self._httpd = _Server(("127.0.0.1", 0), Handler)
        self._httpd.state = self.state
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="fake-hub", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    # -- test helpers ----------------------------------------------------------------------
    def corrupt(self, repo_id: str, path: str, *, times: int | None = None, repo_type: str = "model") -> None:
        with self.state.lock:
            self.state.faults[(repo_key(repo_type, repo_id), path)] = Fault("corrupt", times=times)

    def drop(self, repo_id: str, path: str, *, at: int, times: int | None = None, repo_type: str = "model") -> None:
        with self.state.lock:
            self.state.faults[(repo_key(repo_type, repo_id), path)] = Fault("drop", at=at, times=times)

    def clear_faults(self) -> None:
        with self.state.lock:
            self.state.faults.clear()

    def files(self, repo_id: str, rev: str = DEFAULT_BRANCH, *, repo_type: str = "model") -> dict[str, bytes]:
        """The files of a repo at a revision, read straight from storage (for assertions)."""
        with self.state.lock:
            repo = self.state.repos[repo_key(repo_type, repo_id)]
            commit = repo.resolve(rev)
            assert commit is not None, rev
            return {p: self.state.blob(d) for p, d in commit.files.items()}

    def head(self, repo_id: str, branch: str = DEFAULT_BRANCH, *, repo_type: str = "model") -> str:
        with self.state.lock:
            return self.state.repos[repo_key(repo_type, repo_id)].branches[branch]

    def requests(self) -> list[tuple[str, str]]:
        with self.state.lock:
            return list(self.state.requests)
