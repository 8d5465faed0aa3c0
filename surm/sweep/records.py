"""What a sweep keeps of each run: ``run.json`` in its workdir, and rows of ``results.csv``.

A row names its run by ``run_key`` (dataset, method, structure, hparams, lr, head_lr, seed:
structure '-' for a method without one) and holds
its settings, status, final validation and test metrics, parameter counts and wall time, its
validation curve (``curve``: JSON ``[[step, value], ...]`` of every validation pass) and where
its per-example test predictions are (``predictions``: a ``surm.predictions`` file, or
``ARCHIVE.npz#KEY`` in an archive of a record: ``surm.sweep.archive``). An earlier
``results.csv`` (e.g. one kept in git when the workdirs are gone) can stand in for the runs it
records as done or failed (``read_records`` / ``recorded_runs``): a run that failed (diverged)
stays in the record, marked, so that it counts as tried. Records and run.json files of older
versions (family and mode columns) are read in today's words (``upgrade``).
"""
from __future__ import annotations

import csv
import json
import os
import pathlib
from typing import Any, Iterable, Mapping, Sequence

from surm import workdir as workdir_files
from surm.peft import spec as peft_spec
from surm.sweep.grid import NO_STRUCTURE, SweepError, last_line

KEY = ("dataset", "method", "structure", "hparams", "lr", "head_lr", "seed")
CSV_HEAD = [*KEY, "status", "metric", "validation", "validation_loss", "test",
            "best_validation", "trainable", "adapter", "base", "wall_seconds", "final_train_loss",
            "workdir", "error", "settings", "curve", "predictions"]
TEXT_COLUMNS = {"family", "mode",  # an older record's (``upgrade``)
                "dataset", "method", "structure", "hparams", "status", "metric", "workdir", "error",
                "settings", "curve", "predictions"}
RECORDED = ("done", "failed")  # what a record keeps of a run: its result, or that it failed


def upgrade(row: Mapping[str, Any]) -> dict:
    """A row (or a run.json's meta) of an older record, whose runs are named by family and mode
    ('-' where none), with method and structure instead; today's rows come back as they were."""
    row = dict(row)
    if "family" in row and "method" not in row:
        family, mode = row.pop("family"), row.pop("mode", "")
        # an older record's mode was '-' where the method has none, as a structure is today
        method, structure = peft_spec.from_family(family, None if mode in ("-", "") else mode)
        row.update(method=method, structure=structure or NO_STRUCTURE)
    return row


def run_key(row: Mapping[str, Any]) -> tuple[str, ...]:
    """What identifies a run in a results row or a run's meta, as text (the way a CSV holds
    it; numbers written as ``%g``, so 0.001 and 1e-3 are the same run)."""
    return tuple(f"{row[k]:g}" if isinstance(row[k], float) else
                 f"{float(row[k]):g}" if k in ("lr", "head_lr") else str(row[k]) for k in KEY)


def write_record(workdir: pathlib.Path, meta: Mapping[str, Any], settings: Sequence[str]) -> None:
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / workdir_files.SWEEP_RECORD).write_text(json.dumps({**meta, "settings": list(settings)}, indent=2))


def check_workdir(workdir: pathlib.Path, settings: Sequence[str]) -> None:
    """Refuse to reuse a workdir whose run.json records different settings."""
    record = workdir / workdir_files.SWEEP_RECORD
    if record.exists():
        old = json.loads(record.read_text())["settings"]
        if tuple(old) != tuple(settings):
            raise SweepError(f"{workdir} holds a run with different settings (recorded "
                             f"{sorted(set(old) - set(settings))}, now "
                             f"{sorted(set(settings) - set(old))}); sweep into a new --root, or "
                             f"delete that workdir to redo it")


def _log(workdir: pathlib.Path) -> list[dict]:
    path = workdir / workdir_files.METRICS
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] \
        if path.exists() else []


def _final_train_loss(log: Sequence[dict]) -> float | str:
    losses = [r["train_loss"] for r in log if "train_loss" in r]
    return losses[-1] if losses else ""


def _curve(log: Sequence[dict], metric: str) -> str:
    """The validation passes of a run as JSON ``[[step, value], ...]`` (the untouched model's
    at step 0 included when it was evaluated)."""
    key = f"validation_{metric}"
    points = {r["step"]: r[key] for r in log if key in r}  # a step evaluated twice: the last
    return json.dumps([[step, value] for step, value in sorted(points.items())])


def _test_predictions(workdir: pathlib.Path, step: int) -> str:
    from surm import predictions
    path = predictions.path(workdir, "test", step)
    return str(path) if path.exists() else ""


def read_run(record: pathlib.Path) -> dict:
    """One results.csv row from a workdir's run.json and, if finished, its summary.json."""
    workdir = record.parent
    meta = upgrade(json.loads(record.read_text()))
    row = {k: meta[k] for k in (*KEY, "metric")}
    row["workdir"] = str(workdir)
    row["settings"] = json.dumps(meta["settings"])
    summary_path = workdir / workdir_files.SUMMARY
    metric = meta["metric"]
    if summary_path.exists():
        summary = json.loads(summary_path.read_text())
        best = summary.get("best_validation", {})
        final = summary.get("validation", {})
        log = _log(workdir)
        row.update(status="done", test=summary[f"test_{metric}"],
                   validation=final.get(f"validation_{metric}", ""),
                   validation_loss=final.get("validation_loss", ""),
                   best_validation=best.get(f"validation_{metric}", ""),
                   final_train_loss=_final_train_loss(log), curve=_curve(log, metric),
                   predictions=_test_predictions(workdir, summary["step"]),
                   **{k: summary[k] for k in ("trainable", "adapter", "base", "wall_seconds")},
                   **{k: v for k, v in summary.items() if k.startswith("test_")},
                   **{f"best_{k}": v for k, v in best.items() if k.startswith("validation_")})
    elif (workdir / workdir_files.SWEEP_ERROR).exists():
        row.update(status="failed",
                   error=last_line((workdir / workdir_files.SWEEP_ERROR).read_text()))
    else:
        row["status"] = "pending"
    return row


def collect(root: str | os.PathLike, records: Mapping[tuple, dict] | None = None) -> list[dict]:
    """A row per run under ``root`` (its workdirs' run.json) and per run of ``records``
    (``read_records``) that no workdir has finished (done or failed)."""
    root = pathlib.Path(root)
    rows = [read_run(r) for r in sorted(root.rglob(workdir_files.SWEEP_RECORD))] if root.exists() else []
    if not rows and not records:
        raise SweepError(f"no runs under {root} (no run.json in any workdir); run a sweep into "
                         f"this --root first")
    finished = {run_key(r) for r in rows if r["status"] in RECORDED}
    kept = [r for r in rows if r["status"] in RECORDED or run_key(r) not in (records or {})]
    return kept + [r for key, r in (records or {}).items() if key not in finished]


def write_csv(rows: Sequence[dict], path: pathlib.Path) -> None:
    extra = sorted({k for row in rows for k in row} - set(CSV_HEAD))
    path.parent.mkdir(parents=True, exist_ok=True)
    # whole or not at all, and a writer's own: a record is never cut, nor mixed with another's
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, CSV_HEAD + extra, restval="")
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)


def read_csv(path: str | os.PathLike) -> list[dict]:
    """The rows of a results.csv, numbers as numbers."""
    path = pathlib.Path(path)
    try:
        with path.open(newline="") as f:
            rows = list(csv.DictReader(f))
    except OSError as e:
        raise SweepError(f"--records {path}: {e.strerror or e}") from None
    rows = [upgrade(_typed(row)) for row in rows]
    missing = [k for k in (*KEY, "status") if rows and k not in rows[0]]
    if missing:
        raise SweepError(f"--records {path} is not a sweep results.csv (no columns {missing}); "
                         f"give a ROOT/results.csv written by surm.sweep")
    return rows


def read_records(paths: Iterable[str | os.PathLike]) -> dict[tuple[str, ...], dict]:
    """The finished (done or failed) runs of earlier results.csv files, by ``run_key`` (later
    files win)."""
    return {run_key(row): row for path in paths for row in read_csv(path)
            if row["status"] in RECORDED}


def _typed(row: Mapping[str, str]) -> dict:
    """A CSV row with its numbers as numbers again ('' stays '': a value that was not there)."""
    out = {}
    for key, text in row.items():
        value: Any = text
        if key not in TEXT_COLUMNS and text != "":
            for cast in (int, float):
                try:
                    value = cast(text)
                    break
                except ValueError:
                    pass
        out[key] = value
    return out
