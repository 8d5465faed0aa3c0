"""A finished ``surm.train`` run, loaded back from its workdir: config, model, pretrained
weights, trained adapters and spec, and what its outputs mean.

    run = runs.load_run("runs/default")
    logits = peft.apply(run.model, run.frozen, run.trainable, run.spec, *inputs)

The trainer records in ``WORKDIR/outputs.json`` what the model's outputs are (`write_record`):
the dataset, its modality, the number of outputs (``num_classes``, 1 for regression) and the
class names in output order when the data names them. Loading a run reads that record, never
the data files, so a run can be loaded and exported on a machine without its data. Workdirs
written before the record existed are read from what they hold (``dataset.json`` for local
files, the registry for registered datasets).
"""
from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any

import ml_collections

from surm import data, peft
from surm import workdir as workdir_files
from surm.data import local, registry
from surm.peft import io as peft_io

RECORD = workdir_files.OUTPUTS


def write_record(workdir: str | pathlib.Path, data_spec: data.DatasetSpec,
                 labels: list[str] | None) -> None:
    """Writes ``workdir/outputs.json`` (``surm.tasks.classification.write_outputs``)."""
    from surm.tasks.classification import write_outputs
    write_outputs(workdir, data_spec, labels)


def read_record(workdir: str | pathlib.Path, config: ml_collections.ConfigDict) -> dict:
    """The run's record (`write_record`'s fields), without reading any data file.

    A workdir from before the record: a local dataset's ``dataset.json`` or the registry says
    the same. Raises FileNotFoundError (one line, saying what to write) when neither does, and
    ValueError for a damaged record.
    """
    workdir = workdir_files.local(workdir)
    path = workdir / RECORD
    name = config.input.dataset
    if path.is_file():
        try:
            record = json.loads(path.read_text())
            num_classes = record["num_classes"]
        except (ValueError, KeyError, TypeError):
            raise ValueError(f"{path} is damaged: expected a JSON object with num_classes "
                             f"(the model's outputs); fix or delete it") from None
        if not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"{path}: num_classes={num_classes!r}; expected an integer >= 1")
        labels = record.get("labels")
        if labels is not None and len(labels) != num_classes:
            raise ValueError(f"{path}: {len(labels)} labels for num_classes={num_classes}")
        return {"dataset": name, "modality": None, "regression": num_classes == 1,
                "labels": None, **record}
    if local.is_local(name):
        found = local.recorded_run(name, workdir)
        if found is None:
            raise FileNotFoundError(
                f"{workdir} does not record how many classes its model outputs (no {RECORD} "
                f"or {local.RUN_METADATA}); write {path} as {{\"num_classes\": N}} with N the "
                f"classes of {name} (1 for regression) and try again")
        spec, metadata = found
        ids = metadata.get("label_map") or {}
        labels = [n for n, _ in sorted(ids.items(), key=lambda item: item[1])] or None
    else:
        spec, labels = registry.get_spec(name), None
    return {"dataset": name, "modality": spec.modality, "num_classes": spec.num_classes,
            "regression": spec.regression, "labels": None if spec.regression else labels}


@dataclasses.dataclass(frozen=True)
class Run:
    workdir: pathlib.Path
    config: ml_collections.ConfigDict
    model: Any  # the Flax module
    base: dict  # the pretrained parameters, as loaded
    trainable: dict  # adapters and the base leaves that trained in full
    spec: peft.PeftSpec
    record: dict  # `read_record`: num_classes, labels, ...

    @property
    def entry(self):
        """The model's registry entry (`surm.models.registry`): modality, inputs, save."""
        from surm import models
        return models.get(self.config.model.name)

    @property
    def num_classes(self) -> int:
        return self.record["num_classes"]

    @property
    def labels(self) -> list[str] | None:
        """Class names in output order, where the data named them."""
        return self.record["labels"]

    @property
    def data_spec(self) -> data.DatasetSpec:
        """The dataset's spec: for a local dataset from the run's ``dataset.json`` when it has
        one, else from the dataset itself (which then needs its files)."""
        name = self.config.input.dataset
        found = local.recorded_run(name, self.workdir) if local.is_local(name) else None
        return found[0] if found else data.get_spec(name)

    @property
    def frozen(self) -> dict:
        return peft.split(self.base, self.spec)[1]

    @property
    def params(self) -> dict:
        """The fine-tuned parameters with the adapters alongside (unmerged)."""
        return peft.full_params(self.frozen, self.trainable)


def finished_config(workdir: str | pathlib.Path) -> ml_collections.ConfigDict:
    """The config of the finished run in ``workdir``; FileNotFoundError when it holds none
    (a run writes ``config.json`` first and ``adapters/`` at its end)."""
    workdir = workdir_files.local(workdir)
    config_file = workdir / workdir_files.CONFIG
    adapters = workdir / workdir_files.ADAPTERS
    if not config_file.is_file() or not (adapters / peft_io.WEIGHTS).is_file():
        raise FileNotFoundError(f"{workdir} is not a finished surm.train workdir (it needs "
                                f"{config_file.name} and adapters/{peft_io.WEIGHTS}, written at "
                                f"the end of a run); run the training first")
    return ml_collections.ConfigDict(read_config(workdir))


def read_config(workdir: str | pathlib.Path) -> dict:
    """``config.json`` of the run in ``workdir`` as a dict, an older run's in today's words (its
    peft block's family and mode as a method and structure: ``peft.spec.upgrade``); ValueError
    when it is not JSON."""
    config = json.loads((pathlib.Path(workdir) / workdir_files.CONFIG).read_text())
    if isinstance(config.get("peft"), dict):
        config["peft"] = peft.spec.upgrade(config["peft"])
    return config


def load_run(workdir: str | pathlib.Path) -> Run:
    """The run in ``workdir``; FileNotFoundError when it holds no finished run. The model is
    built by the registry entry its ``model.name`` names (`surm.models`): a model of your own
    must be registered first."""
    from surm.models import factory

    from surm import models

    workdir = workdir_files.local(workdir)
    config = finished_config(workdir)
    if models.is_causal_lm(models.get(config.model.name)):  # no classes: next-token logits
        record = {"dataset": config.input.dataset, "modality": "text", "num_classes": 0,
                  "regression": False, "labels": None}
    else:
        record = read_record(workdir, config)
    model, base, _ = factory.build(config.model, record["num_classes"])
    trainable, spec = peft_io.load(workdir / workdir_files.ADAPTERS, base)
    return Run(workdir, config, model, base, trainable, spec, record)
