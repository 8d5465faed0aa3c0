"""A run's workdir: the name of every file in it, and its lock (one run at a time).

Files (every module that reads or writes a workdir takes the names from here)::

    config.json            the run's config, as it runs now (CONFIG)
    config_changes.jsonl   what a resumed run changed on purpose, and from which step
    lora_plan.json         how each lora-mode update is computed, in training and evaluation
    mesh.json              the device mesh the run last ran on (axes, device ids in order)
    metrics.jsonl          one JSON object per log, eval and test line (surm.run_log)
    predictions/           per-example predictions of every evaluation (surm.predictions)
    checkpoints/           orbax checkpoints (surm.checkpointing)
    tb/                    TensorBoard events
    dataset.json           a local dataset's record (what content the run saw)
    outputs.json           what the model outputs (surm.runs)
    adapters/              the final adapters (surm.peft.io)
    summary.json           written last: the run has finished
    run.json, train.log, error.txt   a sweep's record of the run, its log, its failure
    .lock                  held by the run that owns the workdir
    .held.<host>.<pid>.*   where the file system has no locks: one marker per holder

The lock is ``fcntl.flock`` on ``.lock`` in the workdir, held for the run's life. The operating
system releases it when the holding process ends however it ends (an exception, SIGKILL, a
crash), so a killed run never leaves a workdir stuck; the file itself stays and is harmless.
The holder writes its pid into the file, so that a refused run can say who holds it. On a file
system without ``flock`` (some network and bucket mounts), each holder writes a marker of its
own named by its host and pid (``_hold_by_marker``), removed at the end; a marker left by a
killed run of the same host is deleted, one of another host is reported with the instruction to
delete it.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import pathlib
import re
import shutil
import socket
import tempfile
from typing import Iterator

LOCK = ".lock"
MARKER = ".held"  # where the file system has no locks: .held.<host>.<pid>.<token> per holder
CONFIG = "config.json"
CONFIG_CHANGES = "config_changes.jsonl"
LORA_PLAN = "lora_plan.json"
MESH = "mesh.json"  # the device mesh the run last ran on: axes, device ids in mesh order
METRICS = "metrics.jsonl"
PREDICTIONS = "predictions"
CHECKPOINTS = "checkpoints"
TENSORBOARD = "tb"
DATASET = "dataset.json"
OUTPUTS = "outputs.json"
ADAPTERS = "adapters"
SUMMARY = "summary.json"
SWEEP_RECORD = "run.json"
SWEEP_LOG = "train.log"
SWEEP_ERROR = "error.txt"


class WorkdirBusyError(RuntimeError):
    pass


_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


def local(path: str | os.PathLike) -> pathlib.Path:
    """``path`` as a local folder path; a URL (``gs://bucket/run``) is refused by name, never
    turned into a local folder called ``gs:`` (a pod's workdir is a shared file system, or a
    bucket mounted as one, e.g. with gcsfuse)."""
    text = os.fspath(path)
    url = _URL.match(text)
    if url:
        raise ValueError(f"{text}: a workdir is a folder of a file system; {url.group(1)}:// "
                         f"paths are not read. Mount the bucket (e.g. gcsfuse) and give the "
                         f"mounted path")
    return pathlib.Path(text)


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
    except OSError:  # no locks on this file system: a marker names the holder
        holder = _marker_holder(workdir)
        if holder is not None:
            raise WorkdirBusyError(f"{workdir} is in use by another run (pid {holder[2]} on "
                                   f"host {holder[1]}); wait for it to end, or give this run "
                                   f"another --workdir") from None
    finally:
        os.close(fd)


@contextlib.contextmanager
def hold(workdir: str | os.PathLike) -> Iterator[None]:
    """Holds ``workdir`` (created if missing) for the ``with`` block, or raises
    WorkdirBusyError at once, naming the pid of the run that holds it. On a file system
    without file locks (some network and bucket mounts), a marker file names the holder
    instead (``_hold_by_marker``)."""
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / LOCK
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise _busy(workdir, fd) from None
        except OSError:
            os.close(fd)
            fd = -1
            with _hold_by_marker(workdir):
                yield
            return
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        if fd >= 0:
            os.close(fd)  # releases the lock


def _markers(workdir: pathlib.Path) -> list[tuple[pathlib.Path, str, int]]:
    """(file, host, pid) of every holder's marker in ``workdir``."""
    out = []
    for path in workdir.glob(f"{MARKER}.*"):
        host, _, rest = path.name[len(MARKER) + 1:].rpartition(".")
        host, _, pid = host.rpartition(".")
        if host and pid.isdigit():
            out.append((path, host, int(pid)))
    return out


def _ended(host: str, pid: int) -> bool:
    """Whether the process is known to have ended (only one of this host can be checked)."""
    if host != socket.gethostname():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass  # alive, another user's
    return False


def _marker_holder(workdir: pathlib.Path, mine: pathlib.Path | None = None,
                   clean: bool = False) -> tuple[pathlib.Path, str, int] | None:
    """(marker, host, pid) of a live holder's marker other than ``mine``, or None; with
    ``clean``, the markers of ended processes of this host (killed runs) are deleted."""
    for path, host, pid in _markers(workdir):
        if path == mine:
            continue
        if not _ended(host, pid):
            return path, host, pid
        if clean:
            path.unlink(missing_ok=True)  # its name is its own: no other holder's file
    return None


@contextlib.contextmanager
def _hold_by_marker(workdir: pathlib.Path) -> Iterator[None]:
    """Where ``flock`` does not work: this holder's own marker (``.held.<host>.<pid>.<token>``,
    a name no other holder can take), then a look at the others: with another live one, this
    holder removes its own and is refused (two runs starting at once both are: neither holds
    it twice over). Markers of ended processes of this host are deleted; one of another host
    cannot be checked, so the error says to delete it if that run is gone."""
    mine = workdir / f"{MARKER}.{socket.gethostname()}.{os.getpid()}.{os.urandom(4).hex()}"
    mine.touch(exist_ok=False)
    try:
        holder = _marker_holder(workdir, mine, clean=True)
        if holder is not None:
            path, host, pid = holder
            where = "" if host == socket.gethostname() else f" on host {host}"
            raise WorkdirBusyError(
                f"{workdir} is in use by another run (pid {pid}{where}; this file system has "
                f"no file locks, so {path} marks the holder: if that run is gone, delete the "
                f"file); or give this run another --workdir")
        yield
    finally:
        mine.unlink(missing_ok=True)


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
