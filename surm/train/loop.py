"""``train_and_evaluate``: one run, top to bottom. Checks (nothing written before them), mesh,
the task's data, model and pretrained weights, surgery, optimizer; then the workdir taken,
shardings, restore, the loop, evaluations, the final save.

The host does not wait for the device at every step: each step's loss, gradient norm and
finiteness stay on the device until a log, evaluation, checkpoint or stop needs them, and are
then fetched together; a non-finite step stops the run there, naming its step, before anything
is evaluated or saved."""
from __future__ import annotations

import contextlib
import json
import math
import pathlib
import sys
import time
from typing import Any, Sequence

import jax
import ml_collections
import numpy as np
import tqdm

from surm import (cli, config_fields, data, metrics, models, optim, peft, predictions,
                  sharding, tasks)
from surm import workdir as workdir_files
from surm.checkpointing import Checkpoints, CorruptCheckpointError, kept_steps
from surm.models import factory
from surm.peft import io as peft_io
from surm.run_log import RunLog
from surm.train import checks, step as step_lib


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       allow_resume_change: Sequence[str] = ()) -> dict[str, Any]:
    """Trains, evaluates and saves one run in ``workdir``. Everything (config, data, model,
    targets) is checked and built before the workdir is written or taken: a refused run writes
    nothing. The workdir is then held (``surm.workdir``) until the run ends. A workdir that
    holds a run resumes it with the same config; ``allow_resume_change`` names the fields that
    may change on purpose (``surm.config_fields.ON_REQUEST``: total_steps to extend a run, the
    learning rates), each change recorded in ``config_changes.jsonl``."""
    wall_start = time.time()
    try:
        workdir = workdir_files.local(workdir)
    except ValueError as e:
        raise checks.ConfigError(str(e)) from None
    config = config_fields.complete(config)
    spec, data_spec = checks.check_config(config, workdir, allow_resume_change)
    mesh = sharding.make_mesh(config.mesh)
    checks.check_batch(config.input.batch_size, mesh)
    main = jax.process_index() == 0

    # Data: whatever the model's task reads.
    entry = models.get(config.model.name)
    task = tasks.for_entry(entry)
    sources = task.sources(config, entry, data_spec)
    task.check_workdir(sources, workdir)

    def train_loader(start_batch: int):
        return data.make_train_loader(sources.train, sources.train_prep,
                                      global_batch_size=config.input.batch_size,
                                      seed=config.seed, num_workers=config.input.num_workers,
                                      start_batch=start_batch)
    train_iter = train_loader(0)  # built now: a split too small for a batch is refused here

    # Model, pretrained weights, surgery (a target that matches nothing fails here).
    model, params, _ = factory.build(config.model, data_spec.num_classes)
    checks.check_max_length(config, entry, model)
    init_rng, train_rng = jax.random.split(jax.random.PRNGKey(config.seed))
    trainable, frozen = peft.init(params, spec, init_rng)
    counts = peft.count(params, trainable, spec)
    # Which pretrained weights the adapters belong to, recorded beside them at the end.
    base_id = peft_io.base_identity(
        params, spec, f"{config.model.name}:{config.model.get('checkpoint') or 'random'}")
    del params
    tx, schedules = optim.make(config.optimizer, config.total_steps, trainable)
    state = step_lib.initial_state(trainable, tx, train_rng)

    # The workdir: taken (only process 0 writes), checked again now that no other run can
    # change it, then written.
    with (workdir_files.hold(workdir) if main else contextlib.nullcontext()):
        if main:
            checks.check_workdir(config, workdir, sources, task, allow_resume_change)
            _write_config(config, workdir, allow_resume_change)
            print(peft.format_report(counts), flush=True)
        task.record(sources, data_spec, workdir, write=main, finished=False)
        run = _Run(config, workdir, mesh, model, spec, tx, entry, task, data_spec, sources,
                   state, frozen, main)
        run.restore()
        if run.start:  # the stream from the restored step's batch, whatever the process count
            train_iter = train_loader(run.start)
        try:
            summary = run.loop(train_iter, schedules)
        finally:
            run.close()
        summary.update(trainable=counts["trainable"], adapter=counts["adapter"],
                       base=counts["base"], wall_seconds=time.time() - wall_start)
        # on every process: a leaf split over other processes' devices is gathered
        trainable_host = sharding.to_host(run.state["trainable"])
        if main:
            task.record(sources, data_spec, workdir, write=True, finished=True)
            peft_io.save(workdir / workdir_files.ADAPTERS, trainable_host, spec, base=base_id)
            (workdir / workdir_files.SUMMARY).write_text(json.dumps(summary, indent=2))
            _print_final(summary, data_spec, counts)
        return summary


def _write_config(config, workdir: pathlib.Path, allow_resume_change: Sequence[str]) -> None:
    """``config.json`` as the run now runs, and what a resumed run changed, from which step."""
    changes = checks.resume_changes(config, workdir, allow_resume_change)
    if changes:
        with (workdir / workdir_files.CONFIG_CHANGES).open("a") as f:
            f.write(json.dumps({"from_step": max(kept_steps(workdir), default=0),
                                "changes": {k: list(v) for k, v in changes.items()}}) + "\n")
    (workdir / workdir_files.CONFIG).write_text(config.to_json_best_effort(indent=2))


def _print_final(summary: dict, data_spec, counts: dict) -> None:
    headline = f"validation_{data_spec.metrics[0]}"
    head = f"test_{data_spec.metrics[0]}"
    best = summary["best_validation"]
    val = f" best {headline}={best[headline]:.4f} (step {best['step']})" if best else ""
    print(f"final: {head}={summary[head]:.4f}{val} trainable={counts['trainable']:,} "
          f"({100 * counts['share']:.3f}% of {counts['base']:,}) "
          f"wall={summary['wall_seconds']:.0f}s", flush=True)


class _Run:
    """The compiled steps, the state, and what the loop does with them."""

    def __init__(self, config, workdir, mesh, model, spec, tx, entry, task, data_spec,
                 sources, state, frozen, main):
        self.config, self.workdir, self.mesh, self.main = config, workdir, mesh, main
        self.task, self.data_spec, self.sources = task, data_spec, sources
        state_sh, frozen_sh = step_lib.state_shardings(state, frozen, mesh)
        self.state = jax.device_put(state, state_sh)
        self.frozen = jax.device_put(frozen, frozen_sh)
        # How each lora-mode update is computed, decided once, before anything is traced.
        plans = {role: peft.plan_lora_paths(spec, state["trainable"], config.peft.lora_path,
                                            train=role == "train")
                 for role in ("train", "eval")}
        if main:
            (workdir / workdir_files.LORA_PLAN).write_text(json.dumps(
                {"backend": jax.default_backend(), **plans}, indent=1))
            (workdir / workdir_files.MESH).write_text(json.dumps(
                {**sharding.device_order(mesh), "processes": jax.process_count()}))
        train_step, eval_step = step_lib.make_step_fns(model, spec, tx, entry.inputs, task,
                                                       data_spec, plans["train"],
                                                       plans["eval"])
        self.batch_keys, self.eval_keys = task.batch_keys(entry), task.eval_keys(entry)
        self.train_step, self.eval_step = step_lib.jit_steps(
            train_step, eval_step, mesh, state_sh, frozen_sh, self.batch_keys, self.eval_keys)
        self.ckpts = Checkpoints(workdir, keep=config.keep_checkpoints)
        self.start = 0
        self.pending: list[tuple[int, dict]] = []  # steps whose metrics are still on device
        self.window: list[float] = []
        self.window_start = time.time()
        self.untimed = 0  # steps of the window before its clock started (the compile)

    # ---- restore and stop ------------------------------------------------------------------

    def restore(self) -> None:
        """From ``restore_step`` if given (the later checkpoints are then deleted: the resumed
        run writes its own), else from the latest; then the log, as of that step."""
        ckpts = self.ckpts
        start = self.config.restore_step or ckpts.latest_step() or 0
        if start:
            fresh = self.state["opt_state"]
            self.state = ckpts.restore(start, self.state)
            if not step_lib._all_finite((self.state["trainable"], self.state["opt_state"])):
                raise CorruptCheckpointError(
                    f"checkpoint {ckpts.directory / str(start)} holds NaN/Inf values (saved by "
                    f"an older surm, which did not check them). It was left untouched; "
                    f"{ckpts.earlier_steps_hint(start)}")
            self.state["opt_state"] = optim.with_lrs_of(self.state["opt_state"], fresh)
            dropped = ckpts.drop_after(start)
            print(f"Resumed from {ckpts.directory} at step {start}" +
                  (f"; deleted the later checkpoints {', '.join(map(str, dropped))}"
                   if dropped else ""), file=sys.stderr, flush=True)
        self.start = start
        self.log = RunLog(self.workdir, enabled=self.main, resume_step=start,
                          total_steps=self.config.total_steps)
        if self.main:  # as metrics.jsonl: nothing past the restored step
            predictions.drop_after(self.workdir, start)

    def stop_if_asked(self, at_step: int) -> None:
        """After SIGINT/SIGTERM (``surm.cli``): the state at ``at_step`` saved, then stop."""
        if not cli.stopped():
            return
        self.flush(at_step)
        if at_step > (self.ckpts.latest_step() or 0):
            self.ckpts.save(at_step, self.state)
        self.ckpts.wait()
        saved = self.ckpts.latest_step()
        cli.raise_if_stopped(
            f"the checkpoint of step {saved} is in {self.ckpts.directory}; run the same command "
            f"to resume" if saved else "before the first step; nothing was trained")

    def close(self) -> None:
        self.ckpts.close()
        if hasattr(self, "log"):
            self.log.close()

    # ---- the loop ------------------------------------------------------------------------

    def loop(self, train_iter, schedules) -> dict:
        config, headline = self.config, f"validation_{self.data_spec.metrics[0]}"
        best, last_validation, step = {}, {}, self.start
        if config.eval_at_start and self.start == 0:  # the untouched model, for reference
            self.log.write({"step": 0, **self.evaluate("validation", 0),
                            **self.evaluate("test", 0)})
        for step in range(self.start + 1, config.total_steps + 1):
            self.stop_if_asked(step - 1)
            local = next(train_iter)
            batch = sharding.global_batch({k: local[k] for k in self.batch_keys}, self.mesh)
            self.state, m = self.train_step(self.state, self.frozen, batch)
            self.pending.append((step, m))
            if step == self.start + 1:  # compiled and run once: the rate counts from here
                jax.block_until_ready(m["loss"])
                self.window_start, self.untimed = time.time(), 1
            last = step == config.total_steps
            evaluate = config.eval_every and (step % config.eval_every == 0 or last)
            save = step % config.ckpt_every == 0 or last
            if step % config.log_every == 0 or last:
                self.flush(step)
                self.write_log(step, schedules)
            if save:  # before the evaluation: a run stopped there keeps its last step
                self.flush(step)
                self.ckpts.save(step, self.state)
                if last:  # the final evaluations can take minutes: the step is on disk first
                    self.ckpts.wait()
            if evaluate:
                result = self.evaluate("validation", step)
                last_validation = {**result, "step": step}
                if not best or metrics.better(result[headline], best[headline],
                                              self.data_spec.metrics[0]):
                    best = {**result, "step": step}
                self.log.write({"step": step, **result})
        if config.eval_every and not last_validation:  # resumed after the last step
            last_validation = {**self.evaluate("validation", step), "step": step}
            best = best or last_validation
            self.log.write(last_validation)
        test = self.evaluate("test", step)
        self.log.write({"step": step, **test})
        self.ckpts.wait()
        return {"step": step, **test, "validation": last_validation, "best_validation": best}

    def flush(self, step: int) -> None:
        """Fetches the metrics of the steps since the last fetch; stops the run at the first
        non-finite one (its state is never saved)."""
        if not self.pending:
            return
        fetched = jax.device_get([m for _, m in self.pending])
        steps = [s for s, _ in self.pending]
        self.pending = []
        for s, m in zip(steps, fetched):
            if not m["finite"]:
                self._non_finite(s, m)
            self.window.append(float(m["loss"]))
        self.last_metrics = fetched[-1]
        self.log.progress(step, float(fetched[-1]["loss"]))

    def _non_finite(self, step: int, m: dict) -> None:
        self.ckpts.wait()
        last = self.ckpts.latest_step()
        what = ("loss or gradient" if not np.isfinite(m["loss"] + m["grad_norm"])
                else "the updated parameters or optimizer state")
        kept = (f"is step {last} in {self.ckpts.directory} and was kept" if last else
                "does not exist")
        msg = (f"{what} became NaN/Inf at step {step} (loss={m['loss']}, "
               f"grad_norm={m['grad_norm']}); stopping. The last good checkpoint {kept}. "
               f"Lower optimizer.lr, raise optimizer.grad_clip, or check the data")
        self.log.write({"step": step, "error": msg})
        raise FloatingPointError(msg)

    def write_log(self, step: int, schedules) -> None:
        elapsed = time.time() - self.window_start
        timed = len(self.window) - self.untimed  # the first step's compile is not a rate
        record = {"step": step, "train_loss": float(np.mean(self.window)),
                  "learning_rate": float(schedules["adapters"](step - 1)),
                  "grad_norm": float(self.last_metrics["grad_norm"])}
        if timed > 0:
            record["examples_per_sec"] = timed * self.config.input.batch_size / elapsed
        self.log.write(record)
        self.window, self.window_start, self.untimed = [], time.time(), 0

    # ---- evaluation ------------------------------------------------------------------------

    def evaluate(self, role: str, at_step: int) -> dict[str, float]:
        """The metrics of one pass over a split; what the model predicted per example goes to
        ``predictions/<role>_<step>.npz`` (`surm.predictions`), and the metrics are computed
        from exactly those arrays."""
        self.flush(at_step)
        outs, index, host = [], [], []
        keep_keys = self.task.host_keys()
        source = self.sources.evaluation[role]
        size = self.config.input.eval_batch_size
        bar = tqdm.tqdm(total=math.ceil(len(source) / size), desc=role, leave=False,
                        file=sys.stderr, dynamic_ncols=True, mininterval=2.0,
                        disable=not self.main)
        for local in data.make_eval_batches(source, self.sources.eval_prep,
                                            global_batch_size=size):
            bar.update()
            self.stop_if_asked(at_step)
            batch = sharding.global_batch(
                {k: local[k] for k in {*self.eval_keys, *keep_keys, "mask", "index"}},
                self.mesh)
            out = self.eval_step(self.state["trainable"], self.frozen,
                                 {k: batch[k] for k in self.eval_keys})
            keep = np.asarray(_fetch(batch["mask"]), bool)
            outs.append(np.asarray(out)[keep])
            index.append(np.asarray(_fetch(batch["index"]))[keep])
            host.append({k: np.asarray(_fetch(batch[k]))[keep] for k in keep_keys})
        bar.close()
        pred = self.task.predictions(self.data_spec, np.concatenate(index),
                                     np.concatenate(outs), host)
        if self.main:
            predictions.write(predictions.path(self.workdir, role, at_step), pred)
        return {f"{role}_{k}": v for k, v in predictions.metrics(pred).items()}


def _fetch(x: jax.Array) -> np.ndarray:
    """The global value of a batch array on every process (gathered across processes)."""
    if x.is_fully_addressable:
        return np.asarray(x)
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
