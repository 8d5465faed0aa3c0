"""Low-resource views of a split: k random examples of every class, or its first examples.

k-shot subsets are drawn at random with a seed (a different subset for each seed of a study,
the same one for a given seed and k on every run and host). "First" is in the split's stored
order: tfds writes examples in a fixed hash-shuffled order, so the first examples are a
reproducible, unbiased choice (used for a smaller validation set).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np


class Subset:
    """Random access to ``source[indices[i]]``; picklable, so it works in grain workers."""

    def __init__(self, source: Sequence[Any], indices: Sequence[int]):
        self.source = source
        self.indices = list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> Any:
        return self.source[self.indices[index]]

    def __repr__(self) -> str:
        return f"Subset({len(self)} of {len(self.source)} examples)"


def k_per_class(source: Sequence[Any], k: int, label_key: str, num_classes: int,
                seed: int) -> Subset:
    """``k`` examples of every class, drawn at random: the first ``k`` of each class in an
    order of the split shuffled by ``seed``. The subset keeps the split's order. A class with
    fewer than ``k`` examples is an error naming it (a "k-shot" run is never quietly fewer).

    The scan stops as soon as every one of the ``num_classes`` classes has ``k`` examples.
    """
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    counts = [0] * num_classes
    chosen = []
    for index in np.random.default_rng(seed).permutation(len(source)):
        label = int(source[int(index)][label_key])
        if counts[label] < k:
            counts[label] += 1
            chosen.append(int(index))
            if len(chosen) == k * num_classes:
                break
    short = {c: n for c, n in enumerate(counts) if n < k}
    if short:
        raise ValueError(f"{k} examples per class asked, but the split has only "
                         + ", ".join(f"{n} of class {c}" for c, n in list(short.items())[:5])
                         + f"{' ...' if len(short) > 5 else ''}; ask for at most "
                         f"{min(short.values())} (input.shots)")
    return Subset(source, sorted(chosen))


def first(source: Sequence[Any], n: int) -> Subset:
    """The first ``n`` examples (all of them when the split is shorter)."""
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    return Subset(source, range(min(n, len(source))))


def first_fraction(source: Sequence[Any], fraction: float) -> Subset:
    """The first ``ceil(fraction * len(source))`` examples."""
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    return Subset(source, range(math.ceil(fraction * len(source))))
