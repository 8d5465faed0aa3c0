"""Choosing the tuned values (lr, head_lr) of every method on validation, never on test.

For every (dataset, method, structure, hparams, seed), the run with the best *final* validation
metric (the highest; the lowest for perplexity: ``surm.metrics.LOWER_IS_BETTER``; the model that is then
tested is the final one) is chosen, and its test metric is the
one reported. Ties go to the lower final validation loss, then to the smaller lr, then to the
smaller head_lr. A run that failed (e.g. diverged at a large lr) counts as tried and cannot be
chosen. A chosen value at the smallest or largest value tried of its axis is flagged: the
best may lie outside the grid, so widen it.

With ``tune_seed`` the values are chosen on that seed alone, and every seed reports its run at
the chosen values (the other seeds run only those: see ``surm.sweep.runner.plan_followups``).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Iterable, Mapping, Sequence

from surm.metrics import better_sign
from surm.sweep.grid import TUNED, SweepError
from surm.sweep.records import run_key

METHOD = ("dataset", "method", "structure", "hparams")
FINISHED = ("done", "failed")


@dataclasses.dataclass(frozen=True)
class Choice:
    """The tuned values chosen for one method (and seed, unless tuned on one seed)."""

    row: dict  # the chosen run's results row
    tried: int  # tuned settings run (finished or failed)
    failed: int
    edges: tuple[str, ...]  # e.g. ("lr at max",)

    @property
    def values(self) -> dict[str, float]:
        return {k: float(self.row[k]) for k in TUNED}


def _ranking(row: Mapping[str, Any]) -> tuple:
    loss = row.get("validation_loss")
    sign = better_sign(str(row.get("metric", "")))
    return (-sign * float(row["validation"]),
            float(loss) if loss not in ("", None) else float("inf"),
            float(row["lr"]), float(row["head_lr"]))


def _tuned_setting(row: Mapping[str, Any]) -> tuple[float, ...]:
    return tuple(float(row[k]) for k in TUNED)


def choose(runs: Sequence[Mapping[str, Any]]) -> Choice | None:
    """The choice among the runs of one method (and seed); None until every run of the group
    has finished (or failed), or when all failed."""
    if not runs or any(r["status"] not in FINISHED for r in runs):
        return None
    done = [r for r in runs if r["status"] == "done"]
    if not done:
        return None
    settings = {_tuned_setting(r) for r in runs}
    if len(settings) > 1:
        blind = [r for r in done if r.get("validation") in ("", None)]
        if blind:
            raise SweepError(
                f"{len(blind)} run(s) of {' '.join(str(blind[0][k]) for k in METHOD)} have no "
                f"validation metric (e.g. {blind[0].get('workdir') or 'a recorded run'}); a "
                f"tuned value is chosen on validation: run with eval_every > 0")
    best = min(done, key=_ranking) if len(settings) > 1 else done[0]
    edges = []
    tied = all(float(r["lr"]) == float(r["head_lr"]) for r in runs)
    for i, axis in enumerate(TUNED[:1] if tied else TUNED):
        values = sorted({s[i] for s in settings})
        if len(values) > 1:
            chosen = float(best[axis])
            if chosen == values[-1]:
                edges.append(f"{axis} at max")
            elif chosen == values[0]:
                edges.append(f"{axis} at min")
    return Choice(dict(best), len(settings), sum(r["status"] == "failed" for r in runs),
                  tuple(edges))


def _by(rows: Iterable[Mapping[str, Any]], keys: Sequence[str]) -> dict[tuple, list[dict]]:
    out: dict[tuple, list[dict]] = {}
    for row in rows:
        out.setdefault(tuple(str(row[k]) for k in keys), []).append(dict(row))
    return out


def choices(rows: Iterable[Mapping[str, Any]],
            tune_seed: int | None = None) -> dict[tuple, Choice]:
    """{(dataset, method, structure, hparams, seed): Choice}; with ``tune_seed``, keyed by the
    method alone (seed ``None``) and made on that seed's runs."""
    if tune_seed is not None:
        rows = [r for r in rows if str(r["seed"]) == str(tune_seed)]
    out = {}
    for key, runs in _by(rows, (*METHOD, "seed")).items():
        choice = choose(runs)
        if choice is not None:
            out[key[:-1] + ((None,) if tune_seed is not None else key[-1:])] = choice
    return out


def select(rows: Sequence[Mapping[str, Any]], tune_seed: int | None = None) -> list[dict]:
    """The rows to report: for every method and seed, its finished run at the chosen tuned
    values, with ``tried``, ``failed`` and ``edge`` (how the choice was made) added."""
    picked = choices(rows, tune_seed)
    done = {run_key(r): r for r in rows if r.get("status") == "done"}
    out = []
    for key, runs in _by(rows, (*METHOD, "seed")).items():
        choice = picked.get(key[:-1] + ((None,) if tune_seed is not None else key[-1:]))
        if choice is None:
            continue
        at = {**runs[0], **{k: choice.row[k] for k in TUNED}}
        row = done.get(run_key(at))
        if row is not None:
            out.append({**row, "tried": choice.tried, "failed": choice.failed,
                        "edge": "; ".join(choice.edges)})
    return out


def unsettled(rows: Sequence[Mapping[str, Any]], tune_seed: int | None = None) -> list[tuple]:
    """The (dataset, method, structure, hparams[, seed]) groups whose tuning is not finished."""
    if tune_seed is not None:
        rows = [r for r in rows if str(r["seed"]) == str(tune_seed)]
    keys = METHOD if tune_seed is not None else (*METHOD, "seed")
    return [key for key, runs in _by(rows, keys).items()
            if any(r["status"] not in FINISHED for r in runs)]
