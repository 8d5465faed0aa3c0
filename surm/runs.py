"""A finished ``surm.train`` run, loaded back from its workdir: config, model, pretrained
weights, trained adapters and spec.

    run = runs.load_run("runs/default")
    logits = peft.apply(run.model, run.frozen, run.trainable, run.spec, *inputs)
"""
from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any

import ml_collections

from surm import data, peft
from surm.peft import io as peft_io


@dataclasses.dataclass(frozen=True)
class Run:
    workdir: pathlib.Path
    config: ml_collections.ConfigDict
    model: Any  # the Flax module
    base: dict  # the pretrained parameters, as loaded
    trainable: dict  # adapters and the base leaves that trained in full
    spec: peft.PeftSpec
    data_spec: data.DatasetSpec

    @property
    def frozen(self) -> dict:
        return peft.split(self.base, self.spec)[1]

    @property
    def params(self) -> dict:
        """The fine-tuned parameters with the adapters alongside (unmerged)."""
        return peft.full_params(self.frozen, self.trainable)


def load_run(workdir: str | pathlib.Path) -> Run:
    """The run in ``workdir``; FileNotFoundError when it holds no finished run."""
    from surm.models import factory

    workdir = pathlib.Path(workdir)
    config_file, adapters = workdir / "config.json", workdir / "adapters"
    if not config_file.is_file() or not (adapters / peft_io.WEIGHTS).is_file():
        raise FileNotFoundError(f"{workdir} is not a finished surm.train workdir (it needs "
                                f"{config_file.name} and adapters/{peft_io.WEIGHTS}, written at "
                                f"the end of a run); run the training first")
    config = ml_collections.ConfigDict(json.loads(config_file.read_text()))
    data_spec = data.get_spec(config.input.dataset)
    model, base, _ = factory.build(config.model, data_spec.num_classes)
    trainable, spec = peft_io.load(adapters, base)
    return Run(workdir, config, model, base, trainable, spec, data_spec)
