"""What the command line and the studies call: budget matching on a config's model, and the
results files of a root."""
from __future__ import annotations

import dataclasses
import os
import pathlib
from typing import Mapping, Sequence

import jax

from surm import data
from surm.peft import budget
from surm.sweep import plots, records, results
from surm.sweep.grid import (FamilyGrid, Grid, Method, SweepError, load_config, methods_for,
                             parse_family)


def counter_for(config) -> budget.ParamCounter:
    """A parameter counter on the model of a config (shapes only: nothing is initialised)."""
    from surm.models import factory

    num_classes = data.get_spec(config.input.dataset).num_classes
    shapes = jax.eval_shape(lambda: factory.build(config.model, num_classes)[1])
    return budget.ParamCounter(shapes, config.peft.to_dict())


def match_budget(config, n: int, families: Sequence[FamilyGrid | str],
                 modes: Sequence[str] | None = None) -> list[budget.Match]:
    """For each method of the --families items (a structure by each of ``modes``), the setting whose parameters beyond the head are closest to
    ``n`` without exceeding it (``surm.peft.budget.match``); ``families``: FamilyGrid or grid
    strings ('lowrank', 'lowrank:rank=1;2;4': listed values restrict the search)."""
    if n < 1:
        raise SweepError(f"--budget must be a positive number of parameters, got {n}")
    counter = counter_for(config)
    grids = [f if isinstance(f, FamilyGrid) else parse_family(f) for f in families]
    try:
        return [budget.match(counter, method, structure,
                             {k: v for k, v in fam.values if k not in fam.tuned_values}, n)
                for fam in grids for method, structure in methods_for(fam.name, modes)]
    except ValueError as e:
        raise SweepError(str(e)) from None


def match_config_budget(grid: Grid, n: int) -> tuple[str, list[Method]]:
    """The budget table of a grid's families on its config's model, and the matched methods
    (each with the lr values its grid item lists)."""
    config = load_config(grid.config, dict(grid.base) | (
        {grid.dataset_arg: grid.datasets[0]} if grid.datasets else {}), grid.sets)
    matches = match_budget(config, n, grid.families, grid.modes)
    items = {fam.name: fam for fam in grid.families}
    matched = [Method(m.method, m.structure, m.hparams) for m in matches]
    methods = [dataclasses.replace(m, tuned=tuned) for m in matched
               for tuned in items[m.item].tuned()]
    return budget.format_matches(matches, n), methods


def write_results(root: str | os.PathLike, recorded: Mapping[tuple, dict] | None = None,
                  tune_seed: int | None = None, reference: str | None = None) -> list[dict]:
    """ROOT/results.csv, results.md, comparisons.csv and pareto.png from the workdirs under
    ROOT and the ``recorded`` rows; returns the rows."""
    root = pathlib.Path(root)
    rows = records.collect(root, recorded)
    root.mkdir(parents=True, exist_ok=True)
    records.write_csv(rows, root / "results.csv")
    results.write_markdown(rows, root / "results.md", tune_seed, reference)
    compared = results.write_comparisons(rows, root / "comparisons.csv", tune_seed, reference)
    plotted = plots.plot_pareto(rows, root / "pareto.png", tune_seed)
    done = sum(r["status"] == "done" for r in rows)
    print(f"results: {done}/{len(rows)} runs finished -> {root / 'results.csv'}, "
          f"{root / 'results.md'}, {root / 'comparisons.csv'} ({len(compared)} comparisons)"
          + (f", {root / 'pareto.png'}" if plotted else
             " (no plot: no method has a chosen run)"), flush=True)
    return rows
