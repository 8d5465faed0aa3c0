"""What a run predicted, per example: one compressed ``.npz`` per evaluation, beside
``metrics.jsonl``, from which the logged metrics are recomputed exactly and from which
``surm.sweep.stats`` resamples test examples.

    pred = predictions.read("runs/x/predictions/test_000600.npz")
    predictions.metrics(pred)        # == the test_* values logged at step 600
    predictions.scores(pred)         # per-example outcomes for paired statistics

``WORKDIR/predictions/<role>_<step>.npz`` (``path``) holds, in file order of ``index``:

- ``index`` (int64): the example's position in the evaluated split (validation: the first
  ``input.validation_examples`` of the stored order; causal LM: the token block);
- ``kind``: ``classification``, ``regression`` or ``causal_lm``; ``metrics``: the names of the
  metrics logged for this evaluation (the dataset's);
- classification: ``label`` (int32) and ``logits`` (float32, examples x classes);
- regression: ``label`` and ``value`` (float32);
- causal LM: ``nll`` (the summed next-token NLL of the block) and ``tokens`` (its scored
  tokens), float32.

Files hold plain arrays (read with ``allow_pickle=False``).
"""
from __future__ import annotations

import os
import pathlib
from typing import Mapping

import numpy as np

from surm import metrics as metrics_lib
from surm import workdir as workdir_files

FOLDER = workdir_files.PREDICTIONS
KINDS = ("classification", "regression", "causal_lm")
_ARRAYS = {"classification": ("label", "logits"), "regression": ("label", "value"),
           "causal_lm": ("nll", "tokens")}


def path(workdir: str | os.PathLike, role: str, step: int) -> pathlib.Path:
    return pathlib.Path(workdir) / FOLDER / f"{role}_{step:06d}.npz"


def drop_after(workdir: str | os.PathLike, step: int) -> None:
    """Removes the predictions of evaluations after ``step`` (written by a run that was then
    stopped before its next checkpoint): a resumed run writes them again."""
    for file in (pathlib.Path(workdir) / FOLDER).glob("*.npz"):
        at = file.stem.rpartition("_")[2]
        if at.isdigit() and int(at) > step:
            file.unlink()


def make(kind: str, index: np.ndarray, outputs: np.ndarray, labels: np.ndarray | None,
         metric_names: tuple[str, ...]) -> dict[str, np.ndarray]:
    """The predictions of one evaluation from the eval step's ``outputs`` (logits; a
    regression's (N, 1) scores; a causal LM's ``surm.lm.token_nll`` rows) of the examples at
    positions ``index`` of the split, sorted by position."""
    if kind not in KINDS:
        raise ValueError(f"unknown prediction kind {kind!r}; known: {', '.join(KINDS)}")
    order = np.argsort(index, kind="stable")
    outputs = np.asarray(outputs, np.float32)[order]
    pred = {"index": np.asarray(index, np.int64)[order], "kind": np.asarray(kind),
            "metrics": np.asarray(list(metric_names), dtype=str)}
    if kind == "causal_lm":
        pred.update(nll=outputs[:, 0], tokens=outputs[:, 1])
    elif kind == "regression":
        pred.update(label=np.asarray(labels, np.float32)[order], value=outputs[:, 0])
    else:
        pred.update(label=np.asarray(labels, np.int32)[order], logits=outputs)
    return pred


def write(file: pathlib.Path, pred: Mapping[str, np.ndarray]) -> None:
    """``pred`` into ``file``, whole or not at all (written aside, then renamed)."""
    file.parent.mkdir(parents=True, exist_ok=True)
    tmp = file.with_name(f".{file.name}.tmp")
    with tmp.open("wb") as f:
        np.savez_compressed(f, **pred)
    os.replace(tmp, file)


def read(file: str | os.PathLike) -> dict[str, np.ndarray]:
    """The arrays of a predictions file (ValueError naming it when it is not one)."""
    try:
        with np.load(file, allow_pickle=False) as z:
            pred = {k: z[k] for k in z.files}
    except (OSError, ValueError, EOFError) as e:
        raise ValueError(f"{file} is not a readable predictions file ({e}); it is written "
                         f"by surm.train at each evaluation") from None
    kind = str(pred.get("kind", ""))
    missing = [k for k in ("index", *_ARRAYS.get(kind, ("kind",))) if k not in pred]
    if missing:
        raise ValueError(f"{file} lacks {', '.join(missing)}: not a surm predictions file")
    return pred


def metrics(pred: Mapping[str, np.ndarray]) -> dict[str, float]:
    """The metrics of an evaluation, as the trainer logs them (without the ``role_`` prefix):
    the dataset's metrics and the mean loss; a causal LM's perplexity, loss and tokens."""
    kind = str(pred["kind"])
    if kind == "causal_lm":
        from surm import lm
        return lm.perplexity(np.stack([pred["nll"], pred["tokens"]], axis=1))
    names = [str(n) for n in pred["metrics"]]
    label = pred["label"]
    if kind == "regression":
        value = pred["value"]
        result = metrics_lib.compute(names, value, label)
        result["loss"] = float(np.mean((value.astype(np.float64) - label) ** 2))
        return result
    logits = pred["logits"]
    result = metrics_lib.compute(names, logits, label)
    result["loss"] = float(np.mean(_cross_entropy(logits, label)))
    return result


def _cross_entropy(logits: np.ndarray, label: np.ndarray) -> np.ndarray:
    """Per-example softmax cross-entropy, in float64."""
    z = np.asarray(logits, np.float64)
    z = z - z.max(axis=1, keepdims=True)
    logsumexp = np.log(np.exp(z).sum(axis=1))
    return logsumexp - z[np.arange(len(z)), label]


def scores(pred: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The per-example outcomes that ``surm.sweep.stats`` resamples: a classifier's predicted
    class and label, a regression's value and label, a causal LM's NLL and token count."""
    kind = str(pred["kind"])
    if kind == "classification":
        return {"predicted": np.argmax(pred["logits"], axis=1).astype(np.int32),
                "label": pred["label"]}
    if kind == "regression":
        return {"value": pred["value"], "label": pred["label"]}
    return {"nll": pred["nll"], "tokens": pred["tokens"]}
