"""Class ids for label values, and held-out splits carved from one file.

Label values that read as numbers are numbers (``canonical``): ``1``, ``1.0``, ``"1"`` and
``1.00`` are one class, named ``1``, in CSV, TSV and JSONL alike (and ``0.50`` is ``0.5``);
every other value is its text, case and all.

Class ids: the distinct label values, sorted (by value when every one is an integer, so
``0..K-1`` keep their ids and ``2 < 10``; otherwise by code point), get ids 0, 1, ...
The mapping depends only on the set of values, never on the order of the rows.

Carving: ``surm.data.embedded.stratify``'s rule (within each class, order by a SHA-256 of the
example's content; cut the held-out fractions from the front), so a split depends only on the
content, is the same on every machine, and keeps every class's share. Regression targets are
stratified by value: the rows are cut into equal-count bins by rank, ``MAX_STRATA`` of them or
fewer, so that every bin holds at least one example of the smallest held-out fraction.
"""
from __future__ import annotations

import collections
import math
import re
import sys
from collections.abc import Iterable, Mapping, Sequence

from surm.data.embedded import stratify
from surm.data.local.problems import LocalDataError, excerpt

SALT = "surm.local"
MAX_STRATA = 10
_INTEGER = re.compile(r"[+-]?\d+")


def canonical(value: str) -> str:
    """A label's class name: a finite number written one way (an integral one as an integer,
    another by its shortest repr), any other text as it is."""
    try:
        number = float(value)
    except ValueError:
        return value
    if not math.isfinite(number):
        return value
    return str(int(number)) if number.is_integer() and abs(number) < 2 ** 53 else repr(number)


def sorted_names(values: Iterable[str]) -> list[str]:
    """The distinct values in class-id order (see the module docstring)."""
    unique = set(values)
    if all(_INTEGER.fullmatch(v) for v in unique):
        return sorted(unique, key=lambda v: (int(v), v))
    return sorted(unique)


def label_map(values: Iterable[str], name: str) -> dict[str, int]:
    """Label value -> class id; at least two classes."""
    names = sorted_names(values)
    if len(names) < 2:
        raise LocalDataError(
            f"{name}: the labels hold {len(names)} class{'es' if len(names) != 1 else ''} "
            f"({', '.join(map(excerpt, names))}); classification needs at least 2 (for a numeric "
            "target add regression=true)")
    return {value: index for index, value in enumerate(names)}


def regression_strata(values: Sequence[float], fractions: Mapping[str, float]) -> list[int]:
    """Equal-count bins of the values by rank (ties broken by position)."""
    smallest = min(fractions.values(), default=1.0)
    bins = max(1, min(MAX_STRATA, int(len(values) * smallest)))
    order = sorted(range(len(values)), key=lambda i: (values[i], i))
    strata = [0] * len(values)
    for rank, index in enumerate(order):
        strata[index] = rank * bins // len(values)
    return strata


def assign(items: Mapping[str, list], strata: Sequence, keys: Sequence[str],
           fractions: Mapping[str, float], *, name: str, main: str,
           classes: Mapping[str, int] | None = None) -> dict[str, list]:
    """Split -> items, for train, validation and test.

    Args:
      items: ``train`` -> the main file's items, and the held-out roles given as files -> theirs.
      strata, keys: of the main file's items (class or value bin; content), for carving.
      fractions: held-out role -> fraction of every stratum of the main file.
      name, main: the spec and the main path, for the error when a carved split is empty.
      classes: the label map, when ``strata`` are class ids: a class too small to reach a
        carved split is named in a note (its accuracy there is not measured).
    """
    splits = dict(items)
    train = splits.pop("train")
    if fractions:
        carved = stratify.stratified_split(strata, keys, fractions, salt=SALT)
        splits.update({split: [train[i] for i in idx] for split, idx in carved.items()})
        if classes is not None:
            _note_unreached(strata, carved, classes, name)
    else:
        splits["train"] = list(train)
    splits = {split: splits[split] for split in ("train", "validation", "test")}
    check_sizes({split: len(v) for split, v in splits.items()}, name, fractions, main)
    return splits


def _note_unreached(strata: Sequence[int], carved: Mapping[str, Sequence[int]],
                    classes: Mapping[str, int], name: str) -> None:
    """Prints a note naming the classes with no example in a carved split."""
    names = {i: n for n, i in classes.items()}
    size = collections.Counter(strata)
    for split, idx in carved.items():
        missing = sorted(set(size) - {strata[i] for i in idx})
        if missing:
            shown = ", ".join(f"{excerpt(names[c])} ({size[c]} example"
                              f"{'s' if size[c] != 1 else ''})" for c in missing[:5])
            print(f"note: {name}: class{'es' if len(missing) > 1 else ''} {shown}"
                  f"{' ...' if len(missing) > 5 else ''} too small to reach the carved {split} "
                  f"split: not measured there; give more examples or a {split}=PATH file",
                  file=sys.stderr)


def check_sizes(sizes: Mapping[str, int], name: str, fractions: Mapping[str, float],
                main: str) -> None:
    """Every split needs examples: train to learn from, validation and test to evaluate."""
    for split, size in sizes.items():
        if size:
            continue
        if split in fractions:
            raise LocalDataError(
                f"{name}: the {split} split carved from {main} ({fractions[split]:g} of every "
                f"class) is empty; {main} has too few examples. Raise the fraction or give "
                f"{split}=PATH")
        raise LocalDataError(f"{name}: the {split} split has no examples")
