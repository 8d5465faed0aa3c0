"""A run's workdir belongs to one run at a time: an OS lock on ``WORKDIR/.lock``.

The lock is ``fcntl.flock`` on a file in the workdir, held for the run's life. The operating
system releases it when the holding process ends however it ends (an exception, SIGKILL, a
crash), so a killed run never leaves a workdir stuck; the file itself stays and is harmless.
The holder writes its pid into the file, so that a refused run can say who holds it.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import pathlib
import shutil
import tempfile
from typing import Iterator

LOCK = ".lock"


class WorkdirBusyError(RuntimeError):
    pass


def _busy(workdir: pathlib.Path, fd: int) -> WorkdirBusyError:
    holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
    return WorkdirBusyError(f"{workdir} is in use by another run (pid {holder}); wait for it "
                            f"to end, or give this run another --workdir")


def check_free(workdir: str | os.PathLike) -> None:
    """Raises WorkdirBusyError if a run holds ``workdir`` now; writes nothing (so a run can
    be refused before it has built anything)."""
    workdir = pathlib.Path(workdir)
    try:
        fd = os.open(workdir / LOCK, os.O_RDONLY)
    except FileNotFoundError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        raise _busy(workdir, fd) from None
    except OSError:
        pass  # no locks on this file system: hold() says so
    finally:
        os.close(fd)


@contextlib.contextmanager
def hold(workdir: str | os.PathLike) -> Iterator[None]:
    """Holds ``workdir`` (created if missing) for the ``with`` block, or raises
    WorkdirBusyError at once, naming the pid of the run that holds it."""
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / LOCK
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise _busy(workdir, fd) from None
        except OSError as e:
            raise WorkdirBusyError(
                f"cannot lock {path} ({e.strerror}): its file system does not support file "
                f"locks; use a --workdir on a local disk") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock


@contextlib.contextmanager
def staged_folder(out: str | os.PathLike) -> Iterator[pathlib.Path]:
    """Writes a new folder all at once: yields a temporary sibling of ``out`` to fill, renamed
    to ``out`` (which must then be absent or empty) when the block ends without error, and
    removed otherwise, so a failed write never leaves a half-written ``out``."""
    out = pathlib.Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = pathlib.Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        yield staging
        if out.exists():
            out.rmdir()
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
