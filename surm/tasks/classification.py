"""Classification and regression: one output row per example, a ``label`` per example; the
loss is softmax cross-entropy (classification) or the mean squared error of the first output
(regression, ``spec.regression``); the metrics are the dataset's (``surm.metrics``)."""
from __future__ import annotations

import json
import pathlib

import jax.numpy as jnp
import numpy as np
import optax

from surm import data, predictions
from surm import workdir as workdir_files
from surm.config_fields import ConfigError
from surm.tasks.base import Sources, Task


def write_outputs(workdir: str | pathlib.Path, spec: data.DatasetSpec,
                  labels: list[str] | None) -> None:
    """``WORKDIR/outputs.json``: what the model's outputs are (the dataset, its modality, the
    number of outputs, 1 for regression, and the class names in output order), read by
    ``surm.runs`` and ``surm.interop.export`` without the data."""
    record = {"dataset": spec.name, "modality": spec.modality,
              "num_classes": spec.num_classes, "regression": spec.regression,
              "labels": list(labels) if labels else None}
    path = pathlib.Path(workdir) / workdir_files.OUTPUTS
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(record, indent=2, ensure_ascii=False))
    tmp.replace(path)


def preprocessors(config, dataset: data.Dataset):
    """(training, evaluation) preprocessing of a config's dataset: tokenizer or image size,
    normalisation and augmentation."""
    from surm import models
    inp = config.input
    if dataset.spec.modality == "text":
        tok = models.get(config.model.name).tokenizer(config.model, inp.max_length)
        prep = dataset.preprocessor(tokenizer=tok, max_length=inp.max_length)
        return prep, prep
    size = config.model.image_size
    crop = inp.crop_scale
    train = dataset.preprocessor(size=size, normalization=inp.normalization, hflip=inp.hflip,
                                 crop_scale=tuple(crop) if crop else None)
    evaluate = dataset.preprocessor(size=size, normalization=inp.normalization,
                                    central_crop=inp.central_crop)
    return train, evaluate


class Classification(Task):
    name = "classification"

    def data_spec(self, config, entry) -> data.DatasetSpec:
        spec = data.get_spec(config.input.dataset)
        if spec.modality != entry.modality:
            raise ConfigError(f"dataset {config.input.dataset!r} holds {spec.modality} data but "
                             f"model.name={config.model.name!r} reads {entry.modality}; use "
                             f"configs/vit_transfer.py for images, configs/default.py or "
                             f"configs/bert_glue.py for text")
        return spec

    def sources(self, config, entry, spec) -> Sources:
        dataset = data.get_dataset(config.input.dataset, config.input.data_dir or None)
        train_prep, eval_prep = preprocessors(config, dataset)
        shots = config.input.shots
        train = (dataset.source("train", k_per_class=shots, seed=config.seed) if shots
                 else dataset.source("train"))
        # Validation on the first N examples of the split (stored in a shuffled order).
        evaluation = {"validation": dataset.source(
            "validation", first=config.input.validation_examples or None),
            "test": dataset.source("test", first=config.input.test_examples or None)}
        return Sources(train, evaluation, train_prep, eval_prep, dataset.label_names(), dataset)

    def batch_keys(self, entry) -> tuple[str, ...]:
        return (*entry.input_keys, "label")

    def eval_keys(self, entry) -> tuple[str, ...]:
        return tuple(entry.input_keys)

    def loss(self, outputs, batch, spec):
        if spec is not None and spec.regression:
            return jnp.mean((outputs[:, 0] - batch["label"]) ** 2)
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(outputs, batch["label"]))

    def host_keys(self) -> tuple[str, ...]:
        return ("label",)

    def predictions(self, spec, index, outputs, batches):
        labels = np.concatenate([b["label"] for b in batches])
        kind = "regression" if spec.regression else "classification"
        return predictions.make(kind, index, outputs, labels, spec.metrics)

    def check_workdir(self, sources: Sources, workdir: pathlib.Path) -> None:
        sources.dataset.record_run(workdir, write=False)  # local data: the same content

    def record(self, sources, spec, workdir, *, write, finished):
        if not finished:  # local files: the label map etc. in dataset.json
            sources.dataset.record_run(workdir, write=write)
        elif write:  # what the model's outputs are, for exports
            write_outputs(workdir, spec, sources.label_names)

