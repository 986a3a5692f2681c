"""The one place that reads and writes a portllm patch.

A patch is a directory that PEFT loads unchanged:

    adapter_config.json          PEFT LoraConfig (peft_type LORA)
    adapter_model.safetensors    base_model.model.<module>.lora_A.weight / .lora_B.weight
    portllm.json                 the manifest: where the patch came from and what it fits

The manifest (``format: portllm-patch``, ``format_version: 1``) is specified in the README.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from portllm_cli import __version__
from portllm_cli.errors import (
    IntegrityError,
    InvalidInputError,
    NotFoundError,
    PortllmError,
    UnsafeInputError,
    UnsupportedError,
)
from portllm_cli.io.checkpoint import read_json
from portllm_cli.io.safetensors import ScannedFile, TensorInfo, parse_snapshot, read_snapshot, save_tensors

if TYPE_CHECKING:
    import torch

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
MANIFEST = "portllm.json"
FORMAT_NAME = "portllm-patch"
FORMAT_VERSION = 1
PEFT_PREFIX = "base_model.model."

_KEY_RE = re.compile(
    r"^(?P<module>.+)\.(?P<part>lora_A|lora_B)(?:\.[A-Za-z0-9_]+)?\.weight$"
    r"|^(?P<emodule>.+)\.(?P<epart>lora_embedding_A|lora_embedding_B)(?:\.[A-Za-z0-9_]+)?$"
)


@dataclass
class LoraModule:
    """One adapted module: delta W = scale * B @ A (transposed for embeddings / fan_in_fan_out)."""

    name: str  # module path in the model, e.g. model.layers.0.self_attn.q_proj
    A: "torch.Tensor"  # (r, in)   for embeddings: (r, num_embeddings)
    B: "torch.Tensor"  # (out, r)  for embeddings: (dim, r)
    alpha: float
    use_rslora: bool = False
    kind: str = "linear"  # "linear" or "embedding"
    fan_in_fan_out: bool = False

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])

    @property
    def scale(self) -> float:
        return self.alpha / math.sqrt(self.rank) if self.use_rslora else self.alpha / self.rank

    @property
    def weight_key(self) -> str:
        return f"{self.name}.weight"

    @property
    def weight_shape(self) -> tuple[int, int]:
        """Shape of the model weight this module adds to."""
        out_dim, in_dim = int(self.B.shape[0]), int(self.A.shape[1])
        if self.kind == "embedding" or self.fan_in_fan_out:
            return (in_dim, out_dim)
        return (out_dim, in_dim)

    def delta(self, extra_scale: float = 1.0) -> "torch.Tensor":
        """scale * B @ A in float32, in the layout of the model's weight."""
        import torch

        d = (self.B.to(torch.float32) @ self.A.to(torch.float32)) * (self.scale * extra_scale)
        if self.kind == "embedding" or self.fan_in_fan_out:
            d = d.T.contiguous()
        return d


class FactorRef:
    """A patch tensor not read yet (``read_patch(lazy=True)``): its shape and dtype from the
    header; ``load()`` reads it from the scanned file, refused unless its bytes are those whose
    sha256 was checked. ``to()`` loads too, so the reader's own checks (NaN/Inf) run unchanged,
    one tensor at a time."""

    def __init__(self, source: ScannedFile, info: TensorInfo) -> None:
        self.source = source
        self.info = info

    @property
    def shape(self) -> "torch.Size":
        import torch

        return torch.Size(self.info.shape)

    @property
    def ndim(self) -> int:
        return len(self.info.shape)

    @property
    def dtype(self) -> "torch.dtype":
        from portllm_cli.io.safetensors import torch_dtype

        return torch_dtype(self.info.dtype)

    def is_floating_point(self) -> bool:
        return self.info.dtype in ("F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2")

    def load(self) -> "torch.Tensor":
        return self.source.read(self.info)

    def to(self, *args: Any, **kwargs: Any) -> "torch.Tensor":
        return self.load().to(*args, **kwargs)

    def __repr__(self) -> str:
        return f"FactorRef({self.info.name!r}, {self.info.dtype}, {list(self.info.shape)})"


def materialize(obj: Any) -> Any:
    """``obj`` (a LoraModule, or any dataclass holding patch tensors) with every FactorRef field
    read; ``obj`` itself when it holds none (a patch read whole)."""
    changes = {
        f.name: v.load() for f in dataclasses.fields(obj) if isinstance(v := getattr(obj, f.name), FactorRef)
    }
    return dataclasses.replace(obj, **changes) if changes else obj


@dataclass
class Patch:
    path: Path
    config: dict[str, Any]
    manifest: dict[str, Any]
    modules: dict[str, LoraModule]
    warnings: list[str] = field(default_factory=list)
    source: "ScannedFile | None" = None  # the open weights file of a lazily read patch

    def close(self) -> None:
        """Close the weights file a lazily read patch keeps open (its factors cannot be read after)."""
        if self.source is not None:
            self.source.close()

    @property
    def rank(self) -> int:
        return int(self.config.get("r", 0))

    @property
    def alpha(self) -> float:
        return float(self.config["lora_alpha"])

    @property
    def base_model(self) -> str | None:
        base = self.manifest.get("base") or {}
        return base.get("model") or self.config.get("base_model_name_or_path")

    @property
    def has_manifest(self) -> bool:
        return bool(self.manifest)

    def touches_embeddings(self) -> bool:
        return any(m.kind == "embedding" or "embed" in m.name or "lm_head" in m.name for m in self.modules.values())


# -- hashing --------------------------------------------------------------------------------
def sha256_file(path: Path, chunk: int = 8 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")


# -- PEFT pattern matching (same rule as peft.utils.other.get_pattern_key) --------------------
def _pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return patterns[key]
    return default


def is_patch_dir(path: Path) -> bool:
    return (path / ADAPTER_CONFIG).is_file()


# -- reading --------------------------------------------------------------------------------
# LoraConfig fields (PEFT 0.21) that portllm understands or that do not change the merged weights.
KNOWN_CONFIG_KEYS = frozenset(
    {
        "alpha_pattern", "auto_mapping", "base_model_name_or_path", "bias", "corda_config",
        "ensure_weight_tying", "eva_config", "exclude_modules", "fan_in_fan_out", "inference_mode",
        "init_lora_weights", "layers_pattern", "layers_to_transform", "loftq_config", "lora_alpha",
        "lora_dropout", "lora_ga_config", "megatron_config", "megatron_core", "modules_to_save",
        "peft_type", "peft_version", "qalora_group_size", "r", "rank_pattern", "revision",
        "runtime_config", "target_modules", "task_type", "use_dora", "use_rslora", "lora_bias",
        "velora_config",
        # the variants below are refused when set (see _REFUSED_WHEN_SET)
        "alora_invocation_tokens", "arrow_config", "kasa_config", "layer_replication",
        "monteclora_config", "target_parameters", "trainable_token_indices", "use_bdlora", "use_qalora",
    }
)
# Set to anything but null/false/empty, these make an adapter something other than W + scale*B@A.
_REFUSED_WHEN_SET = {
    "use_dora": "DoRA adapters cannot be merged linearly; portllm supports plain LoRA",
    "lora_bias": "adapters with lora_bias are not supported",
    "use_qalora": "QALoRA adapters act on pooled inputs and cannot be merged as W + scale*B@A",
    "alora_invocation_tokens": "Activated LoRA (aLoRA) adapters apply only after their invocation tokens and cannot be merged",
    "layer_replication": "adapters with layer_replication change the model's layer structure",
    "target_parameters": "adapters on raw parameters (target_parameters) are not supported",
    "trainable_token_indices": "adapters with trainable token embeddings (trainable_token_indices) are not supported",
    "use_bdlora": "block-diagonal LoRA (BD-LoRA) adapters are not supported",
    "arrow_config": "Arrow-routed LoRA adapters are not supported",
    "kasa_config": "KaSA adapters are not supported",
    "monteclora_config": "MonteCLoRA adapters are not supported",
}
# A quantified group that itself holds a quantifier, e.g. (a+)+ : exponential backtracking.
_NESTED_QUANTIFIER = re.compile(r"\([^()]*[+*}][^()]*\)\s*[+*{]")
MAX_PATTERN_LEN = 512


def _check_patterns(cfg: dict[str, Any], where: Path) -> None:
    for key, want in (("rank_pattern", "a positive integer"), ("alpha_pattern", "a finite number")):
        patterns = cfg.get(key)
        if patterns is None:
            continue
        if not isinstance(patterns, dict):
            raise InvalidInputError(f"{where}: {key!r} must be an object")
        for pat, value in patterns.items():
            if len(pat) > MAX_PATTERN_LEN or _NESTED_QUANTIFIER.search(pat):
                raise UnsafeInputError(f"{where}: {key}: refusing module pattern {pat[:60]!r} (too long or nested quantifiers)")
            try:
                re.compile(rf"(.*\.)?({pat})$")
            except (re.error, RecursionError, OverflowError):
                raise InvalidInputError(f"{where}: {key}: {pat!r} is not a valid module pattern") from None
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
            if ok and key == "rank_pattern":
                ok = isinstance(value, int) and value > 0
            elif ok:
                ok = math.isfinite(value)
            if not ok:
                raise InvalidInputError(f"{where}: {key}[{pat!r}] must be {want}, got {value!r}")


def _validate_config(cfg: Any, where: Path, warnings: list[str] | None = None) -> dict[str, Any]:
    if not isinstance(cfg, dict):
        raise InvalidInputError(f"{where}: adapter config must be a JSON object")
    peft_type = cfg.get("peft_type", "LORA")
    if peft_type != "LORA":
        raise UnsupportedError(f"{where}: peft_type {peft_type!r} is not a LoRA adapter; portllm ports LoRA patches")
    if "r" not in cfg:
        raise InvalidInputError(f"{where}: 'r' (the LoRA rank) is missing")
    r = cfg["r"]
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise InvalidInputError(f"{where}: 'r' must be a positive integer, got {r!r}")
    if "lora_alpha" not in cfg:
        raise InvalidInputError(f"{where}: 'lora_alpha' is missing")
    a = cfg["lora_alpha"]
    if isinstance(a, bool) or not isinstance(a, (int, float)) or not math.isfinite(a):
        raise InvalidInputError(f"{where}: 'lora_alpha' must be a finite number, got {a!r}")
    _check_patterns(cfg, where)
    for key in ("use_rslora", "fan_in_fan_out"):
        v = cfg.get(key)
        if v is not None and not isinstance(v, bool):
            raise InvalidInputError(f"{where}: {key!r} must be true or false, got {v!r}")
    for key, why in _REFUSED_WHEN_SET.items():
        if cfg.get(key) not in (None, False, [], {}, ""):
            raise UnsupportedError(f"{where}: {why}")
    if cfg.get("modules_to_save"):
        raise UnsupportedError(
            f"{where}: modules_to_save {cfg['modules_to_save']!r} stores full weights, not a low-rank patch"
        )
    tm = cfg.get("target_modules")
    if tm is not None and not (isinstance(tm, str) or (isinstance(tm, list) and all(isinstance(t, str) for t in tm))):
        raise InvalidInputError(f"{where}: 'target_modules' must be a list of strings or a string")
    unknown = sorted(k for k in cfg if k not in KNOWN_CONFIG_KEYS)
    if unknown and warnings is not None:
        # Newer PEFT versions add fields; PEFT itself ignores unknown ones with a warning, and so
        # does portllm. Fields known to change the merge are refused above.
        warnings.append(f"{where}: ignoring unknown adapter config keys {', '.join(map(repr, unknown[:5]))}")
    return cfg


def parse_modules(
    tensors: dict[str, "torch.Tensor"], cfg: dict[str, Any], where: Path, warnings: list[str] | None = None
) -> dict[str, LoraModule]:
    import torch

    parts: dict[str, dict[str, "torch.Tensor"]] = {}
    kinds: dict[str, str] = {}
    for key, t in tensors.items():
        if key.endswith(".base_layer.weight"):
            # PEFT's save_embedding_layers stores the *old* base's full embedding matrix; carrying
            # it to an evolved model would undo the update, so it is never part of a patch.
            if warnings is not None:
                warnings.append(f"{where}: ignoring {key} (a full copy of the old base's weights, not a LoRA factor)")
            continue
        m = _KEY_RE.match(key)
        if not m:
            raise InvalidInputError(f"{where}: unknown tensor key {key!r} (not a LoRA A/B factor)")
        module = m.group("module") or m.group("emodule")
        part = m.group("part") or m.group("epart")
        kind = "embedding" if part.startswith("lora_embedding") else "linear"
        if module.startswith(PEFT_PREFIX):
            module = module[len(PEFT_PREFIX):]
        slot = "A" if part.endswith("A") else "B"
        if slot in parts.setdefault(module, {}):
            raise InvalidInputError(f"{where}: duplicate lora_{slot} for module {module!r}")
        if kinds.setdefault(module, kind) != kind:
            raise InvalidInputError(f"{where}: module {module!r} mixes embedding and linear factors")
        if t.ndim != 2:
            raise InvalidInputError(f"{where}: {key!r} must be 2-D, got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise InvalidInputError(f"{where}: {key!r} has non-float dtype {t.dtype}")
        parts[module][slot] = t
    if not parts:
        raise InvalidInputError(f"{where}: the adapter holds no LoRA factors")
    rank_pattern = cfg.get("rank_pattern") or {}
    alpha_pattern = cfg.get("alpha_pattern") or {}
    modules: dict[str, LoraModule] = {}
    for module, p in sorted(parts.items()):
        if "A" not in p or "B" not in p:
            missing = "lora_B" if "B" not in p else "lora_A"
            raise InvalidInputError(f"{where}: module {module!r} has no {missing}")
        A, B = p["A"], p["B"]
        if kinds[module] == "embedding":
            r_a, r_b = A.shape[0], B.shape[1]
        else:
            r_a, r_b = A.shape[0], B.shape[1]
        if r_a != r_b:
            raise InvalidInputError(
                f"{where}: module {module!r}: lora_A has rank {r_a} but lora_B has rank {r_b}"
            )
        expected_r = _pattern_value(rank_pattern, module, cfg["r"])
        if r_a != expected_r:
            raise InvalidInputError(
                f"{where}: module {module!r}: factors have rank {r_a} but the config says r={expected_r}"
            )
        for slot, t in (("A", A), ("B", B)):
            bad = ~torch.isfinite(t.to(torch.float32))
            if bool(bad.any()):
                raise IntegrityError(
                    f"{where}: module {module!r}: lora_{slot} holds NaN or Inf ({int(bad.sum())} values)"
                )
        modules[module] = LoraModule(
            name=module,
            A=A,
            B=B,
            alpha=float(_pattern_value(alpha_pattern, module, cfg["lora_alpha"])),
            use_rslora=bool(cfg.get("use_rslora", False)),
            kind=kinds[module],
            fan_in_fan_out=bool(cfg.get("fan_in_fan_out", False)),
        )
    return modules


_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")


def _check_type(doc: dict[str, Any], key: str, types: tuple[type, ...], where: str, what: str) -> None:
    v = doc.get(key)
    if v is None:
        return
    if isinstance(v, bool) and bool not in types:
        raise InvalidInputError(f"{where}: {key!r} must be {what}, got {v!r}")
    if not isinstance(v, types):
        shown = repr(v) if len(repr(v)) <= 60 else type(v).__name__
        raise InvalidInputError(f"{where}: {key!r} must be {what}, got {shown}")


def read_manifest(path: Path) -> dict[str, Any]:
    """Read and type-check ``portllm.json``; {} when the directory has none (a plain PEFT adapter)."""
    mpath = path / MANIFEST
    if not (mpath.exists() or mpath.is_symlink()):
        return {}
    doc = read_json(mpath, "patch manifest")
    if not isinstance(doc, dict):
        raise InvalidInputError(f"{mpath}: manifest must be a JSON object")
    if doc.get("format") != FORMAT_NAME:
        raise InvalidInputError(f"{mpath}: not a portllm manifest (format={str(doc.get('format'))[:40]!r})")
    version = doc.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise InvalidInputError(f"{mpath}: 'format_version' must be a positive integer")
    if version > FORMAT_VERSION:
        raise UnsupportedError(
            f"{mpath}: patch format version {version} is newer than this portllm understands ({FORMAT_VERSION})",
            hint="upgrade portllm: pip install -U portllm-cli",
        )
    tensors = doc.get("tensors")
    if not isinstance(tensors, dict) or not isinstance(tensors.get("sha256"), str):
        raise InvalidInputError(f"{mpath}: manifest lacks tensors.sha256")
    if not _SHA256_RE.match(tensors["sha256"]):
        raise InvalidInputError(f"{mpath}: tensors.sha256 is not a lowercase hex sha256 digest")
    if tensors.get("file", ADAPTER_WEIGHTS) != ADAPTER_WEIGHTS:
        # The manifest never chooses which file is read: a name like ../../x is refused here.
        raise UnsafeInputError(f"{mpath}: tensors.file must be {ADAPTER_WEIGHTS!r}, got {str(tensors.get('file'))[:60]!r}")
    for key in ("base", "lora", "source", "target"):
        if key in doc and doc[key] is not None and not isinstance(doc[key], dict):
            raise InvalidInputError(f"{mpath}: {key!r} must be an object")
    for key in ("portllm_version", "created"):
        _check_type(doc, key, (str,), str(mpath), "a string")
    if "ports" in doc and not isinstance(doc["ports"], list):
        raise InvalidInputError(f"{mpath}: 'ports' must be a list")
    for key in ("base", "target"):
        rec = doc.get(key)
        if not isinstance(rec, dict):
            continue
        where = f"{mpath}: {key}"
        for k in ("model", "revision", "content_hash"):
            _check_type(rec, k, (str,), where, "a string")
        fp = rec.get("fingerprint")
        if fp is None:
            continue
        if not isinstance(fp, dict):
            raise InvalidInputError(f"{where}: 'fingerprint' must be an object")
        _check_type(fp, "model_type", (str,), f"{where}.fingerprint", "a string")
        for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                  "intermediate_size", "vocab_size", "head_dim"):
            _check_type(fp, k, (int,), f"{where}.fingerprint", "an integer")
        mods = fp.get("modules")
        if mods is not None and (
            not isinstance(mods, dict)
            or not all(
                isinstance(v, list) and all(isinstance(d, int) and not isinstance(d, bool) for d in v)
                for v in mods.values()
            )
        ):
            raise InvalidInputError(f"{where}.fingerprint: 'modules' must map module names to integer shapes")
    lora = doc.get("lora")
    if isinstance(lora, dict):
        for k in ("rank", "r"):
            _check_type(lora, k, (int,), f"{mpath}: lora", "an integer")
        for k in ("alpha", "lora_alpha"):
            _check_type(lora, k, (int, float), f"{mpath}: lora", "a number")
        _check_type(lora, "use_rslora", (bool,), f"{mpath}: lora", "true or false")
    return doc


def read_patch(path: str | os.PathLike[str], *, verify: bool = True, lazy: bool = False) -> Patch:
    """Read and validate a patch directory (or a plain PEFT adapter directory).

    With ``verify`` (the default) the weights must match the manifest's sha256. Always: the
    config and manifest are type-checked, the safetensors header is validated, every key must be
    a LoRA factor, every module needs both factors of matching rank, and a factor holding NaN or
    Inf is an IntegrityError naming the module.

    With ``lazy`` the factors stay on disk: the file is scanned once (sha256 checked, each tensor's
    own digest recorded), every check above runs reading one factor at a time, and the modules hold
    FactorRef stand-ins that ``materialize`` reads when they are needed, refusing any byte that is
    not what was hashed. Memory then stays one factor, whatever the size of the patch; the patch
    keeps its file open until ``Patch.close``.
    """
    path = Path(path)
    try:
        return _read_patch(path, verify=verify, lazy=lazy)
    except OSError as exc:  # unreadable files or directories: one line, never a traceback
        where = exc.filename or path
        raise InvalidInputError(f"{where}: cannot read the patch ({exc.strerror or exc.__class__.__name__})") from None


def _read_patch(path: Path, *, verify: bool, lazy: bool = False) -> Patch:
    if not path.exists():
        raise NotFoundError(f"{path}: no such patch directory")
    if not path.is_dir():
        raise InvalidInputError(f"{path}: expected a patch directory, found a file")
    cfg_path = path / ADAPTER_CONFIG
    if not cfg_path.exists():
        raise NotFoundError(f"{path}: not a patch (no {ADAPTER_CONFIG})")
    weights = path / ADAPTER_WEIGHTS
    if not weights.exists():
        if (path / "adapter_model.bin").exists():
            raise UnsupportedError(
                f"{path}: adapter weights are a pickle file (adapter_model.bin)",
                hint="re-save the adapter with safe_serialization=True",
            )
        raise NotFoundError(f"{path}: no {ADAPTER_WEIGHTS}")
    if not weights.is_file():
        raise InvalidInputError(f"{weights}: expected a file")
    warnings: list[str] = []
    cfg = _validate_config(read_json(cfg_path, "adapter config"), cfg_path, warnings)
    manifest = read_manifest(path)
    # one read: the digest checked below is that of the very bytes the tensors are parsed from
    # (lazily: of the bytes each tensor must hash to again when it is read)
    def check(digest: str) -> None:
        if manifest and verify and digest != manifest["tensors"]["sha256"]:
            raise IntegrityError(
                f"{weights}: sha256 {digest[:12]}… does not match the manifest's {manifest['tensors']['sha256'][:12]}…",
                hint="the patch was modified or corrupted; pass --no-verify only if you know why",
            )

    source = None
    if lazy:
        try:
            source = ScannedFile.scan(weights)
        except PortllmError as exc:  # a bad header: a tampered file is still reported as one
            if getattr(exc, "sha256", None):
                check(exc.sha256)  # type: ignore[attr-defined]
            raise
    try:
        if source is not None:
            digest = source.sha256
        else:
            digest, data = read_snapshot(weights)
        check(digest)
        if not manifest:
            warnings.append(f"{path}: no {MANIFEST}; a plain PEFT adapter (not integrity-checked)")
        if source is not None:
            tensors = {name: FactorRef(source, info) for name, info in source.header.tensors.items()}
        else:
            _, tensors = parse_snapshot(weights, data)  # validates the layout before any tensor is used
        modules = parse_modules(tensors, cfg, weights, warnings)
    except BaseException:
        if source is not None:
            source.close()
        raise
    return Patch(path, cfg, manifest, modules, warnings, source=source)


# -- writing --------------------------------------------------------------------------------
def peft_key(module: str, slot: str, kind: str = "linear") -> str:
    if kind == "embedding":
        return f"{PEFT_PREFIX}{module}.lora_embedding_{slot}"
    return f"{PEFT_PREFIX}{module}.lora_{slot}.weight"


def adapter_config(
    *,
    base_model: str,
    rank: int,
    alpha: float,
    target_modules: list[str],
    dropout: float = 0.0,
    use_rslora: bool = False,
    rank_pattern: dict[str, int] | None = None,
    alpha_pattern: dict[str, float] | None = None,
    fan_in_fan_out: bool = False,
) -> dict[str, Any]:
    """A LoraConfig dict that PEFT's PeftModel.from_pretrained accepts."""
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": rank,
        "lora_alpha": alpha,
        "lora_dropout": dropout,
        "target_modules": sorted(target_modules),
        "bias": "none",
        "fan_in_fan_out": fan_in_fan_out,
        "use_rslora": use_rslora,
        "use_dora": False,
        "rank_pattern": rank_pattern or {},
        "alpha_pattern": alpha_pattern or {},
        "modules_to_save": None,
        "init_lora_weights": True,
        "inference_mode": True,
    }


def build_manifest(
    *,
    base: dict[str, Any],
    lora: dict[str, Any],
    source: dict[str, Any],
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    doc = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "portllm_version": __version__,
        "created": now_iso(),
        "base": base,
        "lora": lora,
        "source": source,
        "tensors": {"file": ADAPTER_WEIGHTS, "sha256": ""},
    }
    for k, v in (extra or {}).items():
        doc[k] = v
    return doc


def write_patch_files(
    out_dir: Path,
    tensors: dict[str, "torch.Tensor"],
    config: dict[str, Any],
    manifest: dict[str, Any],
) -> dict[str, Any]:
    """Write the three files into an (already temporary) directory; returns the final manifest."""
    out_dir.mkdir(parents=True, exist_ok=True)
    save_tensors(out_dir / ADAPTER_WEIGHTS, tensors)
    manifest = dict(manifest)
    manifest["tensors"] = {"file": ADAPTER_WEIGHTS, "sha256": sha256_file(out_dir / ADAPTER_WEIGHTS)}
    (out_dir / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    (out_dir / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def patch_tensors(modules: dict[str, LoraModule], b_scale: float = 1.0) -> dict[str, "torch.Tensor"]:
    """PEFT-named tensors for a set of modules (B optionally rescaled, e.g. for --scale)."""
    out = {}
    for m in modules.values():
        out[peft_key(m.name, "A", m.kind)] = m.A.contiguous()
        B = m.B if b_scale == 1.0 else (m.B.to(_f32()) * b_scale).to(m.B.dtype)
        out[peft_key(m.name, "B", m.kind)] = B.contiguous()
    return out


def _f32():
    import torch

    return torch.float32


def short_module_kind(module: str) -> str:
    """q_proj / v_proj / mlp / embeddings ... : the last name component."""
    return module.rsplit(".", 1)[-1]
