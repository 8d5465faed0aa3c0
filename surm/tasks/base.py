"""What the trainer asks of a task (``surm.tasks``): it never branches on which one it has."""
from __future__ import annotations

import dataclasses
import pathlib
from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np

from surm import data


@dataclasses.dataclass
class Sources:
    """A run's examples, as the trainer reads them."""

    train: Sequence[Any]  # random access
    evaluation: dict[str, Sequence[Any]]  # "validation", "test"
    train_prep: Callable  # (example, rng) -> dict of arrays
    eval_prep: Callable
    label_names: list[str] | None = None
    dataset: data.Dataset | None = None  # a registered or local dataset (None: a text file)


class Task:
    """One kind of training objective. Subclasses define every method below."""

    name: str = ""

    def data_spec(self, config, entry) -> data.DatasetSpec:
        """The config's dataset as this task reads it (its metrics, its modality)."""
        raise NotImplementedError

    def sources(self, config, entry, spec: data.DatasetSpec) -> Sources:
        """The train and evaluation examples and their preprocessing."""
        raise NotImplementedError

    def batch_keys(self, entry) -> tuple[str, ...]:
        """What the train step reads of a batch."""
        raise NotImplementedError

    def eval_keys(self, entry) -> tuple[str, ...]:
        """What the eval step reads of a batch (the label stays on the host)."""
        raise NotImplementedError

    def loss(self, outputs: jax.Array, batch: Mapping[str, jax.Array],
             spec: data.DatasetSpec) -> jax.Array:
        """The scalar the train step minimises."""
        raise NotImplementedError

    def eval_outputs(self, outputs: jax.Array, batch: Mapping[str, jax.Array]) -> jax.Array:
        """What the eval step returns per example (reduced on device)."""
        return outputs

    def predictions(self, spec: data.DatasetSpec, index: np.ndarray, outputs: np.ndarray,
                    batches: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
        """The stored predictions of one evaluation (``surm.predictions``) from the eval step's
        outputs of the examples at ``index`` and the host batches they came from."""
        raise NotImplementedError

    def host_keys(self) -> tuple[str, ...]:
        """What the evaluation keeps of each host batch for ``predictions`` (e.g. the label)."""
        return ()

    def check_workdir(self, sources: Sources, workdir: pathlib.Path) -> None:
        """Refuses a workdir whose run saw other data (reads only)."""

    def record(self, sources: Sources, spec: data.DatasetSpec, workdir: pathlib.Path,
               *, write: bool, finished: bool) -> None:
        """Writes what the task keeps beside a run: the data it saw (at the start), what the
        model's outputs are (at the end: ``finished``)."""
