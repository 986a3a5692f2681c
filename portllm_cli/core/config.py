"""The settings of `portllm finetune`, `portllm eval` and `portllm port`, each written once.

A frozen dataclass per command, as lm-eval's ``EvaluatorConfig``: every setting is a field with its
default here; the command line builds the object once from its options (``from_options`` picks
them by name) and passes it down; the core reads it, checks it (``validate``) and records it. The
command modules import this file at start-up for the defaults of their options, so it imports
nothing heavy.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Mapping, TypeVar

from portllm_cli.errors import UsageError

C = TypeVar("C", bound="_Config")


def _plain(value: Any) -> Any:
    return value.value if isinstance(value, Enum) else value


class _Config:
    """What both configs share: construction from a command's options, and from overrides."""

    @classmethod
    def field_names(cls) -> set[str]:
        return {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]

    @classmethod
    def from_options(cls: type[C], options: Mapping[str, Any]) -> C:
        """The config from a command's options, matched by name (others are ignored); enum choices
        become their values. Each config's ``_normalize`` turns option spellings into field types."""
        names = cls.field_names()
        kwargs = {k: _plain(v) for k, v in options.items() if k in names}
        return cls(**cls._normalize(kwargs))  # type: ignore[call-arg]

    @classmethod
    def _normalize(cls, kwargs: dict[str, Any]) -> dict[str, Any]:
        return kwargs

    @classmethod
    def build(cls: type[C], config: C | None, overrides: Mapping[str, Any]) -> C:
        """``config`` (or the defaults) with ``overrides`` applied, checked: the Python API's way in."""
        unknown = sorted(set(overrides) - cls.field_names())
        if unknown:
            raise TypeError(f"unknown {cls.__name__} settings: {', '.join(unknown)}")
        base = config if config is not None else cls()
        out = dataclasses.replace(base, **{k: _plain(v) for k, v in overrides.items()})  # type: ignore[type-var]
        out.validate()
        return out

    def validate(self) -> None:
        raise NotImplementedError


@dataclass(frozen=True)
class FinetuneConfig(_Config):
    """Everything `portllm finetune` trains with (paper defaults: rank 8, alpha 16, lr 1e-4, 10 epochs)."""

    # the data
    data: Path | None = None  # a local file; None reads the task's Hub dataset
    text_field: str | None = None
    label_field: str | None = None
    label_map: Mapping[str, str] | None = None
    max_length: int = 256  # tokens per sequence (prompts are cut from the left; text chunk length)
    # what is trained
    rank: int = 8
    alpha: float = 16
    dropout: float = 0.1
    use_dora: bool = False  # DoRA (PEFT's use_dora): a magnitude per output feature on top of the LoRA
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")  # or ("all-linear",)
    full: bool = False  # every weight, and a model directory instead of a patch
    # the optimizer and its schedule
    lr: float = 1e-4
    epochs: int = 10
    max_steps: int | None = None  # overrides epochs
    batch_size: int = 4
    grad_accum: int = 1
    warmup_steps: int = 0
    weight_decay: float = 0.0
    seed: int = 1234
    gradient_checkpointing: bool = False
    # where and how it runs
    dtype: str = "auto"
    device: str = "auto"
    save_every: int | None = None
    resume: bool = False
    keep_checkpoints: bool = False
    overwrite: bool = False
    trust_remote_code: bool = False
    revision: str | None = None

    @classmethod
    def _normalize(cls, kwargs: dict[str, Any]) -> dict[str, Any]:
        if isinstance(kwargs.get("target_modules"), str):
            kwargs["target_modules"] = tuple(t.strip() for t in kwargs["target_modules"].split(",") if t.strip())
        if isinstance(kwargs.get("label_map"), str):
            from portllm_cli.core.tasks import parse_label_map

            kwargs["label_map"] = parse_label_map(kwargs["label_map"])
        return kwargs

    def validate(self) -> None:
        checks = [
            (self.rank >= 1, f"--rank must be at least 1, got {self.rank}"),
            (self.alpha > 0, f"--alpha must be positive, got {self.alpha}"),
            (0.0 <= self.dropout < 1.0, f"--dropout must be in [0, 1), got {self.dropout}"),
            (self.lr > 0 and math.isfinite(self.lr), f"--lr must be positive, got {self.lr}"),
            (self.epochs >= 1, f"--epochs must be at least 1, got {self.epochs}"),
            (self.max_steps is None or self.max_steps >= 1, f"--max-steps must be at least 1, got {self.max_steps}"),
            (self.batch_size >= 1, f"--batch-size must be at least 1, got {self.batch_size}"),
            (self.grad_accum >= 1, f"--grad-accum must be at least 1, got {self.grad_accum}"),
            (self.max_length >= 2, f"--max-length must be at least 2, got {self.max_length}"),
            (self.save_every is None or self.save_every >= 1, f"--save-every must be at least 1, got {self.save_every}"),
            (self.warmup_steps >= 0, f"--warmup-steps must not be negative, got {self.warmup_steps}"),
        ]
        for ok, msg in checks:
            if not ok:
                raise UsageError(msg)
        if self.use_dora and self.full:
            raise UsageError("--use-dora trains a DoRA patch; --full trains every weight", hint="give one of them")


@dataclass(frozen=True)
class EvalConfig(_Config):
    """How `portllm eval` scores: the data, the harness settings, where it runs and what it keeps."""

    data: Mapping[str, Path] = field(default_factory=dict)  # task -> local file (--data TASK=PATH)
    data_dir: Path | None = None  # --data DIR: files named by task
    limit: int | None = None
    num_fewshot: int | None = None
    batch_size: int | str = 8  # or "auto"
    device: str = "auto"
    dtype: str = "auto"
    only: tuple[str, ...] | None = None  # configuration names, MODEL or MODEL+PATCH
    log_samples_dir: Path | None = None
    overwrite: bool = False
    allow_pickle: bool = False
    trust_remote_code: bool = False

    @classmethod
    def _normalize(cls, kwargs: dict[str, Any]) -> dict[str, Any]:
        if kwargs.get("only") is not None:
            kwargs["only"] = tuple(kwargs["only"]) or None
        return kwargs

    @property
    def batch(self) -> int | str:
        """The batch size lm-eval gets: a positive integer or "auto"."""
        value = self.batch_size
        if isinstance(value, int) and not isinstance(value, bool):
            n = value
        elif str(value).strip().lower() == "auto":
            return "auto"
        else:
            try:
                n = int(str(value))
            except ValueError:
                raise UsageError(f"--batch-size must be a positive integer or 'auto', got {value!r}") from None
        if n < 1:
            raise UsageError(f"--batch-size must be at least 1, got {n}")
        return n

    def validate(self) -> None:
        limit, shots = self.limit, self.num_fewshot
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
            raise UsageError(f"--limit must be a positive number of examples, got {limit!r}")
        if shots is not None and (isinstance(shots, bool) or not isinstance(shots, int) or shots < 0):
            raise UsageError(f"--num-fewshot must be 0 or more, got {shots!r}")
        self.batch  # noqa: B018  (raises on a bad --batch-size)


# float32 bytes of one merge block in a port: small enough that the block, its delta and its stored
# rows stay in the CPU's caches between the read, the arithmetic and the write (torch's operations:
# at 4 MiB they leave it), large enough that each pread and pwrite moves a megabyte
# or more. The fused kernel, which holds no float32 block, takes FUSED_BLOCKS times as many rows
# (core.port). The bits do not depend on either (core.merge).
PORT_BLOCK_BYTES = 1 << 20
DORA_POLICIES = ("absolute", "relative")
WHOLE_POLICIES = ("delta", "copy")


def check_scale(scale: Any) -> float:
    """--scale multiplies the patch's own alpha/r: finite and non-zero; negative subtracts it."""
    if not isinstance(scale, (int, float)) or isinstance(scale, bool) or not math.isfinite(scale):
        raise UsageError(f"--scale must be a finite number, got {scale!r}")
    if scale == 0:
        raise UsageError("--scale 0 would write the target unchanged", hint="use a non-zero --scale, or copy the model")
    return float(scale)


@dataclass(frozen=True)
class PortConfig(_Config):
    """How `portllm port` writes (merged, adapter, GGUF): what is merged and how, and the checks."""

    scale: float = 1.0  # on top of each module's alpha/r (--scale, or the calibrated value)
    dora: str = "absolute"  # --dora: the trained magnitudes (PEFT), or rescaled by ||W_new|| / ||W_old||
    modules_to_save: str = "delta"  # whole tensors: new + (saved - old base), or PEFT's copy
    base: Any = None  # the old base (a resolved model), when given with --base
    overwrite: bool = False
    verify: bool = False  # reread and check every written byte
    verify_patch: bool = True  # the patch's sha256 against its manifest (--no-verify turns it off)
    allow_pickle: bool = False
    patch_source: Any = None  # where the patch came from (a resolved spec), for the records
    calibration: Mapping[str, Any] | None = None  # core.calibrate's record of how `scale` was chosen
    block_bytes: int = PORT_BLOCK_BYTES

    def validate(self) -> None:
        check_scale(self.scale)
        if self.dora not in DORA_POLICIES:
            raise UsageError(f"--dora must be one of {', '.join(DORA_POLICIES)}, got {self.dora!r}")
        if self.modules_to_save not in WHOLE_POLICIES:
            raise UsageError(f"--modules-to-save must be one of {', '.join(WHOLE_POLICIES)}, got {self.modules_to_save!r}")
        if not isinstance(self.block_bytes, int) or self.block_bytes < 1:
            raise UsageError(f"block_bytes must be a positive integer, got {self.block_bytes!r}")
