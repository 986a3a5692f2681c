"""Jane Austen's six novels as plain text, from Debian's r-cran-janeaustenr, without R.

The package stores the novels as an R lazy-load database (``data/Rdata.rdx`` + ``Rdata.rdb``): the
index is a gzip-compressed R serialization of a list (variable name -> offset, length), and each
variable is a chunk of the .rdb (4-byte big-endian length, then zlib data, or a type byte and
bzip2/xz data) holding an R serialization (XDR format "X\\n") of a character vector, one element
per line of the book. The small reader below knows the R serialization types these files use
(NULL, symbols, pairlists, character, logical, integer, double and generic vectors, references);
anything else is refused. Texts: public domain (Project Gutenberg); package: MIT.

    from austen import austen_corpus
    path = austen_corpus(400_000)          # the first 400,000 bytes, cached under ~/.cache/portllm
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import os
import struct
import tempfile
import zlib
from pathlib import Path
from typing import Any

DEB = "r-cran-janeaustenr"
LICENCE = "public domain texts (Project Gutenberg); janeaustenr package MIT"
DATA_DIR = "usr/lib/R/site-library/janeaustenr/data/"
# the order the package lists them in (austen_books()), by publication
BOOKS = ("sensesensibility", "prideprejudice", "mansfieldpark", "emma", "northangerabbey", "persuasion")

NILVALUE, SYMSXP, LISTSXP, CHARSXP, LGLSXP, INTSXP, REALSXP, STRSXP, VECSXP, EXPRSXP, REFSXP = (
    254, 1, 2, 9, 10, 13, 14, 16, 19, 20, 255)


class RDataError(ValueError):
    pass


class _Reader:
    """R's XDR serialization (format version 2 or 3), the subset data packages use."""

    def __init__(self, data: bytes) -> None:
        if data[:2] != b"X\n":
            raise RDataError(f"not an XDR R serialization (starts {data[:2]!r})")
        self.b, self.p, self.refs = data, 2, []
        version = self.int()
        self.int()  # the writer's R version
        self.int()  # the minimal reader version
        if version == 3:
            n = self.int()  # the native encoding's name follows
            self.p += n
        elif version != 2:
            raise RDataError(f"R serialization version {version} is not supported")

    def int(self) -> int:
        if self.p + 4 > len(self.b):
            raise RDataError("truncated R serialization")
        (v,) = struct.unpack_from(">i", self.b, self.p)
        self.p += 4
        return v

    def length(self) -> int:
        n = self.int()
        if n == -1:
            hi, lo = self.int(), self.int()
            n = (hi << 32) + lo
        if n < 0 or n > len(self.b):
            raise RDataError(f"bad vector length {n}")
        return n

    def item(self) -> Any:
        flags = self.int()
        kind, has_attr, has_tag = flags & 0xFF, flags & (1 << 9), flags & (1 << 10)
        if kind == NILVALUE:
            return None
        if kind == REFSXP:
            idx = flags >> 8 or self.int()
            return self.refs[idx - 1]
        if kind == SYMSXP:
            sym = ("symbol", self.item())
            self.refs.append(sym)
            return sym
        if kind == CHARSXP:
            n = self.int()
            if n == -1:
                return None  # NA_character_
            s = self.b[self.p:self.p + n].decode("utf-8", "replace")
            self.p += n
            return s
        if kind == LISTSXP:  # a pairlist: (tag, value) pairs
            out = []
            while True:
                if has_attr:
                    self.item()
                tag = self.item() if has_tag else None
                out.append((tag[1] if isinstance(tag, tuple) else tag, self.item()))
                (nxt,) = struct.unpack_from(">i", self.b, self.p)
                if nxt & 0xFF != LISTSXP:
                    self.item()  # the terminating NULL
                    return out
                self.p += 4
                has_attr, has_tag = nxt & (1 << 9), nxt & (1 << 10)
        if kind in (STRSXP, VECSXP, EXPRSXP):
            value: Any = [self.item() for _ in range(self.length())]
        elif kind in (LGLSXP, INTSXP):
            n = self.length()
            value = list(struct.unpack_from(f">{n}i", self.b, self.p))
            self.p += 4 * n
        elif kind == REALSXP:
            n = self.length()
            value = list(struct.unpack_from(f">{n}d", self.b, self.p))
            self.p += 8 * n
        else:
            raise RDataError(f"R object type {kind} is not supported")
        if has_attr:
            attrs = dict(self.item() or [])
            names = attrs.get("names")
            if isinstance(names, list) and isinstance(value, list) and len(names) == len(value):
                return dict(zip(names, value))
        return value


def unserialize(data: bytes) -> Any:
    return _Reader(data).item()


def _chunk(data: bytes) -> bytes:
    """One lazy-load chunk: 4-byte length, then zlib; or a type byte (Z zlib, 2 bzip2, X xz, 0 none)."""
    kind = data[4:5]
    body = {b"Z": lambda b: zlib.decompress(b[5:]), b"2": lambda b: bz2.decompress(b[5:]),
            b"X": lambda b: lzma.decompress(b[5:]), b"0": lambda b: b[5:]}.get(kind)
    return body(data) if body else zlib.decompress(data[4:])


def read_lazyload(rdx: Path, rdb: Path) -> dict[str, Any]:
    """Every variable of an R lazy-load database."""
    index = unserialize(gzip.decompress(rdx.read_bytes()) if rdx.read_bytes()[:2] == b"\x1f\x8b"
                        else _chunk(rdx.read_bytes()))
    blob = rdb.read_bytes()
    out = {}
    for name, (offset, length) in index["variables"].items():
        out[name] = unserialize(_chunk(blob[offset:offset + length]))
    return out


def austen_text(deb: Path) -> str:
    """The six novels, one after another, from the package file."""
    import shutil
    import subprocess

    with tempfile.TemporaryDirectory(prefix="portllm-austen-") as tmp:
        dpkg = shutil.which("dpkg-deb")
        if dpkg is None:
            from portllm_cli.demo.material import _deb_members

            _deb_members(deb, lambda rel: rel.startswith(DATA_DIR), Path(tmp))
        else:
            subprocess.run([dpkg, "-x", str(deb), tmp], check=True, capture_output=True)
        data = Path(tmp) / DATA_DIR
        books = read_lazyload(data / "Rdata.rdx", data / "Rdata.rdb")
    missing = [b for b in BOOKS if b not in books]
    if missing:
        raise RDataError(f"{deb.name}: no {', '.join(missing)} in its data")
    return "\n\n".join("\n".join(line or "" for line in books[b]).strip() for b in BOOKS) + "\n"


def austen_corpus(max_bytes: int, notify: Any = None) -> Path:
    """The first ``max_bytes`` of the six novels (cut at a line end), cached under the material home."""
    from portllm_cli.demo import material
    from portllm_cli.io.home import portllm_home

    base = portllm_home() / "data" / "austen"
    out = base / f"corpus-{max_bytes}.txt"
    if out.is_file():
        return out
    full = base / "corpus-full.txt"
    if not full.is_file():
        deb = material.fetch_deb(DEB, notify=notify, why="Jane Austen's novels: a corpus of another kind of text "
                                 "than the Python docs, for a third evolution of the model", licence=LICENCE)
        base.mkdir(parents=True, exist_ok=True)
        text = austen_text(deb)
        part = full.with_name(f"{full.name}.{os.getpid()}.part")
        part.write_text(text, encoding="utf-8")
        os.replace(part, full)
    data = full.read_bytes()
    if len(data) > max_bytes:
        cut = data.rfind(b"\n", 0, max_bytes)
        data = data[: cut + 1 if cut > 0 else max_bytes]
    part = out.with_name(f"{out.name}.{os.getpid()}.part")
    part.write_bytes(data)
    os.replace(part, out)
    return out
