"""Outputs are written under a temporary sibling and renamed into place when complete.

An interrupted run therefore never leaves something that looks finished under the final
name; a later run removes stale temporary siblings whose writer process is gone.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import uuid
from pathlib import Path
from typing import Iterator

from portllm_cli.errors import InvalidInputError, OutputExistsError, PortllmError

TMP_MARK = ".portllm-tmp-"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale(out: Path) -> list[Path]:
    """Remove temporary siblings of ``out`` left by runs that were killed."""
    removed = []
    parent = out.parent
    if not parent.is_dir():
        return removed
    prefix = f".{out.name}{TMP_MARK}"
    for p in parent.iterdir():
        if not p.name.startswith(prefix):
            continue
        try:
            pid = int(p.name[len(prefix):].split("-", 1)[0])
        except ValueError:
            continue
        if not _pid_alive(pid):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def check_output(out: Path, *, overwrite: bool, inputs: tuple[Path, ...] = ()) -> None:
    """Refuse outputs that would destroy or nest inside an input, or clobber without --overwrite."""
    out_r = out.resolve()
    for inp in inputs:
        if inp is None:
            continue
        inp_r = Path(inp).resolve()
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
    parent = out_r.parent
    if not parent.exists():
        raise OutputExistsError(f"{parent}: the output's parent directory does not exist")
    if not parent.is_dir():
        raise OutputExistsError(f"{parent}: the output's parent is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputExistsError(f"{parent}: not writable")


@contextlib.contextmanager
def atomic_output_dir(out: Path, *, overwrite: bool = False, inputs: tuple[Path, ...] = ()) -> Iterator[Path]:
    """Yield a fresh temporary sibling directory; on success rename it to ``out``.

    On any exception (KeyboardInterrupt and SystemExit included) the temporary directory is
    removed and ``out`` is left exactly as it was.
    """
    out = Path(out)
    check_output(out, overwrite=overwrite, inputs=inputs)
    clean_stale(out)
    tmp = out.parent / f".{out.name}{TMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        tmp.mkdir()
    except OSError as exc:
        raise OutputExistsError(f"{out.parent}: cannot create the output ({exc.strerror})") from None
    try:
        yield tmp
        _fsync_dir(tmp)
        if out.exists():
            old = out.parent / f".{out.name}{TMP_MARK}{os.getpid()}-old-{uuid.uuid4().hex[:8]}"
            os.rename(out, old)
            os.rename(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out)
        _fsync_dir(out.parent)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
            raise PortllmError(
                f"{out}: no space left on device; the partial output was removed",
                hint="free some space or choose another --out",
            ) from None
        raise


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def copy_file(src: Path, dst: Path) -> None:
    """Copy one file's bytes (kernel copy where possible)."""
    try:
        shutil.copyfile(src, dst)
    except IsADirectoryError:
        raise InvalidInputError(f"{src}: expected a file") from None
