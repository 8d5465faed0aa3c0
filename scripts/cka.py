"""CKA between the weight updates of a fully fine-tuned run and of LoRA / SURM runs.

    python scripts/cka.py --full sweeps/study/full/tweet_sentiment/full_seed0 \\
        --runs sweeps/study/full/tweet_sentiment/circulant_lora_seed0 \\
               sweeps/study/full/tweet_sentiment/lowrank_rank-8_lora_seed0 [--json]

Each argument is a ``surm.train`` workdir (its config.json and adapters/). The pretrained
weights W0 are rebuilt from the run's model config; the full run's update of a matrix is
``W_full - W0``, a PEFT run's is its merged weight minus W0 (``scale * to_dense(S)`` for
structured families, ``scale * A @ B`` for LoRA), so only lora-mode runs (whose update is a
matrix) can be compared. For every matrix the PEFT run adapts, linear CKA (centred kernel
alignment, Kornblith et al. 2019) between the two updates, rows as examples:

    CKA(X, Y) = ||Xc^T Yc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F),   Xc = X - column means

1 means the same update up to rotation and scale; as a floor, the same statistic against a
Gaussian matrix of the update's shape and norm is printed (``random``). The paper's Table 8
reports this per run; here the mean, minimum and maximum over the adapted matrices.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402


def linear_cka(x: np.ndarray, y: np.ndarray) -> float:
    """Linear CKA of two matrices with the same number of rows (float64)."""
    x = np.asarray(x, np.float64).reshape(len(x), -1)
    y = np.asarray(y, np.float64).reshape(len(y), -1)
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"CKA compares matrices with the same rows: {x.shape} vs {y.shape}")
    x = x - x.mean(0)
    y = y - y.mean(0)
    cross = np.linalg.norm(x.T @ y) ** 2
    norms = np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y)
    if norms == 0:
        raise ValueError("CKA of a zero update is undefined (did the run train?)")
    return float(cross / norms)


def _load_run(workdir: pathlib.Path):
    """(base params, trained full params, trainable tree, spec) of a surm.train workdir."""
    import ml_collections

    from surm import data
    from surm.models import factory
    from surm.peft import io as peft_io

    config_file = workdir / "config.json"
    if not config_file.is_file() or not (workdir / "adapters").is_dir():
        raise FileNotFoundError(f"{workdir} is not a finished surm.train workdir (it needs "
                                f"config.json and adapters/); run the training first")
    config = ml_collections.ConfigDict(json.loads(config_file.read_text()))
    num_classes = data.get_spec(config.input.dataset).num_classes
    _, base, _ = factory.build(config.model, num_classes)
    trainable, spec = peft_io.load(workdir / "adapters", base)
    return base, trainable, spec, config


def weight_updates(workdir: pathlib.Path) -> tuple[dict[str, np.ndarray], str]:
    """{module path: update of its kernel} and a short name of the method."""
    from surm import peft
    from surm.peft import tree

    base, trainable, spec, _ = _load_run(workdir)
    flat_base = tree.flatten(base)
    if spec.family == "full":
        tuned = tree.flatten(peft.full_params(peft.split(base, spec)[1], trainable))
        paths = [p[:-len("/kernel")] for p in flat_base if p.endswith("/kernel")]
    elif spec.has_adapters and spec.mergeable:
        merged = peft.merge(peft.full_params(peft.split(base, spec)[1], trainable),
                            trainable["adapters"], spec)
        tuned = tree.flatten(merged)
        paths = list(peft.targets(base, spec))
    else:
        raise ValueError(f"{workdir}: a {spec.family}/{spec.mode} run has no weight update "
                         f"matrix to compare (CKA needs full fine-tuning or a lora-mode run)")
    name = spec.family + "".join(f" {k}={v}" for k, v in spec.hparams)
    return ({p: np.asarray(tuned[f"{p}/kernel"], np.float64)
             - np.asarray(flat_base[f"{p}/kernel"], np.float64) for p in paths}, name)


def compare(full: dict[str, np.ndarray], other: dict[str, np.ndarray], seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    per, floor = {}, {}
    for path, delta in other.items():
        if path not in full:
            raise ValueError(f"the full run has no matrix {path}")
        reshaped = full[path].reshape(len(full[path]), -1)
        per[path] = linear_cka(reshaped, delta.reshape(len(delta), -1))
        noise = rng.standard_normal(reshaped.shape)
        floor[path] = linear_cka(reshaped, noise)
    values = list(per.values())
    return {"mean": float(np.mean(values)), "min": float(np.min(values)),
            "max": float(np.max(values)), "random_mean": float(np.mean(list(floor.values()))),
            "matrices": len(values), "per_matrix": per}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--full", required=True, help="workdir of a full fine-tuning run")
    p.add_argument("--runs", nargs="+", required=True, help="workdirs of lora-mode runs")
    p.add_argument("--json", action="store_true", help="print one JSON object last")
    args = p.parse_args(argv)
    full, full_name = weight_updates(pathlib.Path(args.full))
    if full_name.split()[0] != "full":
        p.error(f"--full {args.full} is a {full_name} run, not full fine-tuning")
    results = {}
    print(f"{'run':60s} {'method':22s} {'CKA mean':>9s} {'min':>7s} {'max':>7s} {'random':>7s}")
    for run in args.runs:
        updates, name = weight_updates(pathlib.Path(run))
        r = compare(full, updates)
        r["method"] = name
        results[run] = r
        print(f"{run:60s} {name:22s} {r['mean']:9.4f} {r['min']:7.4f} {r['max']:7.4f} "
              f"{r['random_mean']:7.4f}")
    if args.json:
        print(json.dumps({"full": args.full, "runs": {k: {kk: vv for kk, vv in v.items()
                                                          if kk != "per_matrix"}
                                                      for k, v in results.items()}}))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
