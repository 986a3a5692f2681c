"""Validated, streaming access to GGUF files (llama.cpp's format): headers, tensor rows, splits.

The header is parsed here and checked, not trusted: every length, count, offset and size must
lie inside the file, tensor data must be aligned and sized as type x shape, tensors must not
overlap. A file that lies about its layout is refused (IntegrityError, exit 4) before any byte
of its data is used. Tensor data is read a block of rows at a time with pread, never mapped or
loaded whole, so memory stays flat whatever the model's size.

Layout (GGUF v2/v3, little-endian): magic ``GGUF``, version (u32), tensor count (u64), key/value
count (u64); the key/value pairs; one info per tensor (name, n_dims (u32), dims (u64 each, ggml
order: innermost first), type (u32), offset (u64) relative to the data section); padding to the
alignment (``general.alignment``, default 32); the data section. Shapes here are in numpy order
(ggml's dims reversed), so a linear weight is ``(out, in)`` as in PyTorch, and quantization
blocks run along the last dimension: any range of rows (first dimension) is whole blocks.

Split models (``NAME-00001-of-00003.gguf`` ..., as llama.cpp's gguf-split writes them) are read
as one model; the type table (block size, bytes per block) comes from the ``gguf`` package.
"""

from __future__ import annotations

import math
import mmap
import os
import re
import stat
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from portllm_cli.errors import IntegrityError, InvalidInputError, NotFoundError, UnsupportedError

MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_NAME_BYTES = 63  # GGML_MAX_NAME is 64 with the terminating NUL; llama.cpp refuses longer names
MAX_KV = 1 << 20
MAX_TENSORS = 1 << 20
MAX_STRING = 1 << 26
MAX_ARRAY = 1 << 28
KEEP_ARRAY = 4096  # arrays longer than this (tokenizer vocabularies) are kept as a count only

# value type id -> (name, struct format) for the fixed-size types; 8 = string, 9 = array
T_STRING, T_ARRAY = 8, 9
T_UINT32, T_FLOAT32, T_UINT16, T_INT32, T_BOOL, T_UINT64 = 4, 6, 2, 5, 7, 10
SCALAR_FORMATS: dict[int, str] = {
    0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<B", 10: "<Q", 11: "<q", 12: "<d",
}

SPLIT_RE = re.compile(r"^(?P<prefix>.+)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")
KEY_SPLIT_NO, KEY_SPLIT_COUNT, KEY_SPLIT_TENSORS = "split.no", "split.count", "split.tensors.count"


def gguf_package() -> Any:
    """The ``gguf`` package (llama.cpp's own Python library): type table, name maps, quantizers."""
    try:
        import gguf
    except ImportError:
        raise UnsupportedError(
            "GGUF files need the 'gguf' package (llama.cpp's Python library)",
            hint="pip install 'portllm-cli[gguf]'   (or: pip install gguf)",
        ) from None
    return gguf


def type_table() -> dict[int, tuple[str, int, int]]:
    """ggml type id -> (name, elements per block, bytes per block)."""
    g = gguf_package()
    return {int(t): (t.name, bs, ts) for t, (bs, ts) in g.GGML_QUANT_SIZES.items()}


def type_id(name: str) -> int:
    g = gguf_package()
    return int(g.GGMLQuantizationType[name])


@dataclass(frozen=True)
class GgufArray:
    """An array value too long to keep (e.g. a tokenizer's vocabulary): its item type and length."""

    item_type: int
    count: int


@dataclass(frozen=True)
class GgufTensor:
    name: str
    type_id: int
    type_name: str
    shape: tuple[int, ...]  # numpy order: ggml's dims reversed
    begin: int  # absolute byte offset of the data in its file
    nbytes: int
    info_offset: int  # the offset as written in the header (relative to the data section)

    @property
    def end(self) -> int:
        return self.begin + self.nbytes

    @property
    def rows(self) -> int:
        return self.shape[0] if self.shape else 1

    @property
    def row_bytes(self) -> int:
        return self.nbytes // self.rows if self.rows else 0

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass
class GgufFile:
    path: Path
    version: int
    n_kv: int
    alignment: int
    fields: dict[str, Any]  # key -> value (str, int, float, bool, list, or GgufArray)
    field_types: dict[str, int]
    kv_span: tuple[int, int]  # the key/value section's bytes, copied verbatim into outputs
    infos_span: tuple[int, int]  # the tensor infos' bytes
    data_start: int
    tensors: dict[str, GgufTensor]  # in header order
    file_size: int

    def get(self, key: str, default: Any = None) -> Any:
        return self.fields.get(key, default)


class _Cursor:
    """Bounds-checked reads from a mapped file: a length that runs past the end is a lying header."""

    def __init__(self, path: Path, buf: Any, size: int) -> None:
        self.path, self.buf, self.size, self.pos = path, buf, size, 0

    def take(self, n: int, what: str) -> memoryview:
        if n < 0 or self.pos + n > self.size:
            raise IntegrityError(
                f"{self.path}: GGUF header runs past the end of the file while reading {what} "
                f"(at byte {self.pos}, {n} bytes wanted, {self.size} in the file): truncated file or lying header"
            )
        view = memoryview(self.buf)[self.pos : self.pos + n]
        self.pos += n
        return view

    def unpack(self, fmt: str, what: str) -> Any:
        return struct.unpack(fmt, self.take(struct.calcsize(fmt), what))[0]

    def string(self, what: str, limit: int = MAX_STRING) -> str:
        n = self.unpack("<Q", what)
        if n > limit:
            raise IntegrityError(f"{self.path}: {what} claims {n} bytes (more than {limit}): lying header")
        raw = self.take(n, what)
        try:
            return bytes(raw).decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidInputError(f"{self.path}: {what} is not valid UTF-8") from None

    def skip_strings(self, count: int, what: str) -> None:
        """Walk ``count`` strings without decoding them (a tokenizer's vocabulary: fast path)."""
        buf, pos, size = self.buf, self.pos, self.size
        unpack = _U64.unpack_from
        for _ in range(count):
            if pos + 8 > size:
                self.pos = pos
                self.take(8, what)  # raises with the standard message
            (n,) = unpack(buf, pos)
            pos += 8 + n
            if n > MAX_STRING or pos > size:
                self.pos = pos - n
                raise IntegrityError(f"{self.path}: {what} claims {n} bytes, past the end of the file: "
                                     "truncated file or lying header")
        self.pos = pos


_U64 = struct.Struct("<Q")


def _read_value(cur: _Cursor, vtype: int, key: str) -> Any:
    if vtype in SCALAR_FORMATS:
        v = cur.unpack(SCALAR_FORMATS[vtype], f"the value of {key!r}")
        if vtype == T_BOOL:
            if v not in (0, 1):
                raise InvalidInputError(f"{cur.path}: {key!r}: a bool must be 0 or 1, found {v}")
            return bool(v)
        return v
    if vtype == T_STRING:
        return cur.string(f"the value of {key!r}")
    if vtype == T_ARRAY:
        item = cur.unpack("<I", f"the item type of {key!r}")
        count = cur.unpack("<Q", f"the length of {key!r}")
        if count > MAX_ARRAY:
            raise IntegrityError(f"{cur.path}: {key!r} claims {count} items: lying header")
        if item == T_ARRAY:
            raise UnsupportedError(f"{cur.path}: {key!r} is an array of arrays, which portllm does not read")
        if item == T_STRING:
            if count > KEEP_ARRAY:
                cur.skip_strings(count, f"an item of {key!r}")
                return GgufArray(item, count)
            return [cur.string(f"an item of {key!r}") for _ in range(count)]
        if item not in SCALAR_FORMATS:
            raise InvalidInputError(f"{cur.path}: {key!r}: unknown array item type {item}")
        fmt = SCALAR_FORMATS[item]
        width = struct.calcsize(fmt)
        raw = cur.take(width * count, f"the items of {key!r}")
        if count > KEEP_ARRAY:
            return GgufArray(item, count)
        vals = [v for (v,) in struct.iter_unpack(fmt, raw)] if count else []
        return [bool(v) for v in vals] if item == T_BOOL else vals
    raise InvalidInputError(f"{cur.path}: {key!r}: unknown GGUF value type {vtype}")


def _regular_size(path: Path) -> int:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise NotFoundError(f"{path}: no such file") from None
    except OSError as exc:
        raise InvalidInputError(f"{path}: cannot read ({exc.strerror or exc.__class__.__name__})") from None
    if stat.S_ISDIR(st.st_mode):
        raise InvalidInputError(f"{path}: is a directory, expected a GGUF file")
    if not stat.S_ISREG(st.st_mode):
        raise InvalidInputError(f"{path}: not a regular file")
    return st.st_size


def read_gguf(path: str | os.PathLike[str]) -> GgufFile:
    """Parse and validate a GGUF file's header (not its tensor data)."""
    path = Path(path)
    size = _regular_size(path)
    if size < 24:
        raise IntegrityError(f"{path}: not a GGUF file ({size} bytes: truncated)")
    try:
        with open(path, "rb") as fh:
            if fh.read(4) != MAGIC:
                raise InvalidInputError(f"{path}: not a GGUF file (no GGUF magic)")
            with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
                return _parse(path, mm, size)
    except OSError as exc:
        raise InvalidInputError(f"{path}: cannot read ({exc.strerror or exc.__class__.__name__})") from None


def _parse(path: Path, buf: Any, size: int) -> GgufFile:
    table = type_table()
    cur = _Cursor(path, buf, size)
    cur.take(4, "the magic")
    version = cur.unpack("<I", "the version")
    if version not in (2, 3):
        if version and struct.unpack(">I", struct.pack("<I", version))[0] in (2, 3):
            raise UnsupportedError(f"{path}: a big-endian GGUF file; portllm reads little-endian GGUF only")
        raise UnsupportedError(f"{path}: GGUF version {version}; portllm reads versions 2 and 3")
    n_tensors = cur.unpack("<Q", "the tensor count")
    n_kv = cur.unpack("<Q", "the key/value count")
    if n_tensors > MAX_TENSORS or n_kv > MAX_KV:
        raise IntegrityError(f"{path}: GGUF header claims {n_tensors} tensors and {n_kv} keys: lying header")
    kv_begin = cur.pos
    fields: dict[str, Any] = {}
    types: dict[str, int] = {}
    for _ in range(n_kv):
        key = cur.string("a metadata key", 1 << 16)
        vtype = cur.unpack("<I", f"the type of {key!r}")
        if key in fields:
            raise InvalidInputError(f"{path}: metadata key {key!r} appears twice")
        fields[key] = _read_value(cur, vtype, key)
        types[key] = vtype
    kv_end = cur.pos
    alignment = fields.get("general.alignment", DEFAULT_ALIGNMENT)
    if "general.alignment" in fields and types["general.alignment"] != T_UINT32:
        raise InvalidInputError(f"{path}: general.alignment must be a uint32")
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1) or alignment > 1 << 20:
        raise IntegrityError(f"{path}: general.alignment {alignment!r} is not a power of two")
    raw_infos = []
    for _ in range(n_tensors):
        name = cur.string("a tensor name", 1 << 16)
        if len(name.encode("utf-8")) > MAX_NAME_BYTES:
            raise InvalidInputError(f"{path}: tensor name {name[:40]!r}… is longer than llama.cpp's {MAX_NAME_BYTES} bytes")
        n_dims = cur.unpack("<I", f"the rank of {name!r}")
        if not 1 <= n_dims <= MAX_DIMS:
            raise IntegrityError(f"{path}: tensor {name!r} has {n_dims} dimensions (1 to {MAX_DIMS} allowed)")
        ne = [cur.unpack("<Q", f"the shape of {name!r}") for _ in range(n_dims)]
        tid = cur.unpack("<I", f"the type of {name!r}")
        offset = cur.unpack("<Q", f"the offset of {name!r}")
        raw_infos.append((name, ne, tid, offset))
    infos_end = cur.pos
    data_start = -(-infos_end // alignment) * alignment
    if data_start > size:
        raise IntegrityError(f"{path}: the data section would start at byte {data_start} of a {size}-byte file (truncated)")
    tensors: dict[str, GgufTensor] = {}
    for name, ne, tid, offset in raw_infos:
        if name in tensors:
            raise InvalidInputError(f"{path}: tensor {name!r} appears twice")
        if tid not in table:
            raise UnsupportedError(f"{path}: tensor {name!r} has ggml type {tid}, unknown to the gguf package")
        tname, bs, ts = table[tid]
        if any(d == 0 or d >= 1 << 40 for d in ne):
            raise IntegrityError(f"{path}: tensor {name!r} has impossible dimensions {ne}")
        if ne[0] % bs:
            raise IntegrityError(f"{path}: tensor {name!r}: row length {ne[0]} is not a multiple of {tname}'s block of {bs}")
        nbytes = math.prod(ne) // bs * ts
        if offset % alignment:
            raise IntegrityError(f"{path}: tensor {name!r}: data offset {offset} is not aligned to {alignment}")
        begin = data_start + offset
        if begin + nbytes > size:
            raise IntegrityError(
                f"{path}: tensor {name!r} ({tname} {list(reversed(ne))}, {nbytes} bytes) ends at byte "
                f"{begin + nbytes} of a {size}-byte file: truncated file or lying header"
            )
        tensors[name] = GgufTensor(name, tid, tname, tuple(reversed(ne)), begin, nbytes, offset)
    prev = None
    for t in sorted(tensors.values(), key=lambda t: t.begin):
        if prev is not None and t.begin < prev.end:
            raise IntegrityError(f"{path}: tensors {prev.name!r} and {t.name!r} overlap: lying header")
        prev = t
    return GgufFile(path, version, n_kv, alignment, fields, types, (kv_begin, kv_end), (kv_end, infos_end),
                    data_start, tensors, size)


# -- models (one file or a split set) -----------------------------------------------------------
@dataclass
class GgufModel:
    """A GGUF model: one file, or every part of a split set, with its tensors by name."""

    path: Path  # the file given (the first part of a split set)
    files: list[GgufFile]
    locations: dict[str, tuple[GgufFile, GgufTensor]] = field(default_factory=dict)

    @property
    def meta(self) -> GgufFile:
        return self.files[0]

    @property
    def arch(self) -> str | None:
        a = self.meta.get("general.architecture")
        return a if isinstance(a, str) else None

    @property
    def is_split(self) -> bool:
        return len(self.files) > 1

    def names(self) -> list[str]:
        return list(self.locations)

    def tensor(self, name: str) -> GgufTensor:
        return self.locations[name][1]

    def file_of(self, name: str) -> GgufFile:
        return self.locations[name][0]

    def total_bytes(self) -> int:
        return sum(f.file_size for f in self.files)

    def arch_int(self, suffix: str) -> int | None:
        """``{arch}.{suffix}`` as a positive integer (the first of a per-layer array), else None."""
        v = self.meta.get(f"{self.arch}.{suffix}")
        if isinstance(v, list) and v and all(x == v[0] for x in v):
            v = v[0]
        return v if isinstance(v, int) and not isinstance(v, bool) and v > 0 else None


def split_parts(path: Path) -> list[Path]:
    """The files of a split set named by its first part; [path] for a single file."""
    m = SPLIT_RE.match(path.name)
    if not m:
        return [path]
    count = int(m.group("count"))
    if int(m.group("no")) != 1:
        raise InvalidInputError(
            f"{path}: part {int(m.group('no'))} of a split GGUF", hint=f"pass the first part, {m.group('prefix')}-00001-of-{m.group('count')}.gguf"
        )
    if count < 1:
        raise InvalidInputError(f"{path}: a split set of {count} parts")
    return [path.with_name(f"{m.group('prefix')}-{i:05d}-of-{count:05d}.gguf") for i in range(1, count + 1)]


def open_model(path: str | os.PathLike[str]) -> GgufModel:
    """Open a GGUF file, or the split set it is the first part of, and validate every part."""
    path = Path(path)
    parts = split_parts(path)
    files = []
    for i, p in enumerate(parts):
        if not p.exists():
            raise NotFoundError(f"{p}: part {i + 1} of {len(parts)} of the split GGUF {path.name} is missing")
        files.append(read_gguf(p))
    first = files[0]
    declared = first.get(KEY_SPLIT_COUNT)
    if len(parts) == 1:
        if isinstance(declared, int) and declared > 1:
            raise InvalidInputError(
                f"{path}: the first of {declared} split parts, but not named NAME-00001-of-{declared:05d}.gguf",
                hint="keep the names llama.cpp's gguf-split gave the parts",
            )
    else:
        for i, f in enumerate(files):
            if f.get(KEY_SPLIT_COUNT) != len(parts) or f.get(KEY_SPLIT_NO) != i:
                raise IntegrityError(
                    f"{f.path}: its split.no/split.count ({f.get(KEY_SPLIT_NO)}/{f.get(KEY_SPLIT_COUNT)}) "
                    f"do not say part {i} of {len(parts)}"
                )
    model = GgufModel(path, files)
    for f in files:
        for name, t in f.tensors.items():
            if name in model.locations:
                raise IntegrityError(f"{f.path}: tensor {name!r} is also in {model.locations[name][0].path.name}")
            model.locations[name] = (f, t)
    total = first.get(KEY_SPLIT_TENSORS)
    if len(parts) > 1 and isinstance(total, int) and total != len(model.locations):
        raise IntegrityError(f"{path}: split.tensors.count says {total} tensors, the parts hold {len(model.locations)}")
    if not isinstance(first.get("general.architecture"), str):
        raise InvalidInputError(f"{path}: no general.architecture in the GGUF metadata")
    return model


# -- reading and writing data ----------------------------------------------------------------
def pread_exact(fd: int, n: int, offset: int, where: Path) -> bytearray:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = os.preadv(fd, [view[got:]], offset + got)
        if k <= 0:
            raise IntegrityError(f"{where}: truncated while reading (byte {offset + got})")
        got += k
    return buf


def read_rows(fd: int, t: GgufTensor, r0: int, r1: int, where: Path) -> bytearray:
    """The raw bytes of rows [r0, r1) of a tensor (whole quantization blocks)."""
    rb = t.row_bytes
    return pread_exact(fd, (r1 - r0) * rb, t.begin + r0 * rb, where)


def encode_string(s: str) -> bytes:
    raw = s.encode("utf-8")
    return struct.pack("<Q", len(raw)) + raw


def encode_kv(items: Iterable[tuple[str, int, Any]]) -> tuple[bytes, int]:
    """Key/value pairs (key, value type id, value) as GGUF bytes; arrays as (item type, list)."""
    out = bytearray()
    n = 0
    for key, vtype, value in items:
        out += encode_string(key) + struct.pack("<I", vtype)
        if vtype == T_STRING:
            out += encode_string(value)
        elif vtype == T_ARRAY:
            item, values = value
            out += struct.pack("<IQ", item, len(values))
            for v in values:
                out += encode_string(v) if item == T_STRING else struct.pack(SCALAR_FORMATS[item], v)
        else:
            out += struct.pack(SCALAR_FORMATS[vtype], value)
        n += 1
    return bytes(out), n


@dataclass(frozen=True)
class TensorSpec:
    """A tensor of a file being written: name, numpy-order shape, ggml type id, data size."""

    name: str
    shape: tuple[int, ...]
    type_id: int
    nbytes: int


def tensor_nbytes(shape: tuple[int, ...], tid: int) -> int:
    name, bs, ts = type_table()[tid]
    if shape[-1] % bs:
        raise InvalidInputError(f"a row of {shape[-1]} values cannot be stored as {name} (blocks of {bs})")
    return math.prod(shape) // bs * ts


def layout(specs: list[TensorSpec], alignment: int) -> list[int]:
    """Data-section offsets for tensors written in order, each aligned (as llama.cpp writes them)."""
    offsets, cursor = [], 0
    for s in specs:
        cursor = -(-cursor // alignment) * alignment
        offsets.append(cursor)
        cursor += s.nbytes
    return offsets


def encode_header(version: int, kv: bytes, n_kv: int, specs: list[TensorSpec], offsets: list[int], alignment: int) -> bytes:
    """Magic, counts, the key/value bytes as given, the tensor infos, and padding to the data section."""
    out = bytearray(MAGIC + struct.pack("<IQQ", version, len(specs), n_kv))
    out += kv
    for s, off in zip(specs, offsets):
        ne = list(reversed(s.shape))
        out += encode_string(s.name) + struct.pack("<I", len(ne)) + struct.pack(f"<{len(ne)}Q", *ne)
        out += struct.pack("<IQ", s.type_id, off)
    out += b"\0" * ((-len(out)) % alignment)
    return bytes(out)
