"""The measured study behind docs/RESULTS.md: every method at its own learning rate, chosen on
validation, against LoRA, adapters and the baselines, on this project's 2-core CPU machine.

    python -m surm.study run                  # run (or resume) every part, in order
    python -m surm.study run --parts text_bbc
    python -m surm.study plan                 # the parts and how many runs each has left
    python -m surm.study report               # docs/RESULTS.md from the record

The study is declared as data (``surm.study.parts.PARTS``): each part is one or more
``surm.sweep`` grids sharing a root, run through the sweep's functions. Every method lists its
own learning rates; they are tried on seed 0 (``tune_seed``), the one with the best final
validation metric is chosen (never the test split; ``surm.sweep.selection``), and the other
seeds (5 in all; 10 with at most 10 examples per class) run at the chosen value only. A part
runs its tuning seed, then its other seeds, before the next part starts, so a study cut short
has complete parts. Every run resumes: running the same command again skips
finished runs.

The record is kept in git under docs/results/ (the workdirs under sweeps/study/ are not): after
every run, the part's finished runs are written to docs/results/<part>.csv, and ``run`` passes
those files back as records, so a fresh clone resumes where the record stops and ``report``
rebuilds docs/RESULTS.md from it alone.
"""
from __future__ import annotations

import argparse
import os
import sys

from surm.study import parts as P
from surm.study.report import report, run_cka, write_error_rates
from surm.study.run import plan_summary, run, write_defaults
from surm.sweep import runner


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m surm.study",
                                description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("action", choices=["run", "plan", "stats", "cka", "defaults", "report"])
    p.add_argument("--parts", default=",".join(P.BY_NAME),
                   help="comma-separated parts, in order: " + ", ".join(P.BY_NAME))
    args = p.parse_args(argv)
    os.chdir(P.REPO)  # the study's paths (sweeps/study, docs/results) are the repository's
    unknown = [n for n in args.parts.split(",") if n not in P.BY_NAME]
    if unknown:
        p.error(f"unknown parts {unknown}; known: {', '.join(P.BY_NAME)}")
    parts = [P.BY_NAME[n] for n in args.parts.split(",")]
    if args.action == "run":
        try:
            return run(parts)
        except KeyboardInterrupt:  # the running run stopped at a step boundary, saved
            return runner.interrupted()
    if args.action == "plan":
        plan_summary(parts)
        return 0
    if args.action == "stats":
        return write_error_rates()
    if args.action == "cka":
        return run_cka()
    if args.action == "defaults":
        return write_defaults()
    report(parts)
    return 0


if __name__ == "__main__":
    sys.exit(main())
