"""Parsing a local dataset spec: ``PREFIX:PATH[?key=value&key=value...]``.

The whole spec is one string with no commas, so it passes unchanged through config arguments
(``configs/x.py:dataset=csv:/d/train.csv?label=y``), ``--config.input.dataset=...``, sweeps and
the ``info`` command; it is also what a run's ``config.json`` records. Paths may be relative
(to the working directory) or start with ``~``.
"""
from __future__ import annotations

import codecs
import dataclasses
import os
import pathlib

from surm.data import paths
from surm.data.local.problems import SpecError
from surm.data.registry import UnknownDatasetError

TEXT_FORMATS = ("csv", "tsv", "jsonl")
IMAGE_FORMATS = ("folder", "npz")
PREFIXES = TEXT_FORMATS + IMAGE_FORMATS
HELD_OUT_ROLES = ("validation", "test")
DEFAULT_FRACTION = 0.1  # Of every class of the main file, for a held-out role not given.
DEFAULT_TEXT_COLUMN = "text"
DEFAULT_LABEL_COLUMN = "label"
# The most lines one CSV/TSV row may span (a quoted field with line breaks): a quote left open
# is found within this many lines instead of swallowing the rest of the file.
DEFAULT_MAX_ROW_LINES = 100

_COMMON = ("validation", "test", "drop_bad", "cache_beside")
_TEXT = ("text", "label", "regression", "encoding")
OPTIONS = {
    "csv": _TEXT + ("max_row_lines",) + _COMMON,
    "tsv": _TEXT + ("max_row_lines",) + _COMMON,
    "jsonl": _TEXT + _COMMON,
    "folder": _COMMON,
    "npz": ("image", "label") + _COMMON,
}
EXAMPLE = "csv:/data/train.csv?text=sentence&label=y"


def is_local(name: str) -> bool:
    """Whether ``name`` is a local spec (``PREFIX:PATH...``); no registered name has a colon."""
    return ":" in name


@dataclasses.dataclass(frozen=True)
class LocalSpec:
    """A parsed spec.

    Attributes:
      name: the spec as written.
      format: csv, tsv, jsonl, folder or npz.
      path: the main file or folder (absolute); the train split, and the held-out roles
        given as fractions are carved from it.
      held_out: (role, fraction or absolute path) for validation and test.
      text_columns: one column, or two for a sentence pair (text formats).
      label_column: the label column (text formats) or array name (npz; None: look for the
        usual names).
      image_key: the images array of an npz (None: look for the usual names).
      regression: the label is a number to regress (text formats).
      drop_bad: leave out bad rows or images (counted and reported) instead of failing.
      encoding: of text files, as given (None: UTF-8, or what a file's byte-order mark says;
        see ``text_encoding``).
      max_row_lines: the most lines a CSV/TSV row may span.
      cache_beside: cache the conversion beside the data instead of under the user's cache
        folder (``cache``). Where the cache lives does not change the dataset.
    """

    name: str
    format: str
    path: pathlib.Path
    held_out: tuple[tuple[str, float | pathlib.Path], ...]
    text_columns: tuple[str, ...] = ()
    label_column: str | None = None
    image_key: str | None = None
    regression: bool = False
    drop_bad: bool = False
    encoding: str | None = None
    max_row_lines: int = DEFAULT_MAX_ROW_LINES
    cache_beside: bool = False

    @property
    def modality(self) -> str:
        return "text" if self.format in TEXT_FORMATS else "image"

    def fractions(self) -> dict[str, float]:
        """Held-out role -> fraction of every class of the main file, in cutting order."""
        return {role: v for role, v in self.held_out if isinstance(v, float)}

    def files(self) -> dict[str, pathlib.Path]:
        """Split -> the file or folder it is read from (train, and roles given as paths)."""
        return {"train": self.path,
                **{role: v for role, v in self.held_out if isinstance(v, pathlib.Path)}}

    def options(self) -> dict:
        """Everything that decides the converted dataset except the files' contents."""
        return {"format": self.format, "path": str(self.path),
                "held_out": {role: v if isinstance(v, float) else str(v)
                             for role, v in self.held_out},
                "text_columns": list(self.text_columns), "label_column": self.label_column,
                "image_key": self.image_key, "regression": self.regression,
                "drop_bad": self.drop_bad, "encoding": self.encoding,
                "max_row_lines": self.max_row_lines}


def _path(name: str, text: str, fmt: str) -> pathlib.Path:
    path = pathlib.Path(os.path.abspath(os.path.expanduser(text)))
    want_folder = fmt == "folder"
    if not path.exists():
        where = f" (relative to the working directory {os.getcwd()})" if not os.path.isabs(
            os.path.expanduser(text)) else ""
        raise FileNotFoundError(f"{name!r}: no such {'folder' if want_folder else 'file'} "
                                f"{path}{where}")
    problem = paths.not_plain(path, folder=want_folder, compressed_ok=fmt == "npz")
    if problem:
        raise SpecError(f"{name!r}: {problem}")
    if want_folder and not path.is_dir():
        raise SpecError(f"{name!r}: {path} is a file; folder: takes a folder with one "
                        "subfolder per class (for an .npz use npz:PATH)")
    if not want_folder and path.is_dir():
        raise SpecError(f"{name!r}: {path} is a folder; {fmt}: takes a file (for an image "
                        "folder use folder:PATH)")
    return path


def _bool(name: str, key: str, text: str) -> bool:
    if text.lower() in ("true", "1", "yes"):
        return True
    if text.lower() in ("false", "0", "no"):
        return False
    raise SpecError(f"{name!r}: {key}={text!r}, expected true or false")


def _held_out(name: str, role: str, text: str | None, fmt: str) -> float | pathlib.Path:
    if text is None:
        return DEFAULT_FRACTION
    try:
        fraction = float(text)
    except ValueError:
        return _path(name, text, fmt)
    if not 0 < fraction < 1:
        raise SpecError(f"{name!r}: {role}={text} must be a fraction in (0, 1) or a path")
    return fraction


def parse(name: str) -> LocalSpec:
    """Parses and checks a spec; the files must exist (they are not read here)."""
    fmt, _, rest = name.partition(":")
    if fmt not in PREFIXES:
        raise UnknownDatasetError(
            f"Unknown dataset prefix {fmt + ':'!r} in {name!r}. Local files are named "
            f"{', '.join(p + ':PATH' for p in PREFIXES)}, e.g. {EXAMPLE}")
    path_text, _, query = rest.partition("?")
    if not path_text:
        raise SpecError(f"{name!r} names no path; e.g. {EXAMPLE}")
    options: dict[str, list[str]] = {}
    for item in query.split("&") if query else ():
        key, eq, value = item.partition("=")
        if not eq or not key or not value:
            raise SpecError(f"{name!r}: option {item!r} is not key=value (options are joined "
                            f"with '&', e.g. {EXAMPLE})")
        if key not in OPTIONS[fmt]:
            raise SpecError(f"{name!r}: unknown option {key!r} for {fmt}:; known: "
                            f"{', '.join(OPTIONS[fmt])}")
        if key in options and key != "text":
            raise SpecError(f"{name!r}: option {key!r} is given twice")
        options.setdefault(key, []).append(value)
    first = {key: values[0] for key, values in options.items()}
    main = _path(name, path_text, fmt)
    held_out = tuple((role, _held_out(name, role, first.get(role), fmt))
                     for role in HELD_OUT_ROLES)
    for role, source in held_out:
        if source == main:
            raise SpecError(f"{name!r}: {role}={source} is the train data itself; give other "
                            "files, or a fraction to carve from it")
    total = sum(v for _, v in held_out if isinstance(v, float))
    if total >= 1:
        raise SpecError(f"{name!r}: the held-out fractions add up to {total:g}; they must "
                        "leave examples for train")
    common = dict(name=name, format=fmt, path=main, held_out=held_out,
                  drop_bad=_bool(name, "drop_bad", first.get("drop_bad", "false")),
                  cache_beside=_bool(name, "cache_beside", first.get("cache_beside", "false")))
    if fmt == "folder":
        return LocalSpec(**common)
    if fmt == "npz":
        return LocalSpec(**common, image_key=first.get("image"), label_column=first.get("label"))
    text_columns = tuple(options.get("text", [DEFAULT_TEXT_COLUMN]))
    if len(text_columns) > 2:
        raise SpecError(f"{name!r}: {len(text_columns)} text columns; give one, or two for a "
                        "sentence pair (text=first&text=second)")
    label_column = first.get("label", DEFAULT_LABEL_COLUMN)
    if label_column in text_columns:
        raise SpecError(f"{name!r}: column {label_column!r} is both text and label")
    encoding = first.get("encoding")
    if encoding is not None:
        try:
            codecs.lookup(encoding)
        except LookupError:
            raise SpecError(f"{name!r}: unknown encoding {encoding!r} (e.g. utf-8, latin-1, "
                            "cp1252, utf-16-le)") from None
    max_row_lines = DEFAULT_MAX_ROW_LINES
    if "max_row_lines" in first:
        text = first["max_row_lines"]
        if not text.isdigit() or int(text) < 1:
            raise SpecError(f"{name!r}: max_row_lines={text!r}, expected a whole number >= 1")
        max_row_lines = int(text)
    return LocalSpec(**common, text_columns=text_columns, label_column=label_column,
                     regression=_bool(name, "regression", first.get("regression", "false")),
                     encoding=encoding, max_row_lines=max_row_lines)
