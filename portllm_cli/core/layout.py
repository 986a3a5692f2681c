"""Where a model's parameters are stored: the one place that maps module paths to checkpoint keys.

PEFT names what an adapter changes by its path in the module tree transformers builds
(``model.language_model.layers.0.self_attn.q_proj``, ``model.layers.0.mlp.experts`` with its
``gate_up_proj`` parameter). A checkpoint stores tensors under its own names, which transformers
maps onto that tree when it loads them: GPT-2 and OPT on the Hub are stored without their
``transformer.`` / ``model.`` prefix, Gemma 3 and the llava family store
``language_model.model.*`` for ``model.language_model.*``, and Mixtral or Qwen3-MoE store one
matrix per expert (``experts.3.w1.weight``) for a stacked ``(experts, out, in)`` parameter.

``Layout.of(ckpt)`` asks transformers itself: it builds the model on the meta device (no memory,
no weights read), takes transformers' own checkpoint conversion mapping for it, and replays the
renaming its loader applies to every stored key. Each parameter of the tree then has its
*placements*: which stored tensor holds which rows of it (of which expert). Only renames and
the expert stacking ``MergeModulelist`` / ``Concatenate`` are inverted; a parameter stored through
any other conversion has no placements and the reason, so a patch on it is refused rather than
guessed.

``Layout.identity(ckpt)`` is the same answer without transformers, for a checkpoint whose stored
names are the module paths (what ``save_pretrained`` writes for most models): the plain-LoRA
fast path of ``port`` stays free of the transformers import.

``Layout.live(model)`` describes a loaded model (``eval``): every parameter is its own placement,
a stacked expert parameter one placement per expert.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from portllm_cli.errors import IncompatibleError, UnsupportedError

if TYPE_CHECKING:
    from portllm_cli.io.checkpoint import Checkpoint


@dataclass(frozen=True)
class Placement:
    """Stored tensor ``key`` holds rows [row0, row0 + rows) of a parameter (of expert ``expert``
    when the parameter stacks experts along dimension 0)."""

    key: str
    expert: int | None
    row0: int
    rows: int


@dataclass
class Param:
    name: str  # path in the module tree, e.g. model.layers.0.mlp.experts.gate_up_proj
    shape: tuple[int, ...]
    placements: list[Placement] = field(default_factory=list)
    why: str | None = None  # set when the stored layout cannot be inverted

    @property
    def stored(self) -> bool:
        return bool(self.placements) and self.why is None


@dataclass
class Layout:
    params: dict[str, Param]
    base_prefix: str = ""  # the model's base_model_prefix ("model", "transformer", ...)
    tied: dict[str, str] = field(default_factory=dict)  # parameter -> the parameter it is tied to
    module_params: dict[str, list[str]] = field(default_factory=dict)  # module -> own params, in order
    module_types: dict[str, str] = field(default_factory=dict)  # module -> class name
    transposed_experts: set[str] = field(default_factory=set)  # modules whose experts are (E, in, out)
    embeddings: set[str] = field(default_factory=set)  # modules that are nn.Embedding
    model_class: str | None = None  # the class the tree was built from; None for the identity layout
    stored_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)

    # -- building ------------------------------------------------------------------------------
    @classmethod
    def identity(cls, ckpt: "Checkpoint") -> "Layout":
        params = {}
        shapes = {}
        for k in ckpt.names():
            shape = tuple(ckpt.shape(k))
            shapes[k] = shape
            rows = shape[0] if shape else 1
            params[k] = Param(k, shape, [Placement(k, None, 0, rows)])
        return cls(params, stored_shapes=shapes)

    @classmethod
    def of(cls, ckpt: "Checkpoint") -> "Layout":
        """The layout transformers itself would use to load ``ckpt`` (see the module docstring)."""
        model = skeleton(ckpt.config, ckpt.root)
        return cls.from_model(model, {k: tuple(ckpt.shape(k)) for k in ckpt.names()})

    @classmethod
    def from_model(cls, model: Any, stored: dict[str, tuple[int, ...]]) -> "Layout":
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import (
            Concatenate,
            MergeModulelist,
            WeightConverter,
            WeightRenaming,
            dot_natural_key,
            rename_source_key,
        )

        layout = cls._tree(model)
        layout.stored_shapes = dict(stored)
        sd = {name: p.shape for name, p in layout.params.items()}
        transforms = get_model_conversion_mapping(model)
        renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
        converters = [t for t in transforms if isinstance(t, WeightConverter)]
        by_pattern = {pat: conv for conv in converters for pat in conv.source_patterns}
        prefix = model.base_model_prefix
        groups: dict[str, dict[str, list[str]]] = {}  # parameter -> source pattern -> stored keys
        for key in sorted(stored, key=dot_natural_key):  # the order transformers' loader uses
            name, pattern = rename_source_key(key, renamings, converters, prefix, sd)
            if name not in sd and key in sd:
                name, pattern = rename_source_key(key, [], [], prefix, sd)
            if name not in sd:
                continue  # a buffer, or something this model does not use
            param = layout.params[name]
            if pattern is None:
                shape = stored[key]
                if shape != param.shape:
                    param.why = f"stored as {key} with shape {shape}, not {param.shape}"
                param.placements.append(Placement(key, None, 0, shape[0] if shape else 1))
            else:
                groups.setdefault(name, {}).setdefault(pattern, []).append(key)
        for name, by_source in groups.items():
            param = layout.params[name]
            conv = by_pattern[next(iter(by_source))]
            ops = [type(op) for op in getattr(conv, "operations", [])]
            stacked = ops in ([MergeModulelist], [MergeModulelist, Concatenate])
            if stacked and ops[0] is MergeModulelist and conv.operations[0].dim != 0:
                stacked = False
            if stacked and len(ops) == 2 and conv.operations[1].dim != 1:
                stacked = False
            if not stacked or len(param.shape) != 3:
                param.why = (
                    f"stored through transformers' conversion {[op.__name__ for op in ops]}, "
                    "which portllm does not invert"
                )
                continue
            experts, rows, cols = param.shape
            lists = [by_source.get(p, []) for p in conv.source_patterns]
            if any(len(keys) != experts for keys in lists):
                param.why = f"stored as {sum(map(len, lists))} expert matrices, not {experts} per source"
                continue
            for e in range(experts):
                row0 = 0
                for keys in lists:
                    shape = stored[keys[e]]
                    if len(shape) != 2 or shape[1] != cols:
                        param.why = f"expert matrix {keys[e]} has shape {shape}, not (_, {cols})"
                        break
                    param.placements.append(Placement(keys[e], e, row0, shape[0]))
                    row0 += shape[0]
                if param.why is None and row0 != rows:
                    param.why = f"the expert matrices of expert {e} hold {row0} rows, not {rows}"
        layout.model_class = type(model).__name__
        return layout

    @classmethod
    def live(cls, model: Any) -> "Layout":
        """A loaded model: each parameter is stored as itself (expert e of a stacked one as
        ``name[e]``); a parameter sharing memory with another (tied) is stored once."""
        layout = cls._tree(model)
        canonical = {id(t): name for name, t in model.named_parameters()}
        layout.tied = {}
        for name, t in model.state_dict(keep_vars=True).items():
            owner = canonical.get(id(t))
            p = layout.params[name]
            if owner is not None and owner != name:
                layout.tied[name] = owner  # memory shared: the edit reaches it through the owner
            elif len(p.shape) == 3:  # stacked experts: PEFT adapts each (out, in) matrix
                p.placements = [Placement(f"{name}[{e}]", e, 0, p.shape[1]) for e in range(p.shape[0])]
            else:
                p.placements = [Placement(name, None, 0, p.shape[0] if p.shape else 1)]
        layout.model_class = type(model).__name__
        return layout

    @classmethod
    def _tree(cls, model: Any) -> "Layout":
        import torch

        params = {name: Param(name, tuple(t.shape)) for name, t in model.state_dict(keep_vars=True).items()}
        module_params: dict[str, list[str]] = {}
        module_types: dict[str, str] = {}
        transposed: set[str] = set()
        embeddings: set[str] = set()
        for mname, mod in model.named_modules():
            module_types[mname] = type(mod).__name__
            own = [n for n, _ in mod.named_parameters(recurse=False)]
            if own:
                module_params[mname] = own
            if getattr(mod, "is_transposed", False):
                transposed.add(mname)
            if isinstance(mod, torch.nn.Embedding):
                embeddings.add(mname)
        tied = dict(getattr(model, "all_tied_weights_keys", None) or {})
        return cls(
            params,
            base_prefix=getattr(model, "base_model_prefix", "") or "",
            tied={k: v for k, v in tied.items() if k in params and v in params},
            module_params=module_params,
            module_types=module_types,
            transposed_experts=transposed,
            embeddings=embeddings,
        )

    # -- questions -----------------------------------------------------------------------------
    @property
    def is_identity(self) -> bool:
        return self.model_class is None

    def module_path(self, path: str) -> str | None:
        """The tree path of a module (or parameter) an adapter names: as is, or with the model's
        base prefix added (an adapter trained on the base model class, e.g. AutoModel)."""
        known = set(self.module_types) | set(self.params)
        if self.is_identity:
            return path if any(n == path or n.startswith(path + ".") for n in self.params) else None
        if path in known:
            return path
        if self.base_prefix and f"{self.base_prefix}.{path}" in known:
            return f"{self.base_prefix}.{path}"
        return None

    def tie_group(self, name: str) -> list[str]:
        """The parameters that share storage with ``name`` in the loaded model (itself first)."""
        root = self.tied.get(name, name)
        group = [root] + sorted(k for k, v in self.tied.items() if v == root)
        return [name] + [g for g in group if g != name]

    def placements(self, name: str) -> list[Placement]:
        """Every stored copy of a parameter: its own placements and those of tied parameters, one
        per stored tensor. Raises when the parameter is not stored in a form portllm can change."""
        param = self.params[name]
        if param.why is not None:
            raise UnsupportedError(f"parameter {name}: {param.why}")
        out: list[Placement] = []
        seen: set[str] = set()
        for member in self.tie_group(name):
            p = self.params.get(member)
            if p is None or p.why is not None:
                continue
            for pl in p.placements:
                if pl.key not in seen:
                    seen.add(pl.key)
                    out.append(pl)
        if not out:
            raise IncompatibleError(f"parameter {name}: not stored in the checkpoint")
        return out

    def targeted_params(self, module: str, target_parameters: list[str]) -> list[str]:
        """The parameters of ``module`` that PEFT's target_parameters select, in registration order
        (the order PEFT nests its ParamWrappers: the first is the innermost)."""
        out = []
        for p in self.module_params.get(module, []):
            key = f"{module}.{p}"
            if key in target_parameters or any(key.endswith("." + t) for t in target_parameters):
                out.append(p)
        return out


def skeleton(config: dict[str, Any], root: Any = None, model_class: str | None = None) -> Any:
    """The model transformers builds for this config, on the meta device: module paths, parameter
    shapes, tying and conversion mapping, without memory or weights. Never runs remote code."""
    import torch
    import transformers

    try:
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING

        cfg = CONFIG_MAPPING[config.get("model_type")].from_dict(dict(config))
    except Exception as exc:  # unknown model_type, remote-code config ...
        raise UnsupportedError(
            f"transformers {transformers.__version__} cannot build model_type {config.get('model_type')!r} "
            f"({exc.__class__.__name__}): portllm cannot tell how its weights are stored"
        ) from None
    name = model_class or next(iter(config.get("architectures") or []), None)
    cls = getattr(transformers, name, None) if name else None
    try:
        with torch.device("meta"):
            if cls is not None and hasattr(cls, "_from_config"):
                return cls._from_config(cfg)
            return transformers.AutoModelForCausalLM.from_config(cfg)
    except Exception as exc:
        raise UnsupportedError(
            f"transformers cannot build {name or config.get('model_type')!r} from its config "
            f"({exc.__class__.__name__}: {str(exc)[:120]})"
        ) from None
