"""Paired comparisons of two methods, and a correction for comparing many.

Two methods run with the same seeds are paired: a seed fixes the k-shot subset, the data order
and the initialisation, and both are tested on the same examples. A comparison of method A
with method B (``compare``) reports the difference ``delta`` = mean over seeds of A's test
metric minus B's, in the metric's units, with a confidence interval and a p-value from:

- **a paired t-test over seeds** (``paired_t``, scipy.stats.ttest_rel): the seed-to-seed noise
  of the difference, with the t distribution's small-sample width; it holds the test examples
  fixed;
- **a hierarchical paired bootstrap** (``hierarchical_bootstrap``) from the stored per-example
  predictions (``surm.predictions``): each replicate resamples the seeds and, crossed with
  them, the test examples, both methods alike; the interval is ``delta ± z * se`` with the
  replicates' standard error (a normal bootstrap interval, smooth at any corrected level). It
  holds the test set's own sampling noise, which the t-test ignores;
- with one seed, **McNemar's exact test** (scipy.stats.binomtest on the examples only one of the
  two got right) for accuracy, beside the bootstrap over examples.

A difference is *detected* only when every one of these that applies says so: the decision's
p-value is the largest of theirs and its interval the hull of their intervals, so neither the
few seeds (where a bootstrap over 3 seeds is far too narrow) nor a small test set (which the
t-test ignores) can make a win out of noise.

A table compares many pairs; ``holm`` adjusts their p-values (Holm's step-down, which controls
the chance of any false win or loss in the table at ``alpha``; comparisons of the table still
waiting for their runs count at p = 1, so a partial table's verdicts hold when it completes),
and ``judge`` states each verdict: ``win`` / ``loss`` when the Holm-adjusted p is below
``alpha``, else ``no detectable difference``, with the interval at the comparison's Holm level
(``1 - alpha / (m - rank)``), and the smallest difference the design could have detected
(``mde``: 80% power at that level).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Mapping, Sequence

import numpy as np
import scipy.stats

from surm import metrics as metrics_lib

ALPHA = 0.05
POWER = 0.8  # for the smallest detectable difference
BOOTSTRAP_REPLICATES = 2000
_CHUNK = 250  # bootstrap replicates per matrix product


@dataclasses.dataclass(frozen=True)
class Outcomes:
    """What one method predicted on the test examples, over its seeds: ``arrays`` of shape
    (seeds, examples), the same seeds (in the same order) and examples for every method that
    is compared with it. Classification: ``predicted`` and ``label``; regression: ``value``
    and ``label``; causal LM: ``nll`` and ``tokens`` (``surm.predictions.scores``)."""

    metric: str
    arrays: Mapping[str, np.ndarray]

    @property
    def shape(self) -> tuple[int, int]:
        return next(iter(self.arrays.values())).shape

    @classmethod
    def stack(cls, metric: str, per_seed: Sequence[Mapping[str, np.ndarray]]) -> "Outcomes":
        """From one ``surm.predictions.scores`` dict per seed."""
        keys = per_seed[0].keys()
        return cls(metric, {k: np.stack([np.asarray(s[k]) for s in per_seed]) for k in keys})

    def per_seed(self) -> np.ndarray:
        """The metric of each seed over all examples, (seeds,)."""
        n = self.shape[1]
        return _weighted(self, np.ones((n, 1)))[:, 0]


@dataclasses.dataclass(frozen=True)
class Comparison:
    """A minus B. ``se`` and ``df`` define the interval at any level (``interval``); ``p`` is
    two-sided; ``tests`` the components that decided (each a Comparison)."""

    delta: float
    se: float
    p: float
    df: float  # degrees of freedom of the t quantile; math.inf: normal
    test: str
    seeds: int
    examples: int | None = None
    tests: tuple["Comparison", ...] = ()

    def interval(self, level: float = 1 - ALPHA) -> tuple[float, float]:
        """The confidence interval at ``level``: the hull of the components' intervals."""
        if self.tests:
            parts = [t.interval(level) for t in self.tests if math.isfinite(t.se)]
            if parts:
                return min(a for a, _ in parts), max(b for _, b in parts)
        if not math.isfinite(self.se):
            return -math.inf, math.inf
        q = _quantile(1 - (1 - level) / 2, self.df)
        return self.delta - q * self.se, self.delta + q * self.se

    def detectable(self, level: float = 1 - ALPHA, power: float = POWER) -> float:
        """The smallest true difference this design detects with probability ``power`` at a
        two-sided ``level`` (the largest over the components)."""
        if self.tests:
            return max((t.detectable(level, power) for t in self.tests
                        if math.isfinite(t.se)), default=math.inf)
        if not math.isfinite(self.se):
            return math.inf
        return (_quantile(1 - (1 - level) / 2, self.df) + _quantile(power, self.df)) * self.se


def _quantile(q: float, df: float) -> float:
    return float(scipy.stats.norm.ppf(q) if math.isinf(df) else scipy.stats.t.ppf(q, df))


# ---- the tests ----------------------------------------------------------------------------------

def paired_t(a: Sequence[float], b: Sequence[float]) -> Comparison:
    """The paired t-test over seeds of per-seed metrics ``a`` and ``b`` (same seed order)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"paired values need the same seeds: {a.shape} vs {b.shape}")
    d = a - b
    n = len(d)
    if n < 2:
        return Comparison(float(d.mean()), math.inf, 1.0, math.inf, "paired t over seeds", n)
    se = float(d.std(ddof=1) / math.sqrt(n))
    if se == 0.0:  # identical differences on every seed: the t statistic is undefined
        p = 1.0 if d[0] == 0 else 0.0
    else:
        p = float(scipy.stats.ttest_rel(a, b).pvalue)
    return Comparison(float(d.mean()), se, p, n - 1, "paired t over seeds", n)


def hierarchical_bootstrap(a: Outcomes, b: Outcomes, replicates: int = BOOTSTRAP_REPLICATES,
                           seed: int = 0) -> Comparison:
    """Resamples seeds and test examples (crossed, both methods alike) ``replicates`` times;
    the standard error of the mean per-seed difference over the replicates."""
    _check_paired(a, b)
    seeds, n = a.shape
    rng = np.random.default_rng(seed)
    observed = float(np.mean(a.per_seed() - b.per_seed()))
    deltas = []
    for start in range(0, replicates, _CHUNK):
        size = min(_CHUNK, replicates - start)
        drawn = rng.integers(0, n, size=(size, n)) + n * np.arange(size)[:, None]
        weights = np.bincount(drawn.ravel(), minlength=size * n).reshape(size, n).T.astype(
            np.float64)  # how often each example is drawn, per replicate
        diff = _weighted(a, weights) - _weighted(b, weights)  # (seeds, size)
        picks = rng.integers(0, seeds, size=(size, seeds))  # seeds drawn per replicate
        deltas.append(diff[picks, np.arange(size)[:, None]].mean(axis=1))
    se = float(np.std(np.concatenate(deltas), ddof=1))
    if se == 0.0:
        p = 1.0 if observed == 0 else 0.0
    else:
        p = float(2 * scipy.stats.norm.sf(abs(observed) / se))
    test = "bootstrap over seeds x examples" if seeds > 1 else "bootstrap over examples"
    return Comparison(observed, se, p, math.inf, test, seeds, n)


def mcnemar(a: Outcomes, b: Outcomes) -> Comparison:
    """McNemar's exact test on one seed's predictions: of the examples exactly one method got
    right, is A's share different from one half (scipy.stats.binomtest)."""
    _check_paired(a, b)
    right_a = (a.arrays["predicted"] == a.arrays["label"])[0]
    right_b = (b.arrays["predicted"] == b.arrays["label"])[0]
    only_a, only_b = int(np.sum(right_a & ~right_b)), int(np.sum(right_b & ~right_a))
    n = len(right_a)
    delta = (only_a - only_b) / n
    p = 1.0 if only_a + only_b == 0 else float(
        scipy.stats.binomtest(only_a, only_a + only_b, 0.5).pvalue)
    return Comparison(delta, math.nan, p, math.inf, "McNemar exact", 1, n)


def compare(a_values: Sequence[float], b_values: Sequence[float],
            a: Outcomes | None = None, b: Outcomes | None = None,
            replicates: int = BOOTSTRAP_REPLICATES) -> Comparison:
    """A against B: the paired t-test over seeds on the per-seed metrics, and where per-example
    outcomes are given, the hierarchical bootstrap (and with one seed and accuracy, McNemar);
    the decision's p is the largest of theirs (see the module docstring)."""
    tests = []
    if a is not None and b is not None:
        if len(a_values) != a.shape[0]:
            raise ValueError(f"{len(a_values)} per-seed values for {a.shape[0]} seeds")
        tests.append(hierarchical_bootstrap(a, b, replicates))
        if a.shape[0] == 1 and a.metric == "accuracy":
            tests.append(mcnemar(a, b))
    if len(a_values) >= 2 or not tests:
        tests.insert(0, paired_t(a_values, b_values))
    delta = float(np.mean(np.asarray(a_values, np.float64) - np.asarray(b_values, np.float64)))
    p = max(t.p for t in tests)
    name = " + ".join(t.test for t in tests)
    examples = next((t.examples for t in tests if t.examples), None)
    return Comparison(delta, math.nan, p, math.inf, name, len(a_values), examples, tuple(tests))


# ---- many comparisons ---------------------------------------------------------------------------

def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values (the family-wise error rate over the list)."""
    p = np.asarray(pvalues, np.float64)
    m = len(p)
    order = np.argsort(p, kind="stable")
    adjusted = np.empty(m)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[i]))
        adjusted[i] = running
    return adjusted.tolist()


def holm_levels(pvalues: Sequence[float], alpha: float = ALPHA) -> list[float]:
    """The confidence level at which Holm's procedure tests each comparison: ``1 - alpha /
    (m - rank)`` for the rank-th smallest p while the procedure rejects, and the level of the
    step where it stopped for the rest (so an interval excludes 0 exactly when the adjusted p
    is below ``alpha``)."""
    p = np.asarray(pvalues, np.float64)
    m = len(p)
    levels = np.empty(m)
    stopped = None
    for rank, i in enumerate(np.argsort(p, kind="stable")):
        step = 1 - alpha / (m - rank)
        if stopped is None and p[i] >= alpha / (m - rank):
            stopped = step
        levels[i] = step if stopped is None else stopped
    return levels.tolist()


@dataclasses.dataclass(frozen=True)
class Verdict:
    """One comparison of a table, judged with the table's correction."""

    comparison: Comparison
    p_holm: float
    level: float  # the confidence level of ``ci`` (Holm's level for this comparison)
    ci: tuple[float, float]
    mde: float  # smallest difference detectable with 80% power at ``level``
    outcome: str  # "win", "loss" or "no detectable difference"
    family: int  # the comparisons it was corrected over, those still waiting included

    @property
    def text(self) -> str:
        lo, hi = self.ci
        if self.outcome == "no detectable difference":
            return f"no detectable difference (CI [{lo:+.4f}, {hi:+.4f}])"
        return f"{self.outcome} ({self.comparison.delta:+.4f}, CI [{lo:+.4f}, {hi:+.4f}])"


def judge(comparisons: Sequence[Comparison], metric: str, alpha: float = ALPHA,
          pending: int = 0) -> list[Verdict]:
    """Verdicts for a family of comparisons (A minus B each), Holm-corrected over the family:
    a win when A is better (higher; lower for ``surm.metrics.LOWER_IS_BETTER``) and the
    corrected p is below ``alpha``. ``pending``: comparisons of the same family whose runs
    have not finished, counted at p = 1 until they have; Holm's adjusted p-values only grow
    with any of the family's p-values, so a win or loss called now stands when they come in
    (a "no detectable difference" may still become one)."""
    pvalues = [c.p for c in comparisons] + [1.0] * pending
    adjusted, levels = holm(pvalues), holm_levels(pvalues, alpha)
    out = []
    for c, p_holm, level in zip(comparisons, adjusted, levels):
        ci = c.interval(level)
        detected = p_holm < alpha and not (ci[0] <= 0 <= ci[1])
        outcome = ("no detectable difference" if not detected else
                   "win" if metrics_lib.better_sign(metric) * c.delta > 0 else "loss")
        out.append(Verdict(c, p_holm, level, ci, c.detectable(level), outcome,
                           family=len(pvalues)))
    return out


# ---- metrics on resampled examples ----------------------------------------------------------------

def _check_paired(a: Outcomes, b: Outcomes) -> None:
    if a.metric != b.metric or a.shape != b.shape or a.arrays.keys() != b.arrays.keys():
        raise ValueError(f"unpaired outcomes: {a.metric} {a.shape} vs {b.metric} {b.shape}; "
                         f"compare methods on the same seeds and test examples")
    if "label" in a.arrays and not np.array_equal(a.arrays["label"], b.arrays["label"]):
        raise ValueError("the two methods were tested on different labels: not the same "
                         "test examples")


def _weighted(o: Outcomes, weights: np.ndarray) -> np.ndarray:
    """The metric of every seed under example weights (examples, replicates): (seeds,
    replicates). Sums of per-example terms for accuracy, perplexity, F1 and MCC; the others
    by repeating examples."""
    arr, metric = o.arrays, o.metric
    if metric == "accuracy":
        right = (arr["predicted"] == arr["label"]).astype(np.float64)
        return right @ weights / weights.sum(axis=0)
    if metric == "perplexity":
        nll = arr["nll"].astype(np.float64) @ weights
        return np.exp(np.minimum(nll / (arr["tokens"].astype(np.float64) @ weights), 700.0))
    if metric in ("f1", "mcc"):
        pred, label = arr["predicted"] == 1, arr["label"] == 1
        tp, fp = (pred & label) @ weights, (pred & ~label) @ weights
        fn, tn = (~pred & label) @ weights, (~pred & ~label) @ weights
        if metric == "f1":
            denom = 2 * tp + fp + fn
            return np.divide(2 * tp, denom, out=np.zeros_like(tp), where=denom > 0)
        denom = np.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
        return np.divide(tp * tn - fp * fn, denom, out=np.zeros_like(tp), where=denom > 0)
    if metric not in metrics_lib.METRICS:
        raise ValueError(f"no paired statistics for metric {metric!r}")
    values = arr["value"] if "value" in arr else arr["predicted"]
    out = np.empty((values.shape[0], weights.shape[1]))
    for r in range(weights.shape[1]):
        idx = np.repeat(np.arange(weights.shape[0]), weights[:, r].astype(np.int64))
        for s in range(values.shape[0]):
            out[s, r] = metrics_lib.compute([metric], values[s, idx], arr["label"][s, idx])[metric]
    return out


# ---- the error rates of these verdicts -------------------------------------------------------------

def simulate(seeds: int, delta_in_std: float, repetitions: int = 500, examples: int = 2000,
             std: float = 0.01, shared: float = 0.9, flip: float = 0.06, accuracy: float = 0.7,
             replicates: int = 400, rng_seed: int = 0) -> float:
    """The fraction of ``repetitions`` in which ``compare`` + ``judge`` (one comparison) calls
    method A a win or a loss against B, when A's true accuracy is B's plus ``delta_in_std``
    times the seed-to-seed std of a method (``std``).

    Each repetition draws a test set of ``examples`` (an example's difficulty u ~ U(0, 1)) and,
    for each seed, an accuracy per method: the same ``shared`` share of the seed variance for
    both methods (the subset, order and init the seed fixes) plus each method's own. A method
    gets an example right when u (jittered per method and seed, so that about ``flip`` of the
    examples differ between two runs) is below its accuracy. The defaults follow the study's
    record: seed std about 0.01, the seed explaining about 90% of a method's variance."""
    rng = np.random.default_rng(rng_seed)
    own = std * math.sqrt(1 - shared)
    detected = 0
    for _ in range(repetitions):
        u = rng.uniform(size=examples)
        common = accuracy + std * math.sqrt(shared) * rng.standard_normal(seeds)
        outcomes, values = [], []
        for shift in (delta_in_std * std, 0.0):
            acc = common + shift + own * rng.standard_normal(seeds)
            jitter = rng.uniform(-flip, flip, size=(seeds, examples))
            right = (np.clip(u + jitter, 0, 1) < acc[:, None]).astype(np.int32)
            o = Outcomes("accuracy", {"predicted": right, "label": np.ones_like(right)})
            outcomes.append(o)
            values.append(o.per_seed())
        c = compare(values[0], values[1], *outcomes, replicates=replicates)
        detected += judge([c], "accuracy")[0].outcome != "no detectable difference"
    return detected / repetitions
