"""Standard tensorflow-datasets datasets without TensorFlow: mocked examples through the real
pipeline, real array_record files, and the fail-fast check for missing ones."""
import io
import time

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from data_testing import minilm_tokenizer, mocked, pretend_prepared
from surm import data

STANDARD = [n for n in data.names() if not data.get_spec(n).embedded]
MAX_LENGTH = 24


def _preprocessor(ds):
    if ds.spec.modality == "image":
        return ds.preprocessor(size=16)
    return ds.preprocessor(tokenizer=minilm_tokenizer(), max_length=MAX_LENGTH)


@pytest.mark.parametrize("name", STANDARD)
def test_mocked_dataset_gives_typed_batches(name, tmp_path):
    spec = data.get_spec(name)
    pretend_prepared(spec.tfds_name, tmp_path)
    with mocked(num_examples=10):
        ds = data.get_dataset(name, tmp_path)
        label = ds.info.features[spec.label_key]
        if spec.regression:
            assert label.np_dtype == np.float32
        else:
            assert label.num_classes == spec.num_classes
        assert all(key in ds.info.features for key in spec.text_keys)
        source = ds.source("train")
        assert len(source) == 10
        prep = _preprocessor(ds)
        batch = next(data.make_train_loader(source, prep, global_batch_size=4, seed=0,
                                            shard_index=0, shard_count=1))
        eval_batches = list(data.make_eval_batches(ds.source("test"), prep, global_batch_size=4,
                                                   shard_index=0, shard_count=1))
    label_dtype = np.float32 if spec.regression else np.int32
    assert batch["label"].shape == (4,) and batch["label"].dtype == label_dtype
    if spec.modality == "image":
        assert batch["image"].shape == (4, 16, 16, 3) and batch["image"].dtype == np.float32
        assert -1 <= batch["image"].min() and batch["image"].max() <= 1
    else:
        for key in ("input_ids", "attention_mask", "token_type_ids"):
            assert batch[key].shape == (4, MAX_LENGTH) and batch[key].dtype == np.int32
        assert (batch["input_ids"][:, 0] == 101).all()  # [CLS]
        # A pair puts its second segment in token type 1; a single sentence has none.
        assert batch["token_type_ids"].any() == (len(spec.text_keys) == 2)
    assert [b["mask"].tolist() for b in eval_batches] == [[True] * 4, [True] * 4,
                                                          [True, True, False, False]]


def test_missing_dataset_fails_fast_and_says_how_to_prepare(tmp_path):
    start = time.monotonic()
    with pytest.raises(data.DatasetNotPreparedError) as e:
        data.get_dataset("cifar10", tmp_path)
    assert time.monotonic() - start < 10
    message = str(e.value)
    assert "'cifar10'" in message
    assert str(tmp_path / "cifar10" / "3.0.2") in message
    assert f"tfds build cifar10 --data_dir={tmp_path} --file_format=array_record" in message
    assert "TFRECORD" not in message


def test_missing_config_dataset_names_the_config_folder(tmp_path):
    with pytest.raises(data.DatasetNotPreparedError) as e:
        data.get_dataset("glue/sst2", tmp_path)
    assert str(tmp_path / "glue" / "sst2" / "2.0.0") in str(e.value)
    assert "tfds build glue/sst2" in str(e.value)


def test_tfrecord_only_dataset_says_how_to_convert(tmp_path):
    path = tmp_path / "mnist" / "3.0.1"
    path.mkdir(parents=True)
    (path / "dataset_info.json").write_text("{}")
    (path / "mnist-train.tfrecord-00000-of-00001").touch()
    with pytest.raises(data.DatasetNotPreparedError) as e:
        data.get_dataset("mnist", tmp_path)
    assert f"tfds convert_format --dataset_version_dir={path}" in str(e.value)


class _SmallMnist(tfds.image_classification.MNIST, skip_registration=True):
    """tfds' own mnist builder with its download replaced by 100 + 20 random digits, so that
    real prepared files exist in the standard layout."""

    name = "mnist"

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(100, 0), "test": self._generate_examples(20, 1)}

    def _generate_examples(self, count, seed):
        rng = np.random.default_rng(seed)
        for i in range(count):
            png = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8)).save(png, "PNG")
            yield i, {"image": png.getvalue(), "label": i % 10}


def test_prepared_standard_dataset_reads_without_tensorflow(tmp_path):
    _SmallMnist(data_dir=str(tmp_path), file_format="array_record").download_and_prepare(
        download_config=tfds.download.DownloadConfig(try_download_gcs=False))
    ds = data.get_dataset("mnist", tmp_path)
    assert ds.split_sizes() == {"train": 98, "validation": 2, "test": 20}
    example = ds.source("validation")[0]
    assert example["image"].shape == (28, 28, 1) and example["image"].dtype == np.uint8
    batches = list(data.make_eval_batches(ds.source("test"), ds.preprocessor(size=8),
                                          global_batch_size=8, shard_index=0, shard_count=1))
    assert [b["image"].shape for b in batches] == [(8, 8, 8, 3)] * 3
    assert sum(b["mask"].sum() for b in batches) == 20
