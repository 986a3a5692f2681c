"""What a patch does to a model: every tensor of the adapter located on the model and turned into
edits of stored tensors, in one place for ``port`` (merged), ``eval`` (in memory) and ``diff``.

The adapter's meaning is PEFT 0.21's:

- LoRA factors: W += s*B@A (per expert of a stacked ``target_parameters`` weight, a row range of
  a stored expert matrix each), DoRA (``use_dora``): W' = m / ||W + s*B@A|| * (W + s*B@A),
  ``lora_bias``: b += s*lora_B.bias;
- whole tensors (``modules_to_save``, ``bias="all"|"lora_only"``) and trainable token rows, which
  PEFT writes over the model's own: ported as the change training made to the *old* base,
  ``new + (saved - old)`` (``whole="delta"``, the default), or written over as PEFT does
  (``whole="copy"``);
- PiSSA / OLoRA adapters saved unconverted are converted first against the old base
  (``convert_init``), as PEFT's own ``path_initial_model_for_weight_conversion`` does.

``build_plan`` returns the edits per stored tensor key, and proves the effect: every tensor of the
adapter lands on at least one stored tensor, none twice on the same one; an adapter that
would change nothing, or a tensor of it that lands nowhere, is an error (exit 3).
"""

from __future__ import annotations

import base64
import math
import re
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Callable

from portllm_cli.core.layout import Layout, Placement
from portllm_cli.errors import IncompatibleError, NotFoundError, PortllmError, UnsupportedError, UsageError
from portllm_cli.io.checkpoint import text_config
from portllm_cli.core.config import PortConfig
from portllm_cli.patch.format import PEFT_PREFIX, FactorRef, LoraModule, Patch, peft_key

if TYPE_CHECKING:
    import torch

    from portllm_cli.io.checkpoint import Checkpoint

BASE_HINT = "pass --base OLD_BASE (the model the adapter was trained on)"


@dataclass
class Policy:
    """What a plan merges, from the port's settings (``core.config.PortConfig``, which checks them)."""

    scale: float = 1.0  # --scale: on top of each module's alpha/r
    dora: str = "absolute"  # --dora: the old magnitudes m (PEFT), or m * ||W'|| / ||W_old||
    whole: str = "delta"  # --modules-to-save: new + (saved - old), or saved (PEFT's overwrite)

    def check(self) -> "Policy":
        PortConfig(scale=self.scale, dora=self.dora, modules_to_save=self.whole).validate()
        return self

    @classmethod
    def of(cls, config: PortConfig) -> "Policy":
        return cls(config.scale, config.dora, config.modules_to_save)


@dataclass
class OldBase:
    """The model the adapter was trained on, when it can be had: read lazily, one tensor at a time."""

    ckpt: "Checkpoint"
    display: str
    _layout: Layout | None = None

    def layout(self, names: list[str]) -> Layout:
        if self._layout is None:
            self._layout = layout_for(self.ckpt, names)
        return self._layout

    def param(self, name: str, what: str) -> tuple[str, tuple[int, ...]]:
        """(stored key, shape) of a parameter named as the adapter names it, stored whole."""
        layout = self.layout([name])
        path = layout.module_path(name)
        p = layout.params.get(path) if path else None
        if p is None or not p.stored or len(p.placements) != 1 or p.placements[0].expert is not None:
            raise IncompatibleError(f"{what}: {name} is not stored whole in the old base {self.display}")
        return p.placements[0].key, p.shape

    def reader(self, key: str) -> Callable[[int, int], "torch.Tensor"]:
        return lambda r0, r1: self.ckpt.rows(key, r0, r1)


# -- which layout --------------------------------------------------------------------------------
def layout_for(ckpt: "Checkpoint", names: list[str], *, plain: bool = True, touches_embeddings: bool = False) -> Layout:
    """The identity layout when every name is stored as it is (and nothing tied or stacked is in
    play), else the one transformers uses (core.layout). ``names``: parameter paths."""
    stored = set(ckpt.names())
    tied_cfg = _tied(ckpt.config)
    if plain and all(n in stored for n in names) and not (touches_embeddings and tied_cfg):
        return Layout.identity(ckpt)
    try:
        return Layout.of(ckpt)
    except UnsupportedError:
        if plain:
            # transformers cannot build it (custom code, an unknown architecture): fall back to the
            # stored names, as portllm always did for plain LoRA
            return Layout.identity(ckpt)
        raise


def _tied(config: dict[str, Any]) -> bool:
    tc = text_config(config)
    for c in (config, tc):
        if c.get("tie_word_embeddings") is True:
            return True
    return "tie_word_embeddings" not in config and "tie_word_embeddings" not in tc  # transformers' default


def _names(patch: Patch) -> list[str]:
    return [f"{m.name}.weight" for m in patch.modules.values()] + list(patch.full) + [
        f"{t}.weight" for t in patch.tokens
    ]


# Model types whose linear layers are transformers' Conv1D (weights stored (in, out)). PEFT treats
# them as fan_in_fan_out whatever the adapter's config says; the stored names alone cannot tell.
CONV1D_MODEL_TYPES = frozenset({"gpt2", "openai-gpt", "imagegpt", "decision_transformer"})


def target_layout(patch: Patch, ckpt: "Checkpoint") -> Layout:
    plain = patch.is_plain()
    if text_config(ckpt.config).get("model_type") in CONV1D_MODEL_TYPES and not patch.config.get("fan_in_fan_out"):
        plain = False  # ask transformers which modules are Conv1D
    return layout_for(ckpt, _names(patch), plain=plain, touches_embeddings=patch.touches_embeddings())


# -- locating --------------------------------------------------------------------------------------
def _pattern(patterns: dict[str, Any], key: str, default: Any) -> Any:
    for pat in patterns:
        if re.match(rf"(.*\.)?({pat})$", key):
            return patterns[pat]
    return default


@dataclass
class Located:
    """One LoRA module of the patch on the model: which parameter, and its factors per stored tensor."""

    module: LoraModule
    param: str  # parameter path in the model's tree
    shape: tuple[int, ...]  # the parameter's shape
    placements: list[Placement]
    experts: int = 1
    transposed: bool = False  # the stored matrices are (in, out): embeddings, Conv1D, some experts
    r: int = 0
    alpha: float = 0.0
    note: str | None = None  # a warning (a LoRA merged into a tied matrix)
    is_param: bool = False  # a target_parameters adapter (PEFT's ParamWrapper)

    @property
    def weight_shape(self) -> tuple[int, ...]:
        return self.shape if self.experts == 1 else self.shape[1:]


@dataclass
class LocatedWhole:
    source: str  # patch.full / patch.tokens key
    param: str
    shape: tuple[int, ...]
    placements: list[Placement]


@dataclass
class Location:
    """Every part of a patch located on a model (names and shapes only: works on an outline)."""

    layout: Layout
    lora: dict[str, Located] = field(default_factory=dict)
    bias: dict[str, LocatedWhole] = field(default_factory=dict)  # patch module -> the module's bias
    full: dict[str, LocatedWhole] = field(default_factory=dict)
    tokens: dict[str, LocatedWhole] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def key_map(self) -> dict[str, str]:
        """patch module -> the first stored tensor it changes (records, diff)."""
        return {name: loc.placements[0].key for name, loc in self.lora.items()}

    def module_shapes(self) -> dict[str, list[int]]:
        return {name: list(loc.shape) for name, loc in sorted(self.lora.items())}


def locate(patch: Patch, layout: Layout) -> Location:
    """Find every part of the patch in the model; mismatches become ``errors`` (one line each)."""
    loc = Location(layout)
    cfg = patch.config
    targets = list(cfg.get("target_parameters") or [])
    rank_pattern = cfg.get("rank_pattern") or {}
    alpha_pattern = cfg.get("alpha_pattern") or {}
    for name in sorted(patch.modules):
        m = patch.modules[name]
        try:
            found = _locate_lora(m, layout, targets, rank_pattern, alpha_pattern, cfg)
        except PortllmError as exc:
            loc.errors.append(f"module {name}: {exc.message}")
            continue
        if isinstance(found, str):
            loc.errors.append(f"module {name}: {found}")
            continue
        loc.lora[name] = found
        if found.note:
            loc.warnings.append(found.note)
        if m.bias is not None:
            bname = found.param.rsplit(".", 1)[0] + ".bias"
            p = layout.params.get(bname)
            if p is None:
                loc.errors.append(f"module {name}: lora_bias is set but {found.param.rsplit('.', 1)[0]} has no bias")
            elif p.shape != (found.weight_shape[1] if found.transposed else found.weight_shape[0],):
                loc.errors.append(f"module {name}: lora_B.bias does not fit {bname} {p.shape}")
            else:
                try:
                    loc.bias[name] = LocatedWhole(name, bname, p.shape, layout.placements(bname))
                except PortllmError as exc:
                    loc.errors.append(f"module {name}: {exc.message}")
    for source, what, shape_of in (
        [(n, "full", tuple(f.tensor.shape)) for n, f in sorted(patch.full.items())]
        + [(n, "tokens", None) for n in sorted(patch.tokens)]
    ):
        pname = source if what == "full" else f"{source}.weight"
        path = layout.module_path(pname)
        p = layout.params.get(path) if path else None
        label = f"{'saved tensor' if what == 'full' else 'trainable tokens of'} {source}"
        if p is None:
            loc.errors.append(f"{label}: not present in the model")
            continue
        if what == "full" and p.shape != shape_of:
            loc.errors.append(f"{label}: the adapter stores shape {shape_of}, the model has {p.shape}")
            continue
        if what == "tokens":
            t = patch.tokens[source]
            if len(p.shape) != 2 or tuple(t.values.shape[1:]) != p.shape[1:]:
                loc.errors.append(f"{label}: rows of width {tuple(t.values.shape[1:])} for a weight {p.shape}")
                continue
            if max(t.indices) >= p.shape[0]:
                loc.errors.append(f"{label}: token id {max(t.indices)} is past the model's {p.shape[0]} rows")
                continue
        try:
            placements = layout.placements(path)
        except PortllmError as exc:
            loc.errors.append(f"{label}: {exc.message}")
            continue
        if any(pl.expert is not None or pl.row0 != 0 or pl.rows != (p.shape[0] if p.shape else 1) for pl in placements):
            loc.errors.append(f"{label}: {path} is stored split across tensors; portllm only ports whole ones")
            continue
        (loc.full if what == "full" else loc.tokens)[source] = LocatedWhole(source, path, p.shape, placements)
    return loc


def _locate_lora(m: LoraModule, layout: Layout, targets: list[str], rank_pattern: dict, alpha_pattern: dict,
                 cfg: dict[str, Any]) -> Located | str:
    path = layout.module_path(m.module)
    if path is None:
        return "not present in the model"
    param = "weight"
    is_param = False
    if targets and not layout.is_identity:
        ps = layout.targeted_params(path, targets)
        if ps:
            if m.depth >= len(ps):
                return f"{m.depth + 1} nested parameter adapters, the module has {len(ps)} targeted parameters"
            param, is_param = ps[len(ps) - 1 - m.depth], True
    if m.depth and not is_param:
        return "nested parameter adapters on a module with no targeted parameter"
    pname = f"{path}.{param}"
    p = layout.params.get(pname)
    if p is None:
        if f"{m.name}.weight" in layout.params or layout.is_identity:
            return "not present in the model"
        return f"{path} has no parameter {param!r}"
    r = int(_pattern(rank_pattern, pname, cfg["r"])) if is_param else m.rank
    alpha = float(_pattern(alpha_pattern, pname, cfg["lora_alpha"])) if is_param else m.alpha
    note = None
    if not p.stored and p.why is None:
        root = layout.tied.get(pname)
        if root is None or not layout.params[root].stored:
            return "not present in the model"
        note = (f"{pname} is tied to {root}: its LoRA is merged into the shared matrix, so it changes "
                f"{root} too (as PEFT's merge_and_unload does)")
    try:
        placements = layout.placements(pname)
    except PortllmError as exc:
        return exc.message
    shape = p.shape
    transposed = m.kind == "embedding" or m.fan_in_fan_out or layout.module_types.get(path) == "Conv1D"
    if len(shape) == 3:
        if not is_param:
            return f"{pname} stacks {shape[0]} experts; the adapter treats it as one matrix"
        experts = shape[0]
        transposed = path in layout.transposed_experts
        out_dim, in_dim = (shape[2], shape[1]) if transposed else (shape[1], shape[2])
        a_shape, b_shape = tuple(m.A.shape), tuple(m.B.shape)
        if a_shape != (r * experts, in_dim) or b_shape != (out_dim, r * experts):
            return (f"factors {a_shape} / {b_shape} do not fit {pname}: {experts} experts of ({out_dim}, {in_dim}) "
                    f"at rank {r}")
        return Located(m, pname, shape, placements, experts, transposed, r, alpha, note, True)
    if len(shape) != 2:
        return f"{pname} has shape {shape}; LoRA adapts matrices"
    if tuple(m.A.shape)[0] != r:
        return f"factors have rank {tuple(m.A.shape)[0]} but the config says r={r}"
    out_dim, in_dim = int(m.B.shape[0]), int(m.A.shape[1])
    want = (in_dim, out_dim) if transposed else (out_dim, in_dim)
    if tuple(shape) != want:
        return f"patch expects weight shape {want}, the model has {tuple(shape)}"
    for pl in placements:
        if pl.expert is not None:
            return f"{pname} is stored as expert matrices"
    return Located(m, pname, shape, placements, 1, transposed, r, alpha, note, is_param)


def check_architecture(patch: Patch, config: dict[str, Any]) -> list[str]:
    fp = ((patch.manifest.get("base") or {}).get("fingerprint")) or {}
    patch_type, model_type = fp.get("model_type"), config.get("model_type")
    if patch_type and model_type and patch_type != model_type:
        return [f"architecture: patch was made for model_type {patch_type!r}, the model is {model_type!r}"]
    return []


# -- conversions against the old base --------------------------------------------------------------
def needs_old_base(patch: Patch, policy: Policy, *, manifest_norms: bool = True) -> list[str]:
    """Why this patch cannot be ported without the model it was trained on (empty: it can)."""
    why = []
    if patch.init != "plain":
        why.append(f"init_lora_weights {patch.config.get('init_lora_weights')!r} (converted against the old base)")
    if policy.whole == "delta" and (patch.full or patch.tokens):
        names = sorted(patch.full) + sorted(patch.tokens)
        why.append(f"whole tensors trained on the old base ({', '.join(names[:3])}{' ...' if len(names) > 3 else ''}) "
                   "are ported as their change from it")
    if policy.dora == "relative" and patch.is_dora and not (manifest_norms and dora_norms(patch)):
        why.append("--dora relative needs the old base's weight norms")
    return why


def require_old_base(patch: Patch, policy: Policy, old: OldBase | None, note: str | None = None,
                     hint: str | None = None) -> None:
    why = needs_old_base(patch, policy)
    if why and old is None:
        hint = hint or (BASE_HINT + (", or --modules-to-save copy to overwrite as PEFT does"
                                     if "whole tensors" in why[0] else ""))
        where = f" ({note})" if note else ""
        raise NotFoundError(f"{patch.path}: the old base model is needed{where}: {why[0]}", hint=hint)


def convert_init(patch: Patch, old: OldBase) -> Patch:
    """A PiSSA / OLoRA adapter saved unconverted, as the equivalent plain LoRA on the old base.

    PEFT's loader re-runs the initialisation on the base it is given: W_res = W - s*B0@A0 with
    B0, A0 from the SVD (PiSSA) or QR (OLoRA) of W, then adds the saved s*B@A. The fine-tune's
    change is s*(B@A - B0@A0). B0, A0 are recomputed here from the *old* base exactly as PEFT
    computes them, and stacked as PEFT's own conversion does: A' = [A; A0], B' = [B, -B0], rank
    2r, alpha doubled (times sqrt(2) with rsLoRA), so the scale s is unchanged.
    """
    import torch

    init = patch.init
    if init == "plain":
        return patch
    if patch.full or patch.tokens or patch.is_dora or patch.uses_parameters:
        raise UnsupportedError(f"{patch.path}: a {init!r} adapter with more than LoRA factors is not supported")
    modules: dict[str, LoraModule] = {}
    for name, m in patch.modules.items():
        if m.kind != "linear" or m.bias is not None:
            raise UnsupportedError(f"{patch.path}: module {name}: {init!r} on an embedding or with lora_bias")
        if init == "olora" and m.fan_in_fan_out:
            raise UnsupportedError(f"{patch.path}: module {name}: OLoRA on a fan_in_fan_out (Conv1D) weight")
        key, shape = old.param(f"{name}.weight", f"module {name}")
        W = old.ckpt.tensor(key)
        if W.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise UnsupportedError(f"module {name}: the old base stores {W.dtype}; PEFT initialises {init} on float weights")
        A0, B0 = _initial_factors(init, W, m)
        want_a, want_b = tuple(m.A.shape), tuple(m.B.shape)
        if tuple(A0.shape) != want_a or tuple(B0.shape) != want_b:
            raise IncompatibleError(f"module {name}: the old base's weight {tuple(shape)} does not fit the factors")
        A = torch.cat([m.A.to(torch.float32), A0], dim=0)
        B = torch.cat([m.B.to(torch.float32), -B0], dim=1)
        alpha = m.alpha * (math.sqrt(2) if m.use_rslora else 2)
        modules[name] = replace(m, A=A, B=B, alpha=alpha, r=2 * m.rank)
    cfg = dict(patch.config)
    cfg["init_lora_weights"] = True
    cfg["r"] = 2 * int(cfg["r"])
    factor = math.sqrt(2) if cfg.get("use_rslora") else 2
    cfg["lora_alpha"] = cfg["lora_alpha"] * factor
    cfg["rank_pattern"] = {k: 2 * v for k, v in (cfg.get("rank_pattern") or {}).items()}
    cfg["alpha_pattern"] = {k: v * factor for k, v in (cfg.get("alpha_pattern") or {}).items()}
    warnings = list(patch.warnings) + [
        f"{patch.path}: a {init!r} adapter saved unconverted: converted against the old base {old.display} "
        f"to the equivalent plain LoRA (rank {cfg['r']})"
    ]
    return replace(patch, config=cfg, modules=modules, warnings=warnings)


def _initial_factors(init: str, W: "torch.Tensor", m: LoraModule) -> tuple["torch.Tensor", "torch.Tensor"]:
    """(A0, B0) exactly as PEFT 0.21's pissa_init / olora_init compute them from the weight."""
    import torch

    r, s = m.rank, m.scale
    if init == "pissa":
        weight = W.to(torch.float32)
        if m.fan_in_fan_out:
            weight = weight.T
        V, S, Uh = torch.linalg.svd(weight.data, full_matrices=False)
        Vr, Sr, Uhr = V[:, :r], S[:r], Uh[:r]
        Sr = Sr / s
        A0 = torch.diag(torch.sqrt(Sr)) @ Uhr
        B0 = Vr @ torch.diag(torch.sqrt(Sr))
        return A0, B0
    if init == "olora":
        Q, R = torch.linalg.qr(W.to(torch.float32).data)
        return R[:r].contiguous(), Q[:, :r].contiguous()
    raise UnsupportedError(f"init_lora_weights {init!r}")


# -- DoRA norms ------------------------------------------------------------------------------------
def dora_norms(patch: Patch) -> dict[str, str]:
    doc = (patch.manifest or {}).get("dora") or {}
    norms = doc.get("base_norms") if isinstance(doc, dict) else None
    return norms if isinstance(norms, dict) else {}


def encode_norms(t: "torch.Tensor") -> str:
    import torch

    return base64.b64encode(t.to(torch.float32).contiguous().numpy().tobytes()).decode("ascii")


def decode_norms(text: str, n: int, where: str) -> "torch.Tensor":
    import torch

    try:
        raw = base64.b64decode(text.encode("ascii"), validate=True)
    except (ValueError, UnicodeEncodeError):
        raise IncompatibleError(f"{where}: the recorded DoRA base norms are not base64") from None
    if len(raw) != 4 * n:
        raise IncompatibleError(f"{where}: {len(raw) // 4} recorded DoRA base norms for {n} output features")
    t = torch.frombuffer(bytearray(raw), dtype=torch.float32).clone()
    if not bool(torch.isfinite(t).all()) or bool((t <= 0).any()):
        raise IncompatibleError(f"{where}: the recorded DoRA base norms must be finite and positive")
    return t


def feature_norms(read_rows: Callable[[int, int], "torch.Tensor"], n_rows: int, transposed: bool) -> "torch.Tensor":
    """||W|| per output feature, computed as DoraEdit computes ||W'||: rows with vector_norm,
    columns in fixed steps of NORM_ROWS rows summed in float64."""
    import torch

    from portllm_cli.core.merge import NORM_ROWS

    if not transposed:
        out = []
        for r0 in range(0, n_rows, NORM_ROWS):
            out.append(torch.linalg.vector_norm(read_rows(r0, min(n_rows, r0 + NORM_ROWS)).to(torch.float32), dim=1))
        return torch.cat(out)
    acc = None
    for r0 in range(0, n_rows, NORM_ROWS):
        block = read_rows(r0, min(n_rows, r0 + NORM_ROWS)).to(torch.float32).to(torch.float64)
        part = (block**2).sum(0)
        acc = part if acc is None else acc + part
    return acc.sqrt().to(torch.float32)


# -- the plan ----------------------------------------------------------------------------------------
@dataclass
class EditPlan:
    """Edits per stored tensor key, in the order they apply, and what the effect check found."""

    location: Location
    edits: dict[str, list[Any]]
    applied: dict[str, int]  # adapter tensor key -> stored tensors it changes
    warnings: list[str] = field(default_factory=list)

    @property
    def tensors_applied(self) -> int:
        return sum(1 for n in self.applied.values() if n > 0)

    @property
    def tensors_total(self) -> int:
        return len(self.applied)


def build_plan(
    patch: Patch,
    layout: Layout,
    *,
    policy: Policy | None = None,
    old: OldBase | None = None,
    location: Location | None = None,
) -> EditPlan:
    """The edits that carry ``patch`` onto the model described by ``layout``.

    ``patch`` must hold its factors (read_patch) and be converted already (``convert_init``).
    Raises IncompatibleError (exit 3) for a part that does not fit, lands nowhere, or a patch
    that would change nothing.
    """
    from portllm_cli.core.merge import BiasEdit, DoraEdit, LoraEdit, TokenRowsEdit, WholeTensorEdit

    policy = (policy or Policy()).check()
    if patch.init != "plain":
        raise UnsupportedError(f"{patch.path}: internal: convert_init must run before build_plan")
    loc = location or locate(patch, layout)
    if loc.errors:
        more = f" (and {len(loc.errors) - 1} more)" if len(loc.errors) > 1 else ""
        raise IncompatibleError(f"patch does not fit the model: {loc.errors[0]}{more}",
                                hint="run 'portllm diff PATCH MODEL' for the full report")
    if policy.scale != 1.0 and (patch.full or patch.tokens):
        raise UsageError("--scale multiplies low-rank factors; this patch also carries whole tensors or token rows",
                         hint="port it at --scale 1")
    edits: dict[str, list[Any]] = {}
    applied = {k: 0 for k in patch.tensor_keys()}
    warnings = list(loc.warnings)
    norms = dora_norms(patch)

    def add(key: str, edit: Any, *sources: str) -> None:
        edits.setdefault(key, []).append(edit)
        for s in sources:
            applied[s] += 1

    for name, lc in sorted(loc.lora.items()):
        m = lc.module
        a_key, b_key = peft_key(m.name, "A", m.kind), peft_key(m.name, "B", m.kind)
        for pl in lc.placements:
            sub = _sub_module(lc, pl)
            if m.magnitude is not None:
                if pl.expert is not None or pl.row0 != 0 or pl.rows != lc.shape[0]:
                    raise UnsupportedError(f"module {name}: DoRA on a weight stored in pieces")
                old_norms = None
                if policy.dora == "relative":
                    old_norms = _old_norms(name, m, lc, norms, old)
                edit = DoraEdit(sub, m.magnitude, policy.scale, old_norms)
                add(pl.key, edit, a_key, b_key, f"{PEFT_PREFIX}{m.name}.lora_magnitude_vector")
            else:
                add(pl.key, LoraEdit(sub, policy.scale), a_key, b_key)
        if name in loc.bias:
            lb = loc.bias[name]
            s = m.alpha / math.sqrt(m.rank) if m.use_rslora else m.alpha / m.rank
            for pl in lb.placements:
                add(pl.key, BiasEdit(m.bias[pl.row0 : pl.row0 + pl.rows], s * policy.scale), f"{PEFT_PREFIX}{m.name}.lora_B.bias")
    whole_owner: dict[str, str] = {}  # stored key -> the adapter tensor that sets it whole

    def claim(key: str, source: str) -> None:
        other = whole_owner.setdefault(key, source)
        if other != source:
            raise UnsupportedError(
                f"the adapter saves both {other} and {source} whole, and the model stores them as one tensor "
                f"({key}, tied): which one is meant cannot be told"
            )

    for source, lw in sorted(loc.full.items()):
        f = patch.full[source]
        reader, old_rows = _old_reader(f.name, tuple(f.tensor.shape), policy, old, f"saved tensor {source}")
        for pl in lw.placements:
            claim(pl.key, source)
            add(pl.key, WholeTensorEdit(f.tensor, reader, old_rows), f.key)
    for source, lw in sorted(loc.tokens.items()):
        t = patch.tokens[source]
        reader, old_rows = _old_reader(f"{source}.weight", (None, *tuple(t.values.shape[1:])), policy, old,
                                       f"trainable tokens of {source}")
        for pl in lw.placements:
            claim(pl.key, source)
            add(pl.key, TokenRowsEdit(tuple(t.indices), t.values, reader, old_rows), t.key)
    for key, owner in whole_owner.items():
        if len(edits[key]) > 1:
            raise UnsupportedError(
                f"{key} is saved whole by the adapter ({owner}) and changed by a LoRA too, through weights the "
                "model ties: PEFT keeps them apart in memory, a checkpoint with tied weights cannot"
            )
    unused = [k for k, n in applied.items() if n == 0]
    if unused:
        raise IncompatibleError(f"patch tensor {unused[0]} lands on no weight of the model"
                                + (f" (and {len(unused) - 1} more)" if len(unused) > 1 else ""))
    if _changes_nothing(patch):
        raise IncompatibleError(
            f"{patch.path}: the patch changes nothing: every LoRA module has an all-zero lora_A or lora_B "
            "(an adapter saved before training?)"
        )
    return EditPlan(loc, edits, applied, warnings)


def _sub_module(lc: Located, pl: Placement) -> LoraModule:
    """The LoRA factors that produce exactly the rows ``pl`` of the stored tensor."""
    m = lc.module
    A, B = m.A, m.B
    full_rows = lc.weight_shape[0]
    if lc.experts > 1 or pl.row0 != 0 or pl.rows != full_rows:  # slices need the values
        A, B = _value(A), _value(B)
    if lc.experts > 1:
        E, r = lc.experts, lc.r
        A = A.reshape(E, r, A.shape[-1])[pl.expert]
        B = B.reshape(B.shape[0], r, E)[:, :, pl.expert]
    if pl.row0 != 0 or pl.rows != full_rows:
        if lc.transposed:
            A = A[:, pl.row0 : pl.row0 + pl.rows]
        else:
            B = B[pl.row0 : pl.row0 + pl.rows]
    kind = "embedding" if m.kind == "embedding" else "linear"
    return LoraModule(m.name, A, B, lc.alpha, m.use_rslora, kind, lc.transposed and kind == "linear", r=lc.r)


def _old_norms(name: str, m: LoraModule, lc: Located, recorded: dict[str, str], old: OldBase | None) -> "torch.Tensor":
    n = int(m.magnitude.shape[0])
    if name in recorded:
        return decode_norms(recorded[name], n, f"module {name}")
    if old is None:
        raise NotFoundError(f"module {name}: --dora relative needs the old base's weight norms", hint=BASE_HINT)
    key, shape = old.param(f"{m.name}.weight", f"module {name}")
    if tuple(shape) != tuple(lc.shape):
        raise IncompatibleError(f"module {name}: the old base's weight {shape} is not the target's {lc.shape}")
    return feature_norms(old.reader(key), shape[0], lc.transposed)


def _old_reader(name: str, shape: tuple, policy: Policy, old: OldBase | None, what: str) -> tuple[Any, int]:
    if policy.whole == "copy":
        return None, 0
    if old is None:
        raise NotFoundError(f"{what}: the old base is needed to port it as a change",
                            hint=BASE_HINT + ", or --modules-to-save copy to overwrite as PEFT does")
    key, old_shape = old.param(name, what)
    if tuple(old_shape[1:]) != tuple(shape[1:]):
        raise IncompatibleError(f"{what}: the old base stores {old_shape}, the adapter {shape}")
    if shape[0] is not None and old_shape[0] > shape[0]:
        raise IncompatibleError(f"{what}: the old base has {old_shape[0]} rows, the adapter only {shape[0]}")
    return old.reader(key), int(old_shape[0]) if old_shape else 1


def _changes_nothing(patch: Patch) -> bool:
    if patch.full or patch.tokens:
        return False
    for m in patch.modules.values():
        if m.magnitude is not None:
            return False
        if m.bias is not None and bool(m.bias.any()):
            return False
        if bool(_value(m.A).any()) and bool(_value(m.B).any()):  # usually the first module says so
            return False
    return True


def _value(t: Any) -> "torch.Tensor":
    """A factor's values: a lazily read patch's FactorRef is read (and checked) here."""
    import torch

    return t.load() if isinstance(t, FactorRef) else torch.as_tensor(t)


def open_old_base(patch: Patch, spec: Any = None, *, allow_pickle: bool = False) -> OldBase | None:
    """The old base: ``spec`` (a Resolved or a path/repo id; an error when it cannot be opened),
    else the base the patch records when it is on this machine (None when it is not)."""
    from portllm_cli.io.checkpoint import Checkpoint
    from portllm_cli.resolve import Resolved, looks_like_repo_id, resolve

    if spec is not None:
        res = spec if isinstance(spec, Resolved) else resolve(str(spec), kind="model")
        return OldBase(Checkpoint.open(res.path, allow_pickle=allow_pickle), res.display)
    recorded = patch.base_model
    if not recorded:
        return None
    import os
    from pathlib import Path

    local = Path(os.path.expanduser(recorded))
    try:
        if local.is_dir():
            return OldBase(Checkpoint.open(local, allow_pickle=allow_pickle), str(local))
        if looks_like_repo_id(recorded):
            res = resolve(recorded, kind="model")
            return OldBase(Checkpoint.open(res.path, allow_pickle=allow_pickle), res.display)
    except (PortllmError, ImportError):
        return None
    return None


NO_BASE_FLAG_HINT = ("run 'portllm extract ADAPTER --base OLD_BASE --out PATCH' so that the patch records its "
                     "base, and keep that base on this machine")


def prepare_patch(
    patch: Patch, *, policy: Policy | None = None, base: Any = None, allow_pickle: bool = False,
    hint: str | None = None,
) -> tuple[Patch, OldBase | None]:
    """The patch as plain parts (PiSSA/OLoRA converted) and the old base when its port needs one:
    ``base`` (a Resolved or a spec), else the base the patch records if it is on this machine.
    Raises NotFoundError with a hint naming --base when it is needed and cannot be found."""
    policy = policy or Policy()
    old = None
    if needs_old_base(patch, policy) or base is not None:
        old = open_old_base(patch, base, allow_pickle=allow_pickle)
    require_old_base(patch, policy, old, hint=hint)
    if old is not None and patch.init != "plain":
        patch = convert_init(patch, old)
    return patch, old
