"""Outputs are written under a temporary sibling and renamed into place when complete.

Directories go through :func:`atomic_output_dir`, single files (a plot, a results file, a cached
download) through :func:`atomic_output_file`.

An interrupted run therefore never leaves something that looks finished under the final
name; a later run removes stale temporary siblings whose writer process is gone.

Temporary names are ``.<out>.portllm-tmp-<pid>-<host>-<random>`` (``...-<host>-old-<random>`` for
the previous output while ``--overwrite`` swaps it out). The host tag keeps a run on one
machine from deleting the live temporary directory of a run on another machine that shares
the disk: only siblings from this host whose process is gone are cleaned.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import shutil
import socket
import uuid
from pathlib import Path
from typing import Iterator

from portllm_cli.errors import InvalidInputError, NoSpaceError, OutputExistsError, PortllmError

TMP_MARK = ".portllm-tmp-"
_NO_SPACE = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}


def _host_tag() -> str:
    return hashlib.sha256(socket.gethostname().encode("utf-8", "replace")).hexdigest()[:8]


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return True  # 0 and negatives address process groups: never treat them as dead
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except (OverflowError, OSError):
        return False  # no such pid can exist
    return True


def _tmp_prefix(out: Path) -> str:
    return f".{out.name}{TMP_MARK}"


def _parse_tmp(name: str, prefix: str) -> tuple[int, str | None, bool] | None:
    """(pid, host tag or None for an untagged name, is_old) for a temporary sibling's name."""
    if not name.startswith(prefix):
        return None
    parts = name[len(prefix):].split("-")
    try:
        pid = int(parts[0])
    except ValueError:
        return None
    if len(parts) >= 3:  # pid-host-random or pid-host-old-random
        return pid, parts[1], parts[2] == "old"
    return pid, None, False


def _remove(p: Path) -> None:
    if p.is_symlink() or not p.is_dir():
        p.unlink(missing_ok=True)
    else:
        shutil.rmtree(p, ignore_errors=True)


def clean_stale(out: Path) -> list[Path]:
    """Remove temporary siblings of ``out`` left by runs on this host that were killed.

    If a run was killed between moving the previous output aside and renaming the new one
    into place, ``out`` is missing and the previous (complete) output is put back.
    """
    out = Path(out)
    removed: list[Path] = []
    parent = out.parent
    prefix = _tmp_prefix(out)
    host = _host_tag()
    try:
        if not parent.is_dir():
            return removed
        siblings = sorted(parent.iterdir())
    except OSError:
        return removed
    for p in siblings:
        parsed = _parse_tmp(p.name, prefix)
        if parsed is None:
            continue
        pid, tag, is_old = parsed
        if tag is not None and tag != host:
            continue  # written from another machine: its process cannot be checked from here
        if _pid_alive(pid):
            continue
        try:
            if is_old and not (out.exists() or out.is_symlink()) and p.is_dir() and not p.is_symlink():
                os.rename(p, out)
                continue
            _remove(p)
        except OSError:
            continue
        removed.append(p)
    return removed


def _resolve(p: Path) -> Path:
    try:
        return Path(p).resolve()
    except (OSError, RuntimeError, ValueError) as exc:  # symlink loops, NUL bytes
        raise InvalidInputError(f"{p}: cannot resolve the path ({exc.__class__.__name__})") from None


def _protected_dirs() -> set[Path]:
    """Directories that --overwrite must never replace: /, the home directory, cwd and its parents."""
    out = {Path("/")}
    with contextlib.suppress(Exception):
        out.add(Path.home().resolve())
    with contextlib.suppress(Exception):
        cwd = Path.cwd().resolve()
        out.add(cwd)
        out.update(cwd.parents)
    return out


def check_output(out: Path, *, overwrite: bool, inputs: tuple[Path, ...] = ()) -> None:
    """Refuse outputs that would destroy or nest inside an input, or clobber without --overwrite."""
    out = Path(out)
    if not str(out) or "\x00" in str(out):
        raise OutputExistsError(f"{out!r}: not a usable output path")
    out_r = _resolve(out)
    for inp in inputs:
        if inp is None:
            continue
        inp_r = _resolve(Path(inp))
        if out_r == inp_r:
            raise OutputExistsError(f"{out}: the output is the same path as the input {inp}")
        if inp_r in out_r.parents:
            raise OutputExistsError(f"{out}: the output lies inside the input {inp}")
        if out_r in inp_r.parents and overwrite:
            raise OutputExistsError(f"{out}: overwriting it would delete the input {inp}")
    if out.exists() or out.is_symlink():
        if not out.is_dir():
            raise OutputExistsError(f"{out}: exists and is not a directory")
        if not overwrite:
            raise OutputExistsError(f"{out}: already exists", hint="pass --overwrite to replace it")
        if out_r in _protected_dirs():
            raise OutputExistsError(f"{out}: refusing to overwrite {out_r} (the root, home or current directory or a parent of it)")
    parent = out_r.parent
    if not parent.exists():
        raise OutputExistsError(f"{parent}: the output's parent directory does not exist")
    if not parent.is_dir():
        raise OutputExistsError(f"{parent}: the output's parent is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputExistsError(f"{parent}: not writable")


def _no_space(exc: BaseException) -> bool:
    """Disk full, also when a library wrapped the OSError (torch, the safetensors extension)."""
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in _NO_SPACE:
            return True
        if not isinstance(e, PortllmError) and (
            "No space left on device" in str(e) or "StorageFull" in str(e) or "Disk quota exceeded" in str(e)
        ):
            return True
        e = e.__cause__ or e.__context__
    return False


@contextlib.contextmanager
def atomic_output_dir(out: Path, *, overwrite: bool = False, inputs: tuple[Path, ...] = ()) -> Iterator[Path]:
    """Yield a fresh temporary sibling directory; on success rename it to ``out``.

    On any exception (KeyboardInterrupt and SystemExit included) the temporary directory is
    removed and ``out`` is left exactly as it was. A full disk becomes NoSpaceError and any other
    OSError a one-line PortllmError; everything else is re-raised unchanged.
    """
    out = Path(out)
    check_output(out, overwrite=overwrite, inputs=inputs)
    clean_stale(out)
    stem = f"{_tmp_prefix(out)}{os.getpid()}-{_host_tag()}"
    tmp = out.parent / f"{stem}-{uuid.uuid4().hex[:8]}"
    try:
        # mkdir sits inside the cleanup block: a signal delivered as it returns must not leak tmp
        try:
            tmp.mkdir()
        except OSError as exc:
            raise OutputExistsError(f"{out.parent}: cannot create the output ({exc.strerror})") from None
        yield tmp
        _fsync_tree(tmp)
        if out.exists() or out.is_symlink():
            if not overwrite:  # appeared while we were writing: never clobber it
                raise OutputExistsError(f"{out}: appeared while writing; nothing was replaced", hint="pass --overwrite to replace it")
            old = out.parent / f"{stem}-old-{uuid.uuid4().hex[:8]}"
            os.rename(out, old)
            try:
                os.rename(tmp, out)
            except BaseException:
                os.rename(old, out)  # put the previous output back before reporting
                raise
            _remove(old)
        else:
            os.rename(tmp, out)
        _fsync_dir(out.parent)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, PortllmError) or not isinstance(exc, Exception):
            raise  # KeyboardInterrupt, SystemExit and our own errors pass through unchanged
        if _no_space(exc):
            raise NoSpaceError(
                f"{out}: no space left on device; the partial output was removed",
                hint="free some space or choose another --out",
            ) from None
        if isinstance(exc, OSError):
            where = f"{exc.filename}: " if exc.filename else f"{out}: "
            raise PortllmError(
                f"{where}{exc.strerror or exc.__class__.__name__}; the partial output {out} was removed"
            ) from None
        raise


def _fsync_tree(root: Path) -> None:
    """Flush every file and directory under ``root`` so the rename publishes durable data."""
    for dirpath, _dirnames, filenames in os.walk(root):
        for name in filenames:
            p = os.path.join(dirpath, name)
            if not os.path.islink(p):
                _fsync(p, report=True)
        _fsync_dir(Path(dirpath))


def _fsync(path: str | Path, *, report: bool) -> None:
    """Flush one file or directory to disk. With ``report``, a delayed write-back failure (disk full,
    I/O error) is raised: the output is not intact. Anything else is ignored."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as exc:
        if report and (exc.errno in _NO_SPACE or exc.errno == errno.EIO):
            raise
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    _fsync(path, report=False)


def copy_file(src: Path, dst: Path) -> None:
    """Copy one file's bytes (kernel copy where possible)."""
    try:
        shutil.copyfile(src, dst)
    except IsADirectoryError:
        raise InvalidInputError(f"{src}: expected a file") from None


@contextlib.contextmanager
def atomic_output_file(path: Path) -> Iterator[Path]:
    """Yield a temporary sibling path to write ``path``'s content to; on success flush it to disk and
    rename it to ``path`` (replacing it), on any failure remove it. Whether ``path`` may be replaced
    is the caller's call. The temporary name follows :func:`atomic_output_dir`'s, so a later write
    to the same path removes what a killed run left."""
    path = Path(path)
    clean_stale(path)
    tmp = path.parent / f"{_tmp_prefix(path)}{os.getpid()}-{_host_tag()}-{uuid.uuid4().hex[:8]}"
    try:
        yield tmp
        _fsync(tmp, report=True)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def write_file_atomic(path: Path, data: str | bytes, *, encoding: str = "utf-8") -> None:
    """Write a whole file with :func:`atomic_output_file`."""
    with atomic_output_file(path) as tmp:
        tmp.write_bytes(data.encode(encoding) if isinstance(data, str) else data)
