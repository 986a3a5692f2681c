"""Does a patch fit a model? The one compatibility check that port, eval and diff share."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from portllm_cli.errors import IncompatibleError
from portllm_cli.io.checkpoint import Checkpoint, text_config
from portllm_cli.patch.format import Patch


@dataclass
class CompatReport:
    compatible: bool
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    key_map: dict[str, str] = field(default_factory=dict)  # patch module -> checkpoint weight key

    def raise_if_incompatible(self, target: str = "the model") -> None:
        if not self.compatible:
            more = f" (and {len(self.errors) - 1} more)" if len(self.errors) > 1 else ""
            raise IncompatibleError(
                f"patch does not fit {target}: {self.errors[0]}{more}",
                hint="run 'portllm diff PATCH MODEL' for the full report",
            )

    def as_dict(self) -> dict[str, Any]:
        return {"compatible": self.compatible, "errors": self.errors, "warnings": self.warnings}


def weight_key_for(module: str, names: set[str]) -> str | None:
    """Map a PEFT module path to the checkpoint's weight key (exact, else a unique suffix match)."""
    key = f"{module}.weight"
    if key in names:
        return key
    parts = module.split(".")
    for i in range(1, len(parts)):
        cand = ".".join(parts[i:]) + ".weight"
        if cand in names:
            return cand
    suffix = "." + key
    hits = [n for n in names if n.endswith(suffix)]
    return hits[0] if len(hits) == 1 else None


def check_compatibility(patch: Patch, ckpt: Checkpoint) -> CompatReport:
    errors: list[str] = []
    warnings: list[str] = []
    key_map: dict[str, str] = {}
    fp = ((patch.manifest.get("base") or {}).get("fingerprint")) or {}
    model_cfg = ckpt.config
    patch_type, model_type = fp.get("model_type"), model_cfg.get("model_type")
    if patch_type and model_type and patch_type != model_type:
        errors.append(f"architecture: patch was made for model_type {patch_type!r}, the model is {model_type!r}")
    names = set(ckpt.names())
    for module in sorted(patch.modules):
        m = patch.modules[module]
        key = weight_key_for(module, names)
        if key is None:
            errors.append(f"module {module}: not present in the model")
            continue
        shape = tuple(ckpt.shape(key))
        if shape != tuple(m.weight_shape):
            errors.append(
                f"module {module}: patch expects weight shape {tuple(m.weight_shape)}, the model has {shape}"
            )
            continue
        key_map[module] = key
    p_vocab = fp.get("vocab_size")
    m_vocab = text_config(model_cfg).get("vocab_size")
    if p_vocab and m_vocab and p_vocab != m_vocab:
        msg = f"vocabulary size changed: {p_vocab} in the patch's base, {m_vocab} in the model"
        if patch.touches_embeddings():
            errors.append(msg + " (the patch adapts embeddings)")
        else:
            warnings.append(msg + "; the patch does not touch embeddings, so it still applies")
    return CompatReport(not errors, errors, warnings, key_map)
