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
from portllm_cli.io.checkpoint import ARCH_INT_FIELDS, read_json
from portllm_cli.io.hashing import sha256_file
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
# Other tensors a PEFT 0.21 LoRA adapter holds (keys without the adapter name, as PEFT saves them).
_BIAS_RE = re.compile(r"^(?P<module>.+)\.lora_B(?:\.[A-Za-z0-9_]+)?\.bias$")  # lora_bias=True
_MAGNITUDE_RE = re.compile(r"^(?P<module>.+)\.lora_magnitude_vector(?:\.[A-Za-z0-9_]+)?(?:\.weight)?$")  # DoRA
_TOKENS_RE = re.compile(r"^(?P<module>.+)\.token_adapter\.trainable_tokens_delta(?:\.[A-Za-z0-9_]+)?$")
_BASE_LAYER = ".base_layer"

# init_lora_weights values (PEFT 0.21) whose saved factors mean W + scale*B@A on the unchanged
# base: PEFT re-runs their initialisation on load, then overwrites it with the saved factors.
PLAIN_INITS = ("gaussian", "eva", "orthogonal", "mica")
# Values with which PEFT subtracted an initial s*B0@A0 from the base before training, and does it
# again on every load: the saved factors mean W - s*B0@A0 + s*B@A. portllm converts them against
# the old base, as PEFT's own conversion does: rank 2r, A' = [A; A0], B' = [B, -B0].
CONVERTIBLE_INITS = ("pissa", "olora")
_REFUSED_INITS = {
    "pissa_niter": "PiSSA with a randomized SVD (init_lora_weights {v!r}): the initial factors PEFT subtracted "
                   "from the base at training time cannot be recomputed exactly",
    "corda": "CorDA (init_lora_weights 'corda'): the initial factors PEFT subtracted from the base came from "
             "activation statistics the adapter does not record",
    "loftq": "LoftQ (init_lora_weights 'loftq'): PEFT replaces the base weights with a quantized residual when it "
             "loads the adapter",
    "lora_ga": "LoRA-GA (init_lora_weights 'lora_ga'): the initial factors subtracted from the base at training "
               "time came from gradients the adapter does not record",
}
CONVERT_HINT = (
    "convert it where it was trained: PeftModel.save_pretrained(OUT, "
    "path_initial_model_for_weight_conversion=INITIAL_ADAPTER_DIR), then use OUT"
)
BIAS_MODES = ("none", "all", "lora_only")


def init_kind(cfg: dict[str, Any]) -> str:
    """'plain', 'pissa' or 'olora' for a config that passed validation."""
    init = cfg.get("init_lora_weights", True)
    if isinstance(init, bool) or init in PLAIN_INITS:
        return "plain"
    return str(init).lower()


@dataclass
class LoraModule:
    """One adapted module: delta W = scale * B @ A (transposed for embeddings / fan_in_fan_out).

    ``name`` is the module path as the adapter stores it (PEFT's prefix removed). A LoRA on a raw
    parameter (``target_parameters``) is wrapped by PEFT in ``ParamWrapper`` layers, nested one
    ``.base_layer`` deeper per extra parameter of the same module: ``depth`` counts them and
    ``module`` is the path without them. Which parameter it adapts, and how many experts the
    factors stack, is only known against a model (``core.layout``).
    """

    name: str  # module path in the model, e.g. model.layers.0.self_attn.q_proj
    A: "torch.Tensor"  # (r, in)   for embeddings: (r, num_embeddings); experts: (E*r, in)
    B: "torch.Tensor"  # (out, r)  for embeddings: (dim, r);           experts: (out, E*r)
    alpha: float
    use_rslora: bool = False
    kind: str = "linear"  # "linear" or "embedding"
    fan_in_fan_out: bool = False
    magnitude: "torch.Tensor | None" = None  # DoRA: lora_magnitude_vector, one per output feature
    bias: "torch.Tensor | None" = None  # lora_bias: lora_B.bias, added as scale * bias
    depth: int = 0  # ParamWrapper nesting (target_parameters)
    r: int | None = None  # the rank from the config (differs from A's rows when experts are stacked)

    @property
    def rank(self) -> int:
        return int(self.r if self.r is not None else self.A.shape[0])

    @property
    def scale(self) -> float:
        return self.alpha / math.sqrt(self.rank) if self.use_rslora else self.alpha / self.rank

    @property
    def module(self) -> str:
        """The adapted module's path, without ParamWrapper nesting."""
        name = self.name
        for _ in range(self.depth):
            name = name[: -len(_BASE_LAYER)]
        return name

    @property
    def weight_key(self) -> str:
        return f"{self.name}.weight"

    @property
    def weight_shape(self) -> tuple[int, int]:
        """Shape of the model weight this module adds to (a plain module; see core.layout for experts)."""
        out_dim, in_dim = int(self.B.shape[0]), int(self.A.shape[1])
        if self.kind == "embedding" or self.fan_in_fan_out:
            return (in_dim, out_dim)
        return (out_dim, in_dim)

    @property
    def is_dora(self) -> bool:
        return self.magnitude is not None

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
class FullTensor:
    """A whole tensor the adapter stores (``modules_to_save``, ``bias="all"|"lora_only"``): the
    value it had after training on the *old* base, for ``name`` (a parameter path in the model)."""

    name: str  # e.g. lm_head.weight, model.layers.0.self_attn.q_proj.bias
    tensor: "torch.Tensor"
    origin: str  # "modules_to_save" or "bias"
    key: str  # the adapter's key


@dataclass
class TokenRows:
    """``trainable_token_indices``: rows of an embedding as trained on the old base (PEFT writes
    them over the model's rows with index_copy)."""

    module: str  # e.g. model.embed_tokens
    indices: list[int]
    values: "torch.Tensor"  # (len(indices), dim)
    key: str


@dataclass
class Patch:
    path: Path
    config: dict[str, Any]
    manifest: dict[str, Any]
    modules: dict[str, LoraModule]
    warnings: list[str] = field(default_factory=list)
    full: dict[str, FullTensor] = field(default_factory=dict)  # parameter path -> saved tensor
    tokens: dict[str, TokenRows] = field(default_factory=dict)  # module path -> saved rows
    outline: bool = False  # names and shapes only (read_outline): no factor values
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

    @property
    def init(self) -> str:
        """'plain', or the init PEFT re-runs on the base when it loads the adapter ('pissa', 'olora')."""
        return init_kind(self.config)

    @property
    def is_dora(self) -> bool:
        return any(m.is_dora for m in self.modules.values())

    @property
    def uses_parameters(self) -> bool:
        return bool(self.config.get("target_parameters"))

    def tensor_keys(self) -> list[str]:
        """Every adapter tensor that carries part of the patch (what the effect check counts)."""
        keys: list[str] = []
        for m in self.modules.values():
            keys += [peft_key(m.name, "A", m.kind), peft_key(m.name, "B", m.kind)]
            if m.magnitude is not None:
                keys.append(f"{PEFT_PREFIX}{m.name}.lora_magnitude_vector")
            if m.bias is not None:
                keys.append(f"{PEFT_PREFIX}{m.name}.lora_B.bias")
        keys += [f.key for f in self.full.values()] + [t.key for t in self.tokens.values()]
        return keys

    def is_plain(self) -> bool:
        """Nothing but W + scale*B@A on modules (the paper's LoRA, and the fast path)."""
        return (
            self.init == "plain"
            and not self.full
            and not self.tokens
            and not self.uses_parameters
            and all(m.magnitude is None and m.bias is None and m.depth == 0 for m in self.modules.values())
        )

    def weights_sha256(self) -> str:
        """The sha256 of the patch's weights file: the manifest's (checked when it was read), the
        digest of the bytes a lazy read scanned, else the file hashed now."""
        tensors = (self.manifest or {}).get("tensors") or {}
        if tensors.get("sha256"):
            return tensors["sha256"]
        if self.source is not None:
            return self.source.sha256
        return sha256_file(self.path / ADAPTER_WEIGHTS)

    def touches_embeddings(self) -> bool:
        names = [m.name for m in self.modules.values()] + list(self.full) + list(self.tokens)
        return bool(self.tokens) or any(m.kind == "embedding" for m in self.modules.values()) or any(
            "embed" in n or "lm_head" in n or "wte" in n for n in names
        )


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")


# -- PEFT pattern matching (same rule as peft.utils.other.get_pattern_key) --------------------
def _pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return patterns[key]
    return default


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
        "velora_config", "target_parameters", "trainable_token_indices",
        # the variants below are refused when set (see _REFUSED_WHEN_SET)
        "alora_invocation_tokens", "arrow_config", "kasa_config", "layer_replication",
        "monteclora_config", "use_bdlora", "use_qalora",
    }
)
# Set to anything but null/false/empty, these make an adapter something other than what portllm ports.
_REFUSED_WHEN_SET = {
    "use_qalora": "QALoRA adapters act on pooled inputs and cannot be merged as W + scale*B@A",
    "alora_invocation_tokens": "Activated LoRA (aLoRA) adapters apply only after their invocation tokens and cannot be merged",
    "layer_replication": "adapters with layer_replication change the model's layer structure",
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


def _is_str_list(v: Any) -> bool:
    return isinstance(v, list) and all(isinstance(t, str) for t in v)


def _is_index_list(v: Any) -> bool:
    return isinstance(v, list) and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in v)


def _check_init(cfg: dict[str, Any], where: Path) -> None:
    init = cfg.get("init_lora_weights", True)
    if isinstance(init, bool) or init in PLAIN_INITS or init in CONVERTIBLE_INITS:
        pass
    elif isinstance(init, str):
        key = "pissa_niter" if init.startswith("pissa_niter_") else init
        why = _REFUSED_INITS.get(key)
        if why is None:
            raise UnsupportedError(
                f"{where}: init_lora_weights {init[:40]!r} is not a value PEFT 0.21 knows; portllm cannot tell "
                "what the saved factors mean"
            )
        raise UnsupportedError(f"{where}: {why.format(v=init)}", hint=CONVERT_HINT)
    else:
        raise InvalidInputError(f"{where}: 'init_lora_weights' must be true, false or a string, got {init!r}")
    if init in CONVERTIBLE_INITS and cfg.get("use_dora"):
        raise UnsupportedError(
            f"{where}: DoRA on top of a {init!r} initialisation: the magnitudes were measured on the changed base",
            hint=CONVERT_HINT,
        )


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
    for key in ("use_rslora", "fan_in_fan_out", "use_dora", "lora_bias"):
        v = cfg.get(key)
        if v is not None and not isinstance(v, bool):
            raise InvalidInputError(f"{where}: {key!r} must be true or false, got {v!r}")
    for key, why in _REFUSED_WHEN_SET.items():
        if cfg.get(key) not in (None, False, [], {}, ""):
            raise UnsupportedError(f"{where}: {why}")
    _check_init(cfg, where)
    bias = cfg.get("bias", "none")
    if bias not in BIAS_MODES:
        raise InvalidInputError(f"{where}: 'bias' must be one of {', '.join(BIAS_MODES)}, got {bias!r}")
    for key in ("modules_to_save", "target_parameters"):
        v = cfg.get(key)
        if v is not None and not _is_str_list(v):
            raise InvalidInputError(f"{where}: {key!r} must be a list of strings, got {str(v)[:60]}")
    tti = cfg.get("trainable_token_indices")
    if tti is not None and not (
        _is_index_list(tti) or (isinstance(tti, dict) and all(isinstance(k, str) and _is_index_list(v) for k, v in tti.items()))
    ):
        raise InvalidInputError(
            f"{where}: 'trainable_token_indices' must be a list of token ids or an object of module -> token ids"
        )
    if cfg.get("target_parameters") and cfg.get("use_dora"):
        raise UnsupportedError(f"{where}: DoRA with target_parameters (PEFT itself refuses the combination)")
    tm = cfg.get("target_modules")
    if tm is not None and not (isinstance(tm, str) or (isinstance(tm, list) and all(isinstance(t, str) for t in tm))):
        raise InvalidInputError(f"{where}: 'target_modules' must be a list of strings or a string")
    unknown = sorted(k for k in cfg if k not in KNOWN_CONFIG_KEYS)
    if unknown and warnings is not None:
        # Newer PEFT versions add fields; PEFT itself ignores unknown ones with a warning, and so
        # does portllm. Fields known to change the merge are refused above.
        warnings.append(f"{where}: ignoring unknown adapter config keys {', '.join(map(repr, unknown[:5]))}")
    return cfg


def validate_config(cfg: Any, where: Path, warnings: list[str] | None = None) -> dict[str, Any]:
    """Check an adapter config (PEFT LoraConfig as JSON) and return it; refuses what portllm cannot port."""
    return _validate_config(cfg, where, warnings)


def _strip_prefix(key: str) -> str:
    return key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key


def _nesting(module: str) -> tuple[str, int]:
    depth = 0
    while module.endswith(_BASE_LAYER):
        module = module[: -len(_BASE_LAYER)]
        depth += 1
    return module, depth


def _saved_module(module: str, modules_to_save: list[str]) -> bool:
    # PEFT's rule for modules_to_save (peft.utils.other._set_trainable): a plain string suffix
    return any(module.endswith(t) for t in modules_to_save)


@dataclass
class KeyRole:
    """What one adapter key is: ``role`` in lora_A, lora_B, bias, magnitude, tokens, full, dropped."""

    role: str
    module: str  # module path (for full: the parameter path)
    kind: str = "linear"


def classify_key(key: str, cfg: dict[str, Any]) -> KeyRole | None:
    """The one reader of adapter key names: what a key of ``adapter_model.safetensors`` holds, or None."""
    name = _strip_prefix(key)
    m = _KEY_RE.match(name)
    if m:
        module = m.group("module") or m.group("emodule")
        part = m.group("part") or m.group("epart")
        kind = "embedding" if part.startswith("lora_embedding") else "linear"
        return KeyRole("lora_A" if part.endswith("A") else "lora_B", module, kind)
    for regex, role in ((_BIAS_RE, "bias"), (_MAGNITUDE_RE, "magnitude"), (_TOKENS_RE, "tokens")):
        m = regex.match(name)
        if m:
            return KeyRole(role, m.group("module"))
    if name.endswith(".base_layer.weight"):
        return KeyRole("dropped", name)
    bias = cfg.get("bias", "none")
    if name.endswith(".base_layer.bias") and bias in ("all", "lora_only"):
        return KeyRole("full", name[: -len(".base_layer.bias")] + ".bias", "bias")
    module = name.rsplit(".", 1)[0] if "." in name else ""
    if module and _saved_module(module, cfg.get("modules_to_save") or []):
        return KeyRole("full", name, "modules_to_save")
    if bias == "all" and name.endswith(".bias"):
        return KeyRole("full", name, "bias")
    return None


def _token_indices(cfg: dict[str, Any], module: str, where: Path) -> list[int]:
    tti = cfg.get("trainable_token_indices")
    if tti is None:
        raise InvalidInputError(f"{where}: {module}: trainable token rows but no 'trainable_token_indices' in the config")
    if isinstance(tti, list):
        return list(tti)
    hits = [v for k, v in tti.items() if module == k or module.endswith("." + k) or module.endswith(k)]
    if len(hits) != 1:
        raise InvalidInputError(f"{where}: {module}: 'trainable_token_indices' names it {len(hits)} times (need exactly one)")
    return list(hits[0])


def _finite(t: "torch.Tensor", where: Path, what: str) -> None:
    import torch

    if not t.is_floating_point():
        raise InvalidInputError(f"{where}: {what} has non-float dtype {t.dtype}")
    bad = ~torch.isfinite(t.to(torch.float32))
    if bool(bad.any()):
        raise IntegrityError(f"{where}: {what} holds NaN or Inf ({int(bad.sum())} values)")


def parse_tensors(
    tensors: dict[str, "torch.Tensor"], cfg: dict[str, Any], where: Path, warnings: list[str] | None = None
) -> tuple[dict[str, LoraModule], dict[str, FullTensor], dict[str, TokenRows]]:
    """Every tensor of an adapter, by what it is: LoRA modules, saved whole tensors, token rows."""
    parts: dict[str, dict[str, "torch.Tensor"]] = {}
    kinds: dict[str, str] = {}
    full: dict[str, FullTensor] = {}
    tokens: dict[str, TokenRows] = {}
    params = bool(cfg.get("target_parameters"))
    for key, t in tensors.items():
        role = classify_key(key, cfg)
        if role is None:
            raise InvalidInputError(f"{where}: unknown tensor key {key!r} (not a LoRA A/B factor)")
        if role.role == "dropped":
            # PEFT's save_embedding_layers stores the *old* base's full embedding matrix; carrying
            # it to an evolved model would undo the update, so it is never part of a patch.
            if warnings is not None:
                warnings.append(f"{where}: ignoring {key} (a full copy of the old base's weights, not a LoRA factor)")
            continue
        if role.role == "full":
            if role.module in full:
                raise InvalidInputError(f"{where}: {role.module!r} is stored twice")
            _finite(t, where, f"{key!r}")
            full[role.module] = FullTensor(role.module, t, role.kind, key)
            continue
        if role.role == "tokens":
            indices = _token_indices(cfg, role.module, where)
            if t.ndim != 2 or t.shape[0] != len(indices):
                raise InvalidInputError(
                    f"{where}: {key!r} has shape {tuple(t.shape)} for {len(indices)} trainable token indices"
                )
            if len(set(indices)) != len(indices):
                raise InvalidInputError(f"{where}: {role.module}: 'trainable_token_indices' repeats a token id")
            _finite(t, where, f"{key!r}")
            tokens[role.module] = TokenRows(role.module, indices, t, key)
            continue
        module = role.module
        slot = {"lora_A": "A", "lora_B": "B", "bias": "bias", "magnitude": "magnitude"}[role.role]
        if slot in parts.setdefault(module, {}):
            raise InvalidInputError(f"{where}: duplicate {role.role} for module {module!r}")
        if role.role in ("lora_A", "lora_B"):
            if kinds.setdefault(module, role.kind) != role.kind:
                raise InvalidInputError(f"{where}: module {module!r} mixes embedding and linear factors")
            if t.ndim != 2:
                raise InvalidInputError(f"{where}: {key!r} must be 2-D, got shape {tuple(t.shape)}")
        elif t.ndim != 1:
            raise InvalidInputError(f"{where}: {key!r} must be 1-D, got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise InvalidInputError(f"{where}: {key!r} has non-float dtype {t.dtype}")
        parts[module][slot] = t
    if not parts and not full and not tokens:
        raise InvalidInputError(f"{where}: the adapter holds no LoRA factors")
    rank_pattern = cfg.get("rank_pattern") or {}
    alpha_pattern = cfg.get("alpha_pattern") or {}
    use_dora = bool(cfg.get("use_dora"))
    modules: dict[str, LoraModule] = {}
    for name, p in sorted(parts.items()):
        if "A" not in p or "B" not in p:
            missing = "lora_B" if "B" not in p else "lora_A"
            raise InvalidInputError(f"{where}: module {name!r} has no {missing}")
        A, B = p["A"], p["B"]
        r_a, r_b = A.shape[0], B.shape[1]
        if r_a != r_b:
            raise InvalidInputError(f"{where}: module {name!r}: lora_A has rank {r_a} but lora_B has rank {r_b}")
        _, depth = _nesting(name)
        if depth and not params:
            raise InvalidInputError(f"{where}: module {name!r}: nested base_layer factors without target_parameters")
        expected_r = _pattern_value(rank_pattern, name, cfg["r"])
        # factors of a targeted parameter stack one rank-r block per expert: checked against the model
        if r_a != expected_r and not (params and r_a % expected_r == 0):
            raise InvalidInputError(
                f"{where}: module {name!r}: factors have rank {r_a} but the config says r={expected_r}"
            )
        out_dim = B.shape[0]
        mag, bias = p.get("magnitude"), p.get("bias")
        if use_dora and mag is None:
            raise InvalidInputError(f"{where}: module {name!r}: use_dora is set but it has no lora_magnitude_vector")
        if mag is not None and not use_dora:
            raise InvalidInputError(f"{where}: module {name!r}: a DoRA lora_magnitude_vector but use_dora is not set")
        if mag is not None and mag.shape[0] != out_dim:
            raise InvalidInputError(
                f"{where}: module {name!r}: lora_magnitude_vector has {mag.shape[0]} values for {out_dim} output features"
            )
        if bias is not None and not cfg.get("lora_bias"):
            raise InvalidInputError(f"{where}: module {name!r}: a lora_B.bias but lora_bias is not set")
        if bias is not None and (kinds[name] != "linear" or bias.shape[0] != out_dim):
            raise InvalidInputError(f"{where}: module {name!r}: lora_B.bias does not fit lora_B {tuple(B.shape)}")
        for slot, t in (("A", A), ("B", B), ("magnitude_vector", mag), ("B.bias", bias)):
            if t is not None:
                _finite(t, where, f"module {name!r}: lora_{slot}")
        modules[name] = LoraModule(
            name=name,
            A=A,
            B=B,
            alpha=float(_pattern_value(alpha_pattern, name, cfg["lora_alpha"])),
            use_rslora=bool(cfg.get("use_rslora", False)),
            kind=kinds[name],
            fan_in_fan_out=bool(cfg.get("fan_in_fan_out", False)),
            magnitude=mag,
            bias=bias,
            depth=depth,
            r=int(expected_r),
        )
    return modules, full, tokens


def parse_modules(
    tensors: dict[str, "torch.Tensor"], cfg: dict[str, Any], where: Path, warnings: list[str] | None = None
) -> dict[str, LoraModule]:
    """The LoRA modules of an adapter (see parse_tensors for everything it holds)."""
    return parse_tensors(tensors, cfg, where, warnings)[0]


def read_outline(path: str | os.PathLike[str]) -> "Patch | None":
    """A patch's names and shapes from its config and safetensors header: no torch, no factors read.

    Factor "tensors" are stand-ins with a ``shape`` only. None whenever anything needs the full
    reader's judgement (``read_patch`` then reports it), or the patch is more than plain LoRA.
    """
    from portllm_cli.io.safetensors import read_header

    path = Path(path)
    try:
        cfg = _validate_config(read_json(path / ADAPTER_CONFIG, "adapter config"), path)
        manifest = read_manifest(path)
        header = read_header(path / ADAPTER_WEIGHTS)
    except (PortllmError, OSError):
        return None
    if init_kind(cfg) != "plain" or cfg.get("target_parameters"):
        return None
    parts: dict[str, dict[str, tuple[int, ...]]] = {}
    kinds: dict[str, str] = {}
    for key, info in header.tensors.items():
        role = classify_key(key, cfg)
        if role is None or role.role not in ("lora_A", "lora_B", "dropped") or (
            role.role != "dropped" and len(info.shape) != 2
        ):
            return None
        if role.role == "dropped":
            continue
        slot = "A" if role.role == "lora_A" else "B"
        if slot in parts.setdefault(role.module, {}):
            return None
        parts[role.module][slot] = info.shape
        kinds[role.module] = role.kind
    if not parts or any(set(p) != {"A", "B"} for p in parts.values()):
        return None
    modules = {
        name: LoraModule(
            name=name,
            A=_Shape(p["A"]),  # type: ignore[arg-type]
            B=_Shape(p["B"]),  # type: ignore[arg-type]
            alpha=float(cfg["lora_alpha"]),
            kind=kinds[name],
            fan_in_fan_out=bool(cfg.get("fan_in_fan_out", False)),
        )
        for name, p in parts.items()
    }
    return Patch(path, cfg, manifest, modules, [], outline=True)


class _Shape:
    """Stands in for a factor tensor where only its shape is needed (the compatibility check)."""

    def __init__(self, shape: tuple[int, ...]) -> None:
        self.shape = shape


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
        for k in ARCH_INT_FIELDS:
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
    if lazy and _config_is_plain(cfg):  # a variant's parts (norms, whole tensors, experts) are read whole
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
        modules, full, tokens = parse_tensors(tensors, cfg, weights, warnings)
    except BaseException:
        if source is not None:
            source.close()
        raise
    return Patch(path, cfg, manifest, modules, warnings, full, tokens, source=source)


def _config_is_plain(cfg: dict[str, Any]) -> bool:
    """Only low-rank factors, merged as W + s*B@A: no DoRA, biases, whole tensors, token rows,
    raw-parameter (expert) factors or an init that needs the old base."""
    return (
        init_kind(cfg) == "plain"
        and not cfg.get("use_dora")
        and not cfg.get("lora_bias")
        and not cfg.get("modules_to_save")
        and not cfg.get("trainable_token_indices")
        and cfg.get("bias", "none") in (None, "none")
        and not cfg.get("target_parameters")
    )


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


def patch_tensors(
    modules: dict[str, LoraModule],
    b_scale: float = 1.0,
    *,
    full: dict[str, "torch.Tensor"] | None = None,
    tokens: dict[str, "torch.Tensor"] | None = None,
) -> dict[str, "torch.Tensor"]:
    """PEFT-named tensors for a set of modules (B and its bias optionally rescaled, e.g. for --scale),
    plus whole tensors (``full``: parameter path -> tensor, saved as PEFT saves modules_to_save and
    biases) and trainable token rows (``tokens``: module path -> rows)."""
    out = {}
    for m in modules.values():
        out[peft_key(m.name, "A", m.kind)] = m.A.contiguous()
        B = m.B if b_scale == 1.0 else (m.B.to(_f32()) * b_scale).to(m.B.dtype)
        out[peft_key(m.name, "B", m.kind)] = B.contiguous()
        if m.magnitude is not None:
            out[f"{PEFT_PREFIX}{m.name}.lora_magnitude_vector"] = m.magnitude.contiguous()
        if m.bias is not None:
            bias = m.bias if b_scale == 1.0 else (m.bias.to(_f32()) * b_scale).to(m.bias.dtype)
            out[f"{PEFT_PREFIX}{m.name}.lora_B.bias"] = bias.contiguous()
    for name, t in (full or {}).items():
        out[f"{PEFT_PREFIX}{name}"] = t.contiguous()
    for module, t in (tokens or {}).items():
        out[f"{PEFT_PREFIX}{module}.token_adapter.trainable_tokens_delta"] = t.contiguous()
    return out


def _f32():
    import torch

    return torch.float32


def short_module_kind(module: str) -> str:
    """q_proj / v_proj / mlp / embeddings ... : the last name component."""
    return module.rsplit(".", 1)[-1]
