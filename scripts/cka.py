"""CKA between a full fine-tuning run and LoRA / SURM / adapter runs (``surm.cka``).

    python scripts/cka.py --full sweeps/study/text_full/tweet_sentiment/full_lr0.0001_hlr0.01_seed0 \\
        --full_other .../full_lr0.0001_hlr0.01_seed1 \\
        --runs .../circulant_lora_lr0.01_seed0 .../lowrank_rank-8_lora_lr0.003_seed0 [--json]

Each argument is a finished ``surm.train`` workdir. Weights (lora-mode runs): linear CKA between
the full run's update and the run's update of every adapted matrix, the family's ceiling (the
CKA of its best approximation of the full update) and achieved / ceiling, and a random floor.
Representations (every run): per-layer CKA of the layer outputs on the first ``--examples``
validation examples. ``--full_other`` (full fine-tuning at another seed) is the reference.
"""
from __future__ import annotations

import argparse
import json
import sys


def _fmt(value, digits=4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--full", required=True, help="workdir of a full fine-tuning run")
    p.add_argument("--full_other", help="workdir of full fine-tuning at another seed")
    p.add_argument("--runs", nargs="+", required=True, help="workdirs of the runs to compare")
    p.add_argument("--examples", type=int, default=512,
                   help="validation examples for the representations")
    p.add_argument("--json", action="store_true", help="print one JSON object last")
    args = p.parse_args(argv)

    from surm import cka
    from surm.runs import load_run

    full = load_run(args.full)
    if full.spec.method != "full":
        p.error(f"--full {args.full} is a {cka.method_name(full.spec)} run, not full "
                f"fine-tuning")
    result = cka.report(full, {run: load_run(run) for run in args.runs},
                        load_run(args.full_other) if args.full_other else None, args.examples)
    print(f"{'run':58s} {'method':34s} {'weights':>8s} {'ceiling':>8s} {'of ceil':>8s} "
          f"{'random':>7s} {'repr':>7s} {'last':>7s}")
    for name, r in result["runs"].items():
        w = r.get("weights", {})
        print(f"{name[-58:]:58s} {r['method'][:34]:34s} {_fmt(w.get('mean')):>8s} "
              f"{_fmt(w.get('ceiling_mean')):>8s} {_fmt(w.get('of_ceiling'), 3):>8s} "
              f"{_fmt(w.get('random_mean')):>7s} {_fmt(r['representations']['mean']):>7s} "
              f"{_fmt(r['representations']['last']):>7s}")
    if args.json:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
