"""Resolving a grid into runs, and running them one after another, resumably.

Each run is exactly ``python -m surm.train --config FILE:ARGS --workdir DIR --config.K=V ...``
in ROOT/<dataset>/<family>[_<hparam>-<value>...][_<mode>]_lr<lr>[_hlr<head_lr>]_seed<seed>
with its log (train.log) and the sweep's record of it (run.json). A run whose summary.json
exists is skipped, and an interrupted one resumes from its last checkpoint, so resuming a sweep
is running the same command again. A failed run leaves its error tail in error.txt and the sweep
goes on. A run whose workdir another process holds now (another sweep, or a run still
stopping) is skipped, not recorded: the next attempt runs it.

Stopping a sweep never kills a run mid-step: SIGINT or SIGTERM to the sweep is passed on to the
run, which stops at its next step boundary with a checkpoint, and the sweep stops after it
(``KeyboardInterrupt``). A sweep killed outright (kill -9) takes its run down the same way: the
run gets SIGTERM when its sweep ends (``surm.cli.stop_with_parent``).
"""
from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import math
import os
import pathlib
import shlex
import signal
import subprocess
import sys
import threading
import time
from typing import Callable, Mapping, Sequence

from surm import cli, peft
from surm import workdir as workdir_files
from surm.sweep import selection
from surm.sweep.grid import (TUNED, Grid, Method, SweepError, describe, format_hparams,
                             grid_methods, last_line, load_config, structure_of,
                             train_config_flags)
from surm.sweep.records import check_workdir, run_key, write_record

ERROR_TAIL_LINES = 30


@dataclasses.dataclass(frozen=True)
class Run:
    settings: tuple[str, ...]  # the --config flags of ``python -m surm.train``
    workdir: pathlib.Path
    meta: dict  # dataset, method, structure, hparams, lr, head_lr, seed, metric

    @property
    def argv(self) -> tuple[str, ...]:
        return (f"--workdir={self.workdir}", *self.settings)

    @property
    def finished(self) -> bool:
        return (self.workdir / workdir_files.SUMMARY).exists()

    @property
    def label(self) -> str:
        m = self.meta
        tuned = f"lr={m['lr']:g}" + (f",head_lr={m['head_lr']:g}" if m["head_lr"] != m["lr"]
                                     else "")
        return " ".join(filter(None, [m["dataset"], m["method"], structure_of(m["structure"]),
                                      m["hparams"], tuned, f"seed={m['seed']}"]))

    def command(self, python: str = "python") -> str:
        return shlex.join([python, "-m", "surm.train", *self.argv])


def _config_args(grid: Grid, method: Method, dataset: str | None, seed: int | None) -> str:
    args = dict(grid.base)
    args.update(method.config_args())
    if dataset is not None:
        args[grid.dataset_arg] = dataset
    if seed is not None:
        args["seed"] = str(seed)
    return ",".join(f"{k}={v}" for k, v in args.items())


def workdir_for(root: pathlib.Path, meta: Mapping) -> pathlib.Path:
    """ROOT/<dataset>/<family>[_<hparam>-<value>...][_<mode>]_lr<lr>[_hlr<head lr>]_seed<seed>,
    named in the configs' words (the --families item and mode), as sweeps have always named
    them, so that a root swept before resumes."""
    family, mode = peft.spec.to_family(meta["method"], structure_of(meta["structure"]))
    hp = "".join(f"_{item.replace('=', '-')}" for item in meta["hparams"].split(",") if item)
    mode = f"_{mode}" if mode else ""
    tuned = f"_lr{meta['lr']:g}" + (f"_hlr{meta['head_lr']:g}"
                                    if meta["head_lr"] != meta["lr"] else "")
    return root / dataset_folder(meta["dataset"]) / f"{family}{hp}{mode}{tuned}" \
        f"_seed{meta['seed']}"


def dataset_folder(dataset: str) -> str:
    """A folder name for a dataset: tfds names as they are ('glue/sst2' -> 'glue-sst2'); a
    local spec ('csv:/data/a.csv?label=y') by its file stem and a hash of the whole spec."""
    if ":" not in dataset:
        return dataset.replace("/", "-")
    prefix, _, rest = dataset.partition(":")
    stem = pathlib.Path(rest.split("?")[0]).stem or "data"
    safe = "".join(c if c.isalnum() or c in "_.-" else "_" for c in stem)
    digest = hashlib.sha1(dataset.encode()).hexdigest()[:8]
    return f"{prefix}-{safe}-{digest}"


def resolve(grid: Grid, root: pathlib.Path, method: Method, dataset: str | None,
            seed: int | None) -> Run:
    """One run, its config resolved through the config file (so a typo fails here)."""
    args = _config_args(grid, method, dataset, seed)
    try:
        meta = describe(load_config(grid.config, args, grid.sets))
    except (ValueError, FileNotFoundError) as e:
        why = last_line(str(e)).rstrip(".")
        if f"unknown config argument {grid.dataset_arg!r}" in why:
            why += " (--dataset_arg names the config argument that --datasets sets)"
        raise SweepError(f"the run {grid.config}:{args} is invalid: {why}; fix the grid "
                         f"(--families, --base, --set) before sweeping") from None
    return Run(tuple(train_config_flags(grid.config, args, grid.sets)),
               workdir_for(root, meta), meta)


def _unique(runs: Sequence[Run]) -> list[Run]:
    out: dict[pathlib.Path, Run] = {}
    for run in runs:
        out.setdefault(run.workdir, run)
    if len(out) < len(runs):
        print(f"{len(runs) - len(out)} grid points resolve to the same run as an earlier one "
              f"and are dropped", file=sys.stderr)
    return list(out.values())


def plan(grid: Grid, root: str | os.PathLike,
         methods: Sequence[Method] | None = None) -> list[Run]:
    """Every distinct run of the grid (or of ``methods`` x datasets x seeds), in grid order:
    with ``grid.tune_seed``, only that seed's runs (the others follow its choice:
    ``plan_followups``)."""
    seeds = [grid.tune_seed] if grid.tune_seed is not None else (grid.seeds or [None])
    return _unique([resolve(grid, pathlib.Path(root), m, d, s) for m, d, s in
                    itertools.product(methods or grid_methods(grid), grid.datasets or [None],
                                      seeds)])


@dataclasses.dataclass(frozen=True)
class Tuning:
    """Where the tuning of one method (on one dataset and seed) stands."""

    method: Method  # the method with its grid's listed tuned values left out
    dataset: str | None
    seed: int | None
    choice: selection.Choice | None  # None while runs are missing or unfinished
    extra: tuple[Method, ...] = ()  # the runs that widen the grid, when the choice is at an edge


def _one_step_out(values: Sequence[float], listed: Sequence[float], side: str,
                  limit: int) -> float | None:
    """The next value beyond the smallest (``side='min'``) or largest tried, on the listed
    values' geometric lattice (one step further out), rounded to a 1-2-3-5 value; None when
    ``limit`` values beyond the listed ones were tried already on that side."""
    if len(listed) < 2:
        return None
    beyond = [v for v in values if (v < min(listed) if side == "min" else v > max(listed))]
    if len(beyond) >= limit:
        return None
    ratio = (max(listed) / min(listed)) ** (1 / (len(listed) - 1))
    steps = len(beyond) + 1  # on the listed values' lattice
    value = min(listed) / ratio ** steps if side == "min" else max(listed) * ratio ** steps
    return _round_nicely(value)


def _round_nicely(value: float) -> float:
    """The nearest (on a log scale) of 1, 2, 3 or 5 times a power of ten: 9.5e-6 -> 1e-5."""
    exponent = math.floor(math.log10(value))
    nice = [m * 10.0 ** e for e in (exponent, exponent + 1) for m in (1, 2, 3, 5)]
    return float(f"{min(nice, key=lambda v: abs(math.log(v / value))):.0e}")


def tuning_states(grid: Grid, root: str | os.PathLike, rows: Sequence[dict],
                  methods: Sequence[Method] | None = None, widen: int = 0) -> list[Tuning]:
    """The tuning of every method of the grid on every dataset and tuning seed (``tune_seed``,
    else every seed), from ``rows`` (the results so far). A choice is made once every planned
    run and every run that widened the grid has finished; with ``widen`` > 0, a choice at the
    smallest or largest value tried of an axis asks for one more run a grid step further out
    (at most ``widen`` values beyond the listed ones on each side), and is not final until
    that run has finished."""
    root = pathlib.Path(root)
    by_key = {run_key(r): r for r in rows}
    seeds = [grid.tune_seed] if grid.tune_seed is not None else (grid.seeds or [None])
    groups: dict[tuple, list[tuple[Method, Run]]] = {}
    for method in methods or grid_methods(grid):
        for dataset, seed in itertools.product(grid.datasets or [None], seeds):
            key = (method.method, method.structure, format_hparams(method.hparams), dataset,
                   seed)
            groups.setdefault(key, []).append((method, resolve(grid, root, method, dataset,
                                                                seed)))
    out = []
    for (*_, dataset, seed), members in groups.items():
        method = dataclasses.replace(members[0][0], tuned={})
        meta = members[0][1].meta
        same = lambda r: all(str(r[k]) == str(meta[k]) for k in  # noqa: E731
                             ("dataset", "method", "structure", "hparams", "seed"))
        found = [by_key.get(run_key(r.meta)) for _, r in members]
        tried = list({run_key(r): r for r in [*filter(None, found), *filter(same, rows)]}
                     .values())
        listed = {axis: sorted({float(m.tuned[axis]) for m, _ in members if axis in m.tuned})
                  for axis in TUNED}
        # a widening run that was stopped before it finished is planned again (it resumes)
        planned = {run_key(r.meta) for _, r in members}
        stopped = [r for r in tried if r["status"] not in selection.FINISHED
                   and run_key(r) not in planned]
        if stopped:
            again = tuple(dataclasses.replace(method, tuned={k: float(r[k]) for k in TUNED
                                                             if listed[k]}) for r in stopped)
            out.append(Tuning(method, dataset, seed, None, again))
            continue
        choice = None if None in found else selection.choose(tried)
        if choice is None:
            out.append(Tuning(method, dataset, seed, None))
            continue
        extra = []
        for edge in choice.edges if widen else ():
            axis, _, side = edge.split()
            value = _one_step_out(sorted({float(r[axis]) for r in tried}), listed[axis], side,
                                  widen)
            if value is None:
                continue
            tuned = {k: float(choice.row[k]) for k in TUNED if listed[k]}
            tuned[axis] = value
            if axis == "lr" and all(float(r["lr"]) == float(r["head_lr"]) for r in tried):
                tuned["head_lr"] = value  # the head tied to the lr
            extra.append(dataclasses.replace(method, tuned=tuned))
        out.append(Tuning(method, dataset, seed, None if extra else choice, tuple(extra)))
    return out


def plan_widening(grid: Grid, root: str | os.PathLike, rows: Sequence[dict],
                  methods: Sequence[Method] | None = None, widen: int = 1) -> list[Run]:
    """The runs that widen the grid where a choice sits at its edge (``tuning_states``)."""
    root = pathlib.Path(root)
    return _unique([resolve(grid, root, m, t.dataset, t.seed)
                    for t in tuning_states(grid, root, rows, methods, widen) for m in t.extra])


def plan_followups(grid: Grid, root: str | os.PathLike, rows: Sequence[dict],
                   methods: Sequence[Method] | None = None,
                   widen: int = 0) -> tuple[list[Run], int]:
    """With ``grid.tune_seed``: the other seeds' runs at the values chosen on the tuning seed,
    for the methods whose tuning has finished (``rows``: the results so far); and how many
    methods still wait for their tuning runs (or for runs that widen their grid)."""
    if grid.tune_seed is None:
        return [], 0
    root = pathlib.Path(root)
    runs, waiting = [], 0
    for t in tuning_states(grid, root, rows, methods, widen):
        if t.choice is None:
            waiting += 1
            continue
        chosen = dataclasses.replace(t.method, tuned={
            k: float(t.choice.row[k]) for k in TUNED
            if k in grid_item_axes(grid, t.method)})
        runs += [resolve(grid, root, chosen, t.dataset, seed) for seed in grid.seeds
                 if seed != grid.tune_seed]
    return _unique(runs), waiting


def grid_item_axes(grid: Grid, method: Method) -> set[str]:
    """The tuned axes the grid lists for a method (the others take the config's value)."""
    return {axis for fam in grid.families if fam.name == method.item
            for axis in fam.tuned_values}


def check_records(runs: Sequence[Run]) -> None:
    """Refuse to reuse a workdir whose run.json records different settings."""
    for run in runs:
        check_workdir(run.workdir, run.settings)


def recorded_runs(runs: Sequence[Run], records: Mapping[tuple, dict]) -> dict[pathlib.Path, dict]:
    """{workdir: record} of the runs without a finished workdir that ``records`` holds as done
    or failed (a failed run is not tried again: drop its row to redo it); a record of the same
    run with other settings is an error."""
    out = {}
    for run in runs:
        record = records.get(run_key(run.meta))
        if record is None or run.finished:
            continue
        if record.get("settings") and json.loads(record["settings"]) != list(run.settings):
            raise SweepError(f"the records hold {run.label} with different settings "
                             f"({record['settings']}); sweep into a new --root without "
                             f"--records, or drop that row to redo it")
        out[run.workdir] = record
    return out


def record_planned(runs: Sequence[Run],
                   recorded: Mapping[pathlib.Path, dict] | None = None) -> None:
    """Write the run.json of every run not started yet, so that results made before they all
    finish see them as pending (and never choose an lr among the finished ones alone)."""
    for run in runs:
        if run.workdir not in (recorded or {}) and not (run.workdir / workdir_files.SWEEP_RECORD).exists():
            write_record(run.workdir, run.meta, run.settings)


def _tail(log: pathlib.Path, lines: int = ERROR_TAIL_LINES) -> str:
    """The last lines of a log, progress-bar carriage returns split into lines."""
    text = log.read_text(errors="replace") if log.exists() else ""
    kept = [line.rstrip() for line in text.replace("\r", "\n").splitlines() if line.strip()]
    return "\n".join(kept[-lines:])


_stop = [0]  # the signal that asked the sweep to stop, 0 while none did


def interrupted() -> int:
    """Says how to resume a sweep stopped by a signal, and returns its exit status: 128 + the
    signal (SIGINT when none was seen here: a KeyboardInterrupt raised between runs)."""
    print("interrupted; run the same command again to resume", file=sys.stderr)
    return 128 + (_stop[0] or signal.SIGINT)


def _train(argv: Sequence[str], log: pathlib.Path, env: Mapping[str, str]) -> int:
    """The exit status of one ``surm.train`` subprocess writing to ``log``. SIGINT or SIGTERM
    to the sweep meanwhile is passed on to it and waited for: the run stops at its next step
    boundary with a checkpoint (it is never killed), and ``_stop`` remembers the signal."""
    child = None

    def forward(signum, frame):
        del frame
        _stop[0] = signum
        if child is not None and child.poll() is None:
            child.send_signal(signum)

    held = threading.current_thread() is threading.main_thread()
    old = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)} if held else {}
    try:
        with log.open("w") as out:
            child = subprocess.Popen([sys.executable, "-m", "surm.train", *argv], stdout=out,
                                     stderr=subprocess.STDOUT,
                                     env={**env, cli.PARENT: str(os.getpid())})
            if _stop[0]:  # asked while it started
                child.send_signal(_stop[0])
            return child.wait()
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)


def execute(run: Run, compile_cache: pathlib.Path | None) -> str:
    """Run one training subprocess: 'done', 'failed' (error.txt says why) or 'busy' (another
    process holds the workdir: nothing was run or recorded). Raises KeyboardInterrupt when
    the run stopped on a signal (it resumes from its checkpoint)."""
    try:
        workdir_files.check_free(run.workdir)
    except workdir_files.WorkdirBusyError:
        return "busy"
    write_record(run.workdir, run.meta, run.settings)
    error = run.workdir / workdir_files.SWEEP_ERROR
    error.unlink(missing_ok=True)
    env = dict(os.environ)
    if compile_cache is not None:  # runs differing only in seed or lr reuse compiled programs
        env.setdefault("JAX_COMPILATION_CACHE_DIR", str(compile_cache))
        env.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    rc = _train(run.argv, run.workdir / workdir_files.SWEEP_LOG, env)
    if rc == 0 and run.finished:
        return "done"
    if rc in (128 + signal.SIGINT, 128 + signal.SIGTERM):  # stopped, not failed: it resumes
        raise KeyboardInterrupt
    if rc == cli.BUSY:  # taken by another process between the check and the start
        return "busy"
    error.write_text(f"exit status {rc}\n{_tail(run.workdir / workdir_files.SWEEP_LOG)}\n")
    return "failed"


def run_all(runs: Sequence[Run], compile_cache: pathlib.Path | None = None,
            recorded: Mapping[pathlib.Path, dict] | None = None,
            on_finish: Callable[[Run], None] | None = None) -> list[Run]:
    """Run the unfinished runs one after another (not those in ``recorded``, see
    ``recorded_runs``), calling ``on_finish(run)`` after each that ran (e.g. to write a
    record as it grows); returns the failed ones."""
    failed = []
    _stop[0] = 0
    for i, run in enumerate(runs, 1):
        prefix = f"[{i}/{len(runs)}] {run.label}:"
        if run.finished:
            print(f"{prefix} finished before, skipped", flush=True)
            continue
        if run.workdir in (recorded or {}):
            print(f"{prefix} recorded as {recorded[run.workdir]['status']}, skipped", flush=True)
            continue
        start = time.time()
        outcome = execute(run, compile_cache)
        if outcome == "busy":
            print(f"{prefix} in use by another process, skipped (not recorded; the next "
                  f"attempt runs it)", flush=True)
            continue
        if outcome == "done":
            summary = json.loads((run.workdir / workdir_files.SUMMARY).read_text())
            metric = run.meta["metric"]
            val = summary.get("validation", {}).get(f"validation_{metric}")
            print(f"{prefix} done in {time.time() - start:.0f}s, test_{metric}="
                  f"{summary[f'test_{metric}']:.4f}"
                  + (f", validation_{metric}={val:.4f}" if val is not None else ""), flush=True)
        else:
            failed.append(run)
            tail = (run.workdir / workdir_files.SWEEP_ERROR).read_text().strip().splitlines()[-1]
            print(f"{prefix} FAILED ({run.workdir / 'error.txt'}): {tail}", flush=True)
        if on_finish is not None:
            on_finish(run)
        if _stop[0]:  # the run finished as the sweep was asked to stop: stop now
            raise KeyboardInterrupt
    return failed


