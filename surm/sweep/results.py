"""Result tables of a sweep: the methods at their chosen tuned values, how each compares with a
reference method, and every run.

``results.md`` holds two tables. *Chosen on validation*: one row per (dataset, method), the
test metric (mean ± sample std over seeds) of the runs at the tuned values chosen on validation
(``surm.sweep.selection``), the chosen lr and head lr, how many settings were tried, a flag
where a choice sits at the edge of its grid, how much validation still rose over the last
third of the runs (``late gain``: a run that has not flattened shows it), and the paired
comparison with the reference method (``compare``; ``surm.sweep.stats``): the difference, its
confidence interval at the comparison's Holm level, the p-value, the Holm-adjusted p over the
table's comparisons and the verdict. *Every run*: one row per (dataset, method, lr, head_lr),
for looking at how a method depends on its lr. ``comparisons.csv`` holds each comparison's
numbers.
"""
from __future__ import annotations

import collections
import csv
import json
import pathlib
import statistics
from typing import Iterable, Mapping, Sequence

import numpy as np

from surm import metrics
from surm.peft import spec as peft_spec
from surm.sweep import archive, selection, stats
from surm.sweep.grid import SweepError, structure_of

GROUP = ("dataset", "method", "structure", "hparams")


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


def chosen_table(rows: Sequence[dict], tune_seed: int | None = None,
                 reference: str | None = None) -> list[str]:
    """The markdown lines of the *chosen on validation* table and the note on its
    comparisons."""
    picked = selection.select(rows, tune_seed)
    ref, judged = compare(picked, reference)
    lines = ["| dataset | method | structure | hparams | trainable | metric | test (mean ± std) | "
             "validation | late gain | chosen lr | chosen head lr | tried | grid edge | seeds | "
             f"Δ vs {_method_name(ref) if ref else 'reference'} | CI | p | p_holm | verdict |",
             "|---|---|---|---|---:|---|---|---|---:|---|---|---:|---|---:|---:|---|---:|---:|---|"]
    verdicts = {key: v for key, v in judged}
    majority = majority_rates(picked)
    for key, runs in group(picked).items():
        dataset, method, structure, hparams = key
        failed = max(r["failed"] for r in runs)
        edges = sorted({e for r in runs for e in r["edge"].split("; ") if e})
        test = mean_std([r["test"] for r in runs])
        if dataset in majority and runs[0]["metric"] == "accuracy" and (
                statistics.mean(r["test"] for r in runs) <= majority[dataset]):
            test += " (≤ majority)"
        v = verdicts.get(key)
        cells = (["reference", "", "", "", ""] if ref is not None and key[1:] == ref else
                 ["-"] * 5 if v is None else
                 [f"{v.comparison.delta:+.4f}", f"[{v.ci[0]:+.4f}, {v.ci[1]:+.4f}]",
                  f"{v.comparison.p:.2g}", f"{v.p_holm:.2g}", v.outcome])
        lines.append(
            f"| {dataset} | {method} | {structure} | {hparams or '-'} | {runs[0]['trainable']:,} | "
            f"{runs[0]['metric']} | {test} | {mean_std([r['validation'] for r in runs])} | "
            f"{_format_gain(late_gain(runs))} | "
            f"{format_chosen([r['lr'] for r in runs])} | "
            f"{format_chosen([r['head_lr'] for r in runs])} | "
            f"{runs[0]['tried']}{f' ({failed} failed)' if failed else ''} | "
            f"{', '.join(edges) or '-'} | {len(runs)} | " + " | ".join(cells) + " |")
    if judged:
        tests = sorted({v.comparison.test for _, v in judged})
        family = judged[0][1].family
        waiting = (f" ({family - len(judged)} of them without a seed in common with the "
                   "reference yet: `-`, counted at p = 1)" if family > len(judged) else "")
        lines += ["", f"Each method against {_method_name(ref)} on the same dataset, paired by "
                  f"seed ({'; '.join(tests)}: `surm.sweep.stats`). Holm-corrected over the "
                  f"{family} comparisons of this table{waiting}: `p_holm`, and the CI at each "
                  f"comparison's Holm level; a win or a loss when p_holm < {stats.ALPHA}."]
    if majority:
        lines += ["", "Majority class (the best constant prediction on test): " + ", ".join(
            f"{d} {m:.4f}" for d, m in majority.items()) + "; a cell at or below it is flagged."]
    return lines


def _method_name(key: Sequence[str]) -> str:
    """'lora lowrank rank=1', 'houlsby rank=12', 'probe'."""
    method, structure, hparams = key
    return " ".join(filter(None, [method, structure_of(structure), hparams]))


def _format_gain(gain: float | None) -> str:
    return "-" if gain is None else f"{gain:+.4f}"


def late_gain(runs: Sequence[Mapping]) -> float | None:
    """How much the validation metric improved over the last third of the runs (mean over
    seeds; positive: still improving), from their curves; None without at least two passes
    after step 0."""
    gains = []
    for r in runs:
        points = sorted(dict((s, v) for s, v in json.loads(r.get("curve") or "[]")
                             if s > 0).items())
        if len(points) < 2:
            continue
        last_step, last = points[-1]
        earlier = min(points[:-1], key=lambda p: abs(p[0] - 2 * last_step / 3))
        gains.append(metrics.better_sign(str(r["metric"])) * (last - earlier[1]))
    return statistics.mean(gains) if gains else None


def majority_rates(rows: Sequence[Mapping]) -> dict[str, float]:
    """{dataset: the accuracy of the best constant prediction on its test split} for the
    classification datasets whose rows point to stored predictions."""
    out = {}
    for row in rows:
        if row["dataset"] in out or row.get("metric") != "accuracy":
            continue
        scores = archive.load_scores(row.get("predictions", ""))
        if scores is not None and "label" in scores:
            counts = np.bincount(np.asarray(scores["label"], np.int64))
            out[row["dataset"]] = float(counts.max() / counts.sum())
    return out


# ---- paired comparisons -------------------------------------------------------------------------

def outcomes(runs: Sequence[Mapping], metric: str) -> stats.Outcomes | None:
    """The per-example test outcomes of runs (one per seed, in order) from their stored
    predictions; None when any run has none."""
    scores = [archive.load_scores(r.get("predictions", "")) for r in runs]
    if not scores or any(s is None for s in scores):
        return None
    index = scores[0]["index"]
    if any(not np.array_equal(s["index"], index) for s in scores):
        raise SweepError(f"the runs of {runs[0]['dataset']} were tested on different examples "
                         f"(e.g. {runs[0].get('workdir')}); paired statistics need the same "
                         f"test split")
    return stats.Outcomes.stack(metric, [{k: v for k, v in s.items() if k != "index"}
                                         for s in scores])


def compare_runs(ours: Sequence[Mapping], theirs: Sequence[Mapping]) -> stats.Comparison | None:
    """``ours`` against ``theirs`` over the seeds both ran (paired by seed), from the rows'
    test metrics and, where stored, their per-example predictions; None without a common
    seed."""
    a = {str(r["seed"]): r for r in ours}
    b = {str(r["seed"]): r for r in theirs}
    seeds = sorted(set(a) & set(b), key=lambda s: (len(s), s))
    if not seeds:
        return None
    metric = str(ours[0]["metric"])
    runs_a, runs_b = [a[s] for s in seeds], [b[s] for s in seeds]
    oa, ob = outcomes(runs_a, metric), outcomes(runs_b, metric)
    values = ([float(r["test"]) for r in runs_a], [float(r["test"]) for r in runs_b])
    if oa is None or ob is None:
        return stats.compare(*values)
    return stats.compare(*values, oa, ob)


def find_reference(groups: Mapping[tuple, list], reference: str | None) -> tuple[str, str, str]:
    """The (method, structure, hparams) of the reference method: ``reference`` is a --families
    item, ``FAMILY[:K=V[:K=V...]]`` (e.g. ``lowrank:rank=8``: a structure by any method, or a
    method without one); by default LoRA (the smallest lowrank), else the linear probe, else
    full fine-tuning, else the first method."""
    methods = sorted({key[1:] for key in groups}, key=lambda m: (
        min(runs[0]["trainable"] for k, runs in groups.items() if k[1:] == m), m))
    if reference:
        family, *pairs = reference.split(":")
        wanted = {p.strip() for p in pairs if p.strip()}
        found = [m for m in methods if _is_item(m, family) and wanted <= set(m[2].split(","))]
        if len(found) != 1:
            raise SweepError(f"--reference {reference!r} matches {len(found)} methods of "
                             f"{', '.join(map(_method_name, methods))}; name one, e.g. "
                             f"lowrank:rank=8")
        return found[0]
    for family in ("lowrank", "linear_probe", "full"):
        found = [m for m in methods if _is_item(m, family)]
        if found:
            return found[0]
    return methods[0]


def _is_item(method: Sequence[str], family: str) -> bool:
    """Whether (method, structure, hparams) is what the --families item ``family`` runs."""
    if family in peft_spec.BASELINES:
        return method[0] == peft_spec.from_family(family)[0]
    return method[1] == family


def compare(picked: Sequence[dict], reference: str | None = None, alpha: float = stats.ALPHA,
            ) -> tuple[tuple[str, str, str] | None, list[tuple[tuple, stats.Verdict]]]:
    """Every method at its chosen values against the reference on each dataset, judged
    together (Holm over all of them): the reference's (method, structure, hparams) and
    [((dataset, method, structure, hparams), Verdict)]. A method with no seed in common with
    the reference on a dataset (or none of the reference's runs there) is not compared yet,
    but counts in the correction (at p = 1), so the verdicts stand when it is."""
    groups = group(picked)
    if not groups:
        return None, []
    ref = find_reference(groups, reference)
    pairs, pending = [], 0
    for key, runs in groups.items():
        if key[1:] == ref:
            continue
        theirs = groups.get((key[0], *ref))
        c = compare_runs(runs, theirs) if theirs else None
        if c is None:
            pending += 1
        else:
            pairs.append((key, c))
    if not pairs:
        return ref, []
    verdicts = stats.judge([c for _, c in pairs], str(picked[0]["metric"]), alpha, pending)
    return ref, [(key, v) for (key, _), v in zip(pairs, verdicts)]


def runs_table(rows: Sequence[dict]) -> list[str]:
    """The markdown lines of the *every run* table."""
    lines = ["| dataset | method | structure | hparams | lr | head lr | trainable | metric | "
             "validation | test | seeds | wall s |",
             "|---|---|---|---|---:|---:|---:|---|---|---|---:|---:|"]
    for key, runs in group(rows, (*GROUP, "lr", "head_lr")).items():
        dataset, method, structure, hparams, lr, head_lr = key
        lines.append(
            f"| {dataset} | {method} | {structure} | {hparams or '-'} | {float(lr):g} | "
            f"{float(head_lr):g} | {runs[0]['trainable']:,} | {runs[0]['metric']} | "
            f"{mean_std([r['validation'] for r in runs])} | {mean_std([r['test'] for r in runs])}"
            f" | {len(runs)} | {statistics.mean(r['wall_seconds'] for r in runs):.0f} |")
    return lines


def write_markdown(rows: Sequence[dict], path: pathlib.Path, tune_seed: int | None = None,
                   reference: str | None = None) -> None:
    how = (f"tuned on seed {tune_seed}, the other seeds run at its choice" if tune_seed is not None
           else "tuned on every seed separately")
    lines = [f"## Chosen on validation ({how})", "",
             "The test metric of each method at the lr and head lr with the best final "
             "validation metric (ties: lower validation loss, then smaller lr, then smaller "
             "head lr); the model tested is the one after the last step. `grid edge`: the "
             "choice is the smallest or largest value tried, so the grid should be widened. "
             "`late gain`: the change of validation over the last third of the runs (mean over "
             "seeds, in the direction that is better); a large one means the runs had not "
             "flattened.", ""]
    lines += chosen_table(rows, tune_seed, reference)
    waiting = selection.unsettled(rows, tune_seed)
    if waiting:
        lines += ["", f"Tuning not finished for {len(waiting)} method(s): "
                  + "; ".join(" ".join(str(k) for k in key if k not in ("", "-"))
                              for key in waiting[:10]) + (" ..." if len(waiting) > 10 else "")]
    lines += ["", "## Every run", ""] + runs_table(rows)
    unfinished = [r for r in rows if r["status"] not in ("done",)]
    if unfinished:
        lines += ["", f"Not finished ({sum(r['status'] == 'failed' for r in unfinished)} "
                  f"failed):", ""] + [
            f"- {r['status']}: `{r.get('workdir') or ' '.join(str(r[k]) for k in GROUP)}`"
            + (f": {r['error']}" if r.get("error") else "") for r in unfinished]
    path.write_text("\n".join(lines) + "\n")


COMPARISON_HEAD = ["dataset", "method", "structure", "hparams", "reference", "metric", "seeds",
                   "examples", "delta", "ci_low", "ci_high", "level", "p", "p_holm", "mde",
                   "test", "verdict"]


def write_comparisons(rows: Sequence[dict], path: pathlib.Path, tune_seed: int | None = None,
                      reference: str | None = None) -> list[dict]:
    """``comparisons.csv``: one row per comparison of the chosen table (``compare``)."""
    ref, judged = compare(selection.select(rows, tune_seed), reference)
    out = []
    for (dataset, method, structure, hparams), v in judged:
        c = v.comparison
        out.append({"dataset": dataset, "method": method, "structure": structure,
                    "hparams": hparams,
                    "reference": _method_name(ref), "metric": rows[0]["metric"],
                    "seeds": c.seeds, "examples": c.examples or "", "delta": c.delta,
                    "ci_low": v.ci[0], "ci_high": v.ci[1], "level": v.level, "p": c.p,
                    "p_holm": v.p_holm, "mde": v.mde, "test": c.test, "verdict": v.outcome})
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, COMPARISON_HEAD)
        writer.writeheader()
        writer.writerows(out)
    return out
