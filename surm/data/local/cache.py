"""The converted form of a local dataset: a tfds array_record dataset in a cache folder.

Where: under the user's cache folder, ``$SURM_DATA_DIR/local`` (default
``~/.cache/surm/datasets/local``), whatever ``data_dir`` a caller passes, so that reading a
file never writes next to it, be it in a shared or a system folder. With ``cache_beside=true``
in the spec (asked for, never a fallback), in ``.surm_cache/`` beside the data (in the folder
that holds the main file or image folder) instead. A cache folder that cannot be written is an
error naming it and the fix. Layout::

    ROOT/<format>-<stem>-<key>/
        surm_local.json                       what info and the trainer show: label map,
                                              counts, dropped rows, content digest
        local_files/1.0.0/                    tfds: dataset_info.json, features.json,
            local_files-train.array_record-*  one array_record file set per split

``key`` is a SHA-256 of the spec's options and, for every input file (every file and folder
under an image folder, hidden ones aside), its path, size and modification time, so a changed,
added or removed file, or other options, give a new folder and a fresh conversion; an unchanged
one is reused. Old folders are never read again and may be deleted at any time (nothing
else is ever deleted or moved).
``content_sha256`` in the metadata is a digest of the converted examples themselves: a file
saved again with the same content gets a new folder but the same digest.

A conversion writes into ``.incomplete-*`` in the same cache folder and renames it into place
only when every split and the metadata are written, so a crash or a kill never leaves a folder
that is read. When two processes convert at once, the first rename wins and the other copy is
removed. The metadata lists every file of the converted dataset with its size and SHA-256
(``written``); a cache folder whose files no longer match (a damaged disk, a file edited or
cut) is deleted and converted again, with a note, never read.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import pathlib
import re
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterable, Mapping

import numpy as np
import tensorflow_datasets as tfds

from surm.data.local.problems import LocalDataError
from surm.data.paths import default_data_dir
from surm.data.local.spec import LocalSpec

CACHE_FOLDER = ".surm_cache"
METADATA = "surm_local.json"
# Bump when the conversion changes what it writes, so that old caches are not reused (3:
# numeric labels written one way; the files' checksums recorded).
FORMAT_VERSION = 3

_LOCAL_ONLY = tfds.download.DownloadConfig(try_download_gcs=False)


@dataclasses.dataclass
class Conversion:
    """What a reader makes of the files.

    Attributes:
      features: tfds feature connectors by name.
      splits: split -> (key, example) pairs, read once while the split is written.
      finish: called after every split is written: checks what was written and returns the
        metadata (raises to discard the conversion).
    """

    features: Mapping[str, object]
    splits: Mapping[str, Iterable[tuple[str, dict]]]
    finish: Callable[[], dict]


class LocalFiles(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """A tfds builder over examples that a reader has already produced."""

    VERSION = tfds.core.Version("1.0.0")

    def __init__(self, *, description: str, features: Mapping[str, object],
                 splits: Mapping[str, Iterable[tuple[str, dict]]], **kwargs):
        self._description = description
        self._features = features
        self._splits = splits
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(builder=self, description=self._description,
                                     features=tfds.features.FeaturesDict(dict(self._features)))

    def _split_generators(self, dl_manager):
        del dl_manager  # Everything is local.
        return {name: self._generate_examples(examples)
                for name, examples in self._splits.items()}

    def _generate_examples(self, examples):
        yield from examples


def version_dir(folder: pathlib.Path) -> pathlib.Path:
    """The tfds dataset folder inside a cache folder."""
    return folder / LocalFiles.name / str(LocalFiles.VERSION)


def is_hidden(path: pathlib.Path, root: pathlib.Path) -> bool:
    """Whether a name on the way from ``root`` to ``path`` starts with a dot."""
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def input_entries(spec: LocalSpec) -> list[pathlib.Path]:
    """Every file the conversion reads; for image folders also the folders themselves (an
    added, empty class folder changes the dataset too). Hidden names are not data."""
    entries = []
    for path in spec.files().values():
        entries.append(path)
        if path.is_dir():
            entries += sorted(p for p in path.rglob("*") if not is_hidden(p, path))
    return entries


def folder_name(spec: LocalSpec) -> str:
    """``<format>-<stem>-<key>`` (see the module docstring)."""
    state = []
    for path in input_entries(spec):
        stat = path.stat()
        state.append([str(path), "dir"] if path.is_dir() else
                     [str(path), stat.st_size, stat.st_mtime_ns])
    key = hashlib.sha256(json.dumps(
        {"version": FORMAT_VERSION, "options": spec.options(), "files": state},
        sort_keys=True).encode()).hexdigest()[:16]
    stem = re.sub(r"[^A-Za-z0-9_.-]", "_", spec.path.stem)[:40]
    return f"{spec.format}-{stem}-{key}"


def root(spec: LocalSpec) -> pathlib.Path:
    """The folder that holds the cache folders of ``spec`` (see the module docstring)."""
    if spec.cache_beside:
        return spec.path.parent / CACHE_FOLDER
    return default_data_dir() / "local"


def find(spec: LocalSpec, name: str) -> pathlib.Path | None:
    """The complete, intact cache folder ``name``, if there is one (a damaged one is deleted:
    the caller converts again)."""
    folder = root(spec) / name
    if not (folder / METADATA).is_file():
        return None
    why = damage(folder)
    if why is None:
        return folder
    print(f"note: the converted cache {folder} is damaged ({why}); converting {spec.name} "
          f"again", file=sys.stderr)
    shutil.rmtree(folder, ignore_errors=True)
    return None


def _written(folder: pathlib.Path) -> dict[str, list]:
    """{path under the cache folder: [size, sha256]} of the converted dataset's files."""
    out = {}
    for path in sorted(p for p in version_dir(folder).rglob("*") if p.is_file()):
        sha = hashlib.sha256()
        with path.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                sha.update(chunk)
        out[path.relative_to(folder).as_posix()] = [path.stat().st_size, sha.hexdigest()]
    return out


def damage(folder: pathlib.Path) -> str | None:
    """What is wrong with a complete cache folder's files, or None when they are as written."""
    try:
        recorded = json.loads((folder / METADATA).read_text())["written"]
    except (OSError, ValueError, KeyError, TypeError):
        return f"{METADATA} is unreadable or lacks its file list"
    now = _written(folder)
    for rel, (size, sha) in recorded.items():
        if rel not in now:
            return f"{rel} is missing"
        if now[rel] != [size, sha]:
            return f"{rel} changed since it was written"
    extra = sorted(set(now) - set(recorded))
    return f"{extra[0]} was added" if extra else None


def _incomplete_folder(spec: LocalSpec, name: str) -> pathlib.Path:
    """A new private folder to convert into, in ``root(spec)``."""
    where = root(spec)
    try:
        where.mkdir(parents=True, exist_ok=True)
        return pathlib.Path(tempfile.mkdtemp(prefix=f".incomplete-{name}-", dir=where))
    except OSError as e:
        fix = ("drop cache_beside=true to cache it under $SURM_DATA_DIR/local" if
               spec.cache_beside else "set SURM_DATA_DIR to a folder you can write")
        raise LocalDataError(f"cannot write the cache of {spec.name} in {where} "
                             f"({e.strerror or e}); {fix}") from None


def _digested(examples, digest):
    """The (key, example) pairs, fed into ``digest`` on the way (values are bytes, str or
    numbers)."""
    for key, example in examples:
        for feature in sorted(example):
            value = example[feature]
            if isinstance(value, np.generic):
                value = value.item()
            data = value if isinstance(value, bytes) else str(value).encode()
            digest.update(json.dumps([key, feature, len(data)]).encode() + data)
        yield key, example


def build(spec: LocalSpec, name: str, convert: Callable[[LocalSpec], Conversion]
          ) -> pathlib.Path:
    """Converts the files into the cache folder ``name`` and returns it."""
    incomplete = _incomplete_folder(spec, name)
    final = incomplete.parent / name
    print(f"Converting {spec.name} into {final} (once: reused until its files or options "
          "change)", file=sys.stderr)
    try:
        conversion = convert(spec)
        digests = {split: hashlib.sha256() for split in conversion.splits}
        builder = LocalFiles(
            description=f"Local dataset {spec.name}", features=conversion.features,
            splits={s: _digested(ex, digests[s]) for s, ex in conversion.splits.items()},
            data_dir=os.fspath(incomplete), file_format="array_record")
        with contextlib.redirect_stdout(sys.stderr):  # tfds prints progress; stdout is for
            builder.download_and_prepare(download_config=_LOCAL_ONLY)  # results (info, sweeps).
        metadata = {"source": spec.name, "format": spec.format,
                    "files": {"train": str(spec.path), **spec.options()["held_out"]},
                    **conversion.finish()}
        metadata["content_sha256"] = hashlib.sha256(
            "".join(digests[s].hexdigest() for s in sorted(digests)).encode()).hexdigest()
        shutil.rmtree(incomplete / "downloads", ignore_errors=True)
        metadata["written"] = _written(incomplete)
        (incomplete / METADATA).write_text(json.dumps(metadata, indent=2, ensure_ascii=False))
        incomplete.chmod(0o755)  # mkdtemp made it private.
        try:
            incomplete.rename(final)
        except OSError:
            if not (final / METADATA).is_file():  # Not just another process finishing first.
                raise
    finally:
        shutil.rmtree(incomplete, ignore_errors=True)
    return final
