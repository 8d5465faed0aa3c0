"""Everything checked before a run writes anything: every config field's domain
(``surm.config_fields``), what the owners of the names check (the PEFT spec, the model's entry,
the task's data, the optimizer), the workdir (a folder this process may write, not held by
another run, holding no run with another config), the batch against the mesh, the sequence
length against the model."""
from __future__ import annotations

import json
import math
import os
import pathlib
from typing import Sequence

import jax

from surm import config_fields, data, models, optim, peft, runs, sharding, tasks
from surm import workdir as workdir_files
from surm.checkpointing import kept_steps

ConfigError = config_fields.ConfigError
REQUIRED = ("total_steps", "input.batch_size", "seed", "peft.method", "eval_every",
            "ckpt_every")


def check_config(config, workdir: pathlib.Path, allow_resume_change: Sequence[str] = ()
                 ) -> tuple[peft.PeftSpec, data.DatasetSpec]:
    """Everything that can be checked before loading weights or compiling."""
    for key in REQUIRED:
        node = config
        for part in key.split("."):
            if not hasattr(node, "keys") or part not in node.keys():
                raise ConfigError(f"config has no {key!r}; every config defines "
                                  f"{', '.join(REQUIRED)}")
            node = node[part]
    config_fields.check(config)
    config = config_fields.complete(config)  # the optional fields left out: their defaults
    check_workdir_path(workdir)
    unknown = [k for k in allow_resume_change if k not in config_fields.resumable_on_request()]
    if unknown:
        raise ConfigError(f"--allow_resume_change: {', '.join(unknown)} may not change on "
                          f"resume; the fields that may: "
                          f"{', '.join(config_fields.resumable_on_request())}")
    spec = peft.config_to_spec(config.peft)
    try:
        peft.check_lora_path(spec, config.peft.lora_path, train=True)
    except ValueError as e:
        raise ConfigError(f"peft.lora_path: {e}") from None
    entry = models.get(config.model.name)
    data_spec = tasks.for_entry(entry).data_spec(config, entry)
    entry.check(config.model)  # e.g. that the checkpoint exists
    try:
        optim.check(config.optimizer)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if jax.process_index() == 0:  # the process that holds the workdir during the run
        workdir_files.check_free(workdir)  # refused now, not after loading the model
    check_workdir(config, workdir, allow_resume_change=allow_resume_change)
    return spec, data_spec


def check_workdir_path(workdir: pathlib.Path) -> None:
    """That ``workdir`` is, or can become, a folder this process may write into."""
    existing = next((p for p in (workdir, *workdir.parents) if p.exists()), None)
    if existing is not None and not existing.is_dir():
        raise ConfigError(f"--workdir {workdir}: {existing} is a file, not a folder; give "
                          f"another --workdir")
    if existing is not None and not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"--workdir {workdir}: {existing} cannot be written by this user "
                          f"(read-only or not ours); give another --workdir")


def resume_changes(config, workdir: pathlib.Path,
                   allow_resume_change: Sequence[str] = ()) -> dict[str, tuple]:
    """The fields in which ``config`` differs from the run ``workdir`` holds that the resumed
    run takes (``surm.config_fields``: free ones, and those allowed on request); ConfigError,
    naming each other difference (old -> new) and the fix, when there is any."""
    saved = workdir / workdir_files.CONFIG
    if not saved.exists():
        return {}
    try:
        old = runs.read_config(workdir)
    except ValueError:
        raise ConfigError(f"{saved} is damaged (not JSON); this workdir's run cannot be "
                          f"checked: use a new --workdir") from None
    taken, refused = config_fields.resume_changes(old, json.loads(config.to_json_best_effort()),
                                                  allow_resume_change)
    if refused:
        said = "; ".join(f"{k}: {o!r} -> {n!r}" for k, (o, n) in refused.items())
        on_request = [k for k in refused if k in config_fields.resumable_on_request()]
        raise ConfigError(
            f"{workdir} holds a run with another config ({said}); resume it with its own "
            f"values, or give a new --workdir"
            + (f", or resume with the change on purpose: --allow_resume_change="
               f"{','.join(on_request)}" if on_request and len(on_request) == len(refused)
               else ""))
    return taken


def check_workdir(config, workdir: pathlib.Path, sources: tasks.Sources | None = None,
                  task: tasks.Task | None = None, allow_resume_change: Sequence[str] = ()
                  ) -> None:
    """That ``workdir`` (if it holds a run) can take this config: no difference but those a
    resumed run may take (``resume_changes``), a kept ``restore_step``, the same data (the
    task's check, given its ``sources``). Reads only."""
    resume_changes(config, workdir, allow_resume_change)
    config = config_fields.complete(config)
    if config.restore_step:
        kept = kept_steps(workdir)
        if config.restore_step not in kept:
            raise ConfigError(
                f"restore_step={config.restore_step} is not a checkpoint kept in {workdir} "
                f"(kept: {', '.join(map(str, kept)) or 'none'}); give one of those, or 0 for "
                f"the latest")
    if sources is not None:
        task.check_workdir(sources, workdir)


def check_batch(global_batch: int, mesh) -> None:
    data_axis, procs = sharding.batch_devices(mesh), jax.process_count()
    if global_batch % data_axis or global_batch % procs:
        step = math.lcm(data_axis, procs)
        raise ConfigError(f"input.batch_size={global_batch} must be divisible by the data and "
                          f"fsdp axes ({data_axis} devices) and by the {procs} process(es); "
                          f"use e.g. {step * max(1, global_batch // step)}")


def check_max_length(config, entry, model) -> None:
    """A sequence longer than the built model takes, refused before anything is written."""
    limit = entry.max_length(model)
    if limit is not None and config.input.get("max_length", 0) > limit:
        raise ConfigError(f"input.max_length={config.input.max_length} is longer than "
                          f"{config.model.name} takes ({limit} positions); set e.g. "
                          f"--config.input.max_length={min(limit, 128)}")
