"""Sweep surm.train over methods x hyper-parameters x learning rates x modes x seeds x datasets,
choose each method's learning rate on validation, and tabulate the test metric at that choice.

    python -m surm.sweep --config configs/default.py --base dataset=bbc_news,checkpoint=random \\
        --families 'circulant:lr=1e-3;1e-2;1e-1,lowrank:rank=8:lr=1e-4;1e-3;1e-2,full:lr=1e-5;5e-5' \\
        --modes lora,adapter --seeds 0,1,2 --tune_seed 0 --datasets tweet_sentiment,bbc_news \\
        --set total_steps=20 --set eval_every=20 --root sweeps/smoke

Grid syntax
    --config FILE            the config file every run starts from (configs/<name>.py)
    --base K=V,K=V           config arguments of every run (the ``FILE:K=V`` part)
    --families SPEC          comma-separated FAMILY[:KEY=V1;V2...][:KEY2=...]; repeatable.
                             FAMILY is a structured family or a baseline (houlsby, bitfit,
                             linear_probe, full). KEY is a config argument: a hyper-parameter of
                             the method (rank, block_size, form, factors, alpha, scale), each
                             combination a method of its own, or a tuned axis (lr, head_lr), whose
                             values are tried and one chosen on validation. Quote the spec: ';'
                             ends a shell command. A pair value is written AxB.
    --modes lora,adapter     PEFT modes of the structured families. Baselines ignore the mode
                             (houlsby always runs as an adapter); identical runs are run once.
    --seeds 0,1,2            config argument ``seed``
    --tune_seed S            search lr/head_lr on seed S only; the other seeds run only at the
                             values chosen there (they start once S's runs of a method are done).
                             Without it, every seed is tuned on its own.
    --datasets A,B           config argument ``dataset`` (``--dataset_arg task`` for
                             configs/bert_glue.py, whose argument is ``task``)
    --set K=V                ``--config.K=V`` of every run (any config entry); repeatable
    --grid FILE.json         the same keys in a file: {"config": ..., "base": {"checkpoint":
                             "random"}, "families": ["circulant:lr=1e-3;1e-2", "lowrank:rank=4"],
                             "modes": ["lora"], "seeds": [0, 1], "tune_seed": 0, "datasets":
                             [...], "set": {"total_steps": 20}, "root": ...}. Flags given on the
                             command line replace the file's values (base and set are merged).
An axis left out takes the config's own default. Every run is exactly ``python -m surm.train
--config FILE:ARGS --workdir DIR --config.K=V ...``; the whole grid is resolved through the
config file before anything runs, so a typo fails at once.

Choosing on validation
    For every (dataset, method, hparams, seed) the sweep takes the lr (and head lr) whose run
    has the best final validation metric (never the test split), breaking ties by the lower
    validation loss, then the smaller lr, then the smaller head lr, and reports the test
    metric of that run, the chosen values, how many were tried, and a flag where the choice is
    the smallest or largest value tried (widen the grid). A run that failed (diverged) counts
    as tried and is never chosen. Runs need a validation pass: ``--set eval_every=N`` (the
    last step is always evaluated when eval_every > 0). ``--widen K`` answers an edge by itself:
    one more run a grid step beyond it (the listed values' spacing), up to K values beyond the
    listed ones on each side, before the choice is final.

Runs, resuming and results
    Runs go one after another, each in ROOT/<dataset>/<family>[_<hparam>-<value>...][_<mode>]
    _lr<lr>[_hlr<head_lr>]_seed<seed>; a finished run is skipped and an interrupted one resumes,
    so resuming a sweep is running the same command again. A failed run leaves error.txt and
    the sweep goes on (exit status 1 if any failed). Changing --base or --set under the same
    ROOT is refused for existing runs (use a new --root). The runs share a JAX compilation
    cache (ROOT/jax_cache, see --compile_cache): runs that differ only in seed or lr start in
    seconds. Afterwards ROOT/results.csv (one row per run), ROOT/results.md (the chosen table
    and every run) and ROOT/pareto.png are written; ``--collect_only --root ROOT`` rebuilds
    them. ``--records FILE.csv`` (repeatable) names results.csv files of earlier runs of this
    root (e.g. kept in git): a planned run recorded there as done (or failed) is not run again
    and its row joins the results. ``--print_commands`` (or ``--write_commands FILE``) prints the runs
    that can start now, one ``python -m surm.train`` line each, for a launcher.

Comparisons
    Every method at its chosen values is compared with a reference method on each dataset,
    paired by seed (``--reference FAMILY[:K=V]``, e.g. ``lowrank:rank=8``; by default LoRA,
    the smallest lowrank in the grid, else the linear probe, else full fine-tuning): the
    difference of the test metric, a paired t-test over seeds and a bootstrap over seeds and
    test examples from the per-example predictions every run stores (McNemar with one seed),
    Holm-corrected over the table's comparisons (surm.sweep.stats). results.md shows delta, the
    CI at each comparison's Holm level, p, p_holm and the verdict (win, loss or no detectable
    difference); ROOT/comparisons.csv holds the numbers.

Budget matching
    ``--budget N`` picks, for each method (a family by each of --modes), the hyper-parameters
    whose parameter count beyond the classification head is closest to N without going over
    (surm.peft.budget; the knobs each structure declares searchable, restricted by listed
    values), prints the table and
    sweeps those settings (with their listed lr values); ``--match_only`` stops after the table.

    python -m surm.sweep --config configs/default.py --families lowrank,ldr,circulant,toeplitz \\
        --modes lora --budget 20000 --match_only
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys
from typing import Any, Sequence

from surm import cli
from surm import workdir as workdir_files
from surm.sweep import records as records_lib
from surm.sweep import runner
from surm.sweep.api import match_config_budget, write_results
from surm.sweep.grid import Grid, SweepError, format_value, parse_assignments, parse_families

GRID_KEYS = {"config", "base", "families", "modes", "seeds", "tune_seed", "datasets",
             "dataset_arg", "set", "root"}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m surm.sweep",
        description="Sweep surm.train over a grid, choose lrs on validation; see the syntax "
                    "below.",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    g = p.add_argument_group("grid")
    g.add_argument("--grid", help="JSON grid file with any of the keys "
                   + ", ".join(sorted(GRID_KEYS)))
    g.add_argument("--config", help="config file, e.g. configs/default.py")
    g.add_argument("--base", help="config arguments of every run: K=V,K=V")
    g.add_argument("--families", action="append",
                   help="FAMILY[:KEY=V1;V2...],... e.g. 'circulant:lr=1e-3;1e-2,lowrank:rank=4';"
                   " repeatable")
    g.add_argument("--modes", help="comma-separated PEFT modes (lora, adapter)")
    g.add_argument("--seeds", help="comma-separated seeds")
    g.add_argument("--tune_seed", type=int, help="tune lr/head_lr on this seed only; the other "
                   "seeds run at its choice")
    g.add_argument("--widen", type=int, default=0, metavar="K",
                   help="where a choice is the smallest or largest value tried, run one more "
                   "value a grid step further out, up to K beyond the listed ones per side "
                   "(default 0: flag it only)")
    g.add_argument("--datasets", help="comma-separated dataset names")
    g.add_argument("--dataset_arg", help="the config argument --datasets sets "
                   "(default: dataset; task for configs/bert_glue.py)")
    g.add_argument("--set", action="append", metavar="K=V",
                   help="--config.K=V for every run, e.g. total_steps=20; repeatable")
    a = p.add_argument_group("actions")
    a.add_argument("--root", help="directory holding one workdir per run and the results")
    a.add_argument("--print_commands", action="store_true",
                   help="print the commands of the runs that can start now, instead of running")
    a.add_argument("--write_commands", metavar="FILE",
                   help="write those commands to FILE instead of running")
    a.add_argument("--compile_cache", default="",
                   help="JAX persistent compilation cache shared by the runs (default: "
                   "ROOT/jax_cache; 'none' to disable; $JAX_COMPILATION_CACHE_DIR wins)")
    a.add_argument("--records", action="append", metavar="FILE.csv", default=[],
                   help="results.csv of earlier runs of this root (e.g. kept in git): runs "
                   "recorded there as done or failed are skipped and their rows join the "
                   "results; "
                   "repeatable")
    a.add_argument("--reference", metavar="FAMILY[:K=V]",
                   help="the method the others are compared with (default: LoRA, else the "
                   "linear probe, else full fine-tuning)")
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
    unknown = sorted(set(spec) - GRID_KEYS)
    if unknown:
        raise SweepError(f"--grid {path}: unknown keys {unknown}; known: {sorted(GRID_KEYS)}")
    return spec


def load_grid(args: argparse.Namespace) -> tuple[Grid, str | None]:
    """The grid (file values replaced by command-line flags) and the root."""
    spec = read_grid_file(args.grid)
    cli = {"config": args.config, "families": args.families, "modes": args.modes,
           "seeds": args.seeds, "tune_seed": args.tune_seed, "datasets": args.datasets,
           "dataset_arg": args.dataset_arg, "root": args.root}
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
                dataset_arg=spec.get("dataset_arg", "dataset"), sets=tuple(sets.items()),
                tune_seed=spec.get("tune_seed"))
    return grid, spec.get("root")


def _emit_commands(runs: Sequence[runner.Run], path: str | None) -> None:
    lines = [run.command() for run in runs]
    for run in runs:
        records_lib.write_record(run.workdir, run.meta, run.settings)
    if path:
        pathlib.Path(path).write_text("".join(line + "\n" for line in lines))
        print(f"wrote {len(lines)} commands to {path}", file=sys.stderr)
    else:
        print("\n".join(lines), flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.collect_only:
        spec = read_grid_file(args.grid)
        root = args.root or spec.get("root")
        if not root:
            raise SweepError("--collect_only needs --root DIR (the sweep's root)")
        tune_seed = args.tune_seed if args.tune_seed is not None else spec.get("tune_seed")
        write_results(root, records_lib.read_records(args.records), tune_seed, args.reference)
        return 0
    grid, root = load_grid(args)
    if args.match_only and args.budget is None:
        raise SweepError("--match_only goes with --budget N")
    methods = None
    if args.budget is not None:
        matches, methods = match_config_budget(grid, args.budget)
        print(matches, flush=True)
    if args.match_only:
        return 0
    if not root:
        raise SweepError("give --root DIR: where the runs' workdirs and the results go")
    try:
        workdir_files.local(root)
    except ValueError as e:
        raise SweepError(f"--root {e}") from None
    if pathlib.Path(root).exists() and not pathlib.Path(root).is_dir():
        raise SweepError(f"--root {root} is a file; give a folder for the runs' workdirs")
    runs = runner.plan(grid, root, methods)
    runner.check_records(runs)
    records = records_lib.read_records(args.records)
    recorded = runner.recorded_runs(runs, records)
    pending = [run for run in runs if not run.finished and run.workdir not in recorded]
    tuning = " (tuning seed)" if grid.tune_seed is not None else ""
    print(f"{len(runs)} runs{tuning}, {len(runs) - len(pending)} finished before"
          + (f" ({len(recorded)} of them in --records)" if recorded else ""), file=sys.stderr,
          flush=True)
    if args.print_commands or args.write_commands:
        rows = _rows_so_far(root, records)
        more = runner.plan_widening(grid, root, rows, methods, args.widen) if args.widen else []
        if grid.tune_seed is not None:
            followups, waiting = runner.plan_followups(grid, root, rows, methods, args.widen)
            more += followups
        ready = pending + [r for r in more if not r.finished
                           and r.workdir not in runner.recorded_runs(more, records)]
        if grid.tune_seed is not None and waiting:
            print(f"{waiting} method(s) wait for their tuning runs before the other seeds "
                  f"can start: run this again once those are done", file=sys.stderr)
        _emit_commands(ready, args.write_commands)
        return 0
    cache = None if args.compile_cache == "none" else pathlib.Path(
        args.compile_cache or pathlib.Path(root) / "jax_cache")
    runner.record_planned(runs, recorded)
    failed = runner.run_all(runs, cache, recorded)
    for _ in range(args.widen):
        wider = runner.plan_widening(grid, root, _rows_so_far(root, records), methods, args.widen)
        if not wider:
            break
        print(f"{len(wider)} runs widen the grid where a choice sits at its edge",
              file=sys.stderr, flush=True)
        runner.check_records(wider)
        failed += runner.run_all(wider, cache, runner.recorded_runs(wider, records))
        runs = runs + wider
    if grid.tune_seed is not None:
        followups, _ = runner.plan_followups(grid, root, _rows_so_far(root, records), methods,
                                             args.widen)
        runner.check_records(followups)
        runner.record_planned(followups, runner.recorded_runs(followups, records))
        print(f"{len(followups)} runs of the other seeds at the chosen values", file=sys.stderr,
              flush=True)
        failed += runner.run_all(followups, cache, runner.recorded_runs(followups, records))
        runs = runs + followups
    write_results(root, records, grid.tune_seed, args.reference)
    if failed:
        print(f"{len(failed)} of {len(runs)} runs failed; see error.txt in: "
              + ", ".join(str(r.workdir) for r in failed), file=sys.stderr)
    return 1 if failed else 0


def _rows_so_far(root, records) -> list[dict]:
    try:
        return records_lib.collect(root, records)
    except SweepError:  # nothing has run yet
        return []


def run(argv: Sequence[str] | None = None) -> int:
    """``main`` with the errors a user can fix printed as one line (exit status 2)."""
    try:
        return main(argv)
    except (SweepError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a root that is a file, a full or read-only disk
        print(f"error: {cli.describe_os_error(e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return runner.interrupted()


if __name__ == "__main__":
    sys.exit(run())
