"""What can be wrong with a local dataset, and how it is reported.

Rows (or images) that cannot become examples are collected with their file and line, so one
run reports all of them. By default they are an error; with ``drop_bad=true`` they are left
out, counted, listed in the dataset's metadata (``python -m surm.data info``) and noted on
stderr when the dataset is converted. The count is of what is left out: a malformed CSV row
that spans several lines counts each of them, since where its rows were cannot be told.

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
        self.count = 0  # Rows or images left out; more than len(items) when one spans lines.

    def add(self, path: os.PathLike | str, line: int | None, message: str, *,
            last: int | None = None, count: int = 1) -> None:
        """One problem at ``path:line`` (``path:line-last`` for a span), leaving out
        ``count`` rows."""
        where = f"{path}" if line is None else f"{path}:{line}" if last in (None, line) else (
            f"{path}:{line}-{last}")
        self.items.append(f"{where}: {message}")
        self.count += count

    def __len__(self) -> int:
        return self.count

    def resolve(self, name: str, drop_bad: bool, unit: str = "rows") -> dict:
        """Raises BadRowsError listing the problems, or (``drop_bad``) returns what is dropped:
        ``{"count": n, "first": [the first SHOWN problems]}``."""
        count = self.count
        first = self.items[:self.SHOWN]
        if count and not drop_bad:
            more = (f"\n  ... and {len(self.items) - len(first)} more"
                    if len(self.items) > len(first) else "")
            raise BadRowsError(
                f"{name}: {count} bad {unit}:\n  " + "\n  ".join(first) + more +
                f"\nFix them, or leave them out (they are counted and reported) with "
                f"drop_bad=true: {_with_option(name, 'drop_bad=true')}")
        if count:
            print(f"note: {name}: dropped {count} bad {unit} (drop_bad=true), e.g.\n  " +
                  "\n  ".join(first[:3]), file=sys.stderr)
        return {"count": count, "first": first}
