"""One way out of every command line: a user's mistake is one ``error:`` line and a non-zero
exit status, never a Python traceback; Ctrl-C and SIGTERM stop a run at a step boundary.

    if __name__ == "__main__":
        app.run(main, flags_parser=cli.parse_flags)   # absl commands

    with cli.stop_on_signals():                      # SIGINT/SIGTERM set a flag, nothing more
        for step in ...:
            ...
            cli.raise_if_stopped(step, "run the same command to resume")

Exit statuses: 1 for an error the user can fix, 2 for a command line that does not parse, 75
for a workdir that another run holds now (try again later: a sweep skips such a run rather than
recording it as failed), 130 after SIGINT and 143 after SIGTERM (128 + the signal, the shell's
convention).
"""
from __future__ import annotations

import contextlib
import errno
import os
import signal
import sys
import threading
from typing import Iterator, Sequence

from absl import flags

USAGE = 2
BUSY = 75  # EX_TEMPFAIL: the workdir is in use by another run; nothing was done
PARENT = "SURM_STOP_WITH_PARENT"  # a sweep's pid, given to the runs it starts


class Stopped(Exception):
    """A run stopped on a signal at a step boundary; ``exit_status`` is 128 + the signal."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_status = 128 + signum


def fail(message: str, status: int = 1) -> None:
    """Prints ``error: message`` (its last line only: never a traceback) and exits."""
    lines = [line.strip() for line in str(message).splitlines() if line.strip()]
    print(f"error: {lines[-1] if lines else message}", file=sys.stderr, flush=True)
    sys.exit(status)


def parse_flags(argv: Sequence[str]) -> list[str]:
    """``flags.FLAGS(argv)`` with a bad flag, a config file that fails (an unknown ``:k=v``
    argument) or an override of a field the config does not have (``--config.typo=1``) said
    in one line."""
    try:
        return flags.FLAGS(list(argv))
    except flags.Error as e:
        text = [line.strip() for line in str(e).splitlines() if line.strip()]
        last = text[-1] if text else str(e)
        for prefix in ("ValueError: ", "FileNotFoundError: ", "KeyError: ", "TypeError: "):
            last = last.removeprefix(prefix)
        fail(last if len(text) > 1 else " ".join(text), USAGE)
    except (AttributeError, KeyError) as e:  # ml_collections: an override of an unknown field
        name = str(e).strip("\"' ")
        if any(arg.startswith(("--config.peft.family", "--config.peft.mode")) for arg in argv):
            fail("a config's peft block holds a method and its structure, not family and mode: "
                 "override --config.peft.structure (a structured family) and "
                 "--config.peft.method (lora, adapter, houlsby, bitfit, probe, full), or give "
                 "family= and mode= as config arguments (--config FILE:family=...,mode=...)",
                 USAGE)
        fail(f"a --config.KEY=VALUE override names no field of the config: {name}; check its "
             f"spelling (python -m surm.inspect --config FILE shows the config)", USAGE)
    raise AssertionError("unreachable")


def describe_os_error(e: OSError) -> str:
    """One line for a failed file operation: the cause and the path."""
    why = {errno.ENOSPC: "the disk is full", errno.EROFS: "the file system is read-only",
           errno.EACCES: "permission denied", errno.EPERM: "not permitted",
           errno.ENOTDIR: "a part of the path is a file, not a folder",
           errno.EISDIR: "it is a folder, not a file", errno.ELOOP: "a symbolic link loop",
           errno.ENAMETOOLONG: "the name is too long", errno.EDQUOT: "the disk quota is used up",
           errno.ENOENT: "no such file or folder"}.get(e.errno, e.strerror or str(e))
    where = e.filename if e.filename is not None else ""
    return f"{why}: {where}" if where else why


_stop = threading.Event()
_signal = [0]


def _handler(signum, frame):
    del frame
    _signal[0] = signum
    _stop.set()


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    """While held, SIGINT and SIGTERM only ask the run to stop (``stopped``); the loop stops at
    its next step boundary. No exception is raised inside the compiler or a checkpoint write.
    A second Ctrl-C while stopping still waits for the write to end."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = {s: signal.signal(s, _handler) for s in (signal.SIGINT, signal.SIGTERM)}
    _stop.clear()
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def stopped() -> bool:
    return _stop.is_set()


def raise_if_stopped(what: str) -> None:
    """Raises Stopped (saying ``what`` and the signal) once a stop was asked for."""
    if _stop.is_set():
        name = signal.Signals(_signal[0]).name
        raise Stopped(f"stopped by {name}: {what}", _signal[0])


def stop_with_parent() -> None:
    """In a run a sweep started (``$SURM_STOP_WITH_PARENT`` holds the sweep's pid): when the
    sweep ends however it ends (kill -9 included), this run gets SIGTERM and stops at its next
    step boundary with a checkpoint, instead of running on unwatched and holding its workdir
    from the sweep's next attempt. Linux only (``prctl(PR_SET_PDEATHSIG)``); call it while
    ``stop_on_signals`` is held."""
    parent = os.environ.get(PARENT)
    if not parent or not sys.platform.startswith("linux"):
        return
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    pr_set_pdeathsig = 1
    libc.prctl(pr_set_pdeathsig, signal.SIGTERM, 0, 0, 0)
    if str(os.getppid()) != parent:  # the sweep ended before the request was made
        os.kill(os.getpid(), signal.SIGTERM)
