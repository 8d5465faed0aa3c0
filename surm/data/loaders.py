"""grain input pipelines: an endless, shuffled, checkpointable training stream, and one exact
pass for evaluation.

Both shard the split over processes: process ``i`` of ``n`` reads examples ``i, i + n,
i + 2n, ...`` (``jax.process_index()`` of ``jax.process_count()`` unless given), and yields
``global_batch_size // n`` examples per batch, so the batches of all processes together form
one global batch.

Training: ``make_train_loader`` returns a ``grain.DatasetIterator``. Order and augmentation
depend only on the seed and the global batch's number, so ``start_batch=k`` resumes the stream
at global batch k with any number of processes (what the trainer does: a checkpoint needs only
its step); the iterator's ``get_state()`` / ``set_state()`` resume it too, with the same number
of processes and workers. Every epoch is reshuffled; the incomplete last batch of a finite
stream is dropped.

Evaluation: ``make_eval_batches`` pads every shard with masked copies of a real example to
the same whole number of batches, so all processes run the same number of steps,
``batch["mask"]`` (bool) marks the examples that count (masked metrics are exact) and
``batch["index"]`` (int64) is each example's position in the evaluated split, so that what the
model predicted can be stored per example and matched across runs.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import grain
import jax
from absl import flags

from surm.data.subsets import Subset

Preprocess = Callable[..., dict]  # (example, rng=None) -> dict of arrays


def _shard(shard_index: int | None, shard_count: int | None) -> tuple[int, int]:
    index = jax.process_index() if shard_index is None else shard_index
    count = jax.process_count() if shard_count is None else shard_count
    if not 0 <= index < count:
        raise ValueError(f"shard_index {index} is not in [0, {count})")
    return index, count


def _local_batch_size(global_batch_size: int, shard_count: int) -> int:
    if global_batch_size % shard_count:
        raise ValueError(f"global_batch_size {global_batch_size} is not divisible by the "
                         f"{shard_count} processes")
    return global_batch_size // shard_count


def _iterable(batches: grain.MapDataset, num_workers: int) -> grain.IterDataset:
    """Reads whole batches ahead in threads, and in ``num_workers`` processes if asked.

    Batching happens before the workers split the stream, so worker ``w`` of ``n`` builds
    batches ``w, w + n, ...`` and grain interleaves them back in order: the batches do not
    depend on ``num_workers`` (an iterator state does, so resume with the same value).
    """
    out = batches.to_iter_dataset(grain.ReadOptions(num_threads=4, prefetch_buffer_size=4))
    if num_workers:
        if not flags.FLAGS.is_parsed():
            # grain 0.2.18 reads an absl flag when it starts workers (google/grain#1355);
            # a script that does not run under absl.app gets the flags' defaults.
            flags.FLAGS.mark_as_parsed()
        out = out.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
    return out


def make_train_loader(
    source: Sequence[Any],
    preprocess: Preprocess,
    *,
    global_batch_size: int,
    seed: int,
    shard_index: int | None = None,
    shard_count: int | None = None,
    num_epochs: int | None = None,
    num_workers: int = 0,
    start_batch: int = 0,
) -> grain.DatasetIterator:
    """An iterator of training batches: this process's rows of each global batch.

    Args:
      source: random-access examples (``Dataset.source(...)``).
      preprocess: ``(example, rng) -> dict``; called with a per-element generator.
      global_batch_size: examples per step over all processes.
      seed: seeds the shuffle and the augmentation.
      shard_index, shard_count: this process and the number of processes (default: jax's).
      num_epochs: None repeats forever.
      num_workers: worker processes for reading and preprocessing (0: in this process).
      start_batch: the first global batch to yield (a resumed run's step): the stream is a
        function of the seed and the global batch's number alone, so it resumes at the same
        global examples whatever the number of processes now and before.
    """
    index, count = _shard(shard_index, shard_count)
    batch_size = _local_batch_size(global_batch_size, count)
    ds = grain.MapDataset.source(source)
    if len(ds) < global_batch_size:
        raise ValueError(f"The split has {len(ds)} examples, fewer than one batch "
                         f"({global_batch_size})")
    # One global stream (shuffle, augmentation rngs) cut into local batches; process i takes
    # local batches i, i + count, ...: global batch k is the same whatever the process count.
    ds = ds.seed(seed).shuffle().repeat(num_epochs).random_map(preprocess)
    ds = ds.batch(batch_size, drop_remainder=True)[index + count * start_batch::count]
    return iter(_iterable(ds, num_workers))


class _MaskedPadding:
    """Element ``i`` of a shard padded to ``length``: ``(example, True, position)`` for the
    shard's own examples (``position``: its index in the whole split: shard ``k`` of ``n``
    holds positions ``k, k + n, ...``), then ``(fallback, False, -1)``."""

    def __init__(self, source: Sequence[Any], shard_index: int, shard_count: int, length: int):
        self.shard = Subset(source, range(shard_index, len(source), shard_count))
        self.first, self.step = shard_index, shard_count
        self.fallback = source[0]
        self.length = length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> tuple[Any, bool, int]:
        if index < len(self.shard):
            return self.shard[index], True, self.first + index * self.step
        return self.fallback, False, -1


class _WithMask:
    def __init__(self, preprocess: Preprocess):
        self.preprocess = preprocess

    def __call__(self, element: tuple[Any, bool, int]) -> dict:
        example, real, position = element
        return {**self.preprocess(example), "mask": real, "index": position}


def make_eval_batches(
    source: Sequence[Any],
    preprocess: Preprocess,
    *,
    global_batch_size: int,
    shard_index: int | None = None,
    shard_count: int | None = None,
    num_workers: int = 0,
) -> grain.IterDataset:
    """One pass over this process's shard, in order, in full batches with a ``mask``.

    Every ``iter()`` of the result is a new pass. All processes get
    ``ceil(ceil(len(source) / shard_count) / local_batch_size)`` batches.
    """
    index, count = _shard(shard_index, shard_count)
    batch_size = _local_batch_size(global_batch_size, count)
    if not len(source):
        raise ValueError("Cannot evaluate on an empty split")
    num_batches = math.ceil(math.ceil(len(source) / count) / batch_size)
    padded = _MaskedPadding(source, index, count, num_batches * batch_size)
    ds = grain.MapDataset.source(padded).map(_WithMask(preprocess))
    return _iterable(ds.batch(batch_size), num_workers)
