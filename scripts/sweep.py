"""Sweep surm.train over families x hyper-parameters x modes x seeds x datasets, then tabulate.

    python scripts/sweep.py --config configs/default.py --base dataset=bbc_news,checkpoint=random \\
        --families 'circulant,lowrank:rank=1;4;8,ldr:rank=1;2,houlsby:rank=8,bitfit' \\
        --modes lora,adapter --seeds 0,1,2 --datasets tweet_sentiment,bbc_news \\
        --set total_steps=20 --set input.batch_size=8 --root sweeps/smoke

Grid syntax
    --config FILE            the config file every run starts from (configs/<name>.py)
    --base K=V,K=V           config arguments of every run (the ``FILE:K=V`` part)
    --families SPEC          comma-separated FAMILY[:HPARAM=V1;V2...][:HPARAM2=...]; repeatable.
                             FAMILY is a structured family or a baseline (houlsby, bitfit,
                             linear_probe, full). Each family runs every combination of its
                             listed values, e.g. 'kronecker:rank=1;2:factors=16x48'. Quote the
                             spec: ';' ends a shell command. A pair value is written AxB.
    --modes lora,adapter     PEFT modes of the structured families. Baselines ignore the mode
                             (houlsby always runs as an adapter); identical runs are run once.
    --seeds 0,1,2            config argument ``seed``
    --datasets A,B           config argument ``dataset`` (``--dataset_arg task`` for
                             configs/bert_glue.py, whose argument is ``task``)
    --set K=V                ``--config.K=V`` of every run (any config entry); repeatable
    --grid FILE.json         the same keys in a file: {"config": ..., "base": {"checkpoint":
                             "random"}, "families": ["circulant", "lowrank:rank=1;4"],
                             "modes": ["lora"], "seeds": [0, 1], "datasets": [...],
                             "set": {"total_steps": 20}, "root": ...}. Flags given on the
                             command line replace the file's values (base and set are merged).
An axis left out takes the config's own default. Hyper-parameters are passed as config
arguments (``rank``, ``block_size``, ``form`` in the shipped configs), so every run is exactly
``python -m surm.train --config FILE:ARGS --workdir DIR --config.K=V ...``. The whole grid is
resolved through the config file before anything runs, so a typo fails at once.

Runs, resuming and results
    Runs go one after another, each in ROOT/<dataset>/<family>[_<hparam>-<value>...][_<mode>]
    _seed<seed> with its log (train.log) and the sweep's record of it (run.json). A run whose
    summary.json exists is skipped, and an interrupted one resumes from its last checkpoint, so
    resuming a sweep is running the same command again. A failed run leaves its error tail in
    error.txt and the sweep goes on (the exit status is 1 if any failed). Changing --base or
    --set under the same ROOT is refused for existing runs (use a new --root). The runs share a
    JAX compilation cache (ROOT/jax_cache, see --compile_cache), so seeds after the first
    start in seconds.
    Afterwards ROOT/results.csv (one row per run), ROOT/results.md (mean +- std over seeds) and
    ROOT/pareto.png (test metric vs trainable parameters, one panel per dataset) are written;
    ``--collect_only --root ROOT`` rebuilds them from the workdirs.
    ``--records FILE.csv`` (repeatable) names results.csv files of earlier runs of this root,
    e.g. ones kept in git when the workdirs are gone (a fresh clone, another machine): a planned
    run recorded there as done is not run again, and the recorded rows join the results (a
    finished workdir wins over its record). A run is matched by dataset, family, mode, hparams
    and seed, and by its settings where the record has them (a record with other settings is an
    error, as for a workdir).
    ``--print_commands`` (or ``--write_commands FILE``) prints the unfinished runs' commands,
    one per line, for a cluster or TPU-pod launcher, instead of running them; their run.json
    records are written, so ``--collect_only`` tabulates the runs once the launcher is done.

Budget matching
    ``--budget N`` picks, for each family (and mode), the hyper-parameters whose parameter count
    beyond the classification head (the adapters; biases for bitfit) on the config's model is
        closest to N without going over (the smallest setting when nothing fits, marked OVER),
    prints the table and sweeps those settings; ``--match_only`` stops after the table. Counted
    exactly by surm.peft on the model's parameter shapes (jax.eval_shape: a random model is
    never initialised, a checkpoint is read once).
    Searched: rank (lowrank, ldr, kronecker, houlsby), block_size (block_circulant), form
    (circulant, skew_circulant, symmetric_toeplitz); listed values restrict the search, e.g.
    'lowrank:rank=1;2;4'. From Python: ``match_budget(load_config(FILE, BASE), N, ["lowrank"])``.

    python scripts/sweep.py --config configs/default.py --families lowrank,ldr,circulant,toeplitz \\
        --modes lora --budget 20000 --match_only
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import hashlib
import itertools
import json
import math
import os
import pathlib
import shlex
import statistics
import subprocess
import sys
import time
from typing import Any, Callable, Iterable, Mapping, Sequence

REPO = pathlib.Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `python scripts/sweep.py` from anywhere finds surm
    sys.path.insert(0, str(REPO))

import jax  # noqa: E402
from absl import flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from surm import data, peft, structured  # noqa: E402
from surm.models import factory  # noqa: E402

NO_ADAPTER_BASELINES = ("bitfit", "linear_probe", "full")
RANKED = ("lowrank", "ldr", "kronecker", "houlsby")
FORMS = {"circulant": ("plain", "hadamard"), "skew_circulant": ("plain", "hadamard"),
         "symmetric_toeplitz": ("plain", "product")}
ERROR_TAIL_LINES = 30


class SweepError(ValueError):
    """A grid, budget or root that cannot work; the message says how to fix it."""


# ---- grid syntax --------------------------------------------------------------------------------

def parse_value(text: str) -> Any:
    """'4' -> 4, '0.5' -> 0.5, '16x48' -> (16, 48), anything else stays a string."""
    text = text.strip()
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    parts = text.split("x")
    if len(parts) == 2 and all(p.isdigit() for p in parts):
        return tuple(int(p) for p in parts)
    return text


def format_value(value: Any) -> str:
    return "x".join(map(str, value)) if isinstance(value, tuple) else str(value)


def format_hparams(hparams: Mapping[str, Any]) -> str:
    return ",".join(f"{k}={format_value(v)}" for k, v in sorted(hparams.items()))


@dataclasses.dataclass(frozen=True)
class FamilyGrid:
    """One --families item: a family and the values listed for some of its hyper-parameters."""

    name: str
    values: tuple[tuple[str, tuple[Any, ...]], ...] = ()

    def combos(self) -> list[dict[str, Any]]:
        keys = [k for k, _ in self.values]
        return [dict(zip(keys, combo)) for combo in itertools.product(*(v for _, v in self.values))]


def parse_family(item: str) -> FamilyGrid:
    name, *assignments = item.strip().split(":")
    if name not in structured.FAMILIES + peft.BASELINES:
        raise SweepError(f"unknown family {name!r} in --families item {item!r}; choose from "
                         f"{', '.join(structured.FAMILIES + peft.BASELINES)}")
    values = {}
    for assignment in assignments:
        key, sep, text = assignment.partition("=")
        if not sep or not key or not text:
            raise SweepError(f"--families item {item!r}: {assignment!r} is not HPARAM=V1;V2..., "
                             f"e.g. lowrank:rank=1;4;8")
        values[key.strip()] = tuple(parse_value(v) for v in text.split(";") if v.strip())
        if not values[key.strip()]:
            raise SweepError(f"--families item {item!r}: no values listed for {key.strip()!r}")
    return FamilyGrid(name, tuple(values.items()))


def parse_families(specs: Iterable[str]) -> list[FamilyGrid]:
    return [parse_family(item) for spec in specs for item in spec.split(",") if item.strip()]


def parse_assignments(text: str, what: str) -> dict[str, str]:
    """'k=v,k=v' -> {k: v} (values kept as text)."""
    out = {}
    for item in text.split(","):
        if not item.strip():
            continue
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise SweepError(f"{what} item {item!r} is not of the form key=value")
        out[key.strip()] = value.strip()
    return out


@dataclasses.dataclass(frozen=True)
class Grid:
    config: str
    base: tuple[tuple[str, str], ...] = ()
    families: tuple[FamilyGrid, ...] = ()
    modes: tuple[str, ...] | None = None
    seeds: tuple[int, ...] | None = None
    datasets: tuple[str, ...] | None = None
    dataset_arg: str = "dataset"
    sets: tuple[tuple[str, str], ...] = ()

    def __post_init__(self):
        for mode in self.modes or ():
            if mode not in peft.MODES:
                raise SweepError(f"--modes: unknown mode {mode!r}; choose from {peft.MODES}")
        if not self.families:
            raise SweepError("no families to sweep: give --families, e.g. "
                             "--families circulant,lowrank:rank=4")


def modes_for(family: str, modes: Sequence[str] | None) -> list[str | None]:
    """The modes a family runs in (None: the config's default)."""
    if family in NO_ADAPTER_BASELINES:
        return [None]
    if family == "houlsby":
        return ["adapter"]
    return list(modes) if modes else [None]


Method = tuple[str, "str | None", dict]  # (family, mode or None, hyper-parameters)


def grid_methods(grid: Grid) -> list[Method]:
    return [(fam.name, mode, hp) for fam in grid.families
            for mode in modes_for(fam.name, grid.modes) for hp in fam.combos()]


# ---- resolving runs -----------------------------------------------------------------------------

def load_config(config_file: str, args: str | Mapping[str, Any] = "",
                sets: Iterable[tuple[str, str]] = ()):
    """The ConfigDict ``surm.train`` gets for --config FILE:ARGS --config.K=V...

    Same absl/ml_collections parsing as the trainer, so anything the trainer rejects fails here."""
    if not isinstance(args, str):
        args = ",".join(f"{k}={format_value(v)}" for k, v in args.items())
    argv = ["sweep", *_train_config_flags(config_file, args, sets)]
    values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, flag_values=values, lock_config=True,
                                    sys_argv=argv)
    try:
        values(argv)
        return values.config
    except (AttributeError, KeyError) as e:  # an override of an entry the config lacks
        while e.args and isinstance(e.args[0], BaseException):  # ml_collections nests them
            e = e.args[0]
        raise SweepError(f"the config has no entry {' '.join(str(e.args[0]).split())}") from None
    except (flags.Error, OSError, ValueError, TypeError) as e:
        raise SweepError(_last_line(str(e))) from None


def _train_config_flags(config_file: str, args: str, sets: Iterable[tuple[str, str]]) -> list[str]:
    return ([f"--config={config_file}:{args}" if args else f"--config={config_file}"]
            + [f"--config.{k}={v}" for k, v in sets])


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else text


@dataclasses.dataclass(frozen=True)
class Run:
    settings: tuple[str, ...]  # the --config flags of ``python -m surm.train``
    workdir: pathlib.Path
    meta: dict  # dataset, family, mode, hparams, seed, metric

    @property
    def argv(self) -> tuple[str, ...]:
        return (f"--workdir={self.workdir}", *self.settings)

    @property
    def finished(self) -> bool:
        return (self.workdir / "summary.json").exists()

    @property
    def label(self) -> str:
        m = self.meta
        return " ".join(filter(None, [m["dataset"], m["family"], m["hparams"],
                                      m["mode"] if m["mode"] != "-" else "", f"seed={m['seed']}"]))

    def command(self, python: str = "python") -> str:
        return shlex.join([python, "-m", "surm.train", *self.argv])


def _config_args(grid: Grid, method: Method, dataset: str | None, seed: int | None) -> str:
    family, mode, hp = method
    args = dict(grid.base)
    args["family"] = family
    args.update({k: format_value(v) for k, v in hp.items()})
    if mode is not None:
        args["mode"] = mode
    if dataset is not None:
        args[grid.dataset_arg] = dataset
    if seed is not None:
        args["seed"] = str(seed)
    return ",".join(f"{k}={v}" for k, v in args.items())


def _describe(config) -> dict:
    """What names a run: dataset, family, mode, hparams, seed, and its headline metric."""
    spec = peft.config_to_spec(config.peft)
    dataset = config.input.dataset
    return {"dataset": dataset, "family": spec.family,
            "mode": spec.mode if spec.has_adapters else "-",
            "hparams": format_hparams(dict(spec.hparams)), "seed": config.seed,
            "metric": data.get_spec(dataset).metrics[0]}


def _workdir(root: pathlib.Path, meta: dict) -> pathlib.Path:
    hp = "".join(f"_{item.replace('=', '-')}" for item in meta["hparams"].split(",") if item)
    mode = f"_{meta['mode']}" if meta["mode"] != "-" else ""
    name = f"{meta['family']}{hp}{mode}_seed{meta['seed']}"
    return root / _dataset_folder(meta["dataset"]) / name


def _dataset_folder(dataset: str) -> str:
    """A folder name for a dataset: tfds names as they are ('glue/sst2' -> 'glue-sst2'); a
    local spec ('csv:/data/a.csv?label=y') by its file stem and a hash of the whole spec."""
    if ":" not in dataset:
        return dataset.replace("/", "-")
    prefix, _, rest = dataset.partition(":")
    stem = pathlib.Path(rest.split("?")[0]).stem or "data"
    safe = "".join(c if c.isalnum() or c in "_.-" else "_" for c in stem)
    digest = hashlib.sha1(dataset.encode()).hexdigest()[:8]
    return f"{prefix}-{safe}-{digest}"


def plan(grid: Grid, root: str | os.PathLike, methods: Sequence[Method] | None = None) -> list[Run]:
    """Every distinct run of the grid (or of ``methods`` x datasets x seeds), in grid order."""
    root = pathlib.Path(root)
    runs: dict[pathlib.Path, Run] = {}
    duplicates = 0
    for method, dataset, seed in itertools.product(methods or grid_methods(grid),
                                                   grid.datasets or [None], grid.seeds or [None]):
        args = _config_args(grid, method, dataset, seed)
        try:
            meta = _describe(load_config(grid.config, args, grid.sets))
        except (ValueError, FileNotFoundError) as e:
            why = _last_line(str(e)).rstrip(".")
            if f"unknown config argument {grid.dataset_arg!r}" in why:
                why += " (--dataset_arg names the config argument that --datasets sets)"
            raise SweepError(f"the run {grid.config}:{args} is invalid: {why}; fix the grid "
                             f"(--families, --base, --set) before sweeping") from None
        workdir = _workdir(root, meta)
        if workdir in runs:
            duplicates += 1
        runs.setdefault(workdir, Run(tuple(_train_config_flags(grid.config, args, grid.sets)),
                                     workdir, meta))
    if duplicates:
        print(f"{duplicates} grid points resolve to the same run as an earlier one and are "
              f"dropped", file=sys.stderr)
    return list(runs.values())


def run_key(row: Mapping[str, Any]) -> tuple[str, ...]:
    """What identifies a run in a results row or a run's meta: dataset, family, mode, hparams,
    seed (as text, the way a CSV holds them)."""
    return tuple(str(row[k]) for k in ("dataset", "family", "mode", "hparams", "seed"))


def check_records(runs: Iterable[Run]) -> None:
    """Refuse to reuse a workdir whose run.json records different settings."""
    for run in runs:
        record = run.workdir / "run.json"
        if record.exists():
            old = json.loads(record.read_text())["settings"]
            if tuple(old) != run.settings:
                raise SweepError(f"{run.workdir} holds a run with different settings (recorded "
                                 f"{sorted(set(old) - set(run.settings))}, now "
                                 f"{sorted(set(run.settings) - set(old))}); sweep into a new "
                                 f"--root, or delete that workdir to redo it")


def read_records(paths: Iterable[str | os.PathLike]) -> dict[tuple[str, ...], dict]:
    """The finished runs of earlier results.csv files, by ``run_key`` (later files win)."""
    out = {}
    for path in paths:
        path = pathlib.Path(path)
        try:
            with path.open(newline="") as f:
                rows = list(csv.DictReader(f))
        except OSError as e:
            raise SweepError(f"--records {path}: {e.strerror or e}") from None
        missing = [k for k in CSV_HEAD[:8] if rows and k not in rows[0]]
        if missing:
            raise SweepError(f"--records {path} is not a sweep results.csv (no columns "
                             f"{missing}); give a ROOT/results.csv written by this script")
        out.update({run_key(row): _typed(row) for row in rows if row["status"] == "done"})
    return out


_TEXT_COLUMNS = {"dataset", "family", "mode", "hparams", "status", "metric", "workdir", "error",
                 "settings"}


def _typed(row: Mapping[str, str]) -> dict:
    """A CSV row with its numbers as numbers again ('' stays '': a value that was not there)."""
    out = {}
    for key, text in row.items():
        value: Any = text
        if key not in _TEXT_COLUMNS and text != "":
            for cast in (int, float):
                try:
                    value = cast(text)
                    break
                except ValueError:
                    pass
        out[key] = value
    return out


def recorded_runs(runs: Iterable[Run], records: Mapping[tuple, dict]) -> dict[pathlib.Path, dict]:
    """{workdir: record} of the runs without a finished workdir that ``records`` holds as done;
    a record of the same run with other settings is an error."""
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


def write_record(run: Run) -> None:
    run.workdir.mkdir(parents=True, exist_ok=True)
    (run.workdir / "run.json").write_text(
        json.dumps({**run.meta, "settings": list(run.settings)}, indent=2))


# ---- running ------------------------------------------------------------------------------------

def _tail(log: pathlib.Path, lines: int = ERROR_TAIL_LINES) -> str:
    """The last lines of a log, progress-bar carriage returns split into lines."""
    text = log.read_text(errors="replace") if log.exists() else ""
    kept = [line.rstrip() for line in text.replace("\r", "\n").splitlines() if line.strip()]
    return "\n".join(kept[-lines:])


def execute(run: Run, compile_cache: pathlib.Path | None) -> bool:
    """Run one training subprocess; True if it finished. A failure leaves error.txt."""
    write_record(run)
    error = run.workdir / "error.txt"
    error.unlink(missing_ok=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    if compile_cache is not None:  # runs differing only in seed reuse every compiled program
        env.setdefault("JAX_COMPILATION_CACHE_DIR", str(compile_cache))
        env.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    log = run.workdir / "train.log"
    with log.open("w") as out:
        rc = subprocess.run([sys.executable, "-m", "surm.train", *run.argv], stdout=out,
                            stderr=subprocess.STDOUT, env=env).returncode
    if rc == 0 and run.finished:
        return True
    error.write_text(f"exit status {rc}\n{_tail(log)}\n")
    return False


def run_all(runs: Sequence[Run], compile_cache: pathlib.Path | None = None,
            recorded: Mapping[pathlib.Path, dict] | None = None) -> list[Run]:
    """Run the unfinished runs one after another (not those in ``recorded``, see
    ``recorded_runs``); returns the failed ones."""
    failed = []
    for i, run in enumerate(runs, 1):
        prefix = f"[{i}/{len(runs)}] {run.label}:"
        if run.finished:
            print(f"{prefix} finished before, skipped", flush=True)
            continue
        if run.workdir in (recorded or {}):
            print(f"{prefix} recorded as done, skipped", flush=True)
            continue
        start = time.time()
        if execute(run, compile_cache):
            summary = json.loads((run.workdir / "summary.json").read_text())
            metric = f"test_{run.meta['metric']}"
            print(f"{prefix} done in {time.time() - start:.0f}s, {metric}={summary[metric]:.4f}",
                  flush=True)
        else:
            failed.append(run)
            tail = (run.workdir / "error.txt").read_text().strip().splitlines()[-1]
            print(f"{prefix} FAILED ({run.workdir / 'error.txt'}): {tail}", flush=True)
    return failed


# ---- budget matching ----------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Match:
    family: str
    mode: str | None  # as the sweep passes it (None: the config's default)
    hparams: dict
    counts: dict  # surm.peft.count of the chosen setting
    params: int  # trainable parameters beyond the classification head
    fits: bool

    def row(self, budget: int) -> str:
        mode = self.counts["mode"] if self.family not in NO_ADAPTER_BASELINES else "-"
        verdict = "fits" if self.fits else "OVER: no setting fits"
        return (f"{self.family:<18} {mode:<8} {format_hparams(self.hparams) or '-':<22} "
                f"{self.params:>12,} {self.counts['adapter']:>12,} {self.counts['trainable']:>12,}"
                f"  {100 * self.params / budget:8.1f}%  {verdict}")


class ParamCounter:
    """Exact trainable-parameter counts of PEFT specs on one config's model, from shapes only."""

    def __init__(self, config):
        num_classes = data.get_spec(config.input.dataset).num_classes
        self.shapes = jax.eval_shape(lambda: factory.build(config.model, num_classes)[1])
        self.peft = config.peft.to_dict()
        self._cache: dict = {}
        self.head = self.counts("linear_probe", None, {})["trainable"]

    def spec(self, family: str, mode: str | None, hparams: Mapping) -> peft.PeftSpec:
        return peft.config_to_spec({**self.peft, "family": family, "hparams": dict(hparams),
                                    "mode": mode or self.peft["mode"]})

    def counts(self, family: str, mode: str | None, hparams: Mapping) -> dict:
        spec = self.spec(family, mode, hparams)
        trainable, _ = jax.eval_shape(lambda p: peft.init(p, spec, jax.random.PRNGKey(0)),
                                      self.shapes)
        return peft.count(self.shapes, trainable, spec)

    def params(self, family: str, mode: str | None, hparams: Mapping) -> int | None:
        """Parameters beyond the head; None for an invalid setting (e.g. rank too large)."""
        key = (family, mode, format_hparams(hparams))
        if key not in self._cache:
            try:
                self._cache[key] = self.counts(family, mode, hparams)["trainable"] - self.head
            except ValueError:
                self._cache[key] = None
        return self._cache[key]

    def matrix_dims(self, family: str, mode: str | None) -> list[int]:
        """The sides of the structured matrices: (d_in, d_out) per target in lora mode, the
        output side (d_out, d_out) in adapter mode."""
        spec = self.spec(family, mode, {})
        return [d for d_in, d_out in peft.targets(self.shapes, spec).values()
                for d in ((d_in, d_out) if spec.mode == "lora" else (d_out,))]


def _largest_fitting(count: Callable[[int], int | None], budget: int) -> int:
    """The largest k >= 1 with count(k) <= budget (1 if none), for count increasing in k and
    valid (not None) up to some bound: doubling, then bisection."""
    if count(1) is None or count(1) > budget:
        return 1
    fits, above = 1, 2
    while (c := count(above)) is not None and c <= budget:
        fits, above = above, above * 2
    while above - fits > 1:
        mid = (fits + above) // 2
        c = count(mid)
        fits, above = (mid, above) if c is not None and c <= budget else (fits, mid)
    return fits


def _divisors_of_gcd(dims: Sequence[int]) -> tuple[int, ...]:
    g = math.gcd(*dims)
    return tuple(k for k in range(1, g + 1) if g % k == 0)


def _candidates(counter: ParamCounter, fam: FamilyGrid, mode: str | None,
                budget: int) -> list[dict]:
    """Settings worth counting: listed values, searched knobs, and for rank the best fit."""
    domains = dict(fam.values)
    if fam.name in FORMS:
        domains.setdefault("form", FORMS[fam.name])
    if fam.name == "block_circulant":
        domains.setdefault("block_size", _divisors_of_gcd(counter.matrix_dims(fam.name, mode)))
    search_rank = fam.name in RANKED and "rank" not in domains
    out = []
    for combo in FamilyGrid(fam.name, tuple(domains.items())).combos():
        if search_rank:
            combo["rank"] = _largest_fitting(
                lambda r: counter.params(fam.name, mode, {**combo, "rank": r}), budget)
        out.append(combo)
    return out


def _best(counter: ParamCounter, fam: FamilyGrid, mode: str | None, budget: int) -> Match:
    scored = [(counter.params(fam.name, mode, hp), hp)
              for hp in _candidates(counter, fam, mode, budget)]
    valid = [(n, hp) for n, hp in scored if n is not None]
    if not valid:
        try:  # the family's own explanation
            counter.counts(fam.name, mode, scored[0][1])
            reason = ""
        except ValueError as e:
            reason = f": {e}"
        raise SweepError(f"budget matching {fam.name}: no valid setting{reason}")
    fitting = [(n, hp) for n, hp in valid if n <= budget]
    n, hp = (max(fitting, key=lambda x: x[0]) if fitting else min(valid, key=lambda x: x[0]))
    return Match(fam.name, mode, hp, counter.counts(fam.name, mode, hp), n, bool(fitting))


def match_budget(config, budget: int, families: Sequence[FamilyGrid | str],
                 modes: Sequence[str] | None = None) -> list[Match]:
    """For each family (and mode), the setting whose parameters beyond the head are closest to
    ``budget`` without exceeding it (the smallest one, with fits=False, when none fits).

    ``config``: a ConfigDict (``load_config``); ``families``: FamilyGrid or grid-syntax strings
    ('lowrank', 'lowrank:rank=1;2;4'); listed values restrict the search."""
    if budget < 1:
        raise SweepError(f"--budget must be a positive number of parameters, got {budget}")
    counter = ParamCounter(config)
    grids = [f if isinstance(f, FamilyGrid) else parse_family(f) for f in families]
    return [_best(counter, fam, mode, budget) for fam in grids
            for mode in modes_for(fam.name, modes)]


def format_matches(matches: Sequence[Match], budget: int) -> str:
    header = (f"{'family':<18} {'mode':<8} {'hparams':<22} {'params':>12} {'adapter':>12} "
              f"{'trainable':>12}  {'of budget':>9}")
    return "\n".join([f"budget: {budget:,} parameters beyond the classification head", header]
                     + [m.row(budget) for m in matches])


# ---- collecting ---------------------------------------------------------------------------------

CSV_HEAD = ["dataset", "family", "mode", "hparams", "seed", "status", "metric", "test",
            "best_validation", "trainable", "adapter", "base", "wall_seconds",
            "final_train_loss", "workdir", "error", "settings"]


def _final_train_loss(workdir: pathlib.Path) -> float | str:
    path = workdir / "metrics.jsonl"
    losses = [r["train_loss"] for r in map(json.loads, path.read_text().splitlines())
              if "train_loss" in r] if path.exists() else []
    return losses[-1] if losses else ""


def read_run(record: pathlib.Path) -> dict:
    """One results.csv row from a workdir's run.json and, if finished, its summary.json."""
    workdir = record.parent
    meta = json.loads(record.read_text())
    row = {k: meta[k] for k in ("dataset", "family", "mode", "hparams", "seed", "metric")}
    row["workdir"] = str(workdir)
    row["settings"] = json.dumps(meta["settings"])
    summary_path = workdir / "summary.json"
    if summary_path.exists():
        summary = json.loads(summary_path.read_text())
        best = summary.get("best_validation", {})
        row.update(status="done", test=summary[f"test_{meta['metric']}"],
                   best_validation=best.get(f"validation_{meta['metric']}", ""),
                   final_train_loss=_final_train_loss(workdir),
                   **{k: summary[k] for k in ("trainable", "adapter", "base", "wall_seconds")},
                   **{k: v for k, v in summary.items() if k.startswith("test_")},
                   **{f"best_{k}": v for k, v in best.items() if k.startswith("validation_")})
    elif (workdir / "error.txt").exists():
        row.update(status="failed", error=_last_line((workdir / "error.txt").read_text()))
    else:
        row["status"] = "pending"
    return row


def collect(root: str | os.PathLike, records: Mapping[tuple, dict] | None = None) -> list[dict]:
    """A row per run under ``root`` (its workdirs' run.json) and per run of ``records``
    (``read_records``) that no finished workdir holds."""
    root = pathlib.Path(root)
    rows = [read_run(r) for r in sorted(root.rglob("run.json"))]
    if not rows and not records:
        raise SweepError(f"no runs under {root} (no run.json in any workdir); run a sweep into "
                         f"this --root first")
    done = {run_key(r) for r in rows if r["status"] == "done"}
    kept = [r for r in rows if r["status"] == "done" or run_key(r) not in (records or {})]
    return kept + [r for key, r in (records or {}).items() if key not in done]


def write_csv(rows: Sequence[dict], path: pathlib.Path) -> None:
    extra = sorted({k for row in rows for k in row} - set(CSV_HEAD))
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, CSV_HEAD + extra, restval="")
        writer.writeheader()
        writer.writerows(rows)


def mean_std(values: Sequence[float | str]) -> str:
    """'mean ± sample std' to 4 places (the value alone for one, '-' for none; '' entries are
    values that were not there, e.g. no validation with eval_every=0)."""
    values = [v for v in values if v != ""]
    if not values:
        return "-"
    if len(values) < 2:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"


def group(rows: Iterable[dict]) -> dict[tuple, list[dict]]:
    """Finished runs by (dataset, family, mode, hparams), in order of trainable parameters."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        if row["status"] == "done":
            groups.setdefault((row["dataset"], row["family"], row["mode"], row["hparams"]),
                              []).append(row)
    return dict(sorted(groups.items(), key=lambda kv: (kv[0][0], kv[1][0]["trainable"], kv[0])))


def write_markdown(rows: Sequence[dict], path: pathlib.Path) -> None:
    lines = ["| dataset | family | mode | hparams | trainable | adapter | metric | test "
             "(mean ± std) | best validation | seeds | wall s |",
             "|---|---|---|---|---:|---:|---|---|---|---:|---:|"]
    for (dataset, family, mode, hparams), runs in group(rows).items():
        lines.append(
            f"| {dataset} | {family} | {mode} | {hparams or '-'} | {runs[0]['trainable']:,} | "
            f"{runs[0]['adapter']:,} | {runs[0]['metric']} | {mean_std([r['test'] for r in runs])}"
            f" | {mean_std([r['best_validation'] for r in runs])} | {len(runs)} | "
            f"{statistics.mean(r['wall_seconds'] for r in runs):.0f} |")
    unfinished = [r for r in rows if r["status"] != "done"]
    if unfinished:
        lines += ["", "Not finished:", ""] + [
            f"- {r['status']}: `{r['workdir']}`" + (f": {r['error']}" if r.get("error") else "")
            for r in unfinished]
    path.write_text("\n".join(lines) + "\n")


def _pareto_front(points: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points no other point beats with as few or fewer parameters."""
    front, best = [], -math.inf
    for x, y in sorted(points, key=lambda p: (p[0], -p[1])):
        if y > best:
            front.append((x, y))
            best = y
    return front


def plot_pareto(rows: Sequence[dict], path: pathlib.Path) -> bool:
    """Test metric vs trainable parameters (log x), a panel per dataset; False if nothing ran."""
    groups = group(rows)
    if not groups:
        return False
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = sorted({key[0] for key in groups})
    families = sorted({key[1] for key in groups})
    colours = plt.get_cmap("tab10")
    markers = "os^Dv<>phX*P"
    style = {f: (colours(i % 10), markers[i % len(markers)]) for i, f in enumerate(families)}
    fig, axes = plt.subplots(1, len(datasets), figsize=(5.5 * len(datasets), 4.2), squeeze=False)
    for ax, dataset in zip(axes[0], datasets):
        points, metric = [], ""
        for (ds, family, mode, hparams), runs in groups.items():
            if ds != dataset:
                continue
            x = runs[0]["trainable"]
            ys = [r["test"] for r in runs]
            y = statistics.mean(ys)
            colour, marker = style[family]
            ax.errorbar(x, y, yerr=statistics.stdev(ys) if len(ys) > 1 else None, color=colour,
                        marker=marker, linestyle="none", capsize=2,
                        markerfacecolor="none" if mode == "adapter" else colour)
            ax.annotate(" ".join(filter(None, [hparams, mode if mode != "-" else ""])), (x, y),
                        fontsize=6, xytext=(3, 3), textcoords="offset points")
            points.append((x, y))
            metric = runs[0]["metric"]
        front = _pareto_front(points)
        ax.step(*zip(*front), where="post", color="grey", linestyle="--", linewidth=0.8)
        ax.set_xscale("log")
        ax.set_title(dataset)
        ax.set_xlabel("trainable parameters")
        ax.set_ylabel(f"test {metric}")
        ax.grid(alpha=0.3)
    handles = [plt.Line2D([], [], color=c, marker=m, linestyle="none", label=f)
               for f, (c, m) in style.items()]
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 6), fontsize=8,
               title="family (hollow: adapter mode; dashed: Pareto front)", title_fontsize=8)
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    fig.savefig(path, dpi=150)
    plt.close(fig)
    return True


def write_results(root: str | os.PathLike,
                  records: Mapping[tuple, dict] | None = None) -> list[dict]:
    root = pathlib.Path(root)
    rows = collect(root, records)
    root.mkdir(parents=True, exist_ok=True)
    write_csv(rows, root / "results.csv")
    write_markdown(rows, root / "results.md")
    plotted = plot_pareto(rows, root / "pareto.png")
    done = sum(r["status"] == "done" for r in rows)
    print(f"results: {done}/{len(rows)} runs finished -> {root / 'results.csv'}, "
          f"{root / 'results.md'}" + (f", {root / 'pareto.png'}" if plotted else
                                      " (no plot: no finished run)"), flush=True)
    return rows


# ---- command line -------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Sweep surm.train over a grid; see the module docstring for the syntax.",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    g = p.add_argument_group("grid")
    g.add_argument("--grid", help="JSON grid file with any of the keys config, base, families, "
                   "modes, seeds, datasets, dataset_arg, set, root")
    g.add_argument("--config", help="config file, e.g. configs/default.py")
    g.add_argument("--base", help="config arguments of every run: K=V,K=V")
    g.add_argument("--families", action="append",
                   help="FAMILY[:HPARAM=V1;V2...],... e.g. 'circulant,lowrank:rank=1;4;8'; "
                   "repeatable")
    g.add_argument("--modes", help="comma-separated PEFT modes (lora, adapter)")
    g.add_argument("--seeds", help="comma-separated seeds")
    g.add_argument("--datasets", help="comma-separated dataset names")
    g.add_argument("--dataset_arg", help="the config argument --datasets sets "
                   "(default: dataset; task for configs/bert_glue.py)")
    g.add_argument("--set", action="append", metavar="K=V",
                   help="--config.K=V for every run, e.g. total_steps=20; repeatable")
    a = p.add_argument_group("actions")
    a.add_argument("--root", help="directory holding one workdir per run and the results")
    a.add_argument("--print_commands", action="store_true",
                   help="print the unfinished runs' commands, one per line, instead of running")
    a.add_argument("--write_commands", metavar="FILE",
                   help="write the unfinished runs' commands to FILE instead of running")
    a.add_argument("--compile_cache", default="",
                   help="JAX persistent compilation cache shared by the runs (default: "
                   "ROOT/jax_cache; 'none' to disable; $JAX_COMPILATION_CACHE_DIR wins)")
    a.add_argument("--records", action="append", metavar="FILE.csv", default=[],
                   help="results.csv of earlier runs of this root (e.g. kept in git): runs "
                   "recorded there as done are skipped and their rows join the results; "
                   "repeatable")
    a.add_argument("--collect_only", action="store_true",
                   help="only rebuild results.csv/results.md/pareto.png from --root")
    a.add_argument("--budget", type=int, help="match each family's hparams to N parameters "
                   "beyond the head, print them and sweep those settings")
    a.add_argument("--match_only", action="store_true",
                   help="with --budget: print the matches and stop")
    return p


def _listify(value: Any) -> list[str]:
    """A JSON list, or comma-separated text, as a list of strings."""
    if isinstance(value, list):
        return [str(v) for v in value]
    return [v.strip() for v in str(value).split(",") if v.strip()]


def _base_args(value: Any, what: str) -> dict[str, str]:
    """--base text 'k=v,k=v' (or a JSON object)."""
    if isinstance(value, dict):
        return {k: format_value(v) for k, v in value.items()}
    return parse_assignments(value, what)


def _overrides(value: Any, what: str) -> dict[str, str]:
    """--set items 'k=v', one assignment each (values may hold commas), or a JSON object."""
    if isinstance(value, dict):
        return {k: str(v) for k, v in value.items()}
    out = {}
    for item in [value] if isinstance(value, str) else value:
        key, sep, text = str(item).partition("=")
        if not sep or not key.strip():
            raise SweepError(f"{what} {item!r} is not of the form key=value, e.g. total_steps=20")
        out[key.strip()] = text.strip()
    return out


def read_grid_file(path: str | None) -> dict[str, Any]:
    if not path:
        return {}
    try:
        spec = json.loads(pathlib.Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise SweepError(f"--grid {path}: {e}") from None
    unknown = sorted(set(spec) - {"config", "base", "families", "modes", "seeds", "datasets",
                                  "dataset_arg", "set", "root"})
    if unknown:
        raise SweepError(f"--grid {path}: unknown keys {unknown}")
    return spec


def load_grid(args: argparse.Namespace) -> tuple[Grid, str | None]:
    """The grid (file values replaced by command-line flags) and the root."""
    spec = read_grid_file(args.grid)
    cli = {"config": args.config, "families": args.families, "modes": args.modes,
           "seeds": args.seeds, "datasets": args.datasets, "dataset_arg": args.dataset_arg,
           "root": args.root}
    spec.update({k: v for k, v in cli.items() if v is not None})
    if not spec.get("config"):
        raise SweepError("no config file: give --config configs/<name>.py (or 'config' in --grid)")
    base = {**_base_args(spec.get("base", ""), "grid base"),
            **_base_args(args.base or "", "--base")}
    sets = {**_overrides(spec.get("set", []), "grid set"), **_overrides(args.set or [], "--set")}
    optional = {k: tuple(_listify(spec[k])) if k in spec else None
                for k in ("modes", "seeds", "datasets")}
    try:
        seeds = tuple(int(s) for s in optional["seeds"]) if optional["seeds"] else None
    except ValueError:
        raise SweepError(f"--seeds must be integers, got {optional['seeds']}") from None
    grid = Grid(config=spec["config"], base=tuple(base.items()),
                families=tuple(parse_families(_listify(spec.get("families", [])))),
                modes=optional["modes"], seeds=seeds, datasets=optional["datasets"],
                dataset_arg=spec.get("dataset_arg", "dataset"), sets=tuple(sets.items()))
    return grid, spec.get("root")


def _budget_methods(grid: Grid, budget: int) -> list[Method]:
    config = load_config(grid.config, dict(grid.base) | (
        {grid.dataset_arg: grid.datasets[0]} if grid.datasets else {}), grid.sets)
    matches = match_budget(config, budget, grid.families, grid.modes)
    print(format_matches(matches, budget), flush=True)
    return [(m.family, m.mode, m.hparams) for m in matches]


def _emit_commands(runs: Sequence[Run], path: str | None) -> None:
    lines = [run.command() for run in runs]
    for run in runs:
        write_record(run)
    if path:
        pathlib.Path(path).write_text("".join(line + "\n" for line in lines))
        print(f"wrote {len(lines)} commands to {path}", file=sys.stderr)
    else:
        print("\n".join(lines), flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.collect_only:
        root = args.root or read_grid_file(args.grid).get("root")
        if not root:
            raise SweepError("--collect_only needs --root DIR (the sweep's root)")
        write_results(root, read_records(args.records))
        return 0
    grid, root = load_grid(args)
    if args.match_only and args.budget is None:
        raise SweepError("--match_only goes with --budget N")
    methods = _budget_methods(grid, args.budget) if args.budget is not None else None
    if args.match_only:
        return 0
    if not root:
        raise SweepError("give --root DIR: where the runs' workdirs and the results go")
    runs = plan(grid, root, methods)
    check_records(runs)
    records = read_records(args.records)
    recorded = recorded_runs(runs, records)
    pending = [run for run in runs if not run.finished and run.workdir not in recorded]
    print(f"{len(runs)} runs, {len(runs) - len(pending)} finished before"
          + (f" ({len(recorded)} of them in --records)" if recorded else ""), file=sys.stderr,
          flush=True)
    if args.print_commands or args.write_commands:
        _emit_commands(pending, args.write_commands)
        return 0
    cache = None if args.compile_cache == "none" else pathlib.Path(
        args.compile_cache or pathlib.Path(root) / "jax_cache")
    failed = run_all(runs, cache, recorded)
    write_results(root, records)
    if failed:
        print(f"{len(failed)} of {len(runs)} runs failed; see error.txt in: "
              + ", ".join(str(r.workdir) for r in failed), file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (SweepError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted; run the same command again to resume", file=sys.stderr)
        sys.exit(130)
