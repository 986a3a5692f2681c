"""Does a patch fit a model? The one compatibility check that port, eval, extract and diff share.

Where each part of the patch lands is ``core.plan.locate`` over the model's ``core.layout``;
this adds the architecture and vocabulary checks and reports every mismatch as one line.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from portllm_cli.errors import IncompatibleError
from portllm_cli.io.checkpoint import Checkpoint, text_config
from portllm_cli.patch.format import Patch

if TYPE_CHECKING:
    from portllm_cli.core.layout import Layout
    from portllm_cli.core.plan import Location


@dataclass
class CompatReport:
    compatible: bool
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    key_map: dict[str, str] = field(default_factory=dict)  # patch module -> checkpoint weight key
    location: "Location | None" = None

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
    """Map a PEFT module path to the checkpoint's weight key (exact, else a unique suffix match).

    Only for comparing two checkpoints of one family (diff's base drift); what a patch changes is
    located by ``core.plan.locate``."""
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


def check_compatibility(patch: Patch, ckpt: Checkpoint, layout: "Layout | None" = None) -> CompatReport:
    from portllm_cli.core.plan import check_architecture, locate, target_layout

    errors: list[str] = check_architecture(patch, ckpt.config)
    layout = layout or target_layout(patch, ckpt)
    loc = locate(patch, layout)
    errors += loc.errors
    warnings = list(loc.warnings)
    check_vocabulary(patch, text_config(ckpt.config).get("vocab_size"), errors, warnings)
    return CompatReport(not errors, errors, warnings, loc.key_map, loc)


def check_vocabulary(patch: Patch, model_vocab: int | None, errors: list[str], warnings: list[str]) -> None:
    """A vocabulary that changed since the patch's base: an error when the patch adapts embeddings,
    else a warning (the rule every target, safetensors or GGUF, is checked by)."""
    fp = ((patch.manifest.get("base") or {}).get("fingerprint")) or {}
    p_vocab = fp.get("vocab_size")
    if p_vocab and model_vocab and p_vocab != model_vocab:
        msg = f"vocabulary size changed: {p_vocab} in the patch's base, {model_vocab} in the model"
        if patch.touches_embeddings():
            errors.append(msg + " (the patch adapts embeddings)")
        else:
            warnings.append(msg + "; the patch does not touch embeddings, so it still applies")
