"""File hashes in one place: the sha256 of a file, and a model's content hash.

A patch's weights are hashed afresh every time (:func:`sha256_file`): that digest is an integrity
check. A model's weights are hashed for provenance only, and hashing gigabytes is not free, so
:func:`sha256_file_cached` keeps digests under ``$PORTLLM_HOME/hashes`` keyed by path, size and
modification time. (A safetensors file read into memory is hashed from those very bytes, in
``io.safetensors.read_snapshot``.)
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from portllm_cli.errors import InvalidInputError
from portllm_cli.io.home import portllm_home

CHUNK = 16 << 20
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


def sha256_file(path: Path, chunk: int = CHUNK) -> str:
    """Hex sha256 of a file's bytes, read in chunks (OSError passes through)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_file_cached(path: Path) -> str:
    """:func:`sha256_file`, cached by (path, size, mtime); a read failure is an InvalidInputError."""
    try:
        st = path.stat()
        key = hashlib.sha256(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()
    except OSError as exc:
        raise InvalidInputError(f"{path}: cannot read ({exc.strerror or exc.__class__.__name__})") from None
    cache = portllm_home() / "hashes" / key
    try:
        cached = cache.read_text().strip()
        if _HEX64.match(cached):  # a damaged cache entry is recomputed, never trusted
            return cached
    except (OSError, UnicodeDecodeError):
        pass
    try:
        digest = sha256_file(path)
    except OSError as exc:
        raise InvalidInputError(f"{path}: cannot read ({exc.strerror or exc.__class__.__name__})") from None
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
        h.update(f"{f.name}:{sha256_file_cached(f)}\n".encode())
    return "sha256:" + h.hexdigest()
