"""Carry a patch onto an evolved model: merged weights (W + scale*B@A) or a retargeted adapter.

Merged output keeps the target's layout byte for byte. Every byte range of a safetensors shard
that holds no targeted tensor is copied in the kernel (``copy_file_range``: no user-space
memory) by worker threads, while merge workers read each targeted tensor from the *source*,
merge it in float32 and write it at its original offset. The header does not change (same
names, dtypes, shapes, offsets), so the shard layout, the index, the metadata and every
untargeted byte are identical to the target's. Peak memory is the interpreter plus the patch
plus two targeted tensors in float32 (one per merge worker), whatever the model's size. Given a
patch directory, the copies start as soon as the patch's names and shapes (from its header) are
known to fit, so importing torch and reading and verifying the factors overlap them.

What is merged into which stored tensor (every part of the adapter, located through the
model's layout) is ``portllm_cli.core.plan``: ``PortPlan.edits`` maps each targeted key to its
edits. The merge itself (float32 sum, one rounding, row blocks) is ``portllm_cli.core.merge``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from portllm_cli import __version__
from portllm_cli.core.compat import CompatReport, check_compatibility
from portllm_cli.core.merge import Workspace, merge_tensor
from portllm_cli.core.progress import ProgressFn, no_progress
from portllm_cli.errors import IncompatibleError, IntegrityError, PortllmError, UnsupportedError, UsageError
from portllm_cli.io.atomic import atomic_output_dir, copy_file
from portllm_cli.io.checkpoint import SAFE_INDEX, SAFE_SINGLE, Checkpoint
from portllm_cli.io.safetensors import (
    SafetensorsWriter,
    TensorInfo,
    read_header,
    read_tensor,
    tensor_bytes,
)
from portllm_cli.core.plan import OldBase, Policy, build_plan, prepare_patch, target_layout
from portllm_cli.patch.format import (
    ADAPTER_WEIGHTS,
    Patch,
    build_manifest,
    now_iso,
    patch_tensors,
    read_outline,
    read_patch,
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
# Kernel copies of different shards run side by side: memory bandwidth allows more than one
# stream, and each releases the GIL. Measured on 2 cores: 2 workers ~20% faster than 1.
COPY_WORKERS = max(1, min(4, os.cpu_count() or 1))
# Merges of different tensors run side by side too; each holds one tensor in float32.
MERGE_WORKERS = max(1, min(2, os.cpu_count() or 1))


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
    calibration: dict[str, Any] | None = None  # core.calibrate's record, when the scale was calibrated
    tensors_applied: int = 0  # adapter tensors that changed (merged) or landed on (adapter) the model
    tensors_total: int = 0  # adapter tensors carrying the patch

    def as_dict(self) -> dict[str, Any]:
        doc = {
            "out": str(self.out),
            "mode": self.mode,
            "patch": self.patch,
            "target": self.target,
            "modules_merged": self.modules_merged,
            "bytes_written": self.bytes_written,
            "seconds": round(self.seconds, 3),
            "scale": self.scale,
            "verified": self.verified,
            "patch_tensors": {"applied": self.tensors_applied, "total": self.tensors_total},
            "warnings": list(self.warnings),
        }
        if self.calibration is not None:
            doc["calibration"] = self.calibration
        return doc


# -- the merge itself lives in core/merge.py; ``merge_tensor`` (imported here) is the per-tensor
# hook tests/slow_port.py wraps; what is merged into which tensor is core/plan.py.
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
    """What a port changes: per stored tensor key, the edits that apply to it (``core.plan``)."""

    ckpt: Checkpoint
    report: CompatReport
    key_map: dict[str, str]  # patch module -> (first) checkpoint key it changes
    warnings: list[str]
    targets: list[str] = field(default_factory=list)  # stored keys the patch changes (from names alone)
    edits: dict[str, list] = field(default_factory=dict)  # stored key -> edits; empty for an outline
    applied: dict[str, int] = field(default_factory=dict)  # adapter tensor key -> stored tensors it changes

    def module_shapes(self) -> dict[str, list[int]]:
        loc = self.report.location
        if loc is not None:
            return loc.module_shapes()
        return {m: list(self.ckpt.shape(k)) for m, k in sorted(self.key_map.items())}


def plan_port(
    patch: Patch,
    target: Resolved,
    *,
    allow_pickle: bool = False,
    merging: bool = True,
    policy: Policy | None = None,
    old: OldBase | None = None,
    layout: Any = None,
) -> PortPlan:
    """Open the target and check the patch against it; raises IncompatibleError (exit 3).

    For a patch that holds its factors (not an outline) the edits are planned too.
    """
    ckpt = Checkpoint.open(target.path, allow_pickle=allow_pickle)
    layout = layout or target_layout(patch, ckpt)
    report = check_compatibility(patch, ckpt, layout)
    report.raise_if_incompatible(target.display)
    loc = report.location
    targets = sorted({pl.key for part in (*loc.lora.values(), *loc.bias.values(), *loc.full.values(),
                                          *loc.tokens.values()) for pl in part.placements})
    if merging:
        for key in targets:
            dt = ckpt.dtype(key)
            if dt not in MERGEABLE_DTYPES:
                raise UnsupportedError(
                    f"{target.display}: weight {key} is stored as {dt}; portllm merges into float weights "
                    f"({', '.join(MERGEABLE_DTYPES)}) only",
                    hint="use --as-adapter to serve the patch on top of a quantized model",
                )
    warnings = list(patch.warnings) + list(report.warnings)
    plan = PortPlan(ckpt, report, dict(report.key_map), warnings, targets)
    if not patch.outline:
        ep = build_plan(patch, layout, policy=policy, old=old, location=loc)
        plan.edits, plan.applied = ep.edits, ep.applied
        if sorted(ep.edits) != targets:
            raise IntegrityError(f"{patch.path}: internal: planned edits do not match the located targets")
    return plan


def _patch_sha256(patch: Patch) -> str:
    tensors = (patch.manifest or {}).get("tensors") or {}
    return tensors.get("sha256") or sha256_file(patch.path / ADAPTER_WEIGHTS)


def _lora_summary(patch: Patch) -> dict[str, Any]:
    """The manifest's lora record (same keys as extract writes), for patches that carry none."""
    cfg = patch.config
    return (patch.manifest or {}).get("lora") or {
        "rank": patch.rank,
        "alpha": patch.alpha,
        "use_rslora": bool(cfg.get("use_rslora", False)),
        "target_modules": cfg.get("target_modules"),
        "modules": len(patch.modules),
        "rank_pattern": dict(cfg.get("rank_pattern") or {}),
        "alpha_pattern": dict(cfg.get("alpha_pattern") or {}),
    }


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


class _ShardCopier:
    """Copies the untargeted byte ranges of each shard in worker threads while the caller
    reads the patch and merges the targeted tensors (``copy_file_range`` runs in the kernel and
    releases the GIL, so copying, importing torch and merging overlap)."""

    def __init__(self, tick: Callable[[int], None]) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self._pool = ThreadPoolExecutor(max_workers=COPY_WORKERS, thread_name_prefix="portllm-copy")
        self._cancel = threading.Event()
        self._futures: list = []
        self._tick = tick

    def submit(self, src: Path, dst_fd: int, spans: list[tuple[int, int]]) -> None:
        self._futures.append(self._pool.submit(self._run, src, dst_fd, spans))

    def _run(self, src: Path, dst_fd: int, spans: list[tuple[int, int]]) -> None:
        from portllm_cli.io.safetensors import copy_range

        with open(src, "rb", buffering=0) as fs:
            for begin, end in spans:
                pos = begin
                while pos < end:
                    if self._cancel.is_set():
                        return
                    n = min(COPY_STEP, end - pos)
                    copy_range(fs.fileno(), dst_fd, pos, n)
                    pos += n
                    self._tick(n)

    def finish(self, fds: list[int]) -> None:
        """Wait for every copy, then fsync every file (in parallel): on disk before the rename."""
        try:
            for f in self._futures:
                f.result()
            for f in [self._pool.submit(os.fsync, fd) for fd in fds]:
                f.result()
        finally:
            self.abort()

    def abort(self) -> None:
        self._cancel.set()
        self._pool.shutdown(wait=True)


def _untargeted_spans(size: int, infos: list[TensorInfo]) -> list[tuple[int, int]]:
    spans, cursor = [], 0
    for info in sorted(infos, key=lambda i: i.begin):
        if info.begin > cursor:
            spans.append((cursor, info.begin))
        cursor = info.end
    if cursor < size:
        spans.append((cursor, size))
    return spans


class _torch_threads:
    """Share the cores between the merge workers (torch's thread count is per process); restore
    the caller's setting after."""

    def __enter__(self) -> None:
        import torch

        self._old = torch.get_num_threads()
        torch.set_num_threads(max(1, min(self._old, (os.cpu_count() or 1) // MERGE_WORKERS)))

    def __exit__(self, *exc: object) -> None:
        import torch

        torch.set_num_threads(self._old)


# -- merged output ----------------------------------------------------------------------------
def _targets_by_file(plan: PortPlan) -> dict[Path, list[tuple[str, list]]]:
    by_file: dict[Path, list[tuple[str, list]]] = {}
    for key, edits in plan.edits.items():
        f, _ = plan.ckpt.locations[key]
        by_file.setdefault(f, []).append((key, edits))
    return by_file


def _port_safetensors_shards(
    plan: PortPlan, patch: Patch, tmp: Path, tick: Callable[[int], None],
    load: "Callable[[], tuple[Patch, PortPlan]] | None" = None,
) -> tuple[Patch, PortPlan]:
    """Write every shard: untargeted ranges copied by the workers, merged tensors written here at
    their own offsets (disjoint ranges of the same file, so the two never overlap).

    With ``load``, ``patch`` is only an outline (names and shapes): the copies start first and
    the factors are read while they run. Returns the patch and plan the merges used.
    """
    ckpt = plan.ckpt
    copier = _ShardCopier(tick)
    fds: list[int] = []
    try:
        for f in ckpt.files:
            header = ckpt.headers[f]
            infos = [header.tensors[key] for key in plan.targets if ckpt.locations[key][0] == f]
            fd = os.open(tmp / f.name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            fds.append(fd)
            os.ftruncate(fd, header.file_size)
            copier.submit(f, fd, _untargeted_spans(header.file_size, infos))
        if load is not None:
            outline_targets = plan.targets
            patch, plan = load()
            if plan.targets != outline_targets:  # the factors must target what the copies left out
                raise IntegrityError(f"{patch.path}: the patch changed while it was being read")
        by_file = _targets_by_file(plan)
        jobs = [(f, fd, key, edits) for f, fd in zip(ckpt.files, fds) for key, edits in by_file.get(f, [])]
        with _torch_threads():
            _run_merges(ckpt, jobs, tick)
        copier.finish(fds)
    except BaseException:
        copier.abort()
        raise
    finally:
        for fd in fds:
            os.close(fd)
    return patch, plan


def _run_merges(ckpt: Checkpoint, jobs: list, tick: Callable[[int], None]) -> None:
    """Merge and write the targeted tensors, MERGE_WORKERS at a time (torch releases the GIL), each
    worker with its own float32 buffers: peak memory is MERGE_WORKERS tensors in float32."""
    from concurrent.futures import ThreadPoolExecutor

    local = threading.local()

    def merge_one(job: tuple) -> None:
        f, fd, key, edits = job
        if not hasattr(local, "ws"):
            local.ws = Workspace()
        info = ckpt.headers[f].tensors[key]
        merged = merge_tensor(read_tensor(f, info), edits, ws=local.ws)
        _pwrite_all(fd, tensor_bytes(merged), info.begin)
        tick(info.nbytes)

    pool = ThreadPoolExecutor(max_workers=MERGE_WORKERS, thread_name_prefix="portllm-merge")
    try:
        for fut in [pool.submit(merge_one, job) for job in jobs]:
            fut.result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _verify_safetensors_shard(src: Path, dst: Path, targets: list[tuple[TensorInfo, list]]) -> None:
    """Every untargeted byte equals the source; every targeted tensor equals the recomputed merge."""
    if dst.stat().st_size != src.stat().st_size:
        raise IntegrityError(f"{dst.name}: size {dst.stat().st_size} differs from the target's {src.stat().st_size}")
    size = src.stat().st_size
    with open(src, "rb", buffering=0) as fs, open(dst, "rb", buffering=0) as fd:
        cursor = 0
        for info, edits in sorted(targets, key=lambda t: t[0].begin) + [(None, None)]:
            end = info.begin if info is not None else size
            bad = _same_bytes(fs.fileno(), fd.fileno(), cursor, end)
            if bad is not None:
                raise IntegrityError(f"{dst.name}: byte {bad} differs from the target, outside any patched tensor")
            if info is None:
                break
            expected = tensor_bytes(merge_tensor(read_tensor(src, info), edits))
            got = os.pread(fd.fileno(), info.nbytes, info.begin)
            if got != expected.tobytes():
                raise IntegrityError(
                    f"{dst.name}: tensor {info.name} does not equal base + scale*B@A (the planned edits) after writing"
                )
            cursor = info.end


def _port_pickle(plan: PortPlan, tmp: Path, verify: bool, tick: Callable[[int], None]) -> tuple[list[str], int]:
    """Pickle targets (--allow-pickle): write safetensors shards, one per input file, plus an index."""
    import torch

    ckpt = plan.ckpt
    by_key = plan.edits
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
                    t = merge_tensor(t, by_key[k])
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
                expected = merge_tensor(src, by_key[k]) if k in by_key else src
                got = read_tensor(tmp / name, header.tensors[k])
                if not torch.equal(got.view(torch.uint8) if got.numel() else got,
                                   expected.contiguous().view(torch.uint8) if expected.numel() else expected):
                    raise IntegrityError(f"{name}: tensor {k} differs from what was computed")
    if n > 1:
        index = {"metadata": {"total_size": total_size}, "weight_map": weight_map}
        (tmp / SAFE_INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return out_names, written


def port_merged(
    patch: "Patch | str | os.PathLike[str]",
    target: Resolved,
    out: Path,
    *,
    scale: float = 1.0,
    overwrite: bool = False,
    verify: bool = False,
    allow_pickle: bool = False,
    progress: ProgressFn | None = None,
    patch_source: Resolved | None = None,
    verify_patch: bool = True,
    calibration: dict[str, Any] | None = None,
    dora: str = "absolute",
    modules_to_save: str = "delta",
    base: Resolved | None = None,
) -> PortResult:
    """Write TARGET with PATCH merged into OUT; see the module docstring for how.

    PATCH is a Patch already read, or a patch directory. Given a directory of plain LoRA, the
    patch's module names and shapes are first taken from its config and safetensors header (no
    torch, no factors) and checked against the target; when they fit, the kernel starts copying
    while the factors are read and verified (sha256 unless ``verify_patch`` is false, NaN/Inf),
    which hides the cost of importing torch. Anything unusual in the outline falls back to
    reading the whole patch first, so errors and their order are those of ``read_patch`` then
    the check.

    ``dora``, ``modules_to_save``: the policies of ``core.plan.Policy``; ``base``: the model the
    patch was trained on (else the one it records), needed for PiSSA/OLoRA, whole tensors ported
    as a change, and ``dora="relative"`` without recorded norms.
    """
    t0 = time.monotonic()
    scale = check_scale(scale)
    policy = Policy(scale, dora, modules_to_save).check()
    progress = progress or no_progress
    load = None
    old: OldBase | None = None
    if not isinstance(patch, Patch):
        path = Path(patch)
        outline = read_outline(path) if base is None else None
        plan = None
        if outline is not None:
            try:
                plan = plan_port(outline, target, allow_pickle=allow_pickle, merging=True, policy=policy)
            except PortllmError:
                plan = None  # let the full reader report first, as it would without the outline
        if plan is None or plan.ckpt.is_pickle:
            patch, old = prepare_patch(read_patch(path, verify=verify_patch), policy=policy, base=base,
                                       allow_pickle=allow_pickle)
            plan = plan_port(patch, target, allow_pickle=allow_pickle, merging=True, policy=policy, old=old)
        else:
            patch = outline

            def load() -> tuple[Patch, PortPlan]:
                full = read_patch(path, verify=verify_patch)
                if not full.is_plain():  # the outline said plain LoRA; the factors must agree
                    raise IntegrityError(f"{path}: the patch changed while it was being read")
                return full, plan_port(full, target, allow_pickle=allow_pickle, merging=True, policy=policy)
    else:
        patch, old = prepare_patch(patch, policy=policy, base=base, allow_pickle=allow_pickle)
        plan = plan_port(patch, target, allow_pickle=allow_pickle, merging=True, policy=policy, old=old)
    ckpt = plan.ckpt
    out = Path(out)
    total = ckpt.total_bytes()
    done = 0

    lock = threading.Lock()  # ticks come from the copy thread too

    def tick(n: int) -> None:
        nonlocal done
        with lock:
            done += n
            progress("port", done, total)

    progress("port", 0, total)
    inputs = (target.path, patch.path) + ((old.ckpt.root,) if old is not None else ())
    with atomic_output_dir(out, overwrite=overwrite, inputs=inputs) as tmp:
        if ckpt.is_pickle:
            shard_names, written = _port_pickle(plan, tmp, verify, tick)
        else:
            patch, plan = _port_safetensors_shards(plan, patch, tmp, tick, load)
            shard_names = [f.name for f in ckpt.files]
            written = sum(f.stat().st_size for f in ckpt.files)
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
            "policy": {"dora": policy.dora, "modules_to_save": policy.whole},
            "old_base": old.display if old is not None else None,
            "patch": {
                "source": _patch_record_id(patch, patch_source),
                "sha256": _patch_sha256(patch),
                "base": (patch.manifest or {}).get("base") or {"model": patch.base_model},
                "lora": _lora_summary(patch),
            },
            # Hashing a large target would cost as much as the port itself; the fingerprint and
            # the shard names identify it, and the output's own files are what users keep.
            "target": model_record(target, ckpt, plan.module_shapes(), hash_weights=False),
            "merged_modules": {m: plan.key_map[m] for m in sorted(plan.key_map)},
            "changed_tensors": sorted(plan.edits),
            "patch_tensors": {"applied": sum(1 for n in plan.applied.values() if n), "total": len(plan.applied)},
            "shards": shard_names,
            "converted_from_pickle": ckpt.is_pickle,
        }
        if calibration is not None:
            record["calibration"] = calibration  # how `scale` was chosen (portllm port --calibrate)
        (tmp / PORT_RECORD).write_text(json.dumps(record, indent=2) + "\n")
        written += (tmp / PORT_RECORD).stat().st_size
        if verify and not ckpt.is_pickle:
            by_file = _targets_by_file(plan)
            for f in ckpt.files:
                header = ckpt.headers[f]
                targets = [(header.tensors[k], edits) for k, edits in by_file.get(f, [])]
                _verify_safetensors_shard(f, tmp / f.name, targets)
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
        calibration=calibration,
        tensors_applied=sum(1 for n in plan.applied.values() if n),
        tensors_total=len(plan.applied),
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
    calibration: dict[str, Any] | None = None,
    dora: str = "absolute",
    modules_to_save: str = "delta",
    base: Resolved | None = None,
) -> PortResult:
    """Write PATCH retargeted to TARGET, for PEFT to load on it.

    Modules are renamed to their paths in the model transformers builds for TARGET (in the class
    the adapter was trained on: a head class such as ``*ForCausalLM``, or the base model), B
    (and lora_B.bias) times --scale; DoRA magnitudes pass through (``dora="relative"``: rescaled
    by the target's weight norms over the old base's); whole tensors and token rows are written
    as ported (``core.plan``). After writing, every key of the adapter must land on a module of
    the target's skeleton with the right shape, or nothing is written.
    """
    import torch

    from portllm_cli.core.layout import Layout
    from portllm_cli.core.merge import DoraEdit, TokenRowsEdit, WholeTensorEdit, merge_block
    from portllm_cli.core.plan import feature_norms

    t0 = time.monotonic()
    scale = check_scale(scale)
    policy = Policy(scale, dora, modules_to_save).check()
    progress = progress or no_progress
    patch, old = prepare_patch(patch, policy=policy, base=base, allow_pickle=allow_pickle)
    ckpt = Checkpoint.open(target.path, allow_pickle=allow_pickle)
    try:
        layout = Layout.of(ckpt)
    except UnsupportedError as exc:
        raise UnsupportedError(
            f"--as-adapter names modules as transformers builds {target.display}, and {exc.message}",
            hint="write a merged model instead (drop --as-adapter)",
        ) from None
    plan = plan_port(patch, target, allow_pickle=allow_pickle, merging=False, policy=policy, old=old, layout=layout)
    loc = plan.report.location
    out = Path(out)
    progress("adapter", 0, 3)

    prefix = layout.base_prefix
    named = [lc.param.rsplit(".", 1)[0] for lc in loc.lora.values()] + [lw.param for lw in loc.full.values()] + [
        lw.param.rsplit(".", 1)[0] for lw in loc.tokens.values()
    ]
    given = [lc.module.module for lc in loc.lora.values()] + list(loc.full) + list(loc.tokens)
    # an adapter trained on the base model class (AutoModel) names paths without the prefix
    strip = bool(prefix) and all(t == f"{prefix}.{g}" for t, g in zip(named, given)) and any(
        t != g for t, g in zip(named, given)
    )

    def out_name(path: str) -> str:
        return path[len(prefix) + 1 :] if strip else path

    modules = {}
    plain: list[str] = []
    for name, lc in loc.lora.items():
        m = lc.module
        new_name = out_name(lc.param.rsplit(".", 1)[0]) + ".base_layer" * m.depth
        mag = m.magnitude
        if mag is not None and policy.dora == "relative":
            key = lc.placements[0].key
            edit = next(e for e in plan.edits[key] if isinstance(e, DoraEdit) and e.module.name == m.name)
            new_norms = feature_norms(lambda r0, r1: ckpt.rows(key, r0, r1), lc.shape[0], lc.transposed)
            mag = (mag.to(torch.float32) * (new_norms / edit.old_norms)).to(mag.dtype)
        modules[new_name] = dataclasses.replace(m, name=new_name, magnitude=mag)
        if not lc.is_param:
            plain.append(new_name)
    full = {}
    for source, lw in loc.full.items():
        key = lw.placements[0].key
        edits = [e for e in plan.edits[key] if isinstance(e, WholeTensorEdit) and e.saved is patch.full[source].tensor]
        tensor = merge_tensor(ckpt.tensor(key), edits)
        fname = out_name(lw.param)
        if patch.full[source].key.endswith(".base_layer.bias"):
            fname = fname[: -len(".bias")] + ".base_layer.bias"
        full[fname] = tensor
    tokens = {}
    for source, lw in loc.tokens.items():
        key = lw.placements[0].key
        t = patch.tokens[source]
        edits = [e for e in plan.edits[key] if isinstance(e, TokenRowsEdit) and e.values is t.values]
        rows = [merge_block(ckpt.rows(key, i, i + 1), edits, i)[0] for i in t.indices]
        tokens[out_name(lw.param.rsplit(".", 1)[0])] = torch.stack(rows)
    tensors = patch_tensors(modules, b_scale=scale, full=full, tokens=tokens)
    config = dict(patch.config)
    config["base_model_name_or_path"] = target.record_id
    config["inference_mode"] = True
    # PEFT wraps what target_modules selects: exactly the modules that carry factors, so that no
    # module of the new model gets a fresh (with init_lora_weights=false: random) adapter
    config["target_modules"] = sorted(plain) or None
    for key in ("layers_to_transform", "layers_pattern", "exclude_modules"):
        config.pop(key, None)
    old_doc = dict(patch.manifest or {})
    old_sha = _patch_sha256(patch)
    target_rec = model_record(target, plan.ckpt, plan.module_shapes(), hash_weights=not plan.ckpt.is_pickle)
    progress("adapter", 1, 3)
    port_entry = {
        "from_patch_sha256": old_sha,
        "from_base": (old_doc.get("target") or old_doc.get("base") or {}).get("model") or patch.base_model,
        "to": target.record_id,
        "revision": target.revision,
        "scale": scale,
        "policy": {"dora": policy.dora, "modules_to_save": policy.whole},
        "old_base": old.display if old is not None else None,
        "portllm_version": __version__,
        "created": now_iso(),
    }
    if old_doc:
        manifest = dict(old_doc)
        manifest["portllm_version"] = __version__
    else:
        manifest = build_manifest(
            base={"model": patch.base_model, "revision": None, "content_hash": None, "fingerprint": None},
            lora=_lora_summary(patch),
            source={"kind": "peft-adapter", "path": str(patch.path.resolve())},
        )
    manifest.pop("dora", None)  # norms of the old base: a retargeted DoRA patch is not ported again relatively
    manifest["target"] = target_rec
    manifest["ports"] = list(old_doc.get("ports") or []) + [port_entry]
    manifest.pop("calibration", None)  # an earlier port's: this one's scale is its own
    if calibration is not None:
        manifest["calibration"] = calibration  # how `scale` (folded into B) was chosen
    inputs = (target.path, patch.path) + ((old.ckpt.root,) if old is not None else ())
    with atomic_output_dir(out, overwrite=overwrite, inputs=inputs) as tmp:
        write_patch_files(tmp, tensors, config, manifest)
        progress("adapter", 2, 3)
        back = read_patch(tmp, verify=True)
        landed = check_landing(back, layout, strip, target.display)
        if verify:
            got = patch_tensors(back.modules, full={f.name: f.tensor for f in back.full.values()},
                                tokens={t.module: t.values for t in back.tokens.values()})
            for key, want in tensors.items():
                have = got.get(key)
                if have is None or have.dtype != want.dtype or not torch.equal(have, want):
                    raise IntegrityError(f"{out}: {key} differs after writing")
        written = sum(p.stat().st_size for p in tmp.iterdir() if p.is_file())
        progress("adapter", 3, 3)
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
        calibration=calibration,
        warnings=list(plan.warnings),
        tensors_applied=landed,
        tensors_total=len(tensors),
    )


def check_landing(adapter: Patch, layout: Any, base_class: bool, target: str) -> int:
    """Prove a written adapter acts on the target: every key names a module (parameter) of the
    model transformers builds, exactly as PEFT will look it up, with the right shape. Returns the
    number of adapter tensors that land; raises IncompatibleError otherwise."""
    from portllm_cli.core.plan import locate

    prefix = layout.base_prefix

    def full_path(name: str) -> str:
        return f"{prefix}.{name}" if base_class and prefix else name

    cls = layout.model_class + (f".{prefix}" if base_class and prefix else "")
    for m in adapter.modules.values():
        if full_path(m.module) not in layout.module_types:
            raise IncompatibleError(f"the written adapter's module {m.module} lands on no module of {target} ({cls})")
    for f in adapter.full.values():
        name = f.name.replace(".base_layer.bias", ".bias")
        if full_path(name) not in layout.params:
            raise IncompatibleError(f"the written adapter's tensor {f.name} lands on no parameter of {target} ({cls})")
    for t in adapter.tokens.values():
        if full_path(t.module) not in layout.module_types:
            raise IncompatibleError(f"the written adapter's token rows for {t.module} land on no module of {target}")
    loc = locate(adapter, layout)
    if loc.errors:
        raise IncompatibleError(f"the written adapter does not fit {target}: {loc.errors[0]}")
    return len(adapter.tensor_keys())
