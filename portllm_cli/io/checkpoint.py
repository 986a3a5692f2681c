"""A model checkpoint on disk, read one tensor at a time.

A checkpoint is a directory with ``config.json`` and either ``model.safetensors`` or sharded
``model-0000X-of-0000N.safetensors`` files with ``model.safetensors.index.json``. Pickle-based
weights (``pytorch_model*.bin``, ``*.pt``) are refused unless ``allow_pickle`` is set, and even
then are loaded with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from portllm_cli.errors import (
    IntegrityError,
    InvalidInputError,
    NotFoundError,
    UnsafeInputError,
)
from portllm_cli.io import strict_json
from portllm_cli.io.safetensors import DTYPES, SafetensorsHeader, TensorInfo, read_header, read_tensor

if TYPE_CHECKING:
    import torch

SAFE_INDEX = "model.safetensors.index.json"
SAFE_SINGLE = "model.safetensors"
PICKLE_INDEX = "pytorch_model.bin.index.json"
PICKLE_SINGLE = "pytorch_model.bin"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth")
MAX_JSON_BYTES = 256 << 20  # configs, indexes and manifests are kilobytes; this bounds a hostile one
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf")


def read_json(path: Path, what: str = "JSON file") -> Any:
    """Read a JSON file strictly: duplicate keys and every read or parse failure are InvalidInputError."""
    try:
        st = os.stat(path)
        if stat.S_ISDIR(st.st_mode):
            raise IsADirectoryError(path)
        if not stat.S_ISREG(st.st_mode):  # a FIFO or /dev/zero would block or never end
            raise InvalidInputError(f"{path}: the {what} is not a regular file")
        if st.st_size > MAX_JSON_BYTES:
            raise InvalidInputError(f"{path}: the {what} is {st.st_size} bytes, more than the {MAX_JSON_BYTES} portllm reads")
        raw = Path(path).read_bytes()
    except FileNotFoundError:
        raise NotFoundError(f"{path}: no such {what}") from None
    except IsADirectoryError:
        raise InvalidInputError(f"{path}: is a directory, expected a {what}") from None
    except OSError as exc:
        raise InvalidInputError(f"{path}: cannot read the {what} ({exc.strerror or exc.__class__.__name__})") from None
    return strict_json.loads(raw, where=path, what=what)


def safe_member(root: Path, name: str, what: str) -> Path:
    """Resolve a file name taken from an untrusted index or manifest, refusing path traversal.

    Only a plain file name is accepted: no directory separators, no ``.``/``..``, no NUL, no
    drive prefix; so the result always lies directly inside ``root``.
    """
    if not isinstance(name, str):
        raise InvalidInputError(f"{what}: file name must be a string, got {type(name).__name__}")
    if (
        not name
        or "/" in name
        or "\\" in name
        or name in (".", "..")
        or "\x00" in name
        or (len(name) >= 2 and name[1] == ":")
        or Path(name).is_absolute()
    ):
        raise UnsafeInputError(f"{what}: refusing file name {name!r} (must be a plain file name inside {root})")
    return root / name


@dataclass
class Checkpoint:
    root: Path
    config: dict[str, Any]
    # tensor name -> (file path, info); info is None for pickle shards (loaded on demand)
    locations: dict[str, tuple[Path, TensorInfo | None]]
    files: list[Path]
    index_file: Path | None
    is_pickle: bool = False
    headers: dict[Path, SafetensorsHeader] = field(default_factory=dict)
    _pickle_cache: dict[Path, dict[str, Any]] = field(default_factory=dict, repr=False)

    # -- opening ---------------------------------------------------------------------------
    @classmethod
    def open(cls, path: str | os.PathLike[str], *, allow_pickle: bool = False, need_config: bool = True) -> "Checkpoint":
        root = Path(path)
        try:
            return cls._open(root, allow_pickle=allow_pickle, need_config=need_config)
        except OSError as exc:  # e.g. an unreadable directory: still one line, never a traceback
            where = exc.filename or root
            raise InvalidInputError(f"{where}: cannot read the model ({exc.strerror or exc.__class__.__name__})") from None

    @classmethod
    def _open(cls, root: Path, *, allow_pickle: bool, need_config: bool) -> "Checkpoint":
        if not root.exists():
            raise NotFoundError(f"{root}: no such model directory")
        if not root.is_dir():
            raise InvalidInputError(f"{root}: expected a model directory, found a file")
        config_path = root / "config.json"
        if config_path.exists():
            config = validate_config(read_json(config_path, "model config"), config_path)
        elif need_config:
            raise NotFoundError(
                f"{root}: no config.json (not a Hugging Face model directory)",
                hint="pass the directory written by save_pretrained",
            )
        else:
            config = {}

        if (root / SAFE_INDEX).exists() or (root / SAFE_SINGLE).exists():
            return cls._open_safetensors(root, config)
        singles = sorted(root.glob("*.safetensors"))
        if singles:
            return cls._open_safetensors(root, config, files=singles)
        pickles = [p for p in (root / PICKLE_INDEX, root / PICKLE_SINGLE) if p.exists()] or sorted(
            p for p in root.iterdir() if p.suffix in PICKLE_SUFFIXES
        )
        if pickles:
            if not allow_pickle:
                raise UnsafeInputError(
                    f"{root}: weights are pickle files ({pickles[0].name}); portllm does not unpickle by default",
                    hint="convert them to safetensors, or pass --allow-pickle if you trust their source",
                )
            return cls._open_pickle(root, config)
        if any(p.suffix == ".gguf" for p in root.iterdir()):
            raise InvalidInputError(
                f"{root}: holds GGUF weights; portllm reads safetensors",
                hint="load it with transformers (gguf_file=...) and save_pretrained it once",
            )
        raise NotFoundError(f"{root}: no weight files (*.safetensors) found")

    @classmethod
    def _open_safetensors(cls, root: Path, config: dict[str, Any], files: list[Path] | None = None) -> "Checkpoint":
        index_file = root / SAFE_INDEX if (root / SAFE_INDEX).exists() else None
        expected: dict[str, str] | None = None
        if index_file is not None:
            index = read_json(index_file, "safetensors index")
            wm = index.get("weight_map") if isinstance(index, dict) else None
            if not isinstance(wm, dict) or not wm:
                raise InvalidInputError(f"{index_file}: missing or empty 'weight_map'")
            expected = {}
            for name, fname in wm.items():
                safe_member(root, fname, f"{index_file}: weight_map[{name!r}]")
                expected[name] = fname
            files = [root / f for f in dict.fromkeys(expected.values())]
        elif files is None:
            files = [root / SAFE_SINGLE]
        locations: dict[str, tuple[Path, TensorInfo | None]] = {}
        headers: dict[Path, SafetensorsHeader] = {}
        for f in files:
            if not f.exists():
                raise NotFoundError(f"{f}: shard listed in the index is missing")
            h = read_header(f)
            headers[f] = h
            for name, info in h.tensors.items():
                if name in locations:
                    raise InvalidInputError(f"{root}: tensor {name!r} appears in two shards")
                locations[name] = (f, info)
        if expected is not None:
            for name, fname in expected.items():
                got = locations.get(name)
                if got is None or got[0].name != fname:
                    raise IntegrityError(f"{index_file}: {name!r} is listed in {fname} but not stored there")
        return cls(root, config, locations, files, index_file, headers=headers)

    @classmethod
    def _open_pickle(cls, root: Path, config: dict[str, Any]) -> "Checkpoint":
        index_file = root / PICKLE_INDEX if (root / PICKLE_INDEX).exists() else None
        if index_file is not None:
            index = read_json(index_file, "weights index")
            wm = index.get("weight_map") if isinstance(index, dict) else None
            if not isinstance(wm, dict) or not wm:
                raise InvalidInputError(f"{index_file}: missing or empty 'weight_map'")
            files = [safe_member(root, f, f"{index_file}: weight_map") for f in dict.fromkeys(wm.values())]
            for f in files:
                if not f.is_file():
                    raise NotFoundError(f"{f}: shard listed in the index is missing")
        else:
            single = root / PICKLE_SINGLE
            files = [single] if single.exists() else sorted(p for p in root.iterdir() if p.suffix in PICKLE_SUFFIXES)
        ckpt = cls(root, config, {}, files, index_file, is_pickle=True)
        for f in files:
            for name in ckpt._load_pickle(f):
                ckpt.locations[name] = (f, None)
        return ckpt

    def _load_pickle(self, f: Path) -> dict[str, Any]:
        if f not in self._pickle_cache:
            sd = load_pickle_state_dict(f)
            self._pickle_cache.clear()  # keep one shard mapped at a time
            self._pickle_cache[f] = sd
        return self._pickle_cache[f]

    # -- access ----------------------------------------------------------------------------
    def __contains__(self, name: str) -> bool:
        return name in self.locations

    def names(self) -> list[str]:
        return list(self.locations)

    def shape(self, name: str) -> tuple[int, ...]:
        f, info = self.locations[name]
        if info is not None:
            return info.shape
        return tuple(self._load_pickle(f)[name].shape)

    def dtype(self, name: str) -> str:
        f, info = self.locations[name]
        if info is not None:
            return info.dtype
        from portllm_cli.io.safetensors import dtype_name

        return dtype_name(self._load_pickle(f)[name].dtype)

    def tensor(self, name: str) -> "torch.Tensor":
        try:
            f, info = self.locations[name]
        except KeyError:
            raise NotFoundError(f"{self.root}: no tensor {name!r}") from None
        if info is not None:
            return read_tensor(f, info)
        return self._load_pickle(f)[name].clone()

    def rows(self, name: str, r0: int, r1: int) -> "torch.Tensor":
        """Rows [r0, r1) (along dimension 0) of a stored tensor, reading only those bytes."""
        f, info = self.locations[name]
        if info is None:
            return self._load_pickle(f)[name][r0:r1].clone()
        if not info.shape:
            return read_tensor(f, info)
        per_row = info.numel // info.shape[0] if info.shape[0] else 0
        row_bytes = per_row * DTYPES[info.dtype][0]
        begin = info.begin + r0 * row_bytes
        part = TensorInfo(info.name, info.dtype, (r1 - r0, *info.shape[1:]), begin, begin + (r1 - r0) * row_bytes)
        return read_tensor(f, part)

    def iter_file_order(self) -> Iterator[tuple[Path, list[str]]]:
        """Files in order, each with its tensor names in on-disk order."""
        for f in self.files:
            if f in self.headers:
                yield f, list(self.headers[f].tensors)
            else:
                yield f, [n for n, (g, _) in self.locations.items() if g == f]

    def total_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.files)

    def largest_tensor_bytes(self) -> int:
        return max((i.nbytes for _, i in self.locations.values() if i is not None), default=0)

    def weight_files(self) -> set[Path]:
        out = set(self.files)
        if self.index_file is not None:
            out.add(self.index_file)
        return out

    def side_files(self) -> list[Path]:
        """Config, tokenizer, generation and other non-weight files to carry to an output."""
        skip = {p.name for p in self.weight_files()}
        out = []
        for p in sorted(self.root.iterdir()):
            if p.name in skip or p.name.startswith(".") or not p.is_file():
                continue
            if p.suffix in WEIGHT_SUFFIXES or p.name in (SAFE_INDEX, PICKLE_INDEX):
                continue
            out.append(p)
        return out


def load_pickle_state_dict(f: Path) -> dict[str, Any]:
    """Load a pickle state dict with ``torch.load(weights_only=True)``: tensors only, never code.

    The restricted unpickler refuses every global that is not a tensor type, so a pickle whose
    ``__reduce__`` calls ``os.system`` is refused (UnsafeInputError) before anything runs.
    """
    import pickle

    import torch

    def _load(mmap: bool) -> Any:
        return torch.load(f, map_location="cpu", weights_only=True, mmap=mmap)

    if f.exists() and not f.is_file():
        raise InvalidInputError(f"{f}: not a regular file")
    try:
        try:
            sd = _load(True)
        except RuntimeError as exc:
            if "mmap" not in str(exc):
                raise
            sd = _load(False)  # the legacy (non-zip) format cannot be mapped; weights_only still holds
    except pickle.UnpicklingError as exc:
        first = " ".join(str(exc).split())[:160]
        raise UnsafeInputError(
            f"{f}: refused by torch.load(weights_only=True): holds more than tensors ({first})",
            hint="convert the checkpoint to safetensors in an environment you trust",
        ) from None
    except FileNotFoundError:
        raise NotFoundError(f"{f}: no such file") from None
    except Exception as exc:  # truncated zip, garbage bytes: report, never execute
        raise InvalidInputError(f"{f}: not a readable torch checkpoint ({exc.__class__.__name__})") from None
    if not isinstance(sd, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in sd.items()):
        raise InvalidInputError(f"{f}: not a state dict of named tensors")
    return sd


# The architecture fields of a config, in one place: config.json type checks, the manifest's
# fingerprint (and its type checks in patch.format), and what diff calls a different architecture.
ARCH_INT_FIELDS = (
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "intermediate_size",
    "vocab_size",
    "head_dim",
)
FINGERPRINT_FIELDS = ARCH_INT_FIELDS + ("tie_word_embeddings",)
# Fields whose difference makes two models different architectures (a grown vocabulary or an
# untied head is a change within one architecture, reported but not fatal).
STRUCTURAL_FIELDS = ("model_type", "architectures") + tuple(f for f in ARCH_INT_FIELDS if f != "vocab_size")


def validate_config(config: Any, where: Path) -> dict[str, Any]:
    """Check the types of the config fields portllm relies on (missing fields are fine)."""
    if not isinstance(config, dict):
        raise InvalidInputError(f"{where}: model config must be a JSON object")
    for cfg, prefix in ((config, ""), (config.get("text_config"), "text_config.")):
        if cfg is None:
            continue
        if not isinstance(cfg, dict):
            raise InvalidInputError(f"{where}: 'text_config' must be an object")
        mt = cfg.get("model_type")
        if mt is not None and not isinstance(mt, str):
            raise InvalidInputError(f"{where}: '{prefix}model_type' must be a string, got {mt!r}")
        for k in ARCH_INT_FIELDS:
            v = cfg.get(k)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
                raise InvalidInputError(f"{where}: '{prefix}{k}' must be a non-negative integer, got {v!r}")
        tie = cfg.get("tie_word_embeddings")
        if tie is not None and not isinstance(tie, bool):
            raise InvalidInputError(f"{where}: '{prefix}tie_word_embeddings' must be true or false, got {tie!r}")
    arch = config.get("architectures")
    if arch is not None and (not isinstance(arch, list) or not all(isinstance(a, str) for a in arch)):
        raise InvalidInputError(f"{where}: 'architectures' must be a list of strings")
    return config


def text_config(config: dict[str, Any]) -> dict[str, Any]:
    """The language-model part of a config (multimodal configs nest it under text_config)."""
    tc = config.get("text_config")
    if isinstance(tc, dict):
        merged = dict(tc)
        merged.setdefault("model_type", config.get("model_type"))
        return merged
    return config


def architecture_fingerprint(config: dict[str, Any], module_shapes: dict[str, list[int]] | None = None) -> dict[str, Any]:
    tc = text_config(config)
    fp: dict[str, Any] = {
        "model_type": config.get("model_type"),
        "architectures": config.get("architectures"),
    }
    for k in FINGERPRINT_FIELDS:
        if k in tc:
            fp[k] = tc[k]
    if module_shapes is not None:
        fp["modules"] = {k: list(v) for k, v in sorted(module_shapes.items())}
    return fp
