"""Sweeps: grids of methods x hyper-parameters x learning rates x seeds x datasets over
``surm.train``, each method's learning rate chosen on validation, tables and plots of the test
metric at that choice. ``python -m surm.sweep --help`` describes the command line.

    from surm import sweep
    grid = sweep.Grid(config="configs/default.py", base=(("checkpoint", "random"),),
                      families=tuple(sweep.parse_families(["circulant:lr=1e-3;1e-2"])),
                      seeds=(0, 1), tune_seed=0)
    runs = sweep.plan(grid, "sweeps/x")          # resolved through the config: typos fail here
    sweep.run_all(runs)                          # one surm.train subprocess each, resumable
    rows = sweep.write_results("sweeps/x", tune_seed=0)
    chosen = sweep.select(rows, tune_seed=0)     # the runs at the lr chosen on validation

Modules: ``grid`` (syntax, methods, configs), ``runner`` (runs, resuming, the tuning seed's
follow-ups), ``records`` (run.json, results.csv), ``selection`` (choosing on validation),
``results`` (tables), ``plots`` (Pareto plot), ``api`` (budget matching, results files).
"""
from surm.sweep.api import counter_for, match_budget, match_config_budget, write_results
from surm.sweep.grid import (TUNED, FamilyGrid, Grid, Method, SweepError, format_hparams,
                             grid_methods, load_config, parse_families, parse_family)
from surm.sweep.records import collect, read_csv, read_records, run_key, write_csv
from surm.sweep.results import mean_std
from surm.sweep.runner import Run, plan, plan_followups, run_all
from surm.sweep.selection import Choice, choices, choose, select

__all__ = ["TUNED", "Choice", "FamilyGrid", "Grid", "Method", "Run", "SweepError", "choices",
           "choose", "collect", "counter_for", "format_hparams", "grid_methods", "load_config",
           "match_budget", "match_config_budget", "mean_std", "parse_families", "parse_family",
           "plan", "plan_followups", "read_csv", "read_records", "run_all", "run_key", "select",
           "write_csv", "write_results"]
