"""Evaluation metrics over whole splits (host side, numpy/scipy).

accuracy; mcc (Matthews correlation, CoLA); f1 (binary, positive class 1: MRPC, QQP);
pearson and spearman (STS-B, on the regression output). A higher value is better, except for
the metrics in ``LOWER_IS_BETTER`` (a language model's perplexity: `surm.lm`).
"""
from __future__ import annotations

from typing import Iterable

import numpy as np


def accuracy(pred, label) -> float:
    return float(np.mean(np.asarray(pred) == np.asarray(label)))


def mcc(pred, label) -> float:
    pred, label = np.asarray(pred), np.asarray(label)
    tp = float(np.sum((pred == 1) & (label == 1)))
    tn = float(np.sum((pred == 0) & (label == 0)))
    fp = float(np.sum((pred == 1) & (label == 0)))
    fn = float(np.sum((pred == 0) & (label == 1)))
    denom = np.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    return float((tp * tn - fp * fn) / denom) if denom else 0.0


def f1(pred, label) -> float:
    pred, label = np.asarray(pred), np.asarray(label)
    tp = np.sum((pred == 1) & (label == 1))
    denom = np.sum(pred == 1) + np.sum(label == 1)
    return float(2 * tp / denom) if denom else 0.0


# scipy.stats is imported where it is used: it takes seconds to import, and only the regression
# metrics need it.
def pearson(score, label) -> float:
    import scipy.stats
    return float(scipy.stats.pearsonr(score, label)[0])


def spearman(score, label) -> float:
    import scipy.stats
    return float(scipy.stats.spearmanr(score, label)[0])


# Metrics where a lower value is better; every other one: higher.
LOWER_IS_BETTER = frozenset({"perplexity", "loss"})


def better_sign(metric: str) -> float:
    """+1 when a higher ``metric`` is better, -1 when a lower one is."""
    return -1.0 if metric in LOWER_IS_BETTER else 1.0


def better(a: float, b: float, metric: str) -> bool:
    """Whether ``a`` is strictly better than ``b`` as values of ``metric``."""
    return better_sign(metric) * (a - b) > 0


_CLASSIFICATION = {"accuracy": accuracy, "mcc": mcc, "f1": f1}
_REGRESSION = {"pearson": pearson, "spearman": spearman}
METRICS = tuple(_CLASSIFICATION) + tuple(_REGRESSION)


def compute(names: Iterable[str], outputs: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """``outputs``: logits (N, classes) or regression scores (N,)."""
    result = {}
    for name in names:
        if name in _CLASSIFICATION:
            result[name] = _CLASSIFICATION[name](np.argmax(outputs, axis=-1), labels)
        elif name in _REGRESSION:
            result[name] = _REGRESSION[name](outputs, labels)
        else:
            raise ValueError(f"unknown metric {name!r}; known: {', '.join(METRICS)}")
    return result
