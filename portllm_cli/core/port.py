"""Carry a patch onto an evolved model: merged weights (W + scale*B@A) or a retargeted adapter.

Merged output keeps the target's layout byte for byte: the header does not change (same names,
dtypes, shapes, offsets), so the shard layout, the index, the metadata and every untargeted byte are
identical to the target's. Each output shard is first the source shard: cloned where the filesystem
shares extents (a reflink, no bytes copied), else its untargeted byte ranges copied by the kernel
(``copy_file_range``, no user-space memory) in worker threads (``portllm_cli.io.shards``). Merge
workers meanwhile stream each targeted tensor in row blocks: pread a block of rows from the
*source*, merge it in float32 (``portllm_cli.core.merge``), pwrite it at its own offset. The
patch is read lazily: its file is scanned once (sha256 checked, one digest per tensor kept), and
each module's factors are read when its tensor is merged, refused unless they hash as scanned.

Peak memory is the interpreter with torch plus a few blocks per merge worker (PORT_BLOCK_BYTES of
float32 each) plus the factors of the tensors being merged, whatever the size of the model, of its
shards, of its largest tensor or of the patch. Given a patch directory, the copies start as soon as
the patch's names and shapes (from its header) are known to fit, so importing torch and reading and
verifying the factors overlap them.
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
from portllm_cli.core.merge import Edit, LoraEdit, Workspace, block_rows, merge_stream, merge_weight
from portllm_cli.core.progress import ProgressFn, no_progress
from portllm_cli.errors import IntegrityError, PortllmError, UnsupportedError, UsageError
from portllm_cli.io.atomic import atomic_output_dir, copy_file
from portllm_cli.io.checkpoint import SAFE_INDEX, SAFE_SINGLE, Checkpoint, read_json
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
    first_difference,
    pread_into,
    pwrite_all,
    untargeted_spans,
)
from portllm_cli.patch.format import (
    ADAPTER_WEIGHTS,
    LoraModule,
    Patch,
    build_manifest,
    materialize,
    now_iso,
    patch_tensors,
    peft_key,
    read_patch,
    sha256_file,
    write_patch_files,
)
from portllm_cli.resolve import Resolved, model_record

if TYPE_CHECKING:
    import torch

PORT_RECORD = "portllm_port.json"
MERGEABLE_DTYPES = ("F32", "F16", "BF16", "F64")
# Kernel copies of different shards run side by side: memory bandwidth allows more than one
# stream, and each releases the GIL. Measured on 2 cores: 2 workers ~20% faster than 1.
COPY_WORKERS = max(1, min(4, os.cpu_count() or 1))
# Merges of different tensors run side by side too; each holds a few row blocks.
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


# -- the merge itself lives in core/merge.py; ``merge_shard_tensor`` below is the per-tensor step
# of a port (the hook tests/slow_port.py wraps); ``merge_weight`` (in memory) serves pickle targets.
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
    if tensors.get("sha256"):
        return tensors["sha256"]
    if patch.source is not None:  # read lazily: the digest of the bytes that were used
        return patch.source.sha256
    return sha256_file(patch.path / ADAPTER_WEIGHTS)


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
    the caller's setting after. The cyclic garbage collector pauses meanwhile: each block makes a
    few short-lived tensor objects (no cycles), and a collection walks every object torch's import
    created, a few percent of a port's CPU time for nothing."""

    def __enter__(self) -> None:
        import gc

        import torch

        self._old = torch.get_num_threads()
        torch.set_num_threads(max(1, min(self._old, (os.cpu_count() or 1) // MERGE_WORKERS)))
        self._gc = gc.isenabled()
        gc.disable()

    def __exit__(self, *exc: object) -> None:
        import gc

        import torch

        torch.set_num_threads(self._old)
        if self._gc:
            gc.enable()


class _Shape:
    """Stands in for a factor tensor where only its shape is needed (the compatibility check)."""

    def __init__(self, shape: tuple[int, ...]) -> None:
        self.shape = shape


def _patch_outline(path: Path) -> Patch | None:
    """A patch's module names and factor shapes from its config and safetensors header, without
    torch and without reading the factors. None whenever anything needs the full reader's
    judgement (it then runs first and reports)."""
    from portllm_cli.patch import format as pf

    try:
        cfg = pf._validate_config(read_json(path / pf.ADAPTER_CONFIG, "adapter config"), path)
        manifest = pf.read_manifest(path)
        header = read_header(path / ADAPTER_WEIGHTS)
    except (PortllmError, OSError):
        return None
    parts: dict[str, dict[str, tuple[int, ...]]] = {}
    kinds: dict[str, str] = {}
    for key, info in header.tensors.items():
        if key.endswith(".base_layer.weight"):
            continue
        m = pf._KEY_RE.match(key)
        if not m or len(info.shape) != 2:
            return None
        module = (m.group("module") or m.group("emodule")).removeprefix(pf.PEFT_PREFIX)
        part = m.group("part") or m.group("epart")
        slot = "A" if part.endswith("A") else "B"
        if slot in parts.setdefault(module, {}):
            return None
        parts[module][slot] = info.shape
        kinds[module] = "embedding" if part.startswith("lora_embedding") else "linear"
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
    return Patch(path, cfg, manifest, modules, [])


# -- merged output ----------------------------------------------------------------------------
# float32 bytes of one merge block in a port: small enough that the block, its delta and its stored
# rows stay in the CPU's caches between the read, the arithmetic and the write, large enough that
# each pread and pwrite moves a megabyte or more. The bits do not depend on it (core.merge).
PORT_BLOCK_BYTES = 4 << 20


@dataclass
class _Target:
    """One stored tensor to merge, and how to build its edits when its turn comes (reading the
    factors they need then, not before)."""

    info: TensorInfo
    edits: Callable[[], list[Edit]]


def _targets(plan: PortPlan, patch: Patch, scale: float) -> dict[Path, list[_Target]]:
    """Per shard, in file order, every targeted tensor with its list of edits (one LoraEdit per
    patch module that maps to it), built when the tensor's merge starts."""
    modules: dict[str, list[str]] = {}
    for module, key in sorted(plan.key_map.items()):
        modules.setdefault(key, []).append(module)
    by_file: dict[Path, list[_Target]] = {}
    for key, names in modules.items():
        f, info = plan.ckpt.locations[key]
        found = [patch.modules[n] for n in names]
        by_file.setdefault(f, []).append(
            _Target(info, lambda found=found: [LoraEdit(materialize(m), scale) for m in found])
        )
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
) -> None:
    """Merge one stored tensor of a shard into the output shard, a row block at a time: pread the
    rows from the source, apply the edits (core.merge.merge_stream), pwrite the merged rows at the
    same offset of the output. Memory is one block, whatever the tensor's size. The per-tensor step
    of a port (tests/slow_port.py wraps it)."""
    if info.nbytes == 0:
        return
    ws, bufs = ws or Workspace(), bufs or Buffers()
    n_rows, row_bytes, _ = _row_layout(info)

    def write_rows(r0: int, t: "torch.Tensor") -> None:
        data = tensor_bytes(t)
        pwrite_all(dst_fd, data, info.begin + r0 * row_bytes)
        if tick is not None:
            tick(len(data))

    merge_stream(n_rows, _rows_reader(src_fd, info, bufs), write_rows, edits, block_rows(info.shape or (1,), block_bytes), ws)


def _port_safetensors_shards(
    plan: PortPlan, patch: Patch, tmp: Path, scale: float, tick: Callable[[int], None],
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
    try:
        for f in ckpt.files:
            header = ckpt.headers[f]
            infos = [header.tensors[key] for key in plan.key_map.values() if ckpt.locations[key][0] == f]
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
            outline_map = plan.key_map
            patch, plan = load()
            if plan.key_map != outline_map:  # the factors must target what the copies left out
                raise IntegrityError(f"{patch.path}: the patch changed while it was being read")
        targets = _targets(plan, patch, scale)
        jobs = [(src, dst, t) for f, (src, dst) in zip(ckpt.files, fds) for t in targets.get(f, [])]
        with _torch_threads():
            _run_merges(jobs, tick, block_bytes)
        copier.wait()
        copier.fsync([dst for _, dst in fds])
    finally:
        copier.close()
        for src, dst in fds:
            os.close(src)
            os.close(dst)
    return patch, plan


def _run_merges(jobs: list[tuple[int, int, _Target]], tick: Callable[[int], None], block_bytes: int) -> None:
    """Merge and write the targeted tensors, MERGE_WORKERS at a time (torch releases the GIL), each
    worker with its own bounded buffers (one block), reading each tensor's factors as it starts."""
    from concurrent.futures import ThreadPoolExecutor

    local = threading.local()

    def merge_one(job: tuple[int, int, _Target]) -> None:
        src, dst, target = job
        if not hasattr(local, "ws"):
            local.ws, local.bufs = Workspace(), Buffers()
        merge_shard_tensor(src, dst, target.info, target.edits(), block_bytes=block_bytes, ws=local.ws,
                           bufs=local.bufs, tick=tick)

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
                        f"{dst.name}: tensor {info.name} does not equal base + scale*B@A after writing"
                    )

            if info.nbytes:
                n_rows, _, _ = _row_layout(info)
                merge_stream(n_rows, _rows_reader(sfd, info, bufs), check, t.edits(),
                             block_rows(info.shape or (1,), block_bytes), ws)
            cursor = info.end
    finally:
        os.close(sfd)
        os.close(dfd)


def _verify_shards(plan: PortPlan, patch: Patch, tmp: Path, scale: float, progress: ProgressFn,
                   block_bytes: int = PORT_BLOCK_BYTES) -> None:
    """--verify for safetensors targets: every shard reread and checked, MERGE_WORKERS side by side."""
    from concurrent.futures import ThreadPoolExecutor

    ckpt = plan.ckpt
    targets = _targets(plan, patch, scale)
    done = 0
    lock = threading.Lock()

    def one(f: Path) -> None:
        nonlocal done
        _verify_safetensors_shard(f, tmp / f.name, targets.get(f, []), block_bytes)
        with lock:
            done += 1
            progress("verify", done, len(ckpt.files))

    with _torch_threads():
        pool = ThreadPoolExecutor(max_workers=MERGE_WORKERS, thread_name_prefix="portllm-verify")
        try:
            for fut in [pool.submit(one, f) for f in ckpt.files]:
                fut.result()
        finally:
            pool.shutdown(wait=True, cancel_futures=True)


def _port_pickle(
    plan: PortPlan, patch: Patch, tmp: Path, scale: float, verify: bool, tick: Callable[[int], None]
) -> tuple[list[str], int]:
    """Pickle targets (--allow-pickle): write safetensors shards, one per input file, plus an index."""
    import torch

    ckpt = plan.ckpt
    by_key = {key: materialize(patch.modules[m]) for m, key in plan.key_map.items()}
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
    block_bytes: int = PORT_BLOCK_BYTES,
) -> PortResult:
    """Write TARGET with PATCH merged into OUT; see the module docstring for how.

    PATCH is a Patch already read, or a patch directory. Given a directory, the patch's module
    names and shapes are first taken from its config and safetensors header (no torch, no
    factors) and checked against the target; when they fit, the kernel starts copying while
    the patch file is scanned and verified (sha256 unless ``verify_patch`` is false, NaN/Inf),
    which hides the cost of importing torch. Anything unusual in the outline falls back to
    reading the patch first, so errors and their order are those of ``read_patch`` then the
    check. A patch directory is read lazily (``read_patch(lazy=True)``): each module's factors are
    read when its tensor is merged. ``block_bytes`` is the float32 size of one merge block.
    """
    opened: list[Patch] = []  # lazily read patches keep their file open until the port ends
    try:
        return _port_merged(patch, target, out, scale=scale, overwrite=overwrite, verify=verify,
                            allow_pickle=allow_pickle, progress=progress, patch_source=patch_source,
                            verify_patch=verify_patch, block_bytes=block_bytes, opened=opened)
    finally:
        for p in opened:
            p.close()


def _port_merged(
    patch: "Patch | str | os.PathLike[str]", target: Resolved, out: Path, *, scale: float, overwrite: bool,
    verify: bool, allow_pickle: bool, progress: ProgressFn | None, patch_source: Resolved | None,
    verify_patch: bool, block_bytes: int, opened: list[Patch],
) -> PortResult:
    t0 = time.monotonic()
    scale = check_scale(scale)
    progress = progress or no_progress
    load = None
    if not isinstance(patch, Patch):
        path = Path(patch)
        outline = _patch_outline(path)
        plan = None
        if outline is not None:
            try:
                plan = plan_port(outline, target, allow_pickle=allow_pickle, merging=True)
            except PortllmError:
                plan = None  # let the full reader report first, as it would without the outline
        if plan is None or plan.ckpt.is_pickle:
            patch = read_patch(path, verify=verify_patch, lazy=True)
            opened.append(patch)
            plan = plan_port(patch, target, allow_pickle=allow_pickle, merging=True)
        else:
            patch = outline

            def load() -> tuple[Patch, PortPlan]:
                full = read_patch(path, verify=verify_patch, lazy=True)
                opened.append(full)
                return full, plan_port(full, target, allow_pickle=allow_pickle, merging=True)
    else:
        plan = plan_port(patch, target, allow_pickle=allow_pickle, merging=True)
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
    with atomic_output_dir(out, overwrite=overwrite, inputs=(target.path, patch.path)) as tmp:
        if ckpt.is_pickle:
            shard_names, written = _port_pickle(plan, patch, tmp, scale, verify, tick)
        else:
            patch, plan = _port_safetensors_shards(plan, patch, tmp, scale, tick, load, block_bytes)
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
            "shards": shard_names,
            "converted_from_pickle": ckpt.is_pickle,
        }
        (tmp / PORT_RECORD).write_text(json.dumps(record, indent=2) + "\n")
        written += (tmp / PORT_RECORD).stat().st_size
        if verify and not ckpt.is_pickle:
            _verify_shards(plan, patch, tmp, scale, progress, block_bytes)
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
            lora=_lora_summary(patch),
            source={"kind": "peft-adapter", "path": str(patch.path.resolve())},
        )
    manifest["target"] = target_rec
    manifest["ports"] = list(old.get("ports") or []) + [port_entry]
    with atomic_output_dir(out, overwrite=overwrite, inputs=(target.path, patch.path)) as tmp:
        write_patch_files(tmp, tensors, config, manifest)
        progress("adapter", 2, 3)
        if verify:
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
