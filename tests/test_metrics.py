"""Metrics against independent formulas (numpy/scipy)."""
import numpy as np
import pytest
import scipy.stats

from surm import metrics

rng = np.random.default_rng(0)
LABELS = rng.integers(0, 2, 200)
PRED = np.where(rng.random(200) < 0.7, LABELS, 1 - LABELS)


def test_mcc_is_the_correlation_of_binary_variables():
    np.testing.assert_allclose(metrics.mcc(PRED, LABELS), np.corrcoef(PRED, LABELS)[0, 1])
    assert metrics.mcc(np.zeros(10), LABELS[:10]) == 0.0  # degenerate: defined as 0


def test_f1_and_accuracy():
    tp = np.sum((PRED == 1) & (LABELS == 1))
    precision, recall = tp / np.sum(PRED == 1), tp / np.sum(LABELS == 1)
    np.testing.assert_allclose(metrics.f1(PRED, LABELS),
                               2 * precision * recall / (precision + recall))
    assert metrics.accuracy(PRED, LABELS) == np.mean(PRED == LABELS)


def test_compute_from_logits_and_scores():
    logits = np.stack([1 - PRED, PRED], axis=1).astype(float)
    got = metrics.compute(("accuracy", "mcc", "f1"), logits, LABELS)
    assert got["accuracy"] == metrics.accuracy(PRED, LABELS)
    scores = rng.standard_normal(50)
    target = scores + 0.5 * rng.standard_normal(50)
    got = metrics.compute(("pearson", "spearman"), scores, target)
    np.testing.assert_allclose(got["pearson"], np.corrcoef(scores, target)[0, 1])
    np.testing.assert_allclose(got["spearman"], np.corrcoef(scipy.stats.rankdata(scores),
                                                            scipy.stats.rankdata(target))[0, 1])
    with pytest.raises(ValueError, match="unknown metric"):
        metrics.compute(("bleu",), logits, LABELS)
