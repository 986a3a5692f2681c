"""Carry a patch onto an evolved model: merged weights (W + scale*B@A) or a retargeted adapter.

Merged output keeps the target's layout byte for byte: the header does not change (same names,
dtypes, shapes, offsets), so the shard layout, the index, the metadata and every untargeted byte are
identical to the target's. Each output shard is first the source shard: cloned where the filesystem
shares extents (a reflink, no bytes copied), else its untargeted byte ranges copied by the kernel
(``copy_file_range``, no user-space memory) in worker threads (``portllm_cli.io.shards``). Merge
workers meanwhile stream each targeted tensor in row blocks: read a block of rows from the
*source*, merge it in float32 (``portllm_cli.core.merge``), pwrite it at its own offset. A bf16
LoRA merge (nearly every port) reads its rows where they lie in a read-only mapping of the source
shard, through the compiled fused kernel, and unmaps them once written; any other merge preads
them into a buffer. Disk writes are started from a background thread as ranges are written. The
patch is read lazily: its file is scanned once (sha256 checked, one digest per tensor kept), and
each module's factors are read when its tensor is merged, refused unless they hash as scanned.

Peak memory is the interpreter with torch plus a few blocks per merge worker (PORT_BLOCK_BYTES of
float32 each, or for the fused kernel one bf16 output block of FUSED_BLOCKS / 2 times that and the
mapped source pages it is reading) plus the factors of the tensors being merged, whatever the size
of the model, of its shards, of its largest tensor or of the patch. Given a patch directory, the
copies start as soon as the patch's names and shapes (from its header) are known to fit, so
importing torch and reading and verifying the factors overlap them.

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
from portllm_cli.core.config import PORT_BLOCK_BYTES, PortConfig
from portllm_cli.core.merge import Edit, Workspace, block_rows, merge_buffer_stream, merge_stream, merge_tensor
from portllm_cli.core.progress import ProgressFn, counter, no_progress
from portllm_cli.errors import IncompatibleError, IntegrityError, PortllmError, UnsupportedError
from portllm_cli.io.atomic import atomic_output_dir, copy_file
from portllm_cli.io.checkpoint import SAFE_INDEX, SAFE_SINGLE, Checkpoint
from portllm_cli.io.safetensors import (
    DTYPES,
    SafetensorsWriter,
    TensorInfo,
    read_header,
    read_tensor,
    tensor_bytes,
    torch_dtype,
)
from portllm_cli.io.shards import (
    Buffers,
    ShardCopier,
    clone_file,
    drop_mapped,
    first_difference,
    map_readonly,
    pread_into,
    pwrite_all,
    start_writeback,
    untargeted_spans,
)
from portllm_cli.core.plan import OldBase, Policy, build_plan, prepare_patch, target_layout
from portllm_cli.patch.format import (
    LoraModule,
    Patch,
    build_manifest,
    materialize,
    now_iso,
    patch_tensors,
    read_outline,
    read_patch,
    write_patch_files,
)
from portllm_cli.resolve import Resolved, model_record

if TYPE_CHECKING:
    import mmap

    import torch

PORT_RECORD = "portllm_port.json"
MERGEABLE_DTYPES = ("F32", "F16", "BF16", "F64")
# Kernel copies of different shards run side by side: memory bandwidth allows more than one
# stream, and each releases the GIL. Measured on 2 cores: 2 workers ~20% faster than 1.
COPY_WORKERS = max(1, min(4, os.cpu_count() or 1))
# Merges of different tensors run side by side too; each holds a few row blocks.
MERGE_WORKERS = max(1, min(2, os.cpu_count() or 1))
# The fused kernel's blocks, in float32 blocks of block_bytes: it holds only its bf16 output (half
# of one float32 block for each of them), and fewer, larger blocks cost less Python and fewer
# syscalls (4 took ~0.7 s less CPU than 1 on a 7.6 GB all-linear port, measured side by side).
FUSED_BLOCKS = 4


@dataclass
class PortResult:
    """What a port wrote (every output format: merged, adapter, GGUF); ``as_dict`` is its --json."""

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


class _gc_paused:
    """The cyclic garbage collector paused for a port, restored after. Importing torch creates
    hundreds of thousands of objects, and the collections that triggers cost a tenth of the import
    (which is on a port's critical path: no merge starts before it); each merged block then makes a
    few short-lived objects (no cycles), and every collection would walk all of torch's again."""

    def __enter__(self) -> None:
        import gc

        self._gc = gc.isenabled()
        gc.disable()

    def __exit__(self, *exc: object) -> None:
        import gc

        if self._gc:
            gc.enable()


# -- merged output ----------------------------------------------------------------------------
@dataclass
class _Target:
    """One stored tensor to merge, and its edits (``core.plan``'s), whose factors a lazily read
    patch reads when the tensor's turn comes, not before."""

    info: TensorInfo
    planned: list[Edit]

    def edits(self) -> list[Edit]:
        return _loaded(self.planned)


def _loaded(edits: list[Edit]) -> list[Edit]:
    """The edits with every factor a lazily read patch left on disk read now (and checked against
    the digest it was scanned with)."""
    out = []
    for e in edits:
        changes = {}
        if dataclasses.is_dataclass(e):
            for f in dataclasses.fields(e):
                v = getattr(e, f.name)
                if isinstance(v, LoraModule):
                    mv = materialize(v)
                    if mv is not v:
                        changes[f.name] = mv
        out.append(dataclasses.replace(e, **changes) if changes else e)
    return out


def _targets(plan: PortPlan) -> dict[Path, list[_Target]]:
    """Per shard, in file order, every targeted tensor with its planned edits."""
    by_file: dict[Path, list[_Target]] = {}
    for key, edits in plan.edits.items():
        f, info = plan.ckpt.locations[key]
        by_file.setdefault(f, []).append(_Target(info, edits))
    for targets in by_file.values():
        targets.sort(key=lambda t: t.info.begin)
    return by_file


def _row_layout(info: TensorInfo) -> tuple[int, int, tuple[int, ...]]:
    """(rows, bytes per row, shape of a row) of a stored tensor; rows run along dimension 0."""
    shape = info.shape or (1,)
    row_elems = math.prod(shape[1:])
    return int(shape[0]), row_elems * DTYPES[info.dtype][0], tuple(shape[1:])


def _rows_reader(fd: int, info: TensorInfo, bufs: Buffers, name: str = "rows") -> Callable[[int, int], "torch.Tensor"]:
    """read_rows(r0, r1) for core.merge: a pread into a reused buffer, viewed as the stored dtype."""
    import torch

    dtype = torch_dtype(info.dtype)
    _, row_bytes, row_shape = _row_layout(info)
    elems = row_bytes // DTYPES[info.dtype][0]

    def read_rows(r0: int, r1: int) -> "torch.Tensor":
        n = (r1 - r0) * row_bytes
        buf = bufs.get(name, n)
        pread_into(fd, memoryview(buf)[:n], info.begin + r0 * row_bytes)
        return torch.frombuffer(buf, dtype=dtype, count=(r1 - r0) * elems).view(r1 - r0, *row_shape)

    return read_rows


def merge_shard_tensor(
    src_fd: int,
    dst_fd: int,
    info: TensorInfo,
    edits: list[Edit],
    *,
    block_bytes: int = PORT_BLOCK_BYTES,
    ws: Workspace | None = None,
    bufs: Buffers | None = None,
    tick: Callable[[int], None] | None = None,
    writeback: Callable[[int, int, int], None] = start_writeback,
    source: "mmap.mmap | None" = None,
) -> None:
    """Merge one stored tensor of a shard into the output shard, a row block at a time: read the
    rows from the source, apply the edits (core.merge), pwrite the merged rows at the same offset
    of the output, then start their disk write (``writeback``). Given ``source`` (a read-only
    mapping of the source shard, ``io.shards.map_readonly``), a merge the fused kernel does reads
    each block where it lies and unmaps it after; every other merge preads it into a buffer
    (``merge_stream``). Memory is one block, whatever the tensor's size. The per-tensor step of a
    port (tests/slow_port.py wraps it)."""
    if info.nbytes == 0:
        return
    ws, bufs = ws or Workspace(), bufs or Buffers()
    n_rows, row_bytes, _ = _row_layout(info)
    rows_per_block = block_rows(info.shape or (1,), block_bytes)
    fused_rows = block_rows(info.shape or (1,), FUSED_BLOCKS * block_bytes)

    def write_rows(r0: int, t: "torch.Tensor") -> None:
        data = tensor_bytes(t)
        pwrite_all(dst_fd, data, info.begin + r0 * row_bytes)
        if tick is not None:
            tick(len(data))

    def write_mapped(r0: int, t: "torch.Tensor") -> None:  # and unmap the source rows just merged
        write_rows(r0, t)
        at = info.begin + r0 * row_bytes
        drop_mapped(source, at, at + int(t.shape[0]) * row_bytes)

    if source is not None and os.fstat(src_fd).st_size < info.end:
        # read through the mapping, a truncated source would be a SIGBUS: refuse it first, as pread would
        raise IntegrityError(f"the source shard ended before byte {info.end} while being read")
    if source is None or not merge_buffer_stream(
        source, info.begin, info.shape, torch_dtype(info.dtype), edits, write_mapped, fused_rows, ws
    ):
        merge_stream(n_rows, _rows_reader(src_fd, info, bufs), write_rows, edits, rows_per_block, ws)
    writeback(dst_fd, info.begin, info.nbytes)


def _port_safetensors_shards(
    plan: PortPlan, patch: Patch, tmp: Path, tick: Callable[[int], None],
    load: "Callable[[], tuple[Patch, PortPlan]] | None" = None, block_bytes: int = PORT_BLOCK_BYTES,
) -> tuple[Patch, PortPlan]:
    """Write every shard: the source cloned (reflink) or its untargeted ranges copied by the
    kernel in worker threads, and the merged tensors written here at their own offsets (disjoint
    ranges of the same file, so the two never overlap); then every shard fsynced, side by side.

    With ``load``, ``patch`` is only an outline (names and shapes): the copies start first and
    the factors are read while they run. Returns the patch and plan the merges used.
    """
    ckpt = plan.ckpt
    copier = ShardCopier(COPY_WORKERS, tick)
    fds: list[tuple[int, int]] = []
    maps: dict[int, "mmap.mmap | None"] = {}  # source fd -> its read-only mapping, for the merges
    try:
        for f in ckpt.files:
            header = ckpt.headers[f]
            infos = [header.tensors[key] for key in plan.targets if ckpt.locations[key][0] == f]
            src = os.open(f, os.O_RDONLY)
            try:
                dst = os.open(tmp / f.name, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
            except BaseException:
                os.close(src)
                raise
            fds.append((src, dst))
            spans = untargeted_spans(header.file_size, [(i.begin, i.end) for i in infos])
            if clone_file(src, dst):  # the whole shard shared, copy-on-write: only merges write
                tick(sum(end - begin for begin, end in spans))
            else:
                os.ftruncate(dst, header.file_size)
                copier.submit(src, dst, spans)
        if load is not None:
            outline_targets = plan.targets
            patch, plan = load()
            if plan.targets != outline_targets:  # the factors must target what the copies left out
                raise IntegrityError(f"{patch.path}: the patch changed while it was being read")
        targets = _targets(plan)
        for f, (src, _) in zip(ckpt.files, fds):
            if targets.get(f):
                maps[src] = map_readonly(src)
        jobs = _interleaved([[(src, dst, t, maps.get(src)) for t in targets.get(f, [])]
                             for f, (src, dst) in zip(ckpt.files, fds)])
        with _torch_threads():
            _run_merges(jobs, tick, block_bytes, copier.writeback)
        copier.wait()
        copier.fsync([dst for _, dst in fds])
    finally:
        copier.close()
        for mm in maps.values():
            if mm is not None:
                mm.close()
        for src, dst in fds:
            os.close(src)
            os.close(dst)
    return patch, plan


def _interleaved(per_file: list[list[Any]]) -> list[Any]:
    """Jobs taken from each file in turn (each file's in its own order): side by side, merge
    workers then mostly write to different files. Two writing into one file take turns on its
    inode lock, and the kernel spins while waiting for it (7% of a worker's CPU time, measured)."""
    out: list[Any] = []
    for i in range(max((len(jobs) for jobs in per_file), default=0)):
        out.extend(jobs[i] for jobs in per_file if i < len(jobs))
    return out


def _run_merges(
    jobs: "list[tuple[int, int, _Target, mmap.mmap | None]]", tick: Callable[[int], None], block_bytes: int,
    writeback: Callable[[int, int, int], None] = start_writeback,
) -> None:
    """Merge and write the targeted tensors (source fd, output fd, target, the source's mapping),
    MERGE_WORKERS at a time (the kernels and torch release the GIL), each worker with its own
    bounded buffers (one block), reading each tensor's factors as it starts."""
    from concurrent.futures import ThreadPoolExecutor

    local = threading.local()

    def merge_one(job: "tuple[int, int, _Target, mmap.mmap | None]") -> None:
        src, dst, target, source = job
        if not hasattr(local, "ws"):
            local.ws, local.bufs = Workspace(), Buffers()
        merge_shard_tensor(src, dst, target.info, target.edits(), block_bytes=block_bytes, ws=local.ws,
                           bufs=local.bufs, tick=tick, writeback=writeback, source=source)

    pool = ThreadPoolExecutor(max_workers=MERGE_WORKERS, thread_name_prefix="portllm-merge")
    try:
        for fut in [pool.submit(merge_one, job) for job in jobs]:
            fut.result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _verify_safetensors_shard(src: Path, dst: Path, targets: list[_Target], block_bytes: int = PORT_BLOCK_BYTES) -> None:
    """Every untargeted byte equals the source; every targeted tensor equals the merge recomputed
    from the source, block by block (memory: a few blocks, whatever the shard's size)."""
    if dst.stat().st_size != src.stat().st_size:
        raise IntegrityError(f"{dst.name}: size {dst.stat().st_size} differs from the target's {src.stat().st_size}")
    size = src.stat().st_size
    bufs, ws = Buffers(), Workspace()
    sfd, dfd = os.open(src, os.O_RDONLY), os.open(dst, os.O_RDONLY)
    try:
        cursor = 0
        for t in sorted(targets, key=lambda t: t.info.begin) + [None]:
            end = t.info.begin if t is not None else size
            bad = first_difference(sfd, dfd, cursor, end, bufs)
            if bad is not None:
                raise IntegrityError(f"{dst.name}: byte {bad} differs from the target, outside any patched tensor")
            if t is None:
                break
            info = t.info
            _, row_bytes, _ = _row_layout(info)

            def check(r0: int, merged: "torch.Tensor", info: TensorInfo = info, row_bytes: int = row_bytes) -> None:
                want = tensor_bytes(merged)
                n = len(want)
                got = bufs.get("got", n)
                pread_into(dfd, memoryview(got)[:n], info.begin + r0 * row_bytes)
                if (got if n == len(got) else got[:n]) != want:
                    raise IntegrityError(
                        f"{dst.name}: tensor {info.name} does not equal base + scale*B@A (the planned edits) after writing"
                    )

            if info.nbytes:
                n_rows, _, _ = _row_layout(info)
                merge_stream(n_rows, _rows_reader(sfd, info, bufs), check, t.edits(),
                             block_rows(info.shape or (1,), block_bytes), ws)
            cursor = info.end
    finally:
        os.close(sfd)
        os.close(dfd)


def _verify_shards(plan: PortPlan, tmp: Path, progress: ProgressFn, block_bytes: int = PORT_BLOCK_BYTES) -> None:
    """--verify for safetensors targets: every shard reread and checked, MERGE_WORKERS side by side."""
    from concurrent.futures import ThreadPoolExecutor

    ckpt = plan.ckpt
    targets = _targets(plan)
    tick = counter(progress, "verify", len(ckpt.files))

    def one(f: Path) -> None:
        _verify_safetensors_shard(f, tmp / f.name, targets.get(f, []), block_bytes)
        tick(1)

    with _torch_threads():
        pool = ThreadPoolExecutor(max_workers=MERGE_WORKERS, thread_name_prefix="portllm-verify")
        try:
            for fut in [pool.submit(one, f) for f in ckpt.files]:
                fut.result()
        finally:
            pool.shutdown(wait=True, cancel_futures=True)


def _port_pickle(plan: PortPlan, tmp: Path, verify: bool, tick: Callable[[int], None]) -> tuple[list[str], int]:
    """Pickle targets (--allow-pickle): write safetensors shards, one per input file, plus an index."""
    import torch

    ckpt = plan.ckpt
    by_key = {k: _loaded(e) for k, e in plan.edits.items()}
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
    config: PortConfig | None = None,
    *,
    progress: ProgressFn | None = None,
    **overrides: Any,
) -> PortResult:
    """Write TARGET with PATCH merged into OUT; see the module docstring for how.

    PATCH is a Patch already read, or a patch directory. Given a directory of plain LoRA, the
    patch's module names and shapes are first taken from its config and safetensors header (no
    torch, no factors) and checked against the target; when they fit, the kernel starts copying
    while the factors are read and verified (sha256 unless ``verify_patch`` is false, NaN/Inf),
    which hides the cost of importing torch. Anything unusual in the outline falls back to
    reading the whole patch first, so errors and their order are those of ``read_patch`` then
    the check.

    ``config`` (``core.config.PortConfig``) holds every setting; keyword ``overrides`` replace single
    fields (``port_merged(p, t, out, scale=0.5, verify=True)``). Its ``dora`` and
    ``modules_to_save`` are the policies of ``core.plan.Policy``; ``base`` the model the patch was
    trained on (else the one it records), needed for PiSSA/OLoRA, whole tensors ported as a change,
    and ``dora="relative"`` without recorded norms.

    A patch directory of plain LoRA is read lazily (``read_patch(lazy=True)``): its file is scanned
    once, and each module's factors are read when its tensor is merged. ``block_bytes`` is the
    float32 size of one merge block (the bits do not depend on it).
    """
    cfg = PortConfig.build(config, overrides)
    opened: list[Patch] = []  # lazily read patches keep their file open until the port ends
    try:
        with _gc_paused():
            return _port_merged(patch, target, Path(out), cfg, progress or no_progress, opened)
    finally:
        for p in opened:
            p.close()


def _port_merged(
    patch: "Patch | str | os.PathLike[str]", target: Resolved, out: Path, cfg: PortConfig, progress: ProgressFn,
    opened: list[Patch],
) -> PortResult:
    t0 = time.monotonic()
    calibration = dict(cfg.calibration) if cfg.calibration is not None else None
    policy = Policy.of(cfg)
    load = None
    old: OldBase | None = None
    if not isinstance(patch, Patch):
        path = Path(patch)
        outline = read_outline(path) if cfg.base is None else None
        plan = None
        if outline is not None:
            try:
                plan = plan_port(outline, target, allow_pickle=cfg.allow_pickle, merging=True, policy=policy)
            except PortllmError:
                plan = None  # let the full reader report first, as it would without the outline
        if plan is None or plan.ckpt.is_pickle:
            read = read_patch(path, verify=cfg.verify_patch, lazy=True)
            opened.append(read)
            patch, old = prepare_patch(read, policy=policy, base=cfg.base, allow_pickle=cfg.allow_pickle)
            plan = plan_port(patch, target, allow_pickle=cfg.allow_pickle, merging=True, policy=policy, old=old)
        else:
            patch = outline

            def load_full() -> tuple[Patch, PortPlan]:
                full = read_patch(path, verify=cfg.verify_patch, lazy=True)
                opened.append(full)
                if not full.is_plain():  # the outline said plain LoRA; the factors must agree
                    raise IntegrityError(f"{path}: the patch changed while it was being read")
                return full, plan_port(full, target, allow_pickle=cfg.allow_pickle, merging=True, policy=policy)

            load = load_full
    else:
        patch, old = prepare_patch(patch, policy=policy, base=cfg.base, allow_pickle=cfg.allow_pickle)
        plan = plan_port(patch, target, allow_pickle=cfg.allow_pickle, merging=True, policy=policy, old=old)
    ckpt = plan.ckpt
    out = Path(out)
    tick = counter(progress, "port", ckpt.total_bytes())  # ticks come from the copy threads too
    inputs = (target.path, patch.path) + ((old.ckpt.root,) if old is not None else ())
    with atomic_output_dir(out, overwrite=cfg.overwrite, inputs=inputs) as tmp:
        if ckpt.is_pickle:
            shard_names, written = _port_pickle(plan, tmp, cfg.verify, tick)
        else:
            patch, plan = _port_safetensors_shards(plan, patch, tmp, tick, load, cfg.block_bytes)
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
            "scale": cfg.scale,
            "policy": {"dora": policy.dora, "modules_to_save": policy.whole},
            "old_base": old.display if old is not None else None,
            "patch": {
                "source": _patch_record_id(patch, cfg.patch_source),
                "sha256": patch.weights_sha256(),
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
        if cfg.verify and not ckpt.is_pickle:
            _verify_shards(plan, tmp, progress, cfg.block_bytes)
    return PortResult(
        out=out,
        mode="merged",
        patch=cfg.patch_source.display if cfg.patch_source else str(patch.path),
        target=target.display,
        modules_merged=len(plan.key_map),
        bytes_written=written,
        seconds=time.monotonic() - t0,
        scale=cfg.scale,
        verified=cfg.verify,
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
    config: PortConfig | None = None,
    *,
    progress: ProgressFn | None = None,
    **overrides: Any,
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
    cfg = PortConfig.build(config, overrides)
    scale, overwrite, verify, allow_pickle, patch_source = cfg.scale, cfg.overwrite, cfg.verify, cfg.allow_pickle, cfg.patch_source
    calibration = dict(cfg.calibration) if cfg.calibration is not None else None
    policy = Policy.of(cfg)
    progress = progress or no_progress
    patch, old = prepare_patch(patch, policy=policy, base=cfg.base, allow_pickle=allow_pickle)
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
    old_sha = patch.weights_sha256()
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
