"""``get_dataset``: a registered dataset opened from ``data_dir``, or a local one (a spec such as
``csv:/data/train.csv``, see ``surm.data.local``) from its cache, ready to read."""
from __future__ import annotations

import os
import pathlib
from collections.abc import Sequence
from typing import Any

import tensorflow_datasets as tfds

from surm.data import embedded, local, registry, standard, subsets
from surm.data.image import ImagePreprocess
from surm.data.paths import default_data_dir
from surm.data.registry import ROLES, DatasetSpec
from surm.data.text import TextPreprocess


class Dataset:
    """A prepared dataset: its spec, its tfds info, and random-access splits.

    ``metadata`` is None for a registered dataset; for a local one it holds the source files,
    the label map, counts per split and class, and dropped rows (``surm.data.local``).
    """

    def __init__(self, spec: DatasetSpec, data_dir: pathlib.Path,
                 builder: tfds.core.DatasetBuilder, metadata: dict | None = None):
        self.spec = spec
        self.data_dir = data_dir
        self.metadata = metadata
        self._builder = builder

    @property
    def info(self) -> tfds.core.DatasetInfo:
        """tfds metadata: features, splits and their sizes, description."""
        return self._builder.info

    def source(self, split: str = "train", *, k_per_class: int | None = None, seed: int = 0,
               fraction: float | None = None, first: int | None = None) -> Sequence[Any]:
        """Random-access examples of one split: dicts of numpy arrays, numbers and bytes.

        Args:
          split: a role (``"train"``, ``"validation"``, ``"test"``, mapped through
            ``spec.splits``) or any tfds split string (``"validation_mismatched"``,
            ``"train[:10%]"``).
          k_per_class: keep only k examples of every class (k-shot), drawn with ``seed``.
          seed: which k examples (``subsets.k_per_class``); each seed draws its own subset.
          fraction: keep only the first ``fraction`` of the examples.
          first: keep only the first ``first`` examples.
        """
        if sum(x is not None for x in (k_per_class, fraction, first)) > 1:
            raise ValueError("Pass one of k_per_class, fraction and first")
        source = self._builder.as_data_source(split=self.spec.splits.get(split, split))
        if k_per_class is not None:
            if self.spec.regression:
                raise ValueError(f"{self.spec.name} is a regression task: no classes for "
                                 "k_per_class; use fraction")
            return subsets.k_per_class(source, k_per_class, self.spec.label_key,
                                       self.spec.num_classes, seed)
        if fraction is not None:
            return subsets.first_fraction(source, fraction)
        if first is not None:
            return subsets.first(source, first)
        return source

    def split_sizes(self) -> dict[str, int]:
        """Role -> number of examples."""
        return {role: len(self.source(role)) for role in ROLES}

    def preprocessor(self, **options) -> ImagePreprocess | TextPreprocess:
        """The preprocessing for this dataset's modality, with its feature names and label
        type filled in. ``options`` go to ``ImagePreprocess`` (``size``, ``normalization``,
        augmentation) or ``TextPreprocess`` (``tokenizer``, ``max_length``)."""
        spec = self.spec
        if spec.modality == "image":
            return ImagePreprocess(image_key=spec.image_key, label_key=spec.label_key,
                                   **options)
        return TextPreprocess(text_keys=spec.text_keys, label_key=spec.label_key,
                              regression=spec.regression, **options)

    def label_names(self) -> list[str] | None:
        """The class names in class-id order: a local dataset's label map, a registered one's
        tfds ``ClassLabel`` names; None for a regression target or classes without names."""
        spec = self.spec
        if spec.regression:
            return None
        if self.metadata is not None:
            ids = self.metadata.get("label_map") or {}
            return [str(name) for name, _ in sorted(ids.items(), key=lambda item: item[1])] or None
        features = self.info.features
        names = getattr(features[spec.label_key], "names", None) if (
            spec.label_key in features) else None
        return [str(n) for n in names] if names and len(names) == spec.num_classes else None

    def record_run(self, workdir: str | os.PathLike, *, write: bool = True) -> None:
        """A local dataset writes its metadata (label map, counts, source) to
        ``workdir/dataset.json``, and refuses a workdir whose run saw other content; a
        registered dataset does nothing."""
        if self.metadata is not None:
            local.record_run(self.metadata, self.data_dir, pathlib.Path(workdir), write=write)

    def __repr__(self) -> str:
        return f"Dataset({self.spec.name!r}, data_dir={str(self.data_dir)!r})"


def get_spec(name: str) -> DatasetSpec:
    """The spec of a registered dataset, or of a local one (converted first if needed).

    An unknown name raises UnknownDatasetError listing the known ones.
    """
    if local.is_local(name):
        return local.open_dataset(name).spec
    return registry.get_spec(name)


def get_dataset(name: str, data_dir: str | os.PathLike | None = None) -> Dataset:
    """Opens a registered dataset, or a local one.

    Embedded datasets are prepared into ``data_dir`` on first use. A standard dataset that is
    not prepared raises ``DatasetNotPreparedError`` at once (see ``surm.data.standard``). A
    local spec (``csv:PATH``, ``folder:PATH``, ...) is converted on first use into its cache
    under ``$SURM_DATA_DIR/local``, whatever ``data_dir`` is, never beside the data unless the
    spec says ``cache_beside=true`` (see ``surm.data.local``).
    """
    if local.is_local(name):
        opened = local.open_dataset(name)
        return Dataset(opened.spec, opened.folder, opened.builder(), opened.metadata)
    spec = registry.get_spec(name)
    root = pathlib.Path(data_dir).expanduser() if data_dir else default_data_dir()
    if spec.embedded:
        return Dataset(spec, root, embedded.builder(spec.tfds_name, root))
    return Dataset(spec, root, standard.builder(spec.tfds_name, root))
