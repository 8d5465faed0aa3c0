"""Fine-tune with SURM: ``python -m surm.train --config configs/<file>.py[:k=v,...] --workdir DIR``.

Reads top to bottom: config checks, mesh, data, model and pretrained weights (the
``surm.models`` entry that ``model.name`` names says the model's modality, inputs and
tokenizer), surgery, optimizer (nothing is written before this point: a refused run leaves DIR
as it was), the workdir taken (one run at a time: ``surm.workdir``), shardings, restore, loop,
evaluation. Resumes from DIR when it holds a checkpoint: the latest, or
``--config.restore_step=N`` (a kept step; the checkpoints after it are deleted and written
again by the resumed run). Writes ``DIR/metrics.jsonl`` (one JSON object per line, each with
``step``), ``DIR/predictions/<role>_<step>.npz`` (what the model predicted for each example at
each evaluation, from which the logged metrics are computed: ``surm.predictions``),
``DIR/config.json``, TensorBoard events in ``DIR/tb``, checkpoints in
``DIR/checkpoints``, the final adapters in ``DIR/adapters``, ``DIR/summary.json`` and
``DIR/outputs.json`` (what the model's outputs are: the number of classes and their names, read
by ``surm.runs`` and ``surm.export``).

Multi-host (TPU pods, multi-node GPU): ``--distributed`` (or SURM_DISTRIBUTED=1) calls
``jax.distributed.initialize()``; on CPU give ``--coordinator_address``, ``--num_processes``
and ``--process_id``. Each process reads its own shard of the data; only process 0 writes logs.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import pathlib
import sys
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import app, flags, logging
from ml_collections import config_flags

from surm import (allocator, cli, config_fields, data, lm, metrics, models, optim, peft,
                  predictions, runs, sharding)
from surm import workdir as workdir_files
from surm.checkpointing import Checkpoints, CorruptCheckpointError, kept_steps
from surm.models import factory
from surm.peft import io as peft_io
from surm.run_log import RunLog

_CONFIG = config_flags.DEFINE_config_file("config", None, "configs/<name>.py[:k=v,...]",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and logs.")
_DISTRIBUTED = flags.DEFINE_bool("distributed", os.environ.get("SURM_DISTRIBUTED") == "1",
                                 "Call jax.distributed.initialize() (multi-host).")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")

_ALLOW_RESUME = flags.DEFINE_list(
    "allow_resume_change", [], "Config fields a resumed run may change on purpose (e.g. "
    f"total_steps to extend it); any of: {', '.join(config_fields.resumable_on_request())}.")

ConfigError = config_fields.ConfigError


def _lookup(cfg, dotted: str):
    for part in dotted.split("."):
        cfg = cfg[part]
    return cfg.to_dict() if hasattr(cfg, "to_dict") else cfg


def _lora_path(config) -> str:
    """``peft.lora_path`` of a config (older configs have none: auto)."""
    return config.peft.get("lora_path", "auto")


def check_config(config, workdir: pathlib.Path,
                 allow_resume_change: Sequence[str] = ()) -> tuple[peft.PeftSpec,
                                                                   data.DatasetSpec]:
    """Everything that can be checked before loading weights or compiling: every field's
    domain (``surm.config_fields``), then what the owners of the names check."""
    for key in ("total_steps", "input.batch_size", "seed", "peft.family", "eval_every",
                "ckpt_every"):
        try:
            _lookup(config, key)
        except (KeyError, AttributeError):
            raise ConfigError(f"config has no {key!r}; every config defines total_steps, "
                              f"input.batch_size, seed, peft.family, eval_every, ckpt_every")
    config_fields.check(config)
    check_workdir_path(workdir)
    unknown = [k for k in allow_resume_change if k not in config_fields.resumable_on_request()]
    if unknown:
        raise ConfigError(f"--allow_resume_change: {', '.join(unknown)} may not change on "
                          f"resume; the fields that may: "
                          f"{', '.join(config_fields.resumable_on_request())}")
    spec = peft.config_to_spec(config.peft)
    try:
        peft.check_lora_path(spec, _lora_path(config), train=True)
    except ValueError as e:
        raise ConfigError(f"peft.lora_path: {e}") from None
    entry = models.get(config.model.get("name"))
    data_spec = _data_spec(config, entry)
    if data_spec.modality != entry.modality:
        raise ConfigError(f"dataset {config.input.dataset!r} holds {data_spec.modality} data "
                          f"but model.name={config.model.name!r} reads {entry.modality}; use "
                          f"configs/vit_transfer.py for images, configs/default.py or "
                          f"configs/bert_glue.py for text")
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
        old = json.loads(saved.read_text())
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


def check_workdir(config, workdir: pathlib.Path, dataset: data.Dataset | None = None,
                  allow_resume_change: Sequence[str] = ()) -> None:
    """That ``workdir`` (if it holds a run) can take this config: no difference but those a
    resumed run may take (``resume_changes``), a kept ``restore_step``. Reads only."""
    resume_changes(config, workdir, allow_resume_change)
    restore_step = config.get("restore_step", 0)
    if restore_step:
        kept = kept_steps(workdir)
        if restore_step not in kept:
            raise ConfigError(
                f"restore_step={restore_step} is not a checkpoint kept in {workdir} (kept: "
                f"{', '.join(map(str, kept)) or 'none'}); give one of those, or 0 for the latest")
    if dataset is not None:
        dataset.record_run(workdir, write=False)  # local data: the same content as before


def _check_batch(global_batch: int, mesh) -> None:
    data_axis, procs = mesh.shape["data"], jax.process_count()
    if global_batch % data_axis or global_batch % procs:
        raise ConfigError(f"input.batch_size={global_batch} must be divisible by the data axis "
                          f"({data_axis} devices) and by the {procs} process(es); use e.g. "
                          f"{math.lcm(data_axis, procs) * max(1, global_batch // math.lcm(data_axis, procs))}")


_TEXT_FILE = "text:"  # a causal-LM dataset read straight from a .txt or .jsonl file


def _data_spec(config, entry) -> data.DatasetSpec:
    """The config's dataset; for a causal LM also ``text:PATH`` (a local text file: `surm.lm`)
    and the metric is perplexity."""
    name = config.input.dataset
    if not models.is_causal_lm(entry):
        return data.get_spec(name)
    if name.startswith(_TEXT_FILE):
        path = pathlib.Path(name[len(_TEXT_FILE):])
        if not path.is_file():
            raise FileNotFoundError(f"input.dataset={name!r}: {path} is not a file; give a "
                                    f".txt or .jsonl file (surm.lm)")
        spec = data.DatasetSpec(name=name, tfds_name="", modality="text", num_classes=0,
                                splits={})
    else:
        spec = data.get_spec(name)
        if not spec.text_keys:
            raise ConfigError(f"dataset {name!r} has no text for a language model")
    return dataclasses.replace(spec, metrics=(lm.METRIC,), regression=False)


def _lm_sources(config, entry, data_spec, dataset) -> dict[str, list]:
    """{role: token blocks} of a causal-LM run (`surm.lm`): the dataset's text, or the
    ``text:PATH`` file's records, cut into ``input.max_length`` blocks."""
    tokenizer = entry.tokenizer(config.model, config.input.max_length)
    eos = entry.eos_id(config.model)
    if dataset is None:
        records = lm.read_local(data_spec.name[len(_TEXT_FILE):])
    else:
        key = data_spec.text_keys[0]
        records = {role: [{"text": ex[key]} for ex in dataset.source(role)]
                   for role in ("train", "validation", "test")}
    template = config.input.get("prompt_template") or "{prompt}"
    blocks = {role: lm.blocks_from_records(rs, tokenizer, config.input.max_length, eos,
                                           template=template) for role, rs in records.items()}
    for role, limit in (("validation", config.input.get("validation_examples", 0)),
                        ("test", config.input.get("test_examples", 0))):
        if limit:
            blocks[role] = blocks[role][:limit]
    empty = [role for role, b in blocks.items() if not b]
    if empty:
        raise ConfigError(f"no token blocks for {', '.join(empty)}: the text is too short for "
                          f"input.max_length={config.input.max_length}")
    return blocks


def _identity(example, rng=None):
    del rng
    return example


def _loss(outputs, labels, regression: bool):
    if regression:
        return jnp.mean((outputs[:, 0] - labels) ** 2)
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(outputs, labels))


def preprocessors(config, dataset):
    """(training, evaluation) preprocessing of a config's dataset: tokenizer or image size,
    normalisation and augmentation."""
    spec = dataset.spec
    inp = config.input
    if spec.modality == "text":
        tok = models.get(config.model.name).tokenizer(config.model, inp.max_length)
        prep = dataset.preprocessor(tokenizer=tok, max_length=inp.max_length)
        return prep, prep
    size = config.model.image_size
    norm = inp.get("normalization", "minus_one_to_one")
    crop = inp.get("crop_scale")
    train = dataset.preprocessor(size=size, normalization=norm, hflip=inp.get("hflip", False),
                                 crop_scale=tuple(crop) if crop else None)
    evaluate = dataset.preprocessor(size=size, normalization=norm,
                                    central_crop=inp.get("central_crop"))
    return train, evaluate


def _all_finite(tree) -> jax.Array:
    """Whether every float in ``tree`` is finite (one boolean, computed on device). ``x * 0`` is
    0 where ``x`` is finite and NaN where it is not, so one float sum per leaf answers: a
    reduction XLA runs at memory speed, where ``isfinite(x).all()`` materialises a boolean
    array and reduces it through a slow reduce-window."""
    leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    if not leaves:
        return jnp.asarray(True)
    return jnp.isfinite(sum(jnp.sum(x * 0, dtype=jnp.float32) for x in leaves))


def initial_state(trainable, tx: optax.GradientTransformation, rng: jax.Array) -> dict:
    """The train step's state before its first step: ``step``, ``trainable``, ``opt_state``
    and the run's ``rng`` (each step folds the step number into it)."""
    return {"step": jnp.zeros((), jnp.int32), "trainable": trainable,
            "opt_state": tx.init(trainable), "rng": rng}


def make_step_fns(model, spec: peft.PeftSpec, tx: optax.GradientTransformation,
                  inputs: Callable[[dict], tuple], regression: bool, lora_path: str = "auto",
                  causal_lm: bool = False):
    """The (unjitted) train step ``(state, frozen, batch) -> (state, metrics)`` and eval step
    ``(trainable, frozen, inputs) -> outputs`` of a model under a PEFT spec. ``inputs``: the
    model call's positional inputs from a batch (its registry entry's ``inputs``);
    ``lora_path``: how a lora-mode update is computed (``peft.lora_path_for``). ``causal_lm``:
    the loss is the next-token loss over the batch's ``loss_mask`` and the eval step returns
    ``surm.lm.token_nll`` rows (NLL sum, token count) per example."""

    def train_step(state, frozen, batch):
        step_rng = jax.random.fold_in(state["rng"], state["step"])

        def loss_fn(tr):
            model_rng, adapter_rng = jax.random.split(step_rng)
            out = peft.apply(model, frozen, tr, spec, *inputs(batch), train=True,
                             rngs={"dropout": model_rng}, rng=adapter_rng,
                             lora_path=lora_path)
            if causal_lm:
                return lm.loss(out, batch)
            return _loss(out, batch["label"], regression)

        loss, grads = jax.value_and_grad(loss_fn)(state["trainable"])
        grad_norm = optax.global_norm(grads)
        updates, opt_state = tx.update(grads, state["opt_state"], state["trainable"])
        new = {"step": state["step"] + 1, "rng": state["rng"], "opt_state": opt_state,
               "trainable": optax.apply_updates(state["trainable"], updates)}
        # The new parameters and optimizer state too: a finite gradient can still make them
        # NaN/Inf (a huge step, a NaN hyper-parameter), and a checkpoint holds only finite values.
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & _all_finite(
            (new["trainable"], new["opt_state"]))
        # The host reads ``finite`` after every step and stops the run at the first False,
        # before anything is saved: a non-finite state is never written. (Selecting the old
        # state here instead would keep both states alive and cost a full pass over them.)
        return new, {"loss": loss, "grad_norm": grad_norm, "finite": finite}

    def eval_step(trainable, frozen, batch):
        out = peft.apply(model, frozen, trainable, spec, *inputs(batch), lora_path=lora_path)
        return lm.token_nll(out, batch) if causal_lm else out

    return train_step, eval_step


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       allow_resume_change: Sequence[str] = ()) -> dict[str, Any]:
    """Trains, evaluates and saves one run in ``workdir``. Everything (config, data, model,
    targets) is checked and built before the workdir is written or taken: a refused run writes
    nothing. The workdir is then held (``surm.workdir``) until the run ends. A workdir that
    holds a run resumes it with the same config; ``allow_resume_change`` names the fields that
    may change on purpose (``surm.config_fields.ON_REQUEST``: total_steps to extend a run, the
    learning rates), each change recorded in ``config_changes.jsonl``."""
    wall_start = time.time()
    workdir = pathlib.Path(workdir)
    spec, data_spec = check_config(config, workdir, allow_resume_change)
    mesh = sharding.make_mesh(config.mesh)
    _check_batch(config.input.batch_size, mesh)
    main = jax.process_index() == 0

    # Data.
    entry = models.get(config.model.name)
    causal = models.is_causal_lm(entry)
    dataset = (None if data_spec.name.startswith(_TEXT_FILE) else
               data.get_dataset(config.input.dataset, config.input.get("data_dir") or None))
    if causal:  # token blocks with a loss mask, built once (`surm.lm`)
        label_names = None
        blocks = _lm_sources(config, entry, data_spec, dataset)
        train_prep = eval_prep = _identity
        train_source = blocks["train"]
        eval_sources = {"validation": blocks["validation"], "test": blocks["test"]}
    else:
        dataset.record_run(workdir, write=False)  # local data: the content this workdir saw
        label_names = dataset.label_names()
        train_prep, eval_prep = preprocessors(config, dataset)
        shots = config.input.get("shots", 0)
        train_source = (dataset.source("train", k_per_class=shots, seed=config.seed) if shots
                        else dataset.source("train"))
        # Validation on the first N examples of the split (stored in a shuffled order).
        eval_sources = {"validation": dataset.source(
            "validation", first=config.input.get("validation_examples", 0) or None),
            "test": dataset.source("test")}
    train_iter = data.make_train_loader(train_source, train_prep,
                                        global_batch_size=config.input.batch_size,
                                        seed=config.seed,
                                        num_workers=config.input.get("num_workers", 0))

    # Model, pretrained weights, surgery (a target that matches nothing fails here).
    model, params, _ = factory.build(config.model, data_spec.num_classes)
    limit = entry.max_length(model)
    if limit is not None and config.input.get("max_length", 0) > limit:
        raise ConfigError(f"input.max_length={config.input.max_length} is longer than "
                          f"{config.model.name} takes ({limit} positions); set e.g. "
                          f"--config.input.max_length={min(limit, 128)}")
    rng = jax.random.PRNGKey(config.seed)
    init_rng, train_rng = jax.random.split(rng)
    trainable, frozen = peft.init(params, spec, init_rng)
    counts = peft.count(params, trainable, spec)
    # Which pretrained weights the adapters belong to, recorded beside them at the end.
    base_id = peft_io.base_identity(
        params, spec, f"{config.model.name}:{config.model.get('checkpoint') or 'random'}")
    del params

    tx, schedules = optim.make(config.optimizer, config.total_steps, trainable)
    state = initial_state(trainable, tx, train_rng)

    # The workdir: taken (only process 0 writes), checked again now that no other run can
    # change it, then written.
    with (workdir_files.hold(workdir) if main else contextlib.nullcontext()):
        if main:
            check_workdir(config, workdir, None if causal else dataset, allow_resume_change)
            changes = resume_changes(config, workdir, allow_resume_change)
            if changes:  # what the resumed run does differently, and from where
                with (workdir / workdir_files.CONFIG_CHANGES).open("a") as f:
                    f.write(json.dumps({"from_step": max(kept_steps(workdir), default=0),
                                        "changes": {k: list(v) for k, v in changes.items()}})
                            + "\n")
            (workdir / workdir_files.CONFIG).write_text(config.to_json_best_effort(indent=2))
            print(peft.format_report(counts), flush=True)
        if not causal:  # Local files: label map etc. in dataset.json.
            dataset.record_run(workdir, write=main)
        # Shardings.
        repl = sharding.replicated(mesh)
        state_sh = jax.tree.map(lambda _: repl, state)
        frozen_sh = sharding.base_shardings(frozen, mesh, config.mesh.get("fsdp", False))
        batch_sh = sharding.batch_sharding(mesh)
        state = jax.device_put(state, state_sh)
        frozen = jax.device_put(frozen, frozen_sh)
        regression = data_spec.regression

        train_step, eval_step = make_step_fns(model, spec, tx, entry.inputs, regression,
                                              _lora_path(config), causal_lm=causal)

        # What the step reads of a batch; the eval step all but the label (a causal LM's
        # loss_mask is its label and its eval step's input).
        batch_keys = entry.input_keys + (("loss_mask",) if causal else ("label",))
        eval_keys = batch_keys if causal else batch_keys[:-1]
        batch_sh_tree = {k: batch_sh for k in batch_keys}
        p_train_step = jax.jit(train_step, in_shardings=(state_sh, frozen_sh, batch_sh_tree),
                               out_shardings=(state_sh, repl), donate_argnums=(0,))
        p_eval_step = jax.jit(eval_step, in_shardings=(state_sh["trainable"], frozen_sh,
                                                       {k: batch_sh for k in eval_keys}),
                              out_shardings=repl)

        kind = "causal_lm" if causal else "regression" if regression else "classification"

        def evaluate(role: str, at_step: int) -> dict[str, float]:
            """The metrics of one pass over a split; what the model predicted per example
            goes to ``predictions/<role>_<step>.npz`` (`surm.predictions`), and the metrics
            are computed from exactly those arrays."""
            outs, labels, index = [], [], []
            for local in data.make_eval_batches(eval_sources[role], eval_prep,
                                                global_batch_size=config.input.eval_batch_size):
                stop_if_asked(at_step)
                batch = sharding.global_batch(
                    {k: local[k] for k in batch_keys + ("mask", "index")}, mesh)
                out = p_eval_step(state["trainable"], frozen, {k: batch[k] for k in eval_keys})
                keep = np.asarray(_fetch(batch["mask"]), bool)
                outs.append(np.asarray(out)[keep])
                index.append(np.asarray(_fetch(batch["index"]))[keep])
                if not causal:
                    labels.append(np.asarray(_fetch(batch["label"]))[keep])
            pred = predictions.make(kind, np.concatenate(index), np.concatenate(outs),
                                    None if causal else np.concatenate(labels),
                                    data_spec.metrics)
            if main:
                predictions.write(predictions.path(workdir, role, at_step), pred)
            return {f"{role}_{k}": v for k, v in predictions.metrics(pred).items()}

        # Restore: from ``restore_step`` if given (the later checkpoints are then deleted: the
        # resumed run writes its own), else from the latest.
        ckpts = Checkpoints(workdir, keep=config.get("keep_checkpoints", 2))
        start = config.get("restore_step", 0) or ckpts.latest_step() or 0
        if start:
            fresh = state["opt_state"]
            state = ckpts.restore(start, state, train_iter)
            if not _all_finite((state["trainable"], state["opt_state"])):  # an older surm's
                raise CorruptCheckpointError(
                    f"checkpoint {ckpts.directory / str(start)} holds NaN/Inf values (saved by "
                    f"an older surm, which did not check them). It was left untouched; "
                    f"{ckpts.earlier_steps_hint(start)}")
            state["opt_state"] = optim.with_lrs_of(state["opt_state"], fresh)
            dropped = ckpts.drop_after(start)
            print(f"Resumed from {ckpts.directory} at step {start}" +
                  (f"; deleted the later checkpoints {', '.join(map(str, dropped))}"
                   if dropped else ""), file=sys.stderr, flush=True)
        log = RunLog(workdir, enabled=main, resume_step=start, total_steps=config.total_steps)
        if main:  # as metrics.jsonl: nothing past the restored step
            predictions.drop_after(workdir, start)

        def stop_if_asked(at_step: int) -> None:
            """After SIGINT/SIGTERM (``surm.cli``): the state at ``at_step`` saved, then stop."""
            if not cli.stopped():
                return
            if at_step > (ckpts.latest_step() or 0):
                ckpts.save(at_step, state, train_iter)
            ckpts.wait()
            saved = ckpts.latest_step()
            cli.raise_if_stopped(
                f"the checkpoint of step {saved} is in {ckpts.directory}; run the same command "
                f"to resume" if saved else "before the first step; nothing was trained")

        # Loop.
        headline = f"validation_{data_spec.metrics[0]}"
        best, last_validation = {}, {}
        window_loss, window_start, window_steps = [], time.time(), 0
        step = start
        if config.get("eval_at_start") and start == 0:  # the untouched model, for reference
            log.write({"step": 0, **evaluate("validation", 0), **evaluate("test", 0)})
        try:
            for step in range(start + 1, config.total_steps + 1):
                stop_if_asked(step - 1)
                local = next(train_iter)
                batch = sharding.global_batch({k: local[k] for k in batch_keys}, mesh)
                state, m = p_train_step(state, frozen, batch)
                m = jax.device_get(m)
                if not m["finite"]:
                    ckpts.wait()
                    last = ckpts.latest_step()
                    what = ("loss or gradient" if not np.isfinite(m["loss"] + m["grad_norm"])
                            else "the updated parameters or optimizer state")
                    kept = (f"is step {last} in {ckpts.directory} and was kept" if last else
                            "does not exist")
                    msg = (f"{what} became NaN/Inf at step {step} (loss={m['loss']}, "
                           f"grad_norm={m['grad_norm']}); stopping. The last good checkpoint "
                           f"{kept}. Lower optimizer.lr, raise optimizer.grad_clip, or check "
                           f"the data")
                    log.write({"step": step, "error": msg})
                    raise FloatingPointError(msg)
                window_loss.append(float(m["loss"]))
                window_steps += 1
                log.progress(step, float(m["loss"]))
                if step % config.get("log_every", 20) == 0 or step == config.total_steps:
                    elapsed = time.time() - window_start
                    log.write({"step": step, "train_loss": float(np.mean(window_loss)),
                               "learning_rate": float(schedules["adapters"](step - 1)),
                               "grad_norm": float(m["grad_norm"]),
                               "examples_per_sec":
                                   window_steps * config.input.batch_size / elapsed})
                    window_loss, window_start, window_steps = [], time.time(), 0
                if config.eval_every and (step % config.eval_every == 0
                                          or step == config.total_steps):
                    result = evaluate("validation", step)
                    last_validation = {**result, "step": step}
                    if not best or metrics.better(result[headline], best[headline],
                                                  data_spec.metrics[0]):
                        best = {**result, "step": step}
                    log.write({"step": step, **result})
                if step % config.ckpt_every == 0 or step == config.total_steps:
                    ckpts.save(step, state, train_iter)
            if config.eval_every and not last_validation:  # resumed after the last step
                last_validation = {**evaluate("validation", step), "step": step}
                best = best or last_validation
                log.write(last_validation)
            test = evaluate("test", step)
            log.write({"step": step, **test})
            ckpts.wait()
        finally:
            ckpts.close()
            log.close()

        summary = {"step": step, **test, "validation": last_validation, "best_validation": best,
                   "trainable": counts["trainable"],
                   "adapter": counts["adapter"], "base": counts["base"],
                   "wall_seconds": time.time() - wall_start}
        if main:
            if not causal:  # a classifier's outputs, for exports
                runs.write_record(workdir, data_spec, label_names)
            peft_io.save(workdir / workdir_files.ADAPTERS, jax.device_get(state["trainable"]), spec,
                         base=base_id)
            (workdir / workdir_files.SUMMARY).write_text(json.dumps(summary, indent=2))
            head = f"test_{data_spec.metrics[0]}"
            val = (f" best {headline}={best[headline]:.4f} (step {best['step']})" if best else "")
            print(f"final: {head}={test[head]:.4f}{val} "
                  f"trainable={counts['trainable']:,} ({100 * counts['share']:.3f}% of "
                  f"{counts['base']:,}) wall={summary['wall_seconds']:.0f}s", flush=True)
        return summary


def _fetch(x: jax.Array) -> np.ndarray:
    """The global value of a batch array on every process (gathered across processes)."""
    if x.is_fully_addressable:
        return np.asarray(x)
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def _initialize_distributed() -> None:
    if not _DISTRIBUTED.value:
        return
    # CPU processes talk through gloo (harmless where an accelerator has its own collectives).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=_COORDINATOR.value,
                               num_processes=_NUM_PROCESSES.value, process_id=_PROCESS_ID.value)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if _CONFIG.value is None or not _WORKDIR.value:
        cli.fail("--config and --workdir are required (a workdir is a folder of its own, never "
                 "''), e.g. --config configs/default.py --workdir runs/default", cli.USAGE)
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # orbax and tfds are chatty at INFO
    allocator.configure()  # before XLA's threads exist: see surm/allocator.py
    _initialize_distributed()
    try:
        with cli.stop_on_signals():
            train_and_evaluate(_CONFIG.value, _WORKDIR.value, _ALLOW_RESUME.value)
    except cli.Stopped as e:
        print(str(e), file=sys.stderr, flush=True)
        sys.exit(e.exit_status)
    except (ValueError, FileNotFoundError, FloatingPointError, CorruptCheckpointError,
            workdir_files.WorkdirBusyError, OSError) as e:
        # an operating system's error (disk full, read-only, a file for a folder): its cause
        # and path; the project's own errors say themselves
        message = (cli.describe_os_error(e) if isinstance(e, OSError) and e.errno is not None
                   else str(e))
        print(f"error: {message}", file=sys.stderr)
        if isinstance(e, CorruptCheckpointError):
            # The failed restore's reads are still collected at exit, each with its own
            # traceback or warning: the run is over and its files closed, so leave now.
            sys.stderr.flush()
            sys.stdout.flush()
            os._exit(1)
        sys.exit(1)


def run() -> None:
    """The command line (``python -m surm.train``, ``surm-train``)."""
    app.run(main, flags_parser=cli.parse_flags)


if __name__ == "__main__":
    run()
