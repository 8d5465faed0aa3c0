"""surm.sweep.stats: paired tests against scipy, Holm against its step-down definition, the
bootstrap against the analytic paired-proportion error, and the error rates of the verdicts."""
import math
import pathlib

import numpy as np
import pytest
import scipy.stats

from surm import lm, metrics
from surm.sweep import stats


def test_paired_t_is_scipys_paired_test_and_interval():
    rng = np.random.default_rng(0)
    a = 0.7 + 0.01 * rng.standard_normal(5)
    b = a - 0.004 + 0.003 * rng.standard_normal(5)
    c = stats.paired_t(a, b)
    ref = scipy.stats.ttest_rel(a, b)
    assert c.delta == pytest.approx(np.mean(a - b))
    assert c.p == pytest.approx(ref.pvalue)
    for level in (0.95, 0.99):
        lo, hi = ref.confidence_interval(level)
        assert c.interval(level) == pytest.approx((lo, hi))


def _holm_rejects(p, alpha):
    """Holm's procedure as usually stated: sort, reject while p_(k) <= alpha / (m - k)."""
    order = np.argsort(p)
    rejected = set()
    for k, i in enumerate(order):
        if p[i] > alpha / (len(p) - k):
            break
        rejected.add(int(i))
    return rejected


def test_holm_adjusted_p_rejects_what_the_step_down_procedure_rejects():
    rng = np.random.default_rng(1)
    for _ in range(200):
        p = rng.uniform(0, 0.1, size=rng.integers(1, 9)) ** rng.uniform(1, 3)
        adjusted = stats.holm(p)
        assert all(q >= x for q, x in zip(adjusted, p)) and max(adjusted) <= 1
        for alpha in (0.01, 0.05, 0.1):
            assert {i for i, q in enumerate(adjusted) if q < alpha} == _holm_rejects(p, alpha)


def test_a_verdicts_interval_excludes_zero_exactly_when_holm_rejects():
    rng = np.random.default_rng(2)
    for _ in range(50):
        comps = [stats.paired_t(a, a - shift + 0.01 * rng.standard_normal(5))
                 for a, shift in ((rng.standard_normal(5), rng.uniform(-0.03, 0.03))
                                  for _ in range(6))]
        for v in stats.judge(comps, "accuracy"):
            lo, hi = v.ci
            assert (v.outcome != "no detectable difference") == (v.p_holm < 0.05)
            assert (lo > 0 or hi < 0) == (v.p_holm < 0.05)
            assert (v.outcome == "win") == (lo > 0)


def test_a_partial_tables_verdicts_stand_when_its_other_comparisons_come_in():
    """Comparisons still waiting for their runs count at p = 1: a win or loss called on part of
    a table is still one once the whole table is judged, and the part is never judged more
    leniently than the whole (Holm over the part alone is)."""
    rng = np.random.default_rng(4)
    lenient = 0
    for _ in range(100):
        comps = [stats.paired_t(a, a - rng.uniform(-0.03, 0.03) + 0.01 * rng.standard_normal(5))
                 for a in (rng.standard_normal(5) for _ in range(6))]
        k = int(rng.integers(1, 6))
        part = stats.judge(comps[:k], "accuracy", pending=len(comps) - k)
        whole = stats.judge(comps, "accuracy")[:k]
        alone = stats.judge(comps[:k], "accuracy")
        for p, w, a in zip(part, whole, alone):
            assert p.p_holm >= w.p_holm - 1e-12 and p.ci[0] <= w.ci[0] and p.ci[1] >= w.ci[1]
            if p.outcome != "no detectable difference":
                assert w.outcome == p.outcome
            lenient += a.outcome != "no detectable difference" and w.outcome == (
                "no detectable difference")
    assert lenient > 0  # judging the finished part alone would have called some too early


def test_a_lower_perplexity_wins():
    a, b = [30.0, 30.1, 29.9, 30.2, 30.0], [31.0, 31.2, 30.9, 31.1, 31.0]
    v, = stats.judge([stats.compare(a, b)], "perplexity")
    assert v.outcome == "win" and v.comparison.delta < 0
    v, = stats.judge([stats.compare(b, a)], "perplexity")
    assert v.outcome == "loss"


def _one_seed(right_a, right_b):
    label = np.zeros((1, len(right_a)), np.int32)
    return (stats.Outcomes("accuracy", {"predicted": 1 - right_a[None], "label": label}),
            stats.Outcomes("accuracy", {"predicted": 1 - right_b[None], "label": label}))


def test_bootstrap_over_examples_has_the_paired_proportion_standard_error():
    rng = np.random.default_rng(3)
    n = 3000
    right_a = (rng.uniform(size=n) < 0.75).astype(np.int32)
    right_b = np.where(rng.uniform(size=n) < 0.1, 1 - right_a, right_a)
    a, b = _one_seed(right_a, right_b)
    boot = stats.hierarchical_bootstrap(a, b, replicates=4000)
    only_a, only_b = np.mean(right_a > right_b), np.mean(right_b > right_a)
    analytic = math.sqrt((only_a + only_b - (only_a - only_b) ** 2) / n)
    assert boot.delta == pytest.approx(only_a - only_b)
    assert boot.se == pytest.approx(analytic, rel=0.08)


def test_mcnemar_is_the_exact_binomial_test_of_the_discordant_examples():
    right_a = np.array([1] * 10 + [0] * 5 + [1] * 20, np.int32)
    right_b = np.array([0] * 10 + [0] * 5 + [1] * 20, np.int32)
    a, b = _one_seed(right_a, right_b)
    c = stats.mcnemar(a, b)
    assert c.p == pytest.approx(2 * 0.5 ** 10)
    assert c.delta == pytest.approx(10 / 35)
    # one seed: the decision is McNemar's and the bootstrap's, never a t-test on one value
    assert "McNemar" in stats.compare([0.9], [0.6], a, b).test


def test_per_seed_metrics_from_outcomes_are_the_logged_ones():
    rng = np.random.default_rng(4)
    pred, label = rng.integers(0, 2, (3, 200)), rng.integers(0, 2, (3, 200))
    for name in ("accuracy", "f1", "mcc"):
        o = stats.Outcomes(name, {"predicted": pred, "label": label})
        onehot = np.eye(2)[pred]  # metrics.compute takes outputs (argmax'ed)
        want = [metrics.compute([name], onehot[s], label[s])[name] for s in range(3)]
        np.testing.assert_allclose(o.per_seed(), want, rtol=1e-12)
    nll, tokens = rng.uniform(50, 90, (2, 30)), rng.integers(20, 40, (2, 30)).astype(float)
    o = stats.Outcomes("perplexity", {"nll": nll, "tokens": tokens})
    want = [lm.perplexity(np.stack([nll[s], tokens[s]], 1))["perplexity"] for s in range(2)]
    np.testing.assert_allclose(o.per_seed(), want, rtol=1e-12)
    value, target = rng.standard_normal((2, 40)), rng.standard_normal((2, 40))
    o = stats.Outcomes("spearman", {"value": value, "label": target})
    want = [scipy.stats.spearmanr(value[s], target[s])[0] for s in range(2)]
    np.testing.assert_allclose(o.per_seed(), want, rtol=1e-12)


def test_unpaired_outcomes_are_refused():
    a = stats.Outcomes("accuracy", {"predicted": np.zeros((3, 10)), "label": np.zeros((3, 10))})
    b = stats.Outcomes("accuracy", {"predicted": np.zeros((2, 10)), "label": np.zeros((2, 10))})
    with pytest.raises(ValueError, match="same seeds and test examples"):
        stats.hierarchical_bootstrap(a, b)


@pytest.mark.parametrize("seeds", [3, 5])
def test_no_true_difference_is_rarely_called_and_two_stds_mostly_are(seeds):
    """500 simulated pairs of methods with the record's noise (seed std 0.01, 90% of it shared
    through the seed, 1000 test examples): with no true difference at most 7% are called a
    win or a loss; with a true difference of 2 seed stds most are called a win."""
    kw = dict(repetitions=500, examples=1000, replicates=300)
    assert stats.simulate(seeds, 0.0, **kw) <= 0.07
    assert stats.simulate(seeds, 0.0, shared=0.0, rng_seed=1, **kw) <= 0.07  # no pairing
    assert stats.simulate(seeds, 2.0, **{**kw, "repetitions": 200}) > 0.5


@pytest.mark.parametrize("kind", ["classification", "regression", "causal_lm"])
def test_a_records_archive_keeps_each_kind_of_prediction_and_its_verdict(kind, tmp_path):
    """A record's archive (surm.sweep.archive) holds every kind of test prediction, a causal
    LM's blocks (no labels) included: read back, they are the runs' own outcomes and give the
    comparison the workdirs' files gave."""
    from surm import predictions
    from surm.sweep import archive, results
    rng = np.random.default_rng(7)
    n, metric = 40, {"classification": "accuracy", "regression": "spearman",
                     "causal_lm": "perplexity"}[kind]
    label = rng.integers(0, 3, n) if kind == "classification" else rng.standard_normal(n)
    rows = []
    for method in ("a", "b"):
        for seed in range(3):
            outputs = {"classification": lambda: rng.standard_normal((n, 3)),
                       "regression": lambda: label[:, None] + rng.standard_normal((n, 1)),
                       "causal_lm": lambda: np.stack([rng.uniform(50, 90, n),
                                                      rng.integers(20, 40, n)], 1)}[kind]()
            file = tmp_path / "gone" / f"{method}{seed}.npz"
            order = rng.permutation(n)  # as evaluation batches them: sorted when stored
            pred = predictions.make(kind, order, outputs,
                                    None if kind == "causal_lm" else label[order], (metric,))
            predictions.write(file, pred)
            rows.append(dict(dataset="d", method=method, structure="-", hparams="", lr="0.01",
                             head_lr="0.01", seed=seed, status="done", metric=metric,
                             test=predictions.metrics(pred)[metric], predictions=str(file)))
    before = results.compare_runs(rows[:3], rows[3:])
    want = [archive.load_scores(r["predictions"]) for r in rows]
    archived = archive.write(rows, tmp_path / "rec.csv")
    for row in rows:
        pathlib.Path(row["predictions"]).unlink()  # the workdirs gone: the archive alone
    for row, scores in zip(archived, want):
        got = archive.load_scores(row["predictions"])
        assert sorted(got) == sorted(scores)
        for name in scores:
            np.testing.assert_array_equal(got[name], scores[name])
    after = results.compare_runs(archived[:3], archived[3:])
    assert "bootstrap" in after.test and after.test == before.test
    assert (after.delta, after.p, after.interval()) == (before.delta, before.p,
                                                         before.interval())
