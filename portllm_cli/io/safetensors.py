"""Validated, streaming access to safetensors files: one tensor at a time, never the whole file.

The header is parsed and checked here (not trusted): offsets must lie inside the file, be
contiguous and match dtype x shape, so a file that lies about its layout is refused before
any byte of it is used.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import stat
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator

from portllm_cli.errors import IntegrityError, InvalidInputError, NotFoundError, PortllmError
from portllm_cli.io import strict_json

if TYPE_CHECKING:  # torch is imported lazily so that --help stays instant
    import torch

# dtype name -> (bytes per element, torch dtype attribute name)
DTYPES: dict[str, tuple[int, str]] = {
    "F64": (8, "float64"),
    "F32": (4, "float32"),
    "F16": (2, "float16"),
    "BF16": (2, "bfloat16"),
    "I64": (8, "int64"),
    "I32": (4, "int32"),
    "I16": (2, "int16"),
    "I8": (1, "int8"),
    "U8": (1, "uint8"),
    "U16": (2, "uint16"),
    "U32": (4, "uint32"),
    "U64": (8, "uint64"),
    "BOOL": (1, "bool"),
    "F8_E4M3": (1, "float8_e4m3fn"),
    "F8_E5M2": (1, "float8_e5m2"),
}

MAX_HEADER_BYTES = 100_000_000  # same cap as the safetensors library
MAX_RANK = 64  # more dimensions than any real tensor; bounds the work a hostile header can cause


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str  # safetensors dtype name, e.g. "BF16"
    shape: tuple[int, ...]
    begin: int  # absolute byte offset of the data in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class SafetensorsHeader:
    path: Path
    header_len: int  # length of the JSON header, excluding the 8-byte length prefix
    tensors: dict[str, TensorInfo]  # in file order
    metadata: dict[str, str]
    file_size: int

    @property
    def data_start(self) -> int:
        return 8 + self.header_len


def torch_dtype(name: str) -> "torch.dtype":
    import torch

    try:
        return getattr(torch, DTYPES[name][1])
    except (KeyError, AttributeError):
        raise InvalidInputError(f"unsupported safetensors dtype {name!r}") from None


def dtype_name(dtype: "torch.dtype") -> str:
    attr = str(dtype).removeprefix("torch.")
    for name, (_, a) in DTYPES.items():
        if a == attr:
            return name
    raise InvalidInputError(f"dtype {dtype} cannot be stored in safetensors by portllm")


@contextlib.contextmanager
def _reading(path: Path) -> Iterator[None]:
    """OS errors while reading ``path`` become one-line PortllmErrors."""
    try:
        yield
    except FileNotFoundError:
        raise NotFoundError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise InvalidInputError(f"{path}: is a directory, expected a safetensors file") from None
    except PermissionError:
        raise InvalidInputError(f"{path}: permission denied") from None
    except OSError as exc:
        raise InvalidInputError(f"{path}: cannot read ({exc.strerror or exc.__class__.__name__})") from None
    except ValueError:  # e.g. an embedded NUL in the path
        raise InvalidInputError(f"{path!r}: not a valid file name") from None


def _regular_size(path: Path, st: os.stat_result) -> int:
    if stat.S_ISDIR(st.st_mode):
        raise IsADirectoryError(path)
    if not stat.S_ISREG(st.st_mode):  # a FIFO or device would block or never end
        raise InvalidInputError(f"{path}: not a regular file")
    return st.st_size


def _header_length(path: Path, prefix: bytes, size: int) -> int:
    if len(prefix) < 8:
        raise InvalidInputError(f"{path}: not a safetensors file (empty or truncated header)")
    (n,) = struct.unpack("<Q", prefix[:8])
    if n == 0 or n > MAX_HEADER_BYTES or 8 + n > size:
        raise InvalidInputError(f"{path}: corrupt safetensors header (header length {n} for a {size}-byte file)")
    return n


def read_header(path: str | os.PathLike[str]) -> SafetensorsHeader:
    """Parse and validate the header of a safetensors file without reading its data.

    Refused: an empty or truncated file, a header that is not a JSON object (or has duplicate
    keys), unknown dtypes, bad shapes, offsets outside the file, offsets that disagree with
    dtype x shape, overlapping tensors, gaps, and trailing bytes.
    """
    path = Path(path)
    with _reading(path):
        size = _regular_size(path, os.stat(path))
        with open(path, "rb") as fh:
            n = _header_length(path, fh.read(8), size)
            raw = fh.read(n)
    if len(raw) != n:
        raise InvalidInputError(f"{path}: corrupt safetensors header (file shrank while reading)")
    return _parse_header(path, raw, size)


def _parse_header(path: Path, raw: bytes, size: int) -> SafetensorsHeader:
    """Validate the JSON header ``raw`` of a ``size``-byte safetensors file at ``path``."""
    n = len(raw)
    doc = strict_json.loads(raw, where=path, what="safetensors header", allow_constants=False)
    if not isinstance(doc, dict):
        raise InvalidInputError(f"{path}: corrupt safetensors header (not a JSON object)")
    metadata = doc.pop("__metadata__", None)
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise InvalidInputError(f"{path}: __metadata__ must map strings to strings")
    data_start = 8 + n
    data_len = size - data_start
    entries: list[TensorInfo] = []
    for name, spec in doc.items():
        if not isinstance(spec, dict):
            raise InvalidInputError(f"{path}: tensor {name!r}: entry is not an object")
        unknown = sorted(set(spec) - {"dtype", "shape", "data_offsets"})
        if unknown:
            raise InvalidInputError(f"{path}: tensor {name!r}: unknown header field(s) {', '.join(map(repr, unknown[:3]))}")
        dtype, shape, offsets = spec.get("dtype"), spec.get("shape"), spec.get("data_offsets")
        if not isinstance(dtype, str) or dtype not in DTYPES:
            raise InvalidInputError(f"{path}: tensor {_short(name)}: unknown dtype {_short(dtype)}")
        if not isinstance(shape, list) or len(shape) > MAX_RANK or not all(
            isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 2**63 for d in shape
        ):
            raise InvalidInputError(f"{path}: tensor {name!r}: bad shape {_short(shape)}")
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) and 0 <= o < 2**64 for o in offsets)
        ):
            raise InvalidInputError(f"{path}: tensor {name!r}: bad data_offsets {_short(offsets)}")
        b, e = offsets
        expected = math.prod(shape) * DTYPES[dtype][0]
        if not (0 <= b <= e) or e - b != expected:
            raise IntegrityError(
                f"{path}: tensor {name!r}: header says {dtype} {_short(shape)} ({_short(expected)} bytes) "
                f"but its offsets span {_short(e - b)} bytes"
            )
        if e > data_len:
            raise IntegrityError(
                f"{path}: tensor {name!r} ends at byte {_short(e)} of a {data_len}-byte data section "
                "(truncated file or lying header)"
            )
        entries.append(TensorInfo(name, dtype, tuple(shape), data_start + b, data_start + e))
    entries.sort(key=lambda t: (t.begin, t.end))
    cursor = data_start
    for t in entries:
        if t.begin != cursor:
            raise IntegrityError(
                f"{path}: tensor {t.name!r}: data offsets overlap or leave a gap (starts at "
                f"{t.begin - data_start}, expected {cursor - data_start})"
            )
        cursor = t.end
    if cursor != size:
        raise IntegrityError(
            f"{path}: {size - cursor} unexpected trailing bytes after the last tensor"
        )
    return SafetensorsHeader(path, n, {t.name: t for t in entries}, dict(metadata), size)


def _short(value: object, limit: int = 80) -> str:
    """repr() cut to a length that keeps an error message on one readable line."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def read_tensor(path: str | os.PathLike[str], info: TensorInfo) -> "torch.Tensor":
    """Read one tensor with a plain pread (no mmap, so resident memory stays one tensor)."""
    import torch

    dtype = torch_dtype(info.dtype)
    if info.nbytes == 0:
        return torch.empty(info.shape, dtype=dtype)
    buf = bytearray(info.nbytes)
    try:
        with open(path, "rb", buffering=0) as fh:
            fh.seek(info.begin)
            view = memoryview(buf)
            got = 0
            while got < info.nbytes:
                n = fh.readinto(view[got:])
                if not n:
                    raise IntegrityError(f"{path}: truncated while reading tensor {info.name!r}")
                got += n
    except FileNotFoundError:
        raise NotFoundError(f"{path}: no such file (removed while reading tensor {info.name!r})") from None
    except OSError as exc:
        raise InvalidInputError(f"{path}: cannot read tensor {info.name!r} ({exc.strerror or exc.__class__.__name__})") from None
    return torch.frombuffer(buf, dtype=dtype).reshape(info.shape)


def tensor_bytes(tensor: "torch.Tensor") -> memoryview:
    """The raw little-endian bytes of a tensor, as safetensors stores them."""
    t = tensor.detach().contiguous().cpu()
    if t.numel() == 0:
        return memoryview(b"")
    import torch

    return memoryview(t.view(torch.uint8).reshape(-1).numpy()).cast("B")


def encode_header(
    specs: Iterable[tuple[str, str, tuple[int, ...]]], metadata: dict[str, str] | None = None
) -> tuple[bytes, dict[str, tuple[int, int]]]:
    """Build a safetensors header for tensors written in the given order.

    Returns the full prefix (8-byte length + padded JSON) and each tensor's relative offsets.
    """
    doc: dict[str, Any] = {}
    if metadata:
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
            raise InvalidInputError("safetensors metadata must map strings to strings")
        doc["__metadata__"] = dict(metadata)
    offsets: dict[str, tuple[int, int]] = {}
    cursor = 0
    for name, dtype, shape in specs:
        if name in offsets:
            raise InvalidInputError(f"duplicate tensor name {name!r}")
        if name == "__metadata__":
            raise InvalidInputError("'__metadata__' is reserved and cannot name a tensor")
        if dtype not in DTYPES:
            raise InvalidInputError(f"tensor {name!r}: dtype {dtype!r} cannot be stored in safetensors")
        n = math.prod(shape) * DTYPES[dtype][0]
        offsets[name] = (cursor, cursor + n)
        doc[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [cursor, cursor + n]}
        cursor += n
    raw = json.dumps(doc, separators=(",", ":")).encode("utf-8")
    raw += b" " * ((8 - len(raw) % 8) % 8)  # the data section starts 8-byte aligned
    return struct.pack("<Q", len(raw)) + raw, offsets


class SafetensorsWriter:
    """Write a safetensors file tensor by tensor, once the names, dtypes and shapes are known."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        specs: list[tuple[str, str, tuple[int, ...]]],
        metadata: dict[str, str] | None = None,
    ) -> None:
        self.path = Path(path)
        self._order = [s[0] for s in specs]
        self._specs = {s[0]: s for s in specs}
        prefix, self._offsets = encode_header(specs, metadata)
        self._fh = open(self.path, "wb")
        self._fh.write(prefix)
        self._next = 0

    def write(self, name: str, tensor: "torch.Tensor") -> None:
        if self._next >= len(self._order) or self._order[self._next] != name:
            raise RuntimeError(f"tensors must be written in header order; got {name!r}")
        _, dtype, shape = self._specs[name]
        if tuple(tensor.shape) != tuple(shape) or dtype_name(tensor.dtype) != dtype:
            raise RuntimeError(f"tensor {name!r} does not match its declared {dtype} {shape}")
        self._fh.write(tensor_bytes(tensor))
        self._next += 1

    def close(self) -> None:
        if self._next != len(self._order):
            self._fh.close()
            raise RuntimeError(f"{self.path}: only {self._next} of {len(self._order)} tensors written")
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self._fh.close()

    def __enter__(self) -> "SafetensorsWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self._fh.close()


def save_tensors(
    path: str | os.PathLike[str], tensors: dict[str, "torch.Tensor"], metadata: dict[str, str] | None = None
) -> None:
    """Write a small dict of tensors (e.g. LoRA factors), names in sorted order like safetensors does."""
    meta = {"format": "pt", **(metadata or {})}
    names = sorted(tensors)
    specs = [(n, dtype_name(tensors[n].dtype), tuple(tensors[n].shape)) for n in names]
    with SafetensorsWriter(path, specs, meta) as w:
        for n in names:
            w.write(n, tensors[n])


def load_tensors(path: str | os.PathLike[str]) -> dict[str, "torch.Tensor"]:
    """Read every tensor of a (small) validated safetensors file."""
    header = read_header(path)
    return {name: read_tensor(path, info) for name, info in header.tensors.items()}


def read_snapshot(path: str | os.PathLike[str]) -> tuple[str, bytearray]:
    """Read a (small) file once into memory: (sha256 of the bytes, the bytes).

    With parse_snapshot, the digest a caller checks and the tensors it uses come from the same
    bytes, so a file swapped or rewritten between the integrity check and the read cannot slip
    through (as it could if the file were hashed first and opened again afterwards). For patches,
    whose tensors are all loaded anyway.
    """
    import hashlib

    path = Path(path)
    with _reading(path):
        _regular_size(path, os.stat(path))  # before open(): opening a FIFO would block
        fh = open(path, "rb", buffering=0)
    with _reading(path), fh:
        buf = bytearray(_regular_size(path, os.fstat(fh.fileno())))
        view = memoryview(buf)
        got = 0
        while got < len(buf):
            k = fh.readinto(view[got:])
            if not k:
                raise InvalidInputError(f"{path}: file shrank while reading")
            got += k
        if fh.read(1):
            raise InvalidInputError(f"{path}: file grew while reading")
    return hashlib.sha256(buf).hexdigest(), buf


def parse_snapshot(path: str | os.PathLike[str], buf: bytearray) -> tuple[SafetensorsHeader, dict[str, "torch.Tensor"]]:
    """The validated header and every tensor of a safetensors file held in memory (see read_snapshot)."""
    import torch

    path = Path(path)
    size = len(buf)
    n = _header_length(path, bytes(buf[:8]), size)
    header = _parse_header(path, bytes(buf[8:8 + n]), size)
    tensors: dict[str, torch.Tensor] = {}
    for name, info in header.tensors.items():
        dtype = torch_dtype(info.dtype)
        if info.nbytes == 0:
            tensors[name] = torch.empty(info.shape, dtype=dtype)
        elif info.begin % DTYPES[info.dtype][0] == 0:  # a view of the buffer: no second copy
            tensors[name] = torch.frombuffer(buf, dtype=dtype, count=info.numel, offset=info.begin).reshape(info.shape)
        else:  # a misaligned tensor gets its own aligned storage
            tensors[name] = torch.frombuffer(bytearray(buf[info.begin:info.end]), dtype=dtype).reshape(info.shape)
    return header, tensors


class ScannedFile:
    """A safetensors file read once from start to end, then tensor by tensor through the same open file.

    ``scan`` hashes every byte in order (``sha256``: what a manifest records) and, on the way, each
    tensor's bytes on their own. ``read`` later rereads one tensor and refuses it unless it hashes
    to the digest the scan recorded: the bytes used are the bytes that were hashed, even if the file
    is rewritten in place meanwhile (a file replaced under its name changes nothing: the open one is
    read). Memory stays one chunk during the scan and one tensor per ``read``, for patches of any size.
    """

    def __init__(self, path: Path, fh: Any, header: SafetensorsHeader, sha256: str, digests: dict[str, bytes]) -> None:
        self.path = path
        self._fh = fh
        self.header = header
        self.sha256 = sha256
        self._digests = digests

    @classmethod
    def scan(cls, path: str | os.PathLike[str], chunk: int = 8 << 20) -> "ScannedFile":
        import hashlib

        path = Path(path)
        with _reading(path):
            _regular_size(path, os.stat(path))  # before open(): opening a FIFO would block
            fh = open(path, "rb", buffering=0)
        try:
            with _reading(path):
                size = _regular_size(path, os.fstat(fh.fileno()))
                whole = hashlib.sha256()
                prefix = _read_exact(fh, 8)
                whole.update(prefix)
                try:
                    n = _header_length(path, prefix, size)
                    raw = _read_exact(fh, n)
                    whole.update(raw)
                    if len(raw) != n:
                        raise InvalidInputError(f"{path}: corrupt safetensors header (file shrank while reading)")
                    header = _parse_header(path, raw, size)  # offsets checked against the file's size
                except PortllmError as exc:
                    # the whole file's digest still comes with the error, so that a caller holding
                    # a manifest reports a tampered file as such (as it does reading it whole)
                    while block := fh.read(chunk):
                        whole.update(block)
                    exc.sha256 = whole.hexdigest()  # type: ignore[attr-defined]
                    raise
                digests: dict[str, bytes] = {}
                buf = bytearray(chunk)
                view = memoryview(buf)
                for info in sorted(header.tensors.values(), key=lambda t: t.begin):  # contiguous, in order
                    one = hashlib.sha256()
                    left = info.nbytes
                    while left:
                        k = fh.readinto(view[: min(chunk, left)])
                        if not k:
                            raise InvalidInputError(f"{path}: file shrank while reading")
                        whole.update(view[:k])
                        one.update(view[:k])
                        left -= k
                    digests[info.name] = one.digest()
                if fh.read(1):
                    raise InvalidInputError(f"{path}: file grew while reading")
        except BaseException:
            fh.close()
            raise
        return cls(path, fh, header, whole.hexdigest(), digests)

    def read(self, info: TensorInfo) -> "torch.Tensor":
        """One tensor of the scanned file, in its own memory; IntegrityError unless its bytes are
        those the scan hashed."""
        import hashlib

        import torch

        if self._digests.get(info.name) is None or self.header.tensors.get(info.name) != info:
            raise KeyError(info.name)
        dtype = torch_dtype(info.dtype)
        buf = bytearray(info.nbytes)
        with _reading(self.path):
            view = memoryview(buf)
            got = 0
            while got < info.nbytes:
                k = os.preadv(self._fh.fileno(), [view[got:]], info.begin + got)
                if k <= 0:
                    break
                got += k
        if got != info.nbytes or hashlib.sha256(buf).digest() != self._digests[info.name]:
            raise IntegrityError(
                f"{self.path}: tensor {_short(info.name)} changed after its sha256 was checked "
                "(the file was modified while portllm was reading it)"
            )
        if info.nbytes == 0:
            return torch.empty(info.shape, dtype=dtype)
        return torch.frombuffer(buf, dtype=dtype).reshape(info.shape)

    def close(self) -> None:
        self._fh.close()


def _read_exact(fh: Any, n: int) -> bytes:
    """Up to n bytes (fewer only at the end of the file)."""
    data = bytearray()
    while len(data) < n:
        k = fh.read(n - len(data))
        if not k:
            break
        data += k
    return bytes(data)
