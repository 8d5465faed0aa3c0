"""Running the study: each part's tuning seed, the runs that widen a grid whose choice sits at
its edge, then the other seeds at the chosen values; the record (CSV and archived test
predictions) written after every run; the configs' default learning rates from the record."""
from __future__ import annotations

import json
import pathlib
import statistics
import sys
from typing import Sequence

from surm import sweep
from surm.study import parts as P
from surm.study.parts import Part
from surm.sweep import archive, runner
from surm.sweep.records import KEY


def _records(part: Part) -> dict:
    return sweep.read_records([part.record]) if part.record.exists() else {}


def save_record(part: Part) -> list[dict]:
    """The part's finished runs (its workdirs and its earlier record) into its record file:
    the runs that finished and those that failed (marked; a diverged run counts as tried), and
    their per-example test predictions into the archive beside it (``surm.sweep.archive``)."""
    try:
        rows = sweep.collect(part.root, _records(part))
    except sweep.SweepError:  # nothing has run yet
        rows = []
    finished = [r for r in rows if r["status"] in ("done", "failed")]
    if finished or part.record.exists():
        finished = archive.write(finished, part.record)  # predictions now point into it
        sweep.write_csv(finished, part.record)
    return finished + [r for r in rows if r["status"] not in ("done", "failed")]


def _planned(part: Part, rows: Sequence[dict]) -> list[runner.Run]:
    """Every run of the part planned so far: the tuning seed's, those that widen its grids
    (asked for now, or finished before), and the other seeds' at the values chosen where the
    tuning has finished."""
    runs = []
    for grid in part.sweep_grids():
        runs += runner.plan(grid, part.root)
        runs += runner.plan_widening(grid, part.root, rows, widen=P.WIDEN)
        runs += runner.plan_followups(grid, part.root, rows, widen=P.WIDEN)[0]
    listed = {sweep.run_key(r.meta) for r in runs}
    runs += [runner.Run(tuple(json.loads(r["settings"])), pathlib.Path(r["workdir"]),
                        {k: r[k] for k in (*KEY, "metric")}) for r in rows
             if r["status"] == "done" and sweep.run_key(r) not in listed
             and str(r["seed"]) == str(part.tune_seed)]
    return list({sweep.run_key(r.meta): r for r in runs}.values())


def run_part(part: Part, cache: pathlib.Path) -> int:
    """The tuning seed's runs, then rounds of runs that widen a grid where a choice sits at
    its edge, then the other seeds at the chosen values."""
    failed = 0
    phases = ["tuning"] + ["widening"] * P.WIDEN + ["other seeds"]
    for phase in phases:
        rows = save_record(part)
        runs = [r for grid in part.sweep_grids() for r in (
            runner.plan(grid, part.root) if phase == "tuning" else
            runner.plan_widening(grid, part.root, rows, widen=P.WIDEN) if phase == "widening" else
            runner.plan_followups(grid, part.root, rows, widen=P.WIDEN)[0])]
        runner.check_records(runs)
        recorded = runner.recorded_runs(runs, _records(part))
        left = sum(1 for r in runs if not r.finished and r.workdir not in recorded)
        print(f"\n=== {part.name} ({phase}): {len(runs)} runs, {left} to go", flush=True)
        failed += len(runner.run_all(runs, cache, recorded, on_finish=lambda _: save_record(part)))
    save_record(part)
    return failed


def run(parts: Sequence[Part]) -> int:
    cache = P.ROOT / "jax_cache"  # shared: runs that differ in seed, lr or data reuse programs
    failed = sum(run_part(part, cache) for part in parts)
    if failed:
        print(f"{failed} runs failed (diverged runs count as tried; see error.txt)",
              file=sys.stderr)
    return 0


def plan_summary(parts: Sequence[Part]) -> None:
    """Per part: runs planned and to go, methods still tuning, and the time left at the median
    wall time of its finished runs (a still-tuning method counted with its other seeds)."""
    total = 0.0
    for part in parts:
        rows = save_record(part)
        runs = _planned(part, rows)
        done = {sweep.run_key(r) for r in rows if r["status"] == "done"}
        waits = [(runner.plan_followups(g, part.root, rows)[1], len(g.seeds) - 1)
                 for g in part.sweep_grids()]
        waiting = sum(n for n, _ in waits)
        left = sum(sweep.run_key(r.meta) not in done for r in runs)
        walls = [float(r["wall_seconds"]) for r in rows
                 if r["status"] == "done" and r.get("wall_seconds") not in ("", None)]
        more = left + sum(n * others for n, others in waits)
        eta = ""
        if more and walls:
            median = statistics.median(walls)
            total += more * median / 3600
            eta = f"; about {more * median / 3600:.1f} h left ({more} runs at {median:.0f} s)"
        print(f"{part.name:22s} {len(runs):4d} runs planned, {left:4d} to go, {waiting:3d} "
              f"methods still tuning (their other seeds not planned yet){eta}")
    if total:
        print(f"about {total:.1f} hours of runs left in the parts that have run before (one "
              f"run at a time; a part with no finished run has no estimate)")


# ---- the configs' default learning rates -----------------------------------------------------



def write_defaults() -> int:
    """surm/tuned_lrs.json from the record (``surm.defaults.derive``): what the configs take
    when no lr is given."""
    from surm import defaults

    def rows(name: str) -> list[dict]:
        return part_rows(P.BY_NAME[name]) if name in P.BY_NAME else sweep.read_csv(
            P.RECORDS / f"{name}.csv")

    def chosen(name: str) -> dict:
        return {k: c.values for k, c in sweep.choices(rows(name), P.TUNE_SEED).items()}

    table = defaults.derive({kind: [(name, chosen(name)) for name in names]
                             for kind, names in P.DEFAULT_SOURCES.items()})
    defaults.FILE.write_text(json.dumps(table, indent=1) + "\n")
    print(f"wrote {defaults.FILE}: " + ", ".join(
        f"{kind} {len(t['methods'])} methods" for kind, t in table.items()))
    return 0

def _planned_keys(part: Part, rows: Sequence[dict]) -> set:
    return {sweep.run_key(r.meta) for r in _planned(part, rows)}


def part_rows(part: Part) -> list[dict]:
    """The part's planned runs from its workdirs and record (the record rewritten), each run
    not finished yet as 'not run'."""
    rows = save_record(part)
    planned = _planned_keys(part, rows)
    kept = [r for r in rows if sweep.run_key(r) in planned]
    found = {sweep.run_key(r) for r in kept}
    return kept + [dict(zip(KEY, key), status="not run") for key in sorted(planned - found)]
