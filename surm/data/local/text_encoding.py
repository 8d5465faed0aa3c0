"""Which encoding a text file is read in, from ``encoding=`` and the file's first bytes.

A byte-order mark (BOM) at the start says it outright: UTF-8, UTF-16 or UTF-32, little- or
big-endian. Without one, UTF-16 and UTF-32 text of mostly Latin characters still shows itself
by its NUL bytes (``t\\x00e\\x00x\\x00t\\x00`` is UTF-16-LE), which no UTF-8 or 8-bit text file
has. A file is read

- with a BOM: in the encoding it declares (the mark itself is not text), when ``encoding=``
  is not given or agrees (``utf-16`` agrees with either UTF-16 mark, ``utf-8-sig`` with the
  UTF-8 one); any other ``encoding=`` is an error naming both;
- without a BOM: in ``encoding=`` (default UTF-8), unless the NUL bytes show UTF-16 or UTF-32
  that ``encoding=`` does not name: an error naming the encoding seen and the fix (e.g.
  ``encoding=utf-16-le``), never a misread. ``encoding=utf-16`` or ``utf-32`` without a BOM
  takes its byte order from the NUL bytes, and is an error when they show none.
"""
from __future__ import annotations

import codecs
import pathlib

from surm.data.local.problems import LocalDataError

# Longest first: the UTF-32-LE mark begins with the UTF-16-LE one.
MARKS = (("utf-32-le", codecs.BOM_UTF32_LE), ("utf-32-be", codecs.BOM_UTF32_BE),
         ("utf-8", codecs.BOM_UTF8), ("utf-16-le", codecs.BOM_UTF16_LE),
         ("utf-16-be", codecs.BOM_UTF16_BE))
SAMPLE = 4096  # Bytes looked at for NUL patterns.


def _nul_pattern(head: bytes) -> str | None:
    """``utf-32-le``/``-be`` or ``utf-16-le``/``-be`` when NUL bytes sit where those encodings
    put them for characters below U+0100 (and almost never elsewhere); else None."""
    for width, little, big in ((4, "utf-32-le", "utf-32-be"), (2, "utf-16-le", "utf-16-be")):
        units = len(head) // width
        if units < 2:
            continue
        nul = [head[i:units * width:width].count(0) / units for i in range(width)]
        if width == 4:
            if min(nul[2], nul[3]) > 0.95 and nul[0] < 0.05:
                return little
            if min(nul[0], nul[1]) > 0.95 and nul[3] < 0.05:
                return big
        elif nul[1] > 0.5 and nul[0] < 0.05:
            return little
        elif nul[0] > 0.5 and nul[1] < 0.05:
            return big
    return None


def _agrees(declared: str, given: str) -> bool:
    """Whether ``encoding=given`` (a codec name) fits a file that declares ``declared``."""
    return given == declared or given == declared[:-3] or (
        declared == "utf-8" and given == "utf-8-sig")


def resolve(path: pathlib.Path, given: str | None) -> tuple[str, int]:
    """(the codec to decode the file with, the number of bytes of byte-order mark to skip).

    The codec names a byte order (``utf-16-le``, never ``utf-16``); see the module docstring.
    """
    with open(path, "rb") as f:
        head = f.read(SAMPLE)
    name = codecs.lookup(given).name if given else None
    for declared, mark in MARKS:
        if head.startswith(mark):
            if name is None or _agrees(declared, name):
                return declared, len(mark)
            raise LocalDataError(
                f"{path} starts with a {declared.upper()} byte-order mark, but the spec says "
                f"encoding={given}; drop encoding= (the mark says it) or use "
                f"encoding={declared}")
    seen = _nul_pattern(head)
    if name in ("utf-16", "utf-32"):
        if seen and seen.startswith(name):
            return seen, 0
        if seen:
            raise LocalDataError(
                f"{path} has no byte-order mark, and its NUL bytes look like {seen.upper()}, "
                f"not {given}; read it with encoding={seen}")
        raise LocalDataError(
            f"{path} has no byte-order mark to tell the byte order of encoding={given}, nor "
            f"the NUL bytes of {name.upper()} text; if it is {name.upper()}, name the byte "
            f"order with encoding={name}-le or encoding={name}-be, else drop encoding=")
    if seen and seen != name:
        raise LocalDataError(
            f"{path} looks like {seen.upper()} without a byte-order mark (NUL bytes between "
            f"its characters), not {given or 'UTF-8'}; read it with encoding={seen}")
    if name in (None, "utf-8-sig"):
        return "utf-8", 0
    return name, 0
