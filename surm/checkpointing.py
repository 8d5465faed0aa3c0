"""Orbax checkpoints of a run: the trainable state and the data iterator, never the frozen base.

``workdir/checkpoints/<step>/{state, data}``: ``state`` holds the trainable tree (adapters, head,
...), the optimizer state, the step and the rng; ``data`` the grain iterator's position, so a
resumed run sees exactly the batches an uninterrupted one would. The frozen base is reloaded
from its original file. Saves are asynchronous; the last ``keep`` are kept.
"""
from __future__ import annotations

import pathlib

import grain
import jax
import orbax.checkpoint as ocp


class CorruptCheckpointError(RuntimeError):
    pass


class Checkpoints:
    def __init__(self, workdir: str | pathlib.Path, keep: int = 2):
        self.directory = pathlib.Path(workdir).absolute() / "checkpoints"
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                                 enable_async_checkpointing=True))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state, data_iterator) -> None:
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=grain.checkpoint.CheckpointSave(data_iterator)))

    def restore(self, step: int, state_like, data_iterator):
        """The saved state (shaped and sharded like ``state_like``); moves the iterator."""
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state_like)
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract),
                data=grain.checkpoint.CheckpointRestore(data_iterator)))
        except Exception as e:  # orbax raises many types for unreadable/mismatched files
            raise CorruptCheckpointError(
                f"checkpoint {self.directory / str(step)} cannot be restored ({type(e).__name__}: "
                f"{str(e)[:300]}). It was left untouched. If it is damaged, move it away to "
                f"resume from an earlier step; if the config changed, use a new --workdir"
            ) from e
        return restored["state"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
