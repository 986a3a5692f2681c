"""Carry a patch onto an evolved model: merged weights (W + scale*B@A) or a retargeted adapter.

Merged output keeps the target's layout byte for byte. A safetensors shard that no patch
module touches is copied in the kernel (``copy_file_range``: no user-space memory). A shard
that holds targeted weights is copied the same way range by range, and each targeted tensor
is read from the *source*, merged in float32 and written at its original offset. The header
does not change (same names, dtypes, shapes, offsets), so the shard layout, the index, the
metadata and every untargeted byte are identical to the target's. Peak memory is the
interpreter plus the patch plus one targeted tensor in float32, whatever the model's size.

The merge is ``(W.float() + delta).to(W.dtype)`` with ``delta = scale * B @ A`` in float32:
one rounding to the target's dtype. PEFT's ``merge_and_unload`` on a bfloat16 model can
round twice (delta to bf16, then the sum); see the README for why ours is the closer one.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from portllm_cli import __version__
from portllm_cli.core.compat import CompatReport, check_compatibility
from portllm_cli.core.progress import ProgressFn, no_progress
from portllm_cli.errors import IntegrityError, UnsupportedError, UsageError
from portllm_cli.io.atomic import atomic_output_dir, copy_file
from portllm_cli.io.checkpoint import SAFE_INDEX, SAFE_SINGLE, Checkpoint
from portllm_cli.io.safetensors import (
    SafetensorsWriter,
    TensorInfo,
    read_header,
    read_tensor,
    tensor_bytes,
)
from portllm_cli.patch.format import (
    ADAPTER_WEIGHTS,
    LoraModule,
    Patch,
    build_manifest,
    now_iso,
    patch_tensors,
    peft_key,
    sha256_file,
    write_patch_files,
)
from portllm_cli.resolve import Resolved, model_record

if TYPE_CHECKING:
    import torch

PORT_RECORD = "portllm_port.json"
MERGEABLE_DTYPES = ("F32", "F16", "BF16", "F64")
COPY_STEP = 256 << 20  # bytes copied between two progress ticks
COMPARE_STEP = 16 << 20


@dataclass
class PortResult:
    out: Path
    mode: str  # "merged" or "adapter"
    patch: str
    target: str
    modules_merged: int
    bytes_written: int
    seconds: float
    scale: float
    verified: bool = False
    warnings: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "out": str(self.out),
            "mode": self.mode,
            "patch": self.patch,
            "target": self.target,
            "modules_merged": self.modules_merged,
            "bytes_written": self.bytes_written,
            "seconds": round(self.seconds, 3),
            "scale": self.scale,
            "verified": self.verified,
            "warnings": list(self.warnings),
        }


# -- the merge itself ------------------------------------------------------------------------
def merge_weight(W: "torch.Tensor", module: LoraModule, scale: float = 1.0) -> "torch.Tensor":
    """W + scale * module.scale * B @ A, accumulated in float32 and rounded once to W's dtype."""
    return (W.float() + module.delta(extra_scale=scale)).to(W.dtype)


def merge_into_state_dict(
    patch: Patch, state_dict: dict[str, "torch.Tensor"], key_map: dict[str, str], scale: float = 1.0
) -> list[str]:
    """Merge a patch into an in-memory state dict (in place); returns the keys changed.

    ``key_map`` maps patch module -> state-dict key (``CompatReport.key_map``). For evaluating a
    patched model without writing it to disk.
    """
    import torch

    changed = []
    with torch.no_grad():
        for module, key in key_map.items():
            W = state_dict[key]
            W.copy_(merge_weight(W, patch.modules[module], scale))  # in place: tied views follow
            changed.append(key)
    return changed


def check_scale(scale: float) -> float:
    """--scale multiplies the patch's own alpha/r: finite and non-zero; negative subtracts it."""
    if not isinstance(scale, (int, float)) or isinstance(scale, bool) or not math.isfinite(scale):
        raise UsageError(f"--scale must be a finite number, got {scale!r}")
    if scale == 0:
        raise UsageError("--scale 0 would write the target unchanged", hint="use a non-zero --scale, or copy the model")
    return float(scale)


# -- checks before anything is written -------------------------------------------------------
@dataclass
class PortPlan:
    ckpt: Checkpoint
    report: CompatReport
    key_map: dict[str, str]  # patch module -> checkpoint weight key
    warnings: list[str]

    def module_shapes(self) -> dict[str, list[int]]:
        return {m: list(self.ckpt.shape(k)) for m, k in sorted(self.key_map.items())}


def plan_port(patch: Patch, target: Resolved, *, allow_pickle: bool = False, merging: bool = True) -> PortPlan:
    """Open the target and check the patch against it; raises IncompatibleError (exit 3)."""
    ckpt = Checkpoint.open(target.path, allow_pickle=allow_pickle)
    report = check_compatibility(patch, ckpt)
    report.raise_if_incompatible(target.display)
    if merging:
        for module, key in sorted(report.key_map.items()):
            dt = ckpt.dtype(key)
            if dt not in MERGEABLE_DTYPES:
                raise UnsupportedError(
                    f"{target.display}: weight {key} is stored as {dt}; portllm merges into float weights "
                    f"({', '.join(MERGEABLE_DTYPES)}) only",
                    hint="use --as-adapter to serve the patch on top of a quantized model",
                )
    warnings = list(patch.warnings) + list(report.warnings)
    return PortPlan(ckpt, report, dict(report.key_map), warnings)


def _patch_sha256(patch: Patch) -> str:
    tensors = (patch.manifest or {}).get("tensors") or {}
    return tensors.get("sha256") or sha256_file(patch.path / ADAPTER_WEIGHTS)


def _patch_record_id(patch: Patch, res: Resolved | None) -> str:
    return res.record_id if res is not None else str(patch.path.resolve())


# -- low-level byte moving -------------------------------------------------------------------
def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    view = memoryview(data).cast("B")
    done = 0
    while done < len(view):
        n = os.pwrite(fd, view[done:], offset + done)
        if n <= 0:
            raise OSError(f"short write at offset {offset + done}")
        done += n


def _copy_span(src_fd: int, dst_fd: int, begin: int, end: int, tick: Callable[[int], None]) -> None:
    from portllm_cli.io.safetensors import copy_range

    pos = begin
    while pos < end:
        n = min(COPY_STEP, end - pos)
        copy_range(src_fd, dst_fd, pos, n)
        pos += n
        tick(n)


def _same_bytes(a_fd: int, b_fd: int, begin: int, end: int) -> int | None:
    """First differing offset in [begin, end) of two files, or None when equal."""
    pos = begin
    while pos < end:
        n = min(COMPARE_STEP, end - pos)
        x, y = os.pread(a_fd, n, pos), os.pread(b_fd, n, pos)
        if x != y:
            if len(x) != len(y):
                return pos + min(len(x), len(y))
            return pos + next(i for i in range(len(x)) if x[i] != y[i])
        pos += n
    return None


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _BackgroundSync:
    """fsync finished shards in a thread while the next one is written (fsync releases the GIL),
    so the output is on disk before it is renamed into place without serialising the writeback."""

    def __init__(self) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="portllm-fsync")
        self._futures: list = []

    def submit(self, path: Path) -> None:
        self._futures.append(self._pool.submit(_fsync_path, path))

    def wait(self) -> None:
        try:
            for f in self._futures:
                f.result()
        finally:
            self._pool.shutdown(wait=True)


# -- merged output ----------------------------------------------------------------------------
def _targets_by_file(plan: PortPlan, patch: Patch) -> dict[Path, list[tuple[str, LoraModule]]]:
    by_file: dict[Path, list[tuple[str, LoraModule]]] = {}
    for module, key in plan.key_map.items():
        f, _ = plan.ckpt.locations[key]
        by_file.setdefault(f, []).append((key, patch.modules[module]))
    return by_file


def _port_safetensors_shard(
    src: Path, dst: Path, targets: list[tuple[TensorInfo, LoraModule]], scale: float, tick: Callable[[int], None]
) -> None:
    size = src.stat().st_size
    with open(src, "rb", buffering=0) as fs, open(dst, "wb", buffering=0) as fd:
        cursor = 0
        for info, module in sorted(targets, key=lambda t: t[0].begin):
            _copy_span(fs.fileno(), fd.fileno(), cursor, info.begin, tick)
            merged = merge_weight(read_tensor(src, info), module, scale)
            _pwrite_all(fd.fileno(), tensor_bytes(merged), info.begin)
            del merged
            tick(info.nbytes)
            cursor = info.end
        _copy_span(fs.fileno(), fd.fileno(), cursor, size, tick)
        os.ftruncate(fd.fileno(), size)  # a zero-length tail range still leaves the file whole


def _verify_safetensors_shard(
    src: Path, dst: Path, targets: list[tuple[TensorInfo, LoraModule]], scale: float
) -> None:
    """Every untargeted byte equals the source; every targeted tensor equals the recomputed merge."""
    if dst.stat().st_size != src.stat().st_size:
        raise IntegrityError(f"{dst.name}: size {dst.stat().st_size} differs from the target's {src.stat().st_size}")
    size = src.stat().st_size
    with open(src, "rb", buffering=0) as fs, open(dst, "rb", buffering=0) as fd:
        cursor = 0
        for info, module in sorted(targets, key=lambda t: t[0].begin) + [(None, None)]:
            end = info.begin if info is not None else size
            bad = _same_bytes(fs.fileno(), fd.fileno(), cursor, end)
            if bad is not None:
                raise IntegrityError(f"{dst.name}: byte {bad} differs from the target, outside any patched tensor")
            if info is None:
                break
            expected = tensor_bytes(merge_weight(read_tensor(src, info), module, scale))
            got = os.pread(fd.fileno(), info.nbytes, info.begin)
            if got != expected.tobytes():
                raise IntegrityError(
                    f"{dst.name}: tensor {info.name} does not equal base + scale*B@A after writing"
                )
            cursor = info.end


def _port_pickle(
    plan: PortPlan, patch: Patch, tmp: Path, scale: float, verify: bool, tick: Callable[[int], None]
) -> tuple[list[str], int]:
    """Pickle targets (--allow-pickle): write safetensors shards, one per input file, plus an index."""
    import torch

    ckpt = plan.ckpt
    by_key = {key: patch.modules[m] for m, key in plan.key_map.items()}
    files = list(ckpt.iter_file_order())
    n = len(files)
    weight_map: dict[str, str] = {}
    written = 0
    total_size = 0
    out_names = []
    for i, (_, names) in enumerate(files, start=1):
        name = SAFE_SINGLE if n == 1 else f"model-{i:05d}-of-{n:05d}.safetensors"
        out_names.append(name)
        specs = [(k, ckpt.dtype(k), tuple(ckpt.shape(k))) for k in names]
        with SafetensorsWriter(tmp / name, specs, {"format": "pt"}) as w:
            for k in names:
                t = ckpt.tensor(k)
                if k in by_key:
                    t = merge_weight(t, by_key[k], scale)
                w.write(k, t.contiguous())
                nbytes = t.numel() * t.element_size()
                total_size += nbytes
                tick(nbytes)
                weight_map[k] = name
        written += (tmp / name).stat().st_size
        if verify:
            header = read_header(tmp / name)
            for k in names:
                src = ckpt.tensor(k)
                expected = merge_weight(src, by_key[k], scale) if k in by_key else src
                got = read_tensor(tmp / name, header.tensors[k])
                if not torch.equal(got.view(torch.uint8) if got.numel() else got,
                                   expected.contiguous().view(torch.uint8) if expected.numel() else expected):
                    raise IntegrityError(f"{name}: tensor {k} differs from what was computed")
    if n > 1:
        index = {"metadata": {"total_size": total_size}, "weight_map": weight_map}
        (tmp / SAFE_INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return out_names, written


def port_merged(
    patch: Patch,
    target: Resolved,
    out: Path,
    *,
    scale: float = 1.0,
    overwrite: bool = False,
    verify: bool = False,
    allow_pickle: bool = False,
    progress: ProgressFn | None = None,
    patch_source: Resolved | None = None,
) -> PortResult:
    """Write TARGET with PATCH merged into OUT; see the module docstring for how."""
    t0 = time.monotonic()
    scale = check_scale(scale)
    progress = progress or no_progress
    plan = plan_port(patch, target, allow_pickle=allow_pickle, merging=True)
    ckpt = plan.ckpt
    out = Path(out)
    total = ckpt.total_bytes()
    done = 0

    def tick(n: int) -> None:
        nonlocal done
        done += n
        progress("port", done, total)

    progress("port", 0, total)
    by_file = _targets_by_file(plan, patch)
    with atomic_output_dir(out, overwrite=overwrite, inputs=(target.path, patch.path)) as tmp:
        if ckpt.is_pickle:
            shard_names, written = _port_pickle(plan, patch, tmp, scale, verify, tick)
        else:
            shard_names, written = [], 0
            syncer = _BackgroundSync()
            try:
                for f in ckpt.files:
                    header = ckpt.headers[f]
                    targets = [(header.tensors[k], m) for k, m in by_file.get(f, [])]
                    _port_safetensors_shard(f, tmp / f.name, targets, scale, tick)
                    syncer.submit(tmp / f.name)
                    shard_names.append(f.name)
                    written += f.stat().st_size
            finally:
                syncer.wait()
            if ckpt.index_file is not None:
                copy_file(ckpt.index_file, tmp / ckpt.index_file.name)
                written += ckpt.index_file.stat().st_size
        for side in ckpt.side_files():
            copy_file(side, tmp / side.name)
            written += side.stat().st_size
        record = {
            "format": "portllm-port",
            "format_version": 1,
            "portllm_version": __version__,
            "created": now_iso(),
            "mode": "merged",
            "scale": scale,
            "patch": {
                "source": _patch_record_id(patch, patch_source),
                "sha256": _patch_sha256(patch),
                "base": (patch.manifest or {}).get("base") or {"model": patch.base_model},
                "lora": (patch.manifest or {}).get("lora")
                or {"r": patch.rank, "lora_alpha": patch.alpha, "use_rslora": bool(patch.config.get("use_rslora"))},
            },
            # Hashing a large target would cost as much as the port itself; the fingerprint and
            # the shard names identify it, and the output's own files are what users keep.
            "target": model_record(target, ckpt, plan.module_shapes(), hash_weights=False),
            "merged_modules": {m: plan.key_map[m] for m in sorted(plan.key_map)},
            "shards": shard_names,
            "converted_from_pickle": ckpt.is_pickle,
        }
        (tmp / PORT_RECORD).write_text(json.dumps(record, indent=2) + "\n")
        written += (tmp / PORT_RECORD).stat().st_size
        if verify and not ckpt.is_pickle:
            for f in ckpt.files:
                header = ckpt.headers[f]
                targets = [(header.tensors[k], m) for k, m in by_file.get(f, [])]
                _verify_safetensors_shard(f, tmp / f.name, targets, scale)
                progress("verify", ckpt.files.index(f) + 1, len(ckpt.files))
    return PortResult(
        out=out,
        mode="merged",
        patch=patch_source.display if patch_source else str(patch.path),
        target=target.display,
        modules_merged=len(plan.key_map),
        bytes_written=written,
        seconds=time.monotonic() - t0,
        scale=scale,
        verified=verify,
        warnings=plan.warnings,
    )


# -- adapter output ---------------------------------------------------------------------------
def port_adapter(
    patch: Patch,
    target: Resolved,
    out: Path,
    *,
    scale: float = 1.0,
    overwrite: bool = False,
    verify: bool = False,
    allow_pickle: bool = False,
    progress: ProgressFn | None = None,
    patch_source: Resolved | None = None,
) -> PortResult:
    """Write PATCH retargeted to TARGET: same factors (B times --scale), new base and target record."""
    import torch

    t0 = time.monotonic()
    scale = check_scale(scale)
    progress = progress or no_progress
    plan = plan_port(patch, target, allow_pickle=allow_pickle, merging=False)
    out = Path(out)
    progress("adapter", 0, 3)
    # PEFT names modules by their path in the model, which is the checkpoint key without ".weight".
    modules = {}
    for name, m in patch.modules.items():
        key = plan.key_map[name]
        new_name = key[: -len(".weight")] if key.endswith(".weight") else name
        modules[new_name] = dataclasses.replace(m, name=new_name)
    tensors = patch_tensors(modules, b_scale=scale)
    config = dict(patch.config)
    config["base_model_name_or_path"] = target.record_id
    config["inference_mode"] = True
    old = dict(patch.manifest or {})
    old_sha = _patch_sha256(patch)
    target_rec = model_record(target, plan.ckpt, plan.module_shapes(), hash_weights=not plan.ckpt.is_pickle)
    progress("adapter", 1, 3)
    port_entry = {
        "from_patch_sha256": old_sha,
        "from_base": (old.get("target") or old.get("base") or {}).get("model") or patch.base_model,
        "to": target.record_id,
        "revision": target.revision,
        "scale": scale,
        "portllm_version": __version__,
        "created": now_iso(),
    }
    if old:
        manifest = dict(old)
        manifest["portllm_version"] = __version__
    else:
        manifest = build_manifest(
            base={"model": patch.base_model, "revision": None, "content_hash": None, "fingerprint": None},
            lora={
                "r": patch.rank,
                "lora_alpha": patch.alpha,
                "target_modules": config.get("target_modules"),
                "use_rslora": bool(config.get("use_rslora")),
            },
            source={"kind": "peft-adapter", "path": str(patch.path.resolve())},
        )
    manifest["target"] = target_rec
    manifest["ports"] = list(old.get("ports") or []) + [port_entry]
    with atomic_output_dir(out, overwrite=overwrite, inputs=(target.path, patch.path)) as tmp:
        write_patch_files(tmp, tensors, config, manifest)
        progress("adapter", 2, 3)
        if verify:
            from portllm_cli.patch.format import read_patch

            back = read_patch(tmp, verify=True)
            for name, m in modules.items():
                got = back.modules.get(name)
                if got is None:
                    raise IntegrityError(f"{out}: module {name} missing after writing")
                for slot, a in (("A", got.A), ("B", got.B)):
                    b = tensors[peft_key(name, slot, m.kind)]
                    if a.dtype != b.dtype or not torch.equal(a, b):
                        raise IntegrityError(f"{out}: module {name} differs after writing")
        written = sum(p.stat().st_size for p in tmp.iterdir() if p.is_file())
        progress("adapter", 3, 3)
    warnings = list(plan.warnings)
    return PortResult(
        out=out,
        mode="adapter",
        patch=patch_source.display if patch_source else str(patch.path),
        target=target.display,
        modules_merged=len(modules),
        bytes_written=written,
        seconds=time.monotonic() - t0,
        scale=scale,
        verified=verify,
        warnings=warnings,
    )
