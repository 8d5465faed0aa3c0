"""Bring your own data: text files and image folders as datasets.

A local dataset is named by a spec, usable wherever a dataset name is (``dataset=`` in a
config, ``--config.input.dataset=``, sweeps, ``python -m surm.data info SPEC``)::

    PREFIX:PATH[?key=value&key=value...]

    csv:/data/reviews.csv?text=review&label=stars         one text column, string/int labels
    tsv:/data/pairs.tsv?text=premise&text=hypothesis&label=gold      a sentence pair
    jsonl:/data/scores.jsonl?text=sentence&label=score&regression=true
    csv:/data/train.csv?validation=/data/dev.csv&test=/data/test.csv   splits as files
    folder:/data/flowers?validation=0.15&test=0.15      one subfolder per class
    npz:/data/digits.npz?test=/data/digits_test.npz

Options (all optional; joined with ``&``; no commas, so a spec is one config argument; paths
may be relative to the working directory)::

    text=COLUMN        text column (default text); twice for a sentence pair   csv tsv jsonl
    label=COLUMN       label column (default label); an npz's labels array     all but folder
    regression=true    the label is a number to regress (pearson, spearman)    csv tsv jsonl
    encoding=NAME      of the text files (default: utf-8, or what a file's     csv tsv jsonl
                         byte-order mark says; utf-16-le etc. for UTF-16/32
                         without one; ``text_encoding``)
    image=NAME         an npz's images array                                   npz
    validation=F|PATH  a fraction F of every class of the main file, carved    all
    test=F|PATH          out of it (default 0.1 each), or another file/folder
                         of the same format
    drop_bad=true      leave out bad rows or images, counted and reported      all
    max_row_lines=N    the most lines one row may span (a quoted field with    csv tsv
                         line breaks; default 100); a quote still open
                         after N lines is an error naming its line
    cache_beside=true  cache in .surm_cache/ beside the data instead of        all
                         under $SURM_DATA_DIR/local

Splits: ``train`` is the main file (less what the fractions carve out of it). Carving is
stratified by class (by value for regression) and deterministic: it depends on the content
only, never on the machine, row order or a seed (``labels``).

Labels: classification labels (strings, or numbers without ``regression=true``) become class
ids by sorting the distinct values of all splits' files (numerically when all are integers, so
``0..K-1`` keep their ids); the label map is in the dataset's metadata, shown by ``info`` and
written by the trainer to ``WORKDIR/dataset.json`` with the counts per split and class.

File formats and what counts as a bad row or image: ``text_files`` and ``images``. A bad row
is an error naming each file and line; ``drop_bad=true`` leaves them out and reports how many
(the count is of everything left out: a malformed row that swallowed several lines counts
each). A missing column, an empty class folder, an unknown prefix or option, a missing file,
a quote left open past ``max_row_lines`` lines, or a UTF-16/32 file that ``encoding=`` does not
name is always an error. Errors name files, lines and columns; they do not print the files'
contents (a value that is itself the problem is cut to 20 characters: ``problems``).

Conversion: once, into the tfds array_record form the other datasets use, cached under the
user's cache folder, ``$SURM_DATA_DIR/local`` (default ``~/.cache/surm/datasets/local``; never
beside the data unless ``cache_beside=true``), and converted again when a file or an option
changes (``cache``).
Reading, sharding, shuffling, k-shot views and exact resume then work as for any dataset. A
run refuses to resume in a workdir whose ``dataset.json`` records other content.
"""
from __future__ import annotations

import dataclasses
import json
import pathlib

import tensorflow_datasets as tfds

from surm import workdir as workdir_files
from surm.data.local import cache, images, text_files
from surm.data.local.problems import (BadRowsError, LocalDataError, MissingColumnError,
                                      SpecError)
from surm.data.local.spec import PREFIXES, is_local, parse
from surm.data.registry import DatasetSpec

__all__ = ["BadRowsError", "LocalDataError", "LocalDataset", "MissingColumnError", "PREFIXES",
           "SpecError", "is_local", "open_dataset", "parse"]

_CONVERTERS = {"csv": text_files.convert, "tsv": text_files.convert,
               "jsonl": text_files.convert, "folder": images.convert_folder,
               "npz": images.convert_npz}
RUN_METADATA = workdir_files.DATASET


@dataclasses.dataclass(frozen=True)
class LocalDataset:
    """A converted local dataset.

    Attributes:
      spec: the facts a trainer needs, like a registered dataset's (``name`` is the spec).
      folder: its cache folder.
      metadata: what ``surm_local.json`` holds: source files, label map, counts per split and
        class, dropped rows, content digest.
    """

    spec: DatasetSpec
    folder: pathlib.Path
    metadata: dict

    def builder(self) -> tfds.core.DatasetBuilder:
        return tfds.builder_from_directory(cache.version_dir(self.folder))


def _dataset_spec(name: str, metadata: dict) -> DatasetSpec:
    regression = metadata.get("regression", False)
    text = metadata["modality"] == "text"
    return DatasetSpec(
        name=name, tfds_name=cache.LocalFiles.name, modality=metadata["modality"],
        num_classes=1 if regression else len(metadata["label_map"]),
        splits={role: role for role in ("train", "validation", "test")},
        metrics=("pearson", "spearman") if regression else ("accuracy",),
        image_key=None if text else "image",
        text_keys=tuple(metadata["text_keys"]) if text else (), regression=regression)


def open_dataset(name: str) -> LocalDataset:
    """Parses the spec, converts the files unless an up-to-date cache exists, and opens it."""
    local = parse(name)
    folder_name = cache.folder_name(local)
    folder = cache.find(local, folder_name) or cache.build(local, folder_name,
                                                           _CONVERTERS[local.format])
    metadata = json.loads((folder / cache.METADATA).read_text())
    return LocalDataset(_dataset_spec(name, metadata), folder, metadata)


def record_run(metadata: dict, folder: pathlib.Path, workdir: pathlib.Path, *,
               write: bool = True) -> None:
    """Writes ``workdir/dataset.json`` (the metadata and the cache ``folder``), after checking
    that a run already there used the same content."""
    path = workdir / RUN_METADATA
    if path.is_file():
        before = json.loads(path.read_text()).get("content_sha256")
        if before != metadata["content_sha256"]:
            raise LocalDataError(
                f"{workdir} holds a run on other data: the files of {metadata['source']} changed "
                f"since it started (content digest {before} then, "
                f"{metadata['content_sha256']} now). Resuming needs the same examples; use a "
                "new --workdir")
    if write:
        path.write_text(json.dumps({**metadata, "cache": str(folder)}, indent=2,
                                   ensure_ascii=False))


def recorded_run(name: str, workdir: pathlib.Path) -> tuple[DatasetSpec, dict] | None:
    """The spec and metadata that a run in ``workdir`` recorded in ``dataset.json`` (see
    `record_run`), read without the data files; None when it recorded none."""
    path = workdir / RUN_METADATA
    if not path.is_file():
        return None
    metadata = json.loads(path.read_text())
    return _dataset_spec(name, metadata), metadata
