"""Result tables of a sweep: the methods at their chosen tuned values, and every run.

``results.md`` holds two tables. *Chosen on validation*: one row per (dataset, method), the
test metric (mean ± sample std over seeds) of the runs at the tuned values chosen on validation
(``surm.sweep.selection``), the chosen lr and head lr, how many settings were tried, and a flag
where a choice sits at the edge of its grid. *Every run*: one row per (dataset, method, lr,
head_lr), for looking at how a method depends on its lr. ``verdict`` is the rule by which the
studies call a difference a win, a tie or a loss.
"""
from __future__ import annotations

import collections
import pathlib
import statistics
from typing import Iterable, Sequence

from surm import metrics
from surm.sweep import selection

GROUP = ("dataset", "family", "mode", "hparams")


def mean_std(values: Sequence[float | str]) -> str:
    """'mean ± sample std' to 4 places (the value alone for one, '-' for none; '' entries are
    values that were not there, e.g. no validation with eval_every=0)."""
    values = [v for v in values if v != ""]
    if not values:
        return "-"
    if len(values) < 2:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"


def group(rows: Iterable[dict], keys: Sequence[str] = GROUP) -> dict[tuple, list[dict]]:
    """Finished runs by ``keys``, in order of dataset and trainable parameters."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        if row["status"] == "done":
            groups.setdefault(tuple(row[k] for k in keys), []).append(row)
    return dict(sorted(groups.items(), key=lambda kv: (str(kv[0][0]), kv[1][0]["trainable"],
                                                       tuple(map(str, kv[0])))))


def format_chosen(values: Sequence[float]) -> str:
    """The chosen values of one method over its seeds: '0.003', or '0.003 (2), 0.01 (1)'."""
    counts = collections.Counter(float(v) for v in values)
    if len(counts) == 1:
        return f"{next(iter(counts)):g}"
    return ", ".join(f"{v:g} ({n})" for v, n in sorted(counts.items()))


def chosen_table(rows: Sequence[dict], tune_seed: int | None = None) -> list[str]:
    """The markdown lines of the *chosen on validation* table."""
    picked = selection.select(rows, tune_seed)
    lines = ["| dataset | family | mode | hparams | trainable | metric | test (mean ± std) | "
             "validation | chosen lr | chosen head lr | tried | grid edge | seeds |",
             "|---|---|---|---|---:|---|---|---|---|---|---:|---|---:|"]
    for (dataset, family, mode, hparams), runs in group(picked).items():
        failed = max(r["failed"] for r in runs)
        edges = sorted({e for r in runs for e in r["edge"].split("; ") if e})
        lines.append(
            f"| {dataset} | {family} | {mode} | {hparams or '-'} | {runs[0]['trainable']:,} | "
            f"{runs[0]['metric']} | {mean_std([r['test'] for r in runs])} | "
            f"{mean_std([r['validation'] for r in runs])} | "
            f"{format_chosen([r['lr'] for r in runs])} | "
            f"{format_chosen([r['head_lr'] for r in runs])} | "
            f"{runs[0]['tried']}{f' ({failed} failed)' if failed else ''} | "
            f"{', '.join(edges) or '-'} | {len(runs)} |")
    return lines


def runs_table(rows: Sequence[dict]) -> list[str]:
    """The markdown lines of the *every run* table."""
    lines = ["| dataset | family | mode | hparams | lr | head lr | trainable | metric | "
             "validation | test | seeds | wall s |",
             "|---|---|---|---|---:|---:|---:|---|---|---|---:|---:|"]
    for key, runs in group(rows, (*GROUP, "lr", "head_lr")).items():
        dataset, family, mode, hparams, lr, head_lr = key
        lines.append(
            f"| {dataset} | {family} | {mode} | {hparams or '-'} | {float(lr):g} | "
            f"{float(head_lr):g} | {runs[0]['trainable']:,} | {runs[0]['metric']} | "
            f"{mean_std([r['validation'] for r in runs])} | {mean_std([r['test'] for r in runs])}"
            f" | {len(runs)} | {statistics.mean(r['wall_seconds'] for r in runs):.0f} |")
    return lines


def write_markdown(rows: Sequence[dict], path: pathlib.Path, tune_seed: int | None = None) -> None:
    how = (f"tuned on seed {tune_seed}, the other seeds run at its choice" if tune_seed is not None
           else "tuned on every seed separately")
    lines = [f"## Chosen on validation ({how})", "",
             "The test metric of each method at the lr and head lr with the best final "
             "validation metric (ties: lower validation loss, then smaller lr, then smaller "
             "head lr). `grid edge`: the choice is the smallest or largest value tried, so the "
             "grid should be widened.", ""]
    lines += chosen_table(rows, tune_seed)
    waiting = selection.unsettled(rows, tune_seed)
    if waiting:
        lines += ["", f"Tuning not finished for {len(waiting)} method(s): "
                  + "; ".join(" ".join(str(k) for k in key if k not in ("", "-"))
                              for key in waiting[:10]) + (" ..." if len(waiting) > 10 else "")]
    lines += ["", "## Every run", ""] + runs_table(rows)
    unfinished = [r for r in rows if r["status"] not in ("done",)]
    if unfinished:
        lines += ["", "Not finished:", ""] + [
            f"- {r['status']}: `{r.get('workdir') or ' '.join(str(r[k]) for k in GROUP)}`"
            + (f": {r['error']}" if r.get("error") else "") for r in unfinished]
    path.write_text("\n".join(lines) + "\n")


def verdict(ours: Sequence[float], theirs: Sequence[float], metric: str = "") -> str:
    """'wins', 'ties' or 'loses' for the mean of ``ours`` against the mean of ``theirs``: a
    difference no larger than the larger of the two sample stds (the seed-to-seed noise) is a
    tie; with a single value on either side, only an exact equality is. A higher mean wins,
    or a lower one for a ``metric`` in ``surm.metrics.LOWER_IS_BETTER`` (perplexity)."""
    a, b = statistics.mean(ours), statistics.mean(theirs)
    noise = max(statistics.stdev(v) if len(v) > 1 else 0.0 for v in (ours, theirs))
    if abs(a - b) <= noise:
        return "ties"
    return "wins" if metrics.better(a, b, metric) else "loses"
