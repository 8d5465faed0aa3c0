"""Deterministic stratified train/validation/test assignment for sources without splits.

Rule: within each class, examples are ordered by the SHA-256 of ``salt/key`` (ties by their
position in the source); the first ``floor(f * n + 0.5)`` of a class of ``n`` go to the first
held-out split, the next ones to the second, and the rest to ``train``. A hash of the content
rather than a seeded RNG keeps the assignment identical on every platform and library
version, and using the text as the key keeps exact duplicates within a class together.
"""
from __future__ import annotations

import collections
import hashlib
import math
from collections.abc import Hashable, Mapping, Sequence


def _rank(salt: str, key: str) -> str:
    return hashlib.sha256(f"{salt}/{key}".encode("utf-8")).hexdigest()


def stratified_split(
    labels: Sequence[Hashable],
    keys: Sequence[str],
    held_out: Mapping[str, float],
    salt: str,
) -> dict[str, list[int]]:
    """Assigns every example to ``train`` or one of the ``held_out`` splits.

    Args:
      labels: the class of each example.
      keys: a stable identity of each example (e.g. its text), hashed to order a class.
      held_out: split name -> fraction of every class, in the order the splits are cut.
      salt: mixed into the hash so that different datasets are ordered independently.

    Returns:
      split name -> indices into ``labels``, ascending.
    """
    by_class = collections.defaultdict(list)
    for index, label in enumerate(labels):
        by_class[label].append(index)
    splits = {name: [] for name in ("train", *held_out)}
    for members in by_class.values():
        members.sort(key=lambda i: (_rank(salt, keys[i]), i))
        start = 0
        for name, fraction in held_out.items():
            count = math.floor(fraction * len(members) + 0.5)
            splits[name] += members[start:start + count]
            start += count
        splits["train"] += members[start:]
    return {name: sorted(indices) for name, indices in splits.items()}


def split_records(records: Sequence[Mapping], held_out: Mapping[str, float], *,
                  salt: str) -> dict[str, list[Mapping]]:
    """``stratified_split`` of records with ``label`` and ``text`` fields: split -> records."""
    splits = stratified_split([r["label"] for r in records], [r["text"] for r in records],
                              held_out, salt=salt)
    return {name: [records[i] for i in indices] for name, indices in splits.items()}
