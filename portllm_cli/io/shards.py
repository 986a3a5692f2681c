"""Byte-level work on the shard files of a port: clone or copy what is not merged, write merged rows,
compare two files. No torch here; every buffer is allocated once and reused.

A merged shard keeps the target's layout byte for byte, so the output file is the source file with
the ranges of the merged tensors rewritten. Where the filesystem can share extents (``FICLONE`` on
btrfs, XFS with reflink, bcachefs...) the whole shard is cloned first and only the merged tensors
are written; elsewhere (ext4, tmpfs) the ranges that hold no merged tensor are copied by the kernel
(``copy_file_range``: no user-space buffer, no second read of the merged tensors' bytes).
"""

from __future__ import annotations

import errno
import functools
import os
import queue
import sys
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Callable, Iterable

from portllm_cli.errors import IntegrityError

if TYPE_CHECKING:
    import mmap

COPY_CHUNK = 64 << 20  # bytes per copy_file_range call (and per progress tick / cancellation check)
COMPARE_CHUNK = 8 << 20  # bytes per pread while comparing two files
FICLONE = 0x40049409  # _IOW(0x94, 9, int): linux/fs.h
# errno values meaning "not between these two files, here", after which the caller falls back
_NO_KERNEL_COPY = {errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP}
_NO_CLONE = _NO_KERNEL_COPY | {errno.ENOTTY, errno.EBADF, errno.EPERM, getattr(errno, "ENOTSUP", errno.EOPNOTSUPP)}


def pread_into(fd: int, buf: memoryview, offset: int) -> None:
    """Fill ``buf`` from ``fd`` at ``offset``; a short file is an IntegrityError."""
    view = memoryview(buf).cast("B")
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], offset + done)
        if n <= 0:
            raise IntegrityError(f"file ended at byte {offset + done} while reading {len(view)} bytes at {offset}")
        done += n


def pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    """Write all of ``data`` at ``offset`` (pwrite may write less than asked)."""
    view = memoryview(data).cast("B")
    done = 0
    while done < len(view):
        n = os.pwrite(fd, view[done:], offset + done)
        if n <= 0:
            raise OSError(f"short write at offset {offset + done}")
        done += n


_SYNC_FILE_RANGE_WRITE = 2  # linux/fs.h: start writeback of the range's dirty pages, do not wait


@functools.cache
def _sync_file_range() -> "Callable[[int, int, int, int], int] | None":
    """libc's sync_file_range on Linux, else None (another OS, or a libc without it)."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    try:
        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Ask the kernel to start writing ``[offset, offset + length)`` of ``fd`` to disk now, without
    waiting (Linux ``sync_file_range(SYNC_FILE_RANGE_WRITE)``); elsewhere, or where it fails, nothing.

    An output is fsynced before it is renamed into place; started as each range is written, the disk
    writes run while the rest is being merged, and the fsync finds little left to do instead of
    every page the dirty-memory limits let pile up. Advisory only: durability still comes from the
    fsync."""
    fn = _sync_file_range()
    if fn is not None and length > 0:
        fn(fd, offset, length, _SYNC_FILE_RANGE_WRITE)  # advisory: errors ignored


class Writeback:
    """``start_writeback`` from one background thread: ``wb(fd, offset, length)`` queues the request
    and returns at once. sync_file_range waits while the disk's request queue is full (57 ms a call
    on average, measured with strace on a 7.6 GB port on this project's 2-core test machine), and a
    merge worker waiting there is a core doing nothing. Advisory like ``start_writeback``: requests
    still queued at ``close`` are dropped (the fsync that follows writes everything). ``close``
    returns only when no request is running, so the caller may then close its descriptors."""

    def __init__(self) -> None:
        self._fn = _sync_file_range()
        self._queue: "queue.SimpleQueue[tuple[int, int, int] | None]" = queue.SimpleQueue()
        self._closed = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def __call__(self, fd: int, offset: int, length: int) -> None:
        if self._fn is None or length <= 0 or self._closed.is_set():
            return
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="portllm-writeback", daemon=True)
                self._thread.start()
        self._queue.put((fd, offset, length))

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            if not self._closed.is_set():
                start_writeback(*item)

    def close(self) -> None:
        self._closed.set()
        with self._lock:
            thread, self._thread = self._thread, None
        if thread is not None:
            self._queue.put(None)
            thread.join()


def copy_range(
    src_fd: int, dst_fd: int, offset: int, length: int, dst_offset: int | None = None,
    writeback: Callable[[int, int, int], None] = start_writeback,
) -> None:
    """Copy ``length`` bytes from ``offset`` of one open file to ``dst_offset`` (default: the same
    offset) of another, in the kernel where possible (no user-space copy of the data); ``writeback``
    starts each chunk's disk write (``start_writeback``, or a ``Writeback``'s queue)."""
    dst_offset = offset if dst_offset is None else dst_offset
    done = 0
    while done < length:
        n = min(COPY_CHUNK, length - done)
        try:
            moved = os.copy_file_range(src_fd, dst_fd, n, offset + done, dst_offset + done)
        except (AttributeError, OSError) as exc:  # no copy_file_range (macOS), or not between these files
            if isinstance(exc, OSError) and exc.errno not in _NO_KERNEL_COPY:
                raise
            data = os.pread(src_fd, n, offset + done)
            if not data:
                raise IntegrityError("source file ended early while copying") from None
            pwrite_all(dst_fd, memoryview(data), dst_offset + done)
            moved = len(data)
        if moved == 0:
            raise IntegrityError("source file ended early while copying")
        writeback(dst_fd, dst_offset + done, moved)
        done += moved


def map_readonly(fd: int) -> "mmap.mmap | None":
    """A read-only shared mapping of a whole open file, through which merges read the rows they
    change where they lie (one copy fewer than pread), or None where none can be made (an empty
    file, a file that cannot be mapped). Like safetensors' and transformers' own loading, this
    trusts the file not to shrink while mapped: reading past its end would be a SIGBUS, not an
    error. Release what was read with ``drop_mapped``; close it before the file."""
    import mmap

    try:
        return mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
    except (OSError, ValueError):
        return None


@functools.cache
def _pmd_bytes() -> int:
    """The largest page a file mapping may use here (a huge page mapped by one page-middle-directory
    entry: 2 MiB on x86-64), from the kernel where it says, else 2 MiB."""
    try:
        with open("/sys/kernel/mm/transparent_hugepage/hpage_pmd_size") as f:
            return max(int(f.read().strip()), 4096)
    except (OSError, ValueError):
        return 2 << 20


def drop_mapped(mm: "mmap.mmap", begin: int, end: int) -> None:
    """Unmap ``[begin, end)`` of a read-only mapping from this process (``MADV_DONTNEED``; the data
    stays in the page cache and is mapped again if read again): pages read through a mapping count
    in the process's resident set until then, which would grow with the model. The range is widened
    to whole huge pages: where the page cache holds a file in huge folios (ext4 and XFS on recent
    kernels), a read maps the whole 2 MiB folio around it, the part before ``begin`` included, and
    dropping only ``[begin, end)`` left that part mapped (measured: RssFile grew ~40 KiB per 2 MiB
    block read and dropped). Another thread reading nearby pages maps them again on its next read.
    A no-op where madvise is missing (Windows)."""
    import mmap

    if not hasattr(mm, "madvise") or end <= begin:
        return
    unit = max(_pmd_bytes(), mmap.PAGESIZE)
    start = begin - begin % unit
    stop = min(len(mm), -(-end // unit) * unit)
    if stop > start:
        mm.madvise(mmap.MADV_DONTNEED, start, stop - start)


def clone_file(src_fd: int, dst_fd: int) -> bool:
    """Make ``dst`` share ``src``'s extents (a reflink: no bytes copied); False where unsupported.

    The clone is copy-on-write: writing into ``dst`` afterwards never changes ``src``.
    """
    if not sys.platform.startswith("linux") or os.environ.get("PORTLLM_NO_REFLINK"):
        return False
    import fcntl

    try:
        fcntl.ioctl(dst_fd, FICLONE, src_fd)
    except OSError as exc:
        if exc.errno in _NO_CLONE:
            return False
        raise
    return True


def untargeted_spans(size: int, ranges: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """The [begin, end) byte spans of a ``size``-byte file outside the given (non-overlapping) ranges."""
    spans, cursor = [], 0
    for begin, end in sorted(ranges):
        if begin > cursor:
            spans.append((cursor, begin))
        cursor = max(cursor, end)
    if cursor < size:
        spans.append((cursor, size))
    return spans


class Buffers:
    """Reusable byte buffers by name, grown to the largest request and never shrunk (one per thread)."""

    def __init__(self) -> None:
        self._bufs: dict[str, bytearray] = {}

    def get(self, name: str, n: int) -> bytearray:
        buf = self._bufs.get(name)
        if buf is None or len(buf) < n:
            self._bufs.pop(name, None)  # free the old one before allocating the larger one
            buf = self._bufs[name] = bytearray(n)
        return buf


def first_difference(a_fd: int, b_fd: int, begin: int, end: int, bufs: Buffers) -> int | None:
    """First offset in [begin, end) where two files differ, or None when they are equal there."""
    pos = begin
    a, b = bufs.get("cmp-a", COMPARE_CHUNK), bufs.get("cmp-b", COMPARE_CHUNK)
    while pos < end:
        n = min(COMPARE_CHUNK, end - pos)
        va, vb = memoryview(a)[:n], memoryview(b)[:n]
        pread_into(a_fd, va, pos)
        pread_into(b_fd, vb, pos)
        # bytearray == bytearray is a memcmp; a memoryview comparison goes element by element
        same = a == b if n == len(a) else va.tobytes() == vb.tobytes()
        if not same:
            return pos + next(i for i in range(n) if va[i] != vb[i])
        pos += n
    return None


class ShardCopier:
    """Copies byte spans between open files in worker threads while the caller merges other ranges
    of the same files (``copy_file_range`` runs in the kernel and releases the GIL, so copying,
    importing torch and merging overlap). Spans of different files run side by side. Disk writes
    are started through ``writeback`` (a ``Writeback``, which the merges share), stopped before
    the fsync and at ``close``."""

    def __init__(self, workers: int, tick: Callable[[int], None]) -> None:
        self.writeback = Writeback()
        self._pool = ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="portllm-copy")
        self._cancel = threading.Event()
        self._futures: list[Future] = []
        self._tick = tick

    def submit(self, src_fd: int, dst_fd: int, spans: list[tuple[int, int]]) -> None:
        if spans:
            self._futures.append(self._pool.submit(self._run, src_fd, dst_fd, spans))

    def _run(self, src_fd: int, dst_fd: int, spans: list[tuple[int, int]]) -> None:
        for begin, end in spans:
            pos = begin
            while pos < end:
                if self._cancel.is_set():
                    return
                n = min(COPY_CHUNK, end - pos)
                copy_range(src_fd, dst_fd, pos, n, writeback=self.writeback)
                pos += n
                self._tick(n)

    def wait(self) -> None:
        """Wait for every copy; the first failure is raised."""
        for f in self._futures:
            f.result()

    def fsync(self, fds: list[int]) -> None:
        """fsync every file once, side by side: on disk before the output is renamed into place."""
        self.writeback.close()
        for f in [self._pool.submit(os.fsync, fd) for fd in fds]:
            f.result()

    def close(self) -> None:
        self._cancel.set()
        self._pool.shutdown(wait=True, cancel_futures=True)
        self.writeback.close()
