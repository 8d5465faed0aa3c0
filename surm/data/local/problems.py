"""What can be wrong with a local dataset, and how it is reported.

Rows (or images) that cannot become examples are collected with their file and line, so one
run reports all of them. By default they are an error; with ``drop_bad=true`` they are left
out, counted, listed in the dataset's metadata (``python -m surm.data info``) and noted on
stderr when the dataset is converted.

Messages name files, line numbers, columns and counts, not the files' contents: a value from a
file is shown only where it is the problem (a column name, a label), cut to ``EXCERPT``
characters, so that pointing a spec at a file that is not data does not print that file.
"""
from __future__ import annotations

import os
import sys

EXCERPT = 20  # Characters of a value from a file that a message shows.


def excerpt(value, quote: bool = True) -> str:
    """``value`` as text for a message, cut to ``EXCERPT`` characters (quoted with repr)."""
    text = str(value)
    text = text if len(text) <= EXCERPT else text[:EXCERPT - 1] + "…"
    return repr(text) if quote else text


class LocalDataError(ValueError):
    """A local dataset's spec or files cannot be used as they are."""


class SpecError(LocalDataError):
    """A malformed spec string or option."""


class MissingColumnError(LocalDataError):
    """The text or label column the spec names is not in the file."""


class BadRowsError(LocalDataError):
    """Rows or images that cannot become examples (and ``drop_bad`` is off)."""


def _with_option(name: str, option: str) -> str:
    """The spec ``name`` with ``option`` (``key=value``) added."""
    return f"{name}{'&' if '?' in name else '?'}{option}"


class Problems:
    """Rows or images that cannot be used, each as ``path:line: what is wrong``."""

    SHOWN = 10  # How many an error message or the metadata lists.

    def __init__(self):
        self.items: list[str] = []

    def add(self, path: os.PathLike | str, line: int | None, message: str) -> None:
        where = f"{path}:{line}" if line is not None else f"{path}"
        self.items.append(f"{where}: {message}")

    def __len__(self) -> int:
        return len(self.items)

    def resolve(self, name: str, drop_bad: bool, unit: str = "rows") -> dict:
        """Raises BadRowsError listing the problems, or (``drop_bad``) returns what is dropped:
        ``{"count": n, "first": [the first SHOWN problems]}``."""
        count = len(self.items)
        first = self.items[:self.SHOWN]
        if count and not drop_bad:
            more = f"\n  ... and {count - len(first)} more" if count > len(first) else ""
            raise BadRowsError(
                f"{name}: {count} bad {unit}:\n  " + "\n  ".join(first) + more +
                f"\nFix them, or leave them out (they are counted and reported) with "
                f"drop_bad=true: {_with_option(name, 'drop_bad=true')}")
        if count:
            print(f"note: {name}: dropped {count} bad {unit} (drop_bad=true), e.g.\n  " +
                  "\n  ".join(first[:3]), file=sys.stderr)
        return {"count": count, "first": first}
