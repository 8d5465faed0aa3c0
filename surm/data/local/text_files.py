"""CSV, TSV and JSONL files -> text examples: ``id``, ``text`` (or ``text1``, ``text2``), ``label``.

CSV and TSV: the first line is the header; fields are quoted the usual way (RFC 4180, a quoted
field may span lines, at most ``max_row_lines`` of them: 100 unless the spec says otherwise).
JSONL: one JSON object per line; a label may be a string or a number. ``id`` is ``FILE:LINE``
(the line where the row starts). Encodings, byte-order marks and UTF-16/32: ``text_encoding``.

A row is bad, and reported with its file and line, when: a line is not valid in the encoding;
a CSV/TSV row is malformed or has a different number of fields from the header; a JSONL line
is not a JSON object; a text or the label is missing or empty (blank lines included); a
regression label is not a finite number; a label holds a line break. Texts are kept as they
are; labels are stripped of surrounding white space.

A quote left open swallows the lines after it into one row. When that row turns out malformed
within ``max_row_lines`` lines, it is one bad row reported with its first and last line, and
each of its lines counts as a row left out (``drop_bad=true`` keeps every other line). A row
still open after ``max_row_lines`` lines is an error of its own, naming the line where it
starts, with or without ``drop_bad``: the reader never drops a stretch of the file that long.
"""
from __future__ import annotations

import collections
import csv
import json
import math
import pathlib

import numpy as np
import tensorflow_datasets as tfds

from surm.data.local import labels, text_encoding
from surm.data.local.cache import Conversion
from surm.data.local.problems import LocalDataError, MissingColumnError, Problems, excerpt
from surm.data.local.spec import LocalSpec

_DELIMITERS = {"csv": ",", "tsv": "\t"}
_FIELD_SIZE_LIMIT = 1 << 30  # The csv module's default (128 KiB) is short for a long document.


def text_keys(count: int) -> tuple[str, ...]:
    """The example features holding the texts: ``text``, or ``text1`` and ``text2``."""
    return ("text",) if count == 1 else ("text1", "text2")


def _raw_lines(path: pathlib.Path, codec: str, skip: int):
    """The file's lines as bytes (each with its line break), past ``skip`` bytes of
    byte-order mark. In UTF-16 and UTF-32 a line break is a whole code unit of its width."""
    newline = "\n".encode(codec)
    if len(newline) == 1:
        with open(path, "rb") as f:
            f.seek(skip)
            yield from f
        return
    raw, width, start = path.read_bytes(), len(newline), skip
    while start < len(raw):
        end = raw.find(newline, start)
        while end != -1 and (end - start) % width:
            end = raw.find(newline, end + 1)
        stop = len(raw) if end == -1 else end + width
        yield raw[start:stop]
        start = stop


def _decoded_lines(spec: LocalSpec, path: pathlib.Path, problems: Problems):
    """(line number, text) of every line that decodes; one that does not is reported."""
    codec, skip = text_encoding.resolve(path, spec.encoding)
    for number, raw in enumerate(_raw_lines(path, codec, skip), 1):
        try:
            yield number, raw.decode(codec)
        except UnicodeDecodeError as e:
            problems.add(
                path, number,
                f"not valid {codec} (byte {raw[e.start]:#04x} at column {e.start + 1}); "
                f"re-save the file as {codec} or name its encoding with encoding=..., e.g. "
                "encoding=latin-1")


class _RowFeed:
    """Decoded lines for ``csv.reader``, one row at a time: ``begin()`` before each row; then
    ``first``, ``last`` and ``taken`` say which lines it took. A row that needs more than
    ``limit`` lines is a quote left open: an error naming the line where the row starts."""

    def __init__(self, lines, limit: int, path: pathlib.Path):
        self.lines, self.limit, self.path = lines, limit, path
        self.first = self.last = self.taken = 0

    def begin(self) -> None:
        self.first = self.last = self.taken = 0

    @property
    def gap(self) -> bool:
        """Whether a line within the row did not decode (and was left out of it)."""
        return self.last - self.first + 1 != self.taken

    def __iter__(self):
        return self

    def __next__(self) -> str:
        number, text = next(self.lines)  # StopIteration: the end of the file.
        if self.taken == self.limit:
            raise LocalDataError(
                f"{self.path}:{self.first}: the row starting on this line is still inside a "
                f"quoted field {self.limit} lines later (line {number}): a quote left open? "
                "Close it; if a quoted field really spans more lines, allow them with "
                f"max_row_lines=N (now max_row_lines={self.limit}). drop_bad=true does not "
                "leave out a stretch of the file this long")
        if not self.taken:
            self.first = number
        self.last, self.taken = number, self.taken + 1
        return text


def _missing_columns(spec: LocalSpec, path: pathlib.Path, present: list[str], kind: str):
    wanted = [*spec.text_columns, spec.label_column]
    missing = [c for c in wanted if c not in present]
    if missing:
        shown = ", ".join(map(excerpt, present[:Problems.SHOWN])) + (
            f", ... ({len(present) - Problems.SHOWN} more)" if len(present) > Problems.SHOWN
            else "")
        hint = ""
        if kind == "column" and len(present) == 1:
            separator = "tab" if spec.format == "tsv" else repr(_DELIMITERS[spec.format])
            hint = (f"; its first line holds no {separator}: is it a {spec.format.upper()} "
                    "file?")
        raise MissingColumnError(
            f"{path} has no {kind} {', '.join(map(repr, missing))} ({len(present)} {kind}"
            f"{'s' if len(present) != 1 else ''}: {shown or 'none'}{hint}). Name the text and "
            f"label {kind}s in the spec: {spec.format}:{spec.path}?text=COLUMN&label=COLUMN "
            "(text=A&text=B for a sentence pair)")


def _csv_records(spec: LocalSpec, path: pathlib.Path, problems: Problems):
    """(line, {column: value}) of every well-formed row.

    A malformed row, or one with the wrong number of fields, that spans several lines is
    most likely a quote left open: it is reported with its first and last line and counts
    each line it took, since the rows those lines held cannot be told apart.
    """
    feed = _RowFeed(_decoded_lines(spec, path, problems), spec.max_row_lines, path)
    csv.field_size_limit(max(csv.field_size_limit(), _FIELD_SIZE_LIMIT))
    reader = csv.reader(feed, delimiter=_DELIMITERS[spec.format], strict=True)
    header = None
    while True:
        feed.begin()
        try:
            row, why = next(reader), None
        except StopIteration:
            break
        except csv.Error as e:
            row, why = None, f"malformed {spec.format.upper()} ({e})"
        first, last, taken = feed.first, feed.last, feed.taken
        if row is not None and header is not None and row and len(row) != len(header):
            why = f"{len(row)} fields, the header has {len(header)}"
        if why and taken > 1:
            why += (f", in a row spanning {taken} lines (all left out): a quote opened on "
                    f"line {first} and not closed where it should be?")
        elif not why and taken and feed.gap:
            why = "a quoted field takes in a line that does not decode (all its lines left out)"
        if why:
            problems.add(path, first, why, last=last, count=taken)
            continue
        if header is None:
            header = row
            twice = sorted({c for c in header if header.count(c) > 1})
            if twice:
                raise LocalDataError(f"{path}: the header names {', '.join(map(excerpt, twice))} "
                                     f"more than once (line {first}); give every column its "
                                     f"own name")
            _missing_columns(spec, path, header, "column")
        elif not row:
            problems.add(path, first, "empty line")
        else:
            yield first, dict(zip(header, row))
    if header is None:
        raise LocalDataError(f"{path} is empty: a {spec.format.upper()} file needs a header "
                             "line naming its columns")


def _jsonl_records(spec: LocalSpec, path: pathlib.Path, problems: Problems, seen: set[str]):
    for line, text in _decoded_lines(spec, path, problems):
        if not text.strip():
            problems.add(path, line, "empty line")
            continue
        try:
            record = json.loads(text)
        except json.JSONDecodeError as e:
            problems.add(path, line, f"not valid JSON ({e.msg} at column {e.colno})")
            continue
        if not isinstance(record, dict):
            problems.add(path, line, f"a JSON {type(record).__name__}, not an object")
            continue
        seen.update(record)
        yield line, record


def _value(record: dict, column: str, kind: str) -> tuple[str | None, str | None]:
    """(the value as text, or None and why it is unusable)."""
    if column not in record:
        return None, f"no {kind} {column!r}"
    value = record[column]
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        shown = excerpt(json.dumps(value), quote=False)
        return None, f"{kind} {column!r} is {shown}, not a string or number"
    if isinstance(value, str) and not value.strip():
        return None, f"empty {kind} {column!r}"
    return str(value), None


def _read_file(spec: LocalSpec, path: pathlib.Path, problems: Problems) -> list[dict]:
    """Rows of one file as ``{"id", "texts", "label"}`` (label: str, or float for regression)."""
    rows = []
    seen: set[str] = set()
    if spec.format == "jsonl":
        records, kind = _jsonl_records(spec, path, problems, seen), "key"
    else:
        records, kind = _csv_records(spec, path, problems), "column"
    for line, record in records:
        texts, label, why = [], None, None
        for column in spec.text_columns:
            value, why = _value(record, column, kind)
            if why:
                break
            texts.append(value)
        if not why:
            label, why = _value(record, spec.label_column, kind)
        if not why:
            label = label.strip()
            if spec.regression:
                try:
                    label = float(label)
                except ValueError:
                    label = math.nan
                if not math.isfinite(label):
                    why = (f"label {excerpt(record[spec.label_column])} is not a finite "
                           "number (regression=true)")
            elif "\n" in label or "\r" in label:
                why = f"label {excerpt(label)} holds a line break"
            else:
                label = labels.canonical(label)
        if why:
            problems.add(path, line, why)
            continue
        rows.append({"id": f"{path.name}:{line}", "texts": tuple(texts), "label": label})
    if spec.format == "jsonl" and seen:
        _missing_columns(spec, path, sorted(seen), kind)  # Absent from every object.
    return rows


def _stats(values: list[float]) -> dict[str, float]:
    return {"min": min(values), "mean": sum(values) / len(values), "max": max(values)}


def convert(spec: LocalSpec) -> Conversion:
    problems = Problems()
    files = spec.files()
    rows = {split: _read_file(spec, path, problems) for split, path in files.items()}
    dropped = problems.resolve(spec.name, spec.drop_bad)
    for split, path in files.items():
        if not rows[split]:
            why = f" ({dropped['count']} bad rows dropped)" if dropped["count"] else ""
            raise LocalDataError(f"{spec.name}: {path} holds no examples{why}")

    all_labels = [r["label"] for split_rows in rows.values() for r in split_rows]
    ids = None if spec.regression else labels.label_map(all_labels, spec.name)
    train, fractions = rows["train"], spec.fractions()
    strata = (labels.regression_strata([r["label"] for r in train], fractions)
              if spec.regression else [ids[r["label"]] for r in train])
    splits = labels.assign(rows, strata, ["\x1f".join(r["texts"]) for r in train], fractions,
                           name=spec.name, main=str(spec.path), classes=ids)

    keys = text_keys(len(spec.text_columns))

    def example(row):
        label = np.float32(row["label"]) if spec.regression else ids[row["label"]]
        return row["id"], {"id": row["id"], **dict(zip(keys, row["texts"])), "label": label}

    features = {"id": tfds.features.Text(), **{k: tfds.features.Text() for k in keys},
                "label": np.float32 if spec.regression else
                tfds.features.ClassLabel(names=list(ids))}
    metadata = {
        "modality": "text", "text_columns": list(spec.text_columns),
        "label_column": spec.label_column, "text_keys": list(keys),
        "regression": spec.regression, "dropped": dropped,
        "sizes": {s: len(r) for s, r in splits.items()},
    }
    if spec.regression:
        metadata["label_stats"] = {s: _stats([r["label"] for r in split_rows])
                                   for s, split_rows in splits.items()}
    else:
        metadata["label_map"] = ids
        metadata["class_counts"] = {}
        for s, split_rows in splits.items():
            counts = collections.Counter(r["label"] for r in split_rows)
            metadata["class_counts"][s] = {name: counts[name] for name in ids}
    return Conversion(features=features,
                      splits={s: [example(r) for r in rows] for s, rows in splits.items()},
                      finish=lambda: metadata)
