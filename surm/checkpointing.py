"""Orbax checkpoints of a run: the trainable state, never the frozen base.

``workdir/checkpoints/<step>/state`` holds the trainable tree (adapters, head, ...), the
optimizer state, the step and the rng. The data stream needs no state: its batches are a
function of the seed and the step (``surm.data.loaders``), so a resumed run sees exactly the
batches an uninterrupted one would, with any number of processes and on any mesh (a checkpoint
of an older surm also holds ``data``, the grain iterator's position per process; it is not
read). The frozen base is reloaded
from its original file. Saves are asynchronous; the last ``keep`` are kept. A save killed
half-way leaves a ``<step>.orbax-checkpoint-tmp*`` folder that is never read as a checkpoint and
is removed by the next run on the workdir (which holds the workdir's lock, so no other run is
writing it).
"""
from __future__ import annotations

import logging
import os
import pathlib
import sys
import warnings

import jax
import orbax.checkpoint as ocp

from surm import workdir as workdir_files


class CorruptCheckpointError(RuntimeError):
    pass


def kept_steps(workdir: str | os.PathLike) -> list[int]:
    """The steps of the checkpoints kept in ``workdir`` (ascending), read without writing."""
    directory = pathlib.Path(workdir) / workdir_files.CHECKPOINTS
    return sorted(ocp.path.step.checkpoint_steps(directory)) if directory.is_dir() else []


def _drop_closed_loop_noise(unraisable) -> None:
    """Tensorstore reads still in flight when a restore fails finish into orbax's closed asyncio
    loop; each prints a 'RuntimeError: Event loop is closed' traceback (hundreds of lines for a
    real model). Those, and only those, are dropped."""
    if not (isinstance(unraisable.exc_value, RuntimeError)
            and str(unraisable.exc_value) == "Event loop is closed"):
        _previous_unraisablehook(unraisable)


_previous_unraisablehook = sys.unraisablehook


def _drop_unretrieved_reads(record: logging.LogRecord) -> bool:
    """The same failure's other reads, collected later as asyncio tasks whose exception nobody
    retrieved ('Task exception was never retrieved', logged by asyncio): dropped too."""
    return not record.getMessage().startswith("Task exception was never retrieved")


class _RestoreNoise:
    """While a restore runs, and after it if it failed (its reads finish and are collected
    later), the two kinds of noise above are dropped; a restore that succeeds puts things back."""

    def __enter__(self):
        sys.unraisablehook = _drop_closed_loop_noise
        logging.getLogger("asyncio").addFilter(_drop_unretrieved_reads)

    def __exit__(self, kind, value, traceback):
        if kind is None:
            sys.unraisablehook = _previous_unraisablehook
            logging.getLogger("asyncio").removeFilter(_drop_unretrieved_reads)
        else:  # and its coroutines that never ran, reported when they are collected
            warnings.filterwarnings("ignore", r"coroutine .* was never awaited", RuntimeWarning)
        return False


class Checkpoints:
    def __init__(self, workdir: str | pathlib.Path, keep: int = 2):
        self.directory = pathlib.Path(workdir).absolute() / workdir_files.CHECKPOINTS
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                                 enable_async_checkpointing=True,
                                                 cleanup_tmp_directories=True))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def drop_after(self, step: int) -> list[int]:
        """Deletes the kept checkpoints after ``step`` (a run resumed from an earlier step
        writes its own); returns their steps."""
        later = [s for s in self.manager.all_steps() if s > step]
        for s in later:
            self.manager.delete(s)
        return sorted(later)

    def save(self, step: int, state) -> None:
        self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state)))

    def restore(self, step: int, state_like):
        """The saved state, shaped and sharded like ``state_like``: on this run's mesh, which
        may differ from the saving run's (other devices, another number of processes)."""
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state_like)
        try:
            with _RestoreNoise():
                restored = self.manager.restore(step, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract)))
        except Exception as e:  # orbax raises many types for unreadable/mismatched files
            raise CorruptCheckpointError(
                f"checkpoint {self.directory / str(step)} cannot be restored ({type(e).__name__}: "
                f"{' '.join(str(e).split())[:300]}). It was left untouched. If it is damaged, "
                f"{self.earlier_steps_hint(step)}; if the config changed, use a new --workdir"
            ) from e
        return restored["state"]

    def earlier_steps_hint(self, step: int) -> str:
        """How to resume from a kept step before ``step`` (for an error message)."""
        earlier = sorted(s for s in self.manager.all_steps() if s < step)
        return (f"resume from an earlier kept step with --config.restore_step=N (kept: "
                f"{', '.join(map(str, earlier))})" if earlier else
                "no earlier step is kept: use a new --workdir to start again")

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
