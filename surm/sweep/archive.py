"""The per-example test predictions of a record's runs, in one compressed file beside it.

A record (a results.csv kept in git, e.g. docs/results/<part>.csv) outlives its workdirs; its
runs' test predictions go into ``<record>.predictions.npz`` so that paired statistics over
test examples (``surm.sweep.stats``) can be recomputed from the record alone. Only what the
statistics read is kept (``surm.predictions.scores``): a classifier's predicted class, a
regression's value, a causal LM's NLL and token count per block; the labels and the example
positions once per dataset. A row's ``predictions`` column then reads ``ARCHIVE#KEY``.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import pathlib
from typing import Mapping, Sequence

import numpy as np

from surm import predictions
from surm.sweep.records import run_key

SUFFIX = ".predictions.npz"
_SHARED = ("label", "index")  # stored once per dataset


def path_for(record: str | os.PathLike) -> pathlib.Path:
    """The archive beside a record: ``docs/results/x.csv`` -> ``docs/results/x.predictions.npz``."""
    record = pathlib.Path(record)
    return record.with_name(record.stem + SUFFIX)


def _key(text: str | tuple) -> str:
    return hashlib.sha1(json.dumps(text).encode()).hexdigest()[:16]


def load_scores(ref: str) -> dict[str, np.ndarray] | None:
    """The per-example test outcomes a row's ``predictions`` column points to (a predictions
    file of a workdir, or ``ARCHIVE#KEY``), with their example ``index``; None when there are
    none (a record from before predictions were kept, a workdir or an archive that is gone);
    ValueError when the archive is there but lacks the key (a record from another write)."""
    if not ref:
        return None
    file, _, key = str(ref).partition("#")
    if not key:
        if not pathlib.Path(file).is_file():
            return None
        pred = predictions.read(file)
        return {**predictions.scores(pred), "index": pred["index"]}
    arrays = _read_archive(file)
    if not arrays:
        return None  # the archive is not there (a record copied without it)
    if f"{key}.names" not in arrays:
        raise ValueError(f"{file} holds no predictions {key!r} that its record names: the "
                         f"record and its archive are from different writes; keep the two "
                         f"together (rewrite both from the workdirs)")
    names = json.loads(str(arrays[f"{key}.names"]))
    if not names:
        return None
    dataset = str(arrays[f"{key}.dataset"])
    return {name: arrays[f"{dataset}.{name}"] if name in _SHARED else arrays[f"{key}.{name}"]
            for name in names}


@functools.lru_cache(maxsize=8)
def _read_archive_cached(file: str, mtime: float) -> dict[str, np.ndarray]:
    with np.load(file, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def _read_archive(file: str) -> dict[str, np.ndarray]:
    path = pathlib.Path(file)
    if not path.is_file():
        return {}
    return _read_archive_cached(str(path), path.stat().st_mtime)


def write(rows: Sequence[Mapping], record: str | os.PathLike) -> list[dict]:
    """Stores the test predictions of the done ``rows`` in the record's archive (rewritten
    whole) and returns the rows with ``predictions`` pointing into it."""
    archive = path_for(record)
    arrays: dict[str, np.ndarray] = {}
    out = []
    for row in rows:
        row = dict(row)
        scores = load_scores(row.get("predictions", "")) if row.get("status") == "done" else None
        if scores is None:
            row["predictions"] = ""
            out.append(row)
            continue
        key, dataset = _key(run_key(row)), _key(str(row["dataset"]))
        for name in _SHARED:
            if name not in scores:  # a causal LM's blocks have no label
                continue
            shared = arrays.setdefault(f"{dataset}.{name}", scores[name])
            if not np.array_equal(shared, scores[name]):
                raise ValueError(f"{row.get('workdir') or row['dataset']}: its test examples "
                                 f"differ from those of the other runs on {row['dataset']}")
        for name, value in scores.items():
            if name not in _SHARED:
                arrays[f"{key}.{name}"] = _compact(value)
        arrays[f"{key}.names"] = np.asarray(json.dumps(sorted(scores)))
        arrays[f"{key}.dataset"] = np.asarray(dataset)
        row["predictions"] = f"{archive.as_posix()}#{key}"
        out.append(row)
    if arrays:
        predictions.write(archive, arrays)
    return out


def _compact(value: np.ndarray) -> np.ndarray:
    """Class ids in the smallest integer type that holds them; floats as they are."""
    if np.issubdtype(value.dtype, np.integer) and value.size and value.min() >= 0:
        for dtype in (np.uint8, np.uint16):
            if value.max() <= np.iinfo(dtype).max:
                return value.astype(dtype)
    return value
