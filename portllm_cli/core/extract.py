"""Make a portable patch: from a PEFT LoRA adapter, or by SVD of a full fine-tune's weight deltas.

Adapter mode copies the factors unchanged (same dtype), writes a clean ``adapter_config.json``
and a manifest that records the base the adapter was trained on. SVD mode reads the fine-tuned
and the base checkpoint one tensor at a time, takes dW = W_ft - W_base in fp32 per linear module
and keeps the best rank-k approximation (Eckart-Young): B = U_k sqrt(S_k), A = sqrt(S_k) Vh_k,
lora_alpha = r so that PEFT's scale is 1.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from portllm_cli.core.compat import check_compatibility
from portllm_cli.core.plan import OldBase, convert_init
from portllm_cli.core.progress import ProgressFn, no_progress
from portllm_cli.errors import (
    IncompatibleError,
    InvalidInputError,
    NotFoundError,
    PortllmError,
    UnsupportedError,
    UsageError,
)
from portllm_cli.io.atomic import atomic_output_dir
from portllm_cli.io.checkpoint import Checkpoint, text_config
from portllm_cli.patch import format as pf
from portllm_cli.resolve import model_record, resolve
from portllm_cli.spec import PATCH, Resolved

if TYPE_CHECKING:
    import torch

SVD_DTYPES = ("float32", "bfloat16", "float16")

# Last name components of linear layers that are not spelled *_proj (BERT, Falcon, GPT-J, Llama-1 ...).
# GPT-2's Conv1D layers (c_attn, c_fc, c_proj) store weights transposed, so they are left out.
KNOWN_LINEAR = frozenset(
    {
        "query", "key", "value", "dense", "fc1", "fc2", "fc_in", "fc_out", "wq", "wk", "wv", "wo",
        "w1", "w2", "w3", "query_key_value", "dense_h_to_4h", "dense_4h_to_h", "Wqkv", "out_proj",
    }
)
_CONV1D = frozenset({"c_attn", "c_proj", "c_fc"})
_CONV1D_MODELS = frozenset({"gpt2", "openai-gpt"})
_NOT_LINEAR = ("embed", "lm_head", "norm", "wte", "wpe")
_LAYER_INDEX = re.compile(r"\.\d+\.")

# Keys of the original adapter_config that decide which modules PEFT wraps: kept so the patch
# wraps exactly the modules that carry factors.
_TARGETING_KEYS = ("layers_to_transform", "layers_pattern", "exclude_modules")


@dataclass
class ExtractResult:
    out: Path
    mode: str  # "adapter" | "svd"
    modules: int
    rank: int  # the config's r
    ranks: dict[str, int]  # per module
    base: str  # what the manifest records as the base model
    relative_error: float | None = None  # overall, SVD mode only
    per_module_error: dict[str, float] = field(default_factory=dict)
    energy: float | None = None
    dtype: str | None = None
    skipped: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    manifest: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"out": str(self.out), "mode": self.mode, "modules": self.modules, "base": self.base}
        if self.mode == "svd" and self.energy is not None:
            doc["energy"] = self.energy
            doc["ranks"] = dict(self.ranks)
        else:
            doc["rank"] = self.rank
        doc["relative_error"] = self.relative_error
        if self.mode == "svd":
            doc["per_module"] = {
                m: {"rank": self.ranks[m], "relative_error": self.per_module_error[m]} for m in self.ranks
            }
            doc["skipped"] = list(self.skipped)
            doc["dtype"] = self.dtype
        else:
            doc["per_module"] = {m: {"rank": r} for m, r in self.ranks.items()}
        doc["warnings"] = list(self.warnings)
        return doc


# -- the base an adapter was trained on ------------------------------------------------------------
@dataclass
class BaseInfo:
    model: str  # base_model_name_or_path for the written adapter_config
    record: dict[str, Any]  # the manifest's "base"
    warnings: list[str] = field(default_factory=list)
    ckpt: Checkpoint | None = None  # the base, when it was found
    key_map: dict[str, str] = field(default_factory=dict)  # patch module -> the base's stored weight


def _resolve_base(spec: str, revision: str | None = None, allow_pickle: bool = False,
                  progress: ProgressFn | None = None) -> tuple[Resolved | None, str]:
    """The base, or None and why it could not be had (a missing path, an unreachable Hub ...)."""
    try:
        return resolve(spec, kind="model", revision=revision, allow_pickle=allow_pickle, progress=progress), ""
    except ImportError:  # no Hub support in this build: a remote id cannot be fetched
        return None, "Hub access is not available"
    except PortllmError as exc:
        return None, exc.message


def describe_base(
    patch: pf.Patch,
    spec: str | Resolved | None,
    *,
    base_check: bool = True,
    allow_pickle: bool = False,
    revision: str | None = None,
    progress: ProgressFn | None = None,
) -> BaseInfo:
    """Find the base, check the patch fits it, and build the manifest's base record.

    With base_check=False a base that cannot be found is recorded by its id only, with a
    fingerprint made from the adapter's own shapes.
    """
    if spec is None:
        raise UsageError(
            f"{patch.path}: the adapter does not name its base model (no base_model_name_or_path)",
            hint="pass --base MODEL (a local directory or user/repo)",
        )
    res, why = (spec, "") if isinstance(spec, Resolved) else _resolve_base(spec, revision, allow_pickle, progress)
    shown = spec.display if isinstance(spec, Resolved) else spec
    if res is None:
        if base_check or patch.init != "plain":
            if patch.init != "plain":
                why = (f"the adapter was saved unconverted with init_lora_weights "
                       f"{patch.config.get('init_lora_weights')!r}, which only means something together with its base")
                raise NotFoundError(f"base model {shown!r} not found ({why})",
                                    hint="pass --base with the model the adapter was trained on")
            raise NotFoundError(
                f"base model {shown!r} not found ({why}), so the adapter cannot be checked against it",
                hint="pass --base with a local model directory, or --no-base-check to record the id only",
            )
        shapes = {name: list(m.weight_shape) for name, m in patch.modules.items()}
        old_fp = (patch.manifest.get("base") or {}).get("fingerprint") or {}
        fp = {k: v for k, v in old_fp.items() if k != "modules"}
        fp["modules"] = dict(sorted(shapes.items()))
        record = {"model": shown, "revision": None, "content_hash": None, "fingerprint": fp}
        return BaseInfo(shown, record, [f"base model {shown!r} not found: recorded by id only, not checked"])
    ckpt = Checkpoint.open(res.path, allow_pickle=allow_pickle)
    report = check_compatibility(patch, ckpt)
    report.raise_if_incompatible(f"its base {res.display}")
    shapes = report.location.module_shapes()  # the shapes of the adapted parameters, as PEFT sees them
    record = model_record(res, ckpt, shapes)
    return BaseInfo(res.record_id, record, list(report.warnings), ckpt, dict(report.key_map))


# -- adapter mode ---------------------------------------------------------------------------------
# Fields of the source config that change what the factors and saved tensors mean: carried over
# as they are (init_lora_weights too: rewriting it would make PEFT read the patch as another thing).
_MEANING_KEYS = ("use_dora", "lora_bias", "target_parameters", "modules_to_save", "trainable_token_indices",
                 "bias", "init_lora_weights", "ensure_weight_tying")


def _clean_adapter_config(patch: pf.Patch, base_model: str) -> dict[str, Any]:
    src = patch.config
    tm = src.get("target_modules")
    if isinstance(tm, str) or not tm:
        targets = sorted({pf.short_module_kind(m.module) for m in patch.modules.values()
                          if not src.get("target_parameters") or m.depth == 0})
    else:
        targets = list(tm)
    cfg = pf.adapter_config(
        base_model=base_model,
        rank=int(src["r"]),
        alpha=src["lora_alpha"],
        target_modules=targets,
        dropout=float(src.get("lora_dropout") or 0.0),
        use_rslora=bool(src.get("use_rslora", False)),
        rank_pattern=dict(src.get("rank_pattern") or {}),
        alpha_pattern=dict(src.get("alpha_pattern") or {}),
        fan_in_fan_out=bool(src.get("fan_in_fan_out", False)),
    )
    if isinstance(tm, str) and tm:
        cfg["target_modules"] = tm  # a regex: PEFT matches it as is
    if tm is None and src.get("target_parameters"):
        cfg["target_modules"] = None
    if isinstance(src.get("task_type"), str):
        cfg["task_type"] = src["task_type"]
    for key in _TARGETING_KEYS + _MEANING_KEYS:
        if src.get(key) is not None:
            cfg[key] = src[key]
    return cfg


def _lora_record(cfg: dict[str, Any], modules: dict[str, pf.LoraModule]) -> dict[str, Any]:
    return {
        "use_dora": bool(cfg.get("use_dora")),
        "rank": cfg["r"],
        "alpha": cfg["lora_alpha"],
        "use_rslora": cfg["use_rslora"],
        "target_modules": cfg["target_modules"],
        "modules": len(modules),
        "rank_pattern": cfg["rank_pattern"],
        "alpha_pattern": cfg["alpha_pattern"],
    }


def write_patch_from_peft_dir(
    adapter_dir: Path,
    dest: Path,
    *,
    base: str | Resolved | None = None,
    base_check: bool = True,
    source: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
    allow_pickle: bool = False,
    patch: pf.Patch | None = None,
    progress: ProgressFn | None = None,
) -> tuple[pf.Patch, dict[str, Any], BaseInfo]:
    """Validate a PEFT adapter directory and write it as a portllm patch into ``dest``.

    ``dest`` is a directory being filled (e.g. the temporary one from atomic_output_dir).
    ``base`` overrides the adapter's base_model_name_or_path; ``extra`` adds free manifest
    fields (task, training, scores). Returns the patch read, the manifest written and the base.
    """
    if patch is None:
        patch = pf.read_patch(adapter_dir, verify=True)  # verify only bites when a manifest exists
    if base is not None:
        spec, revision = base, None
    else:  # PEFT records the base's Hub revision next to its id
        spec, revision = patch.config.get("base_model_name_or_path") or None, patch.config.get("revision") or None
    info = describe_base(patch, spec, base_check=base_check, allow_pickle=allow_pickle, revision=revision,
                         progress=progress)
    if patch.init != "plain":
        # PiSSA / OLoRA saved unconverted: the patch is the fine-tune's change, as PEFT converts it
        patch = convert_init(patch, OldBase(info.ckpt, info.model))
    cfg = _clean_adapter_config(patch, info.model)
    fields: dict[str, Any] = {k: patch.manifest[k] for k in ("task", "training", "scores") if k in patch.manifest}
    fields.update({k: v for k, v in (extra or {}).items() if v is not None})
    if patch.is_dora and info.ckpt is not None:
        # --dora relative at port time needs ||W_old|| per output feature: recorded once, here
        fields["dora"] = {"base_norms": _dora_base_norms(patch, info)}
    elif patch.is_dora and patch.manifest.get("dora"):
        fields["dora"] = patch.manifest["dora"]
    manifest = pf.build_manifest(
        base=info.record,
        lora=_lora_record(cfg, patch.modules),
        source=source or {"kind": "peft-adapter", "path": str(Path(adapter_dir).resolve())},
        extra=fields,
    )
    tensors = pf.patch_tensors(
        patch.modules,
        full={f.key.removeprefix(pf.PEFT_PREFIX): f.tensor for f in patch.full.values()},
        tokens={t.module: t.values for t in patch.tokens.values()},
    )
    manifest = pf.write_patch_files(dest, tensors, cfg, manifest)
    return patch, manifest, info


def _dora_base_norms(patch: pf.Patch, info: BaseInfo) -> dict[str, str]:
    from portllm_cli.core.plan import encode_norms, feature_norms

    ckpt = info.ckpt
    out = {}
    for name, m in patch.modules.items():
        if m.magnitude is None:
            continue
        key = info.key_map[name]
        rows = int(ckpt.shape(key)[0])
        transposed = m.kind == "embedding" or m.fan_in_fan_out
        out[name] = encode_norms(feature_norms(lambda r0, r1, k=key: ckpt.rows(k, r0, r1), rows, transposed))
    return out


def extract_adapter(
    adapter: Resolved,
    out: Path,
    *,
    base: str | None = None,
    overwrite: bool = False,
    base_check: bool = True,
    task: str | None = None,
    allow_pickle: bool = False,
    progress: ProgressFn | None = None,
) -> ExtractResult:
    """A portable patch from a PEFT LoRA adapter directory: validated, factors copied, manifest written."""
    progress = progress or no_progress
    out = Path(out)
    if adapter.kind != PATCH:
        raise InvalidInputError(f"{adapter.display}: not a PEFT adapter (no {pf.ADAPTER_CONFIG})")
    patch = pf.read_patch(adapter.path, verify=True)
    progress("extract", 0, 1)
    source = {"kind": "peft-adapter", "path": adapter.record_id}
    if adapter.revision:
        source["revision"] = adapter.revision
    with atomic_output_dir(out, overwrite=overwrite, inputs=(adapter.path,)) as tmp:
        patch, manifest, info = write_patch_from_peft_dir(
            adapter.path,
            tmp,
            base=base,
            base_check=base_check,
            source=source,
            extra={"task": task},
            allow_pickle=allow_pickle,
            patch=patch,
            progress=progress,
        )
    progress("extract", 1, 1)
    cfg = patch.config
    ranks = {name: m.rank for name, m in patch.modules.items()}
    return ExtractResult(
        out=out,
        mode="adapter",
        modules=len(patch.modules),
        rank=int(cfg["r"]),
        ranks=ranks,
        base=info.model,
        warnings=[w for w in patch.warnings if "no portllm.json" not in w] + info.warnings,
        manifest=manifest,
    )


# -- SVD mode -------------------------------------------------------------------------------------
def _is_default_linear(module: str) -> bool:
    last = module.rsplit(".", 1)[-1]
    if not (last.endswith("_proj") or last in KNOWN_LINEAR):
        return False
    if any(tag in module.lower() for tag in _NOT_LINEAR):
        return False
    return bool(_LAYER_INDEX.search(f".{module}."))


def _matches_target(module: str, targets: list[str]) -> bool:
    # PEFT's rule for a list of target_modules: the full name, or a suffix after a dot.
    return any(module == t or module.endswith("." + t) for t in targets)


def _is_embedding(module: str) -> bool:
    last = module.rsplit(".", 1)[-1].lower()
    return "embed" in last or last in ("wte", "wpe")


def select_modules(ckpt: Checkpoint, target_modules: list[str] | None) -> list[str]:
    """Module names (weight key minus '.weight') whose 2-D float weights get a low-rank delta."""
    picked = []
    for key in ckpt.names():
        if not key.endswith(".weight"):
            continue
        module = key[: -len(".weight")]
        if len(ckpt.shape(key)) != 2 or not ckpt.dtype(key).startswith(("F", "BF")):
            continue
        if target_modules is None:
            ok = _is_default_linear(module)
        else:
            ok = _matches_target(module, target_modules)
        if ok:
            picked.append(module)
    return picked


def _choose_rank(s2: "torch.Tensor", rank: int | None, energy: float | None) -> int:
    """Rank to keep from the squared singular values (descending, float64)."""
    n = int(s2.numel())
    if rank is not None:
        return min(rank, n)
    import torch

    cum = torch.cumsum(s2, 0)
    share = cum / cum[-1]
    k = int(torch.searchsorted(share, torch.tensor([energy], dtype=share.dtype), right=False)[0]) + 1
    return max(1, min(k, n))


@dataclass
class _ModuleFactors:
    A: "torch.Tensor"
    B: "torch.Tensor"
    kind: str
    rank: int
    residual2: float  # sum of the dropped squared singular values
    total2: float  # ||dW||_F^2


def factorize_delta(
    delta: "torch.Tensor",
    *,
    rank: int | None = None,
    energy: float | None = None,
    dtype: str = "float32",
    kind: str = "linear",
) -> _ModuleFactors:
    """Best rank-k factors of an fp32 delta: B = U_k sqrt(S_k), A = sqrt(S_k) Vh_k (PEFT layout)."""
    import torch

    mat = delta.T if kind == "embedding" else delta  # PEFT stores embedding factors transposed
    U, S, Vh = torch.linalg.svd(mat, full_matrices=False)
    s2 = S.to(torch.float64) ** 2
    k = _choose_rank(s2, rank, energy)
    total2 = float(s2.sum())
    residual2 = float(s2[k:].sum())
    root = S[:k].sqrt()
    out_dtype = getattr(torch, dtype)
    B = (U[:, :k] * root).to(out_dtype).contiguous()
    A = (root[:, None] * Vh[:k]).to(out_dtype).contiguous()
    if out_dtype != torch.float32:
        # rounding the factors adds error the singular values do not show: measure it
        residual2 = float(((mat - B.float() @ A.float()).to(torch.float64) ** 2).sum())
    return _ModuleFactors(A, B, kind, k, residual2, total2)


def _check_same_architecture(ft: Checkpoint, base: Checkpoint, ft_name: str, base_name: str) -> None:
    a, b = text_config(ft.config).get("model_type"), text_config(base.config).get("model_type")
    if a and b and a != b:
        raise IncompatibleError(
            f"{ft_name} is a {a!r} model but {base_name} is a {b!r} model; they must share an architecture"
        )


def _rank_config(ranks: dict[str, int]) -> tuple[int, dict[str, int], dict[str, int]]:
    """r = the most common rank (ties: the larger); patterns for the modules that differ."""
    counts = Counter(ranks.values())
    r = max(counts, key=lambda k: (counts[k], k))
    # PEFT matches pattern keys as (.*\.)?(key)$ against the module name: a full name picks one module.
    rank_pattern = {m: k for m, k in sorted(ranks.items()) if k != r}
    alpha_pattern = dict(rank_pattern)  # alpha = rank per module: scale 1 everywhere
    return r, rank_pattern, alpha_pattern


def _peft_targets(picked: list[str], ft: Checkpoint) -> list[str]:
    """Short names when they select exactly the extracted modules, else the full module names."""
    shorts = sorted({m.rsplit(".", 1)[-1] for m in picked})
    chosen = set(picked)
    for key in ft.names():
        if key.endswith(".weight"):
            module = key[: -len(".weight")]
            if module not in chosen and _matches_target(module, shorts):
                return sorted(picked)
    return shorts


def extract_svd(
    finetuned: Resolved,
    base: Resolved,
    out: Path,
    *,
    rank: int | None = None,
    energy: float | None = None,
    target_modules: list[str] | None = None,
    dtype: str = "float32",
    overwrite: bool = False,
    task: str | None = None,
    allow_pickle: bool = False,
    progress: ProgressFn | None = None,
) -> ExtractResult:
    """A LoRA patch from a full fine-tune: truncated SVD of W_ft - W_base per linear module."""
    import torch

    progress = progress or no_progress
    out = Path(out)
    if (rank is None) == (energy is None):
        raise UsageError("give exactly one of --rank and --energy", hint="e.g. --rank 16 or --energy 0.99")
    if rank is not None and (isinstance(rank, bool) or rank < 1):
        raise UsageError(f"--rank must be a positive integer, got {rank}")
    if energy is not None and not (0.0 < energy <= 1.0):  # NaN fails the comparison too
        raise UsageError(f"--energy must lie in (0, 1], got {energy}")
    if dtype not in SVD_DTYPES:
        raise UsageError(f"--dtype must be one of {', '.join(SVD_DTYPES)}, got {dtype!r}")
    if target_modules is not None:
        target_modules = [t.strip() for t in target_modules if t.strip()]
        if not target_modules:
            raise UsageError("--target-modules is empty")
    if finetuned.kind == PATCH:
        raise InvalidInputError(f"{finetuned.display}: SVD extraction needs a fine-tuned model directory, this is an adapter")
    ft = Checkpoint.open(finetuned.path, allow_pickle=allow_pickle)
    bs = Checkpoint.open(base.path, allow_pickle=allow_pickle)
    _check_same_architecture(ft, bs, finetuned.display, base.display)

    picked = select_modules(ft, target_modules)
    if not picked:
        if target_modules:
            what = f"matching --target-modules {','.join(target_modules)}"
        else:
            what = "(no *_proj weights in transformer layers)"
        raise InvalidInputError(
            f"{finetuned.display}: no 2-D linear weights {what}",
            hint="name the modules with --target-modules q_proj,v_proj,...",
        )
    is_gpt2 = text_config(ft.config).get("model_type") in _CONV1D_MODELS
    conv1d = [m for m in picked if is_gpt2 and m.rsplit(".", 1)[-1] in _CONV1D]
    if conv1d:
        raise UnsupportedError(
            f"module {conv1d[0]}: GPT-2 style Conv1D weights are stored transposed; SVD extraction supports nn.Linear layers"
        )
    base_names = set(bs.names())
    for module in picked:
        key = f"{module}.weight"
        if key not in base_names:
            raise IncompatibleError(f"module {module}: present in {finetuned.display} but not in the base {base.display}")
        if tuple(ft.shape(key)) != tuple(bs.shape(key)):
            raise IncompatibleError(
                f"module {module}: shape {tuple(ft.shape(key))} in {finetuned.display} but {tuple(bs.shape(key))} in the base"
            )

    warnings: list[str] = []
    skipped: list[str] = []
    factors: dict[str, _ModuleFactors] = {}
    shapes: dict[str, list[int]] = {}
    total = len(picked)
    progress("extract", 0, total)
    for i, module in enumerate(picked):
        key = f"{module}.weight"
        delta = ft.tensor(key).to(torch.float32)
        delta -= bs.tensor(key).to(torch.float32)
        if not bool(torch.isfinite(delta).all()):
            raise InvalidInputError(f"module {module}: the weight delta holds NaN or Inf")
        if not bool(delta.any()):
            skipped.append(module)
        else:
            kind = "embedding" if _is_embedding(module) else "linear"
            factors[module] = factorize_delta(delta, rank=rank, energy=energy, dtype=dtype, kind=kind)
            shapes[module] = list(delta.shape)
        del delta
        progress("extract", i + 1, total)
    if skipped:
        warnings.append(f"{len(skipped)} module(s) unchanged by the fine-tune, skipped: {', '.join(skipped[:5])}"
                        + (" ..." if len(skipped) > 5 else ""))
    if not factors:
        raise InvalidInputError(
            f"{finetuned.display}: no targeted weight differs from the base {base.display}; nothing to extract"
        )
    warnings.extend(_unrepresented_changes(ft, bs, set(picked)))

    ranks = {m: f.rank for m, f in factors.items()}
    per_module = {m: math.sqrt(f.residual2 / f.total2) for m, f in factors.items()}
    overall = math.sqrt(sum(f.residual2 for f in factors.values()) / sum(f.total2 for f in factors.values()))
    r, rank_pattern, alpha_pattern = _rank_config(ranks)
    targets = _peft_targets(list(factors), ft)
    cfg = pf.adapter_config(
        base_model=base.record_id,
        rank=r,
        alpha=r,
        target_modules=targets,
        rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern,
    )
    modules = {
        m: pf.LoraModule(name=m, A=f.A, B=f.B, alpha=float(f.rank), kind=f.kind) for m, f in factors.items()
    }
    base_rec = model_record(base, bs, shapes)
    ft_rec = model_record(finetuned, ft, None)
    ft_rec.pop("fingerprint", None)
    source = {
        "kind": "svd",
        "finetuned": ft_rec,
        "rank": rank,
        "energy": energy,
        "dtype": dtype,
        "relative_error": overall,
        "errors": per_module,
        "skipped": skipped,
    }
    lora = _lora_record(cfg, modules)
    manifest = pf.build_manifest(base=base_rec, lora=lora, source=source, extra={"task": task} if task else None)
    with atomic_output_dir(out, overwrite=overwrite, inputs=(finetuned.path, base.path)) as tmp:
        manifest = pf.write_patch_files(tmp, pf.patch_tensors(modules), cfg, manifest)
    return ExtractResult(
        out=out,
        mode="svd",
        modules=len(modules),
        rank=r,
        ranks=ranks,
        base=base.record_id,
        relative_error=overall,
        per_module_error=per_module,
        energy=energy,
        dtype=dtype,
        skipped=skipped,
        warnings=warnings,
        manifest=manifest,
    )


def _unrepresented_changes(ft: Checkpoint, bs: Checkpoint, picked: set[str]) -> list[str]:
    """Tensors the fine-tune changed that a LoRA patch over the picked modules cannot carry."""
    import torch

    changed: list[str] = []
    untargeted: list[str] = []
    shape_changed: list[str] = []
    only_ft: list[str] = []
    base_names = set(bs.names())
    for key in ft.names():
        module = key[: -len(".weight")] if key.endswith(".weight") else None
        if module in picked:
            continue
        if key not in base_names:
            only_ft.append(key)
            continue
        if tuple(ft.shape(key)) != tuple(bs.shape(key)):
            shape_changed.append(f"{key} {tuple(bs.shape(key))} -> {tuple(ft.shape(key))}")
            continue
        if not torch.equal(ft.tensor(key), bs.tensor(key)):
            linear = module is not None and len(ft.shape(key)) == 2 and _is_default_linear(module)
            (untargeted if linear else changed).append(key)
    out = []

    def _list(items: list[str]) -> str:
        return ", ".join(items[:6]) + (f" and {len(items) - 6} more" if len(items) > 6 else "")

    if changed:
        out.append(f"{len(changed)} tensor(s) changed but are not in the patch (a LoRA patch cannot carry them): {_list(changed)}")
    if untargeted:
        out.append(
            f"{len(untargeted)} linear weight(s) changed but were not targeted (add them with --target-modules): {_list(untargeted)}"
        )
    if shape_changed:
        out.append(f"{len(shape_changed)} tensor(s) changed shape and are not in the patch: {_list(shape_changed)}")
    if only_ft:
        out.append(f"{len(only_ft)} tensor(s) exist only in the fine-tuned model and are not in the patch: {_list(only_ft)}")
    return out
