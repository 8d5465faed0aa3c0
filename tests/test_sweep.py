"""surm.sweep: a tiny grid end to end with lrs chosen on validation, resuming, commands for
launchers, the choice itself on built cases, and budget matching."""
import csv
import json
import pathlib
import shlex
import shutil
import signal
import subprocess
import sys
import time

import pytest

from surm import inspect as surm_inspect
from surm import peft, sweep
from surm import workdir as workdir_files
from surm.sweep import runner, selection
from surm.sweep.__main__ import main
from surm.sweep.runner import dataset_folder

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs" / "default.py")
BASE = "dataset=bbc_news,checkpoint=random,max_length=32"
TINY = ["total_steps=2", "eval_every=2", "ckpt_every=2", "input.batch_size=8",
        "input.eval_batch_size=64"]


def grid_argv(root, data_dir, families="circulant,lowrank:rank=1", seeds="0,1", base=BASE,
              extra=()):
    sets = [a for s in TINY + [f"input.data_dir={data_dir}"] for a in ("--set", s)]
    return ["--config", CONFIG, "--base", base, "--families", families, "--modes", "lora",
            "--seeds", seeds, *sets, "--root", str(root), *extra]


def _rows(path):
    with path.open() as f:
        return list(csv.DictReader(f))


def test_tiny_grid_chooses_lrs_on_validation_and_resumes(tmp_path, capsys):
    """`python -m surm.sweep` with two lrs per method, tuned on seed 0: the chosen lr is the
    one with the better validation, seed 1 runs only at it, and the table says so."""
    root, data_dir = tmp_path / "sweep", tmp_path / "data"
    families = "circulant:lr=1e-3;3e-1,lowrank:rank=1:lr=1e-3;3e-1"
    argv = grid_argv(root, data_dir, families, extra=["--tune_seed", "0"])
    done = subprocess.run([sys.executable, "-m", "surm.sweep", *argv], cwd=tmp_path,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    names = sorted(p.parent.name for p in root.glob("bbc_news/*/summary.json"))
    rows = _rows(root / "results.csv")
    assert len(rows) == 6 and {r["status"] for r in rows} == {"done"}
    tuning = [r for r in rows if r["seed"] == "0"]
    assert len(tuning) == 4 and all(r["validation"] != "" for r in tuning)
    for family in ("circulant", "lowrank"):
        runs = [r for r in tuning if r["structure"] == family]
        best = min(runs, key=lambda r: (-float(r["validation"]), float(r["validation_loss"]),
                                        float(r["lr"])))
        # seed 1 ran at the lr seed 0 chose, and only there
        assert [r["lr"] for r in rows if r["structure"] == family and r["seed"] == "1"] == [
            best["lr"]]
    assert sum(n.endswith("_seed1") for n in names) == 2

    table = (root / "results.md").read_text()
    assert "| chosen lr |" in table and "tuned on seed 0" in table
    chosen = [line for line in table.split("## Every run")[0].splitlines()
              if line.startswith("| bbc_news")]
    assert len(chosen) == 2 and all(line.split("|")[14].strip() == "2" for line in chosen)
    assert all(line.split("|")[12].strip() == "2" for line in chosen)  # tried
    assert (root / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # circulant against LoRA (the default reference), paired by seed, from the stored
    # per-example predictions of each run's test split
    assert "| p_holm | verdict |" in table and "Holm-corrected over the 1 comparisons" in table
    (compared,) = _rows(root / "comparisons.csv")
    assert (compared["structure"], compared["reference"]) == ("circulant", "lora lowrank rank=1")
    assert "bootstrap over seeds x examples" in compared["test"] and compared["examples"] == "223"
    circ, lora = ([float(r["test"]) for r in rows if r["structure"] == f and r["lr"] == r2["lr"]
                   and r["seed"] in "01"] for f, r2 in (
                       ("circulant", next(r for r in rows if r["structure"] == "circulant"
                                          and r["seed"] == "1")),
                       ("lowrank", next(r for r in rows if r["structure"] == "lowrank"
                                        and r["seed"] == "1"))))
    assert float(compared["delta"]) == pytest.approx(sum(circ) / 2 - sum(lora) / 2)
    assert float(compared["ci_low"]) <= float(compared["delta"]) <= float(compared["ci_high"])
    assert float(compared["p"]) <= float(compared["p_holm"]) <= 1
    assert all(pathlib.Path(r["predictions"]).is_file() for r in rows)

    # Same command again: every run is skipped, nothing is rewritten.
    stamps = sorted(p.stat().st_mtime_ns for p in root.glob("bbc_news/*/summary.json"))
    assert main(argv) == 0
    assert capsys.readouterr().out.count("finished before, skipped") == 6
    assert sorted(p.stat().st_mtime_ns for p in root.glob("bbc_news/*/summary.json")) == stamps

    # A third seed: only its runs at the chosen lrs are printed, as commands that parse.
    assert main(grid_argv(root, data_dir, families, seeds="0,1,2",
                          extra=["--tune_seed", "0", "--print_commands"])) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2
    for line in lines:
        args = shlex.split(line)
        assert args[:3] == ["python", "-m", "surm.train"]
        workdir = pathlib.Path(args[3].removeprefix("--workdir="))
        assert workdir.name.endswith("_seed2") and (workdir / "run.json").exists()
        assert workdir.name.replace("_seed2", "_seed1") in names
        assert args[4].startswith(f"--config={CONFIG}:") and "seed=2" in args[4]

    # The workdirs gone (a fresh clone), the results.csv kept: nothing runs again and the
    # results are rebuilt from the record.
    record = tmp_path / "record.csv"
    record.write_text((root / "results.csv").read_text())
    shutil.rmtree(root)
    capsys.readouterr()
    assert main(argv + ["--records", str(record)]) == 0
    assert capsys.readouterr().out.count("recorded as done, skipped") == 6
    assert not list(root.glob("bbc_news/*/summary.json"))
    again = _rows(root / "results.csv")
    assert sorted((r["structure"], r["lr"], r["seed"], r["test"]) for r in again) == sorted(
        (r["structure"], r["lr"], r["seed"], r["test"]) for r in rows)
    # without the predictions the comparison is the t-test over seeds alone
    (compared,) = _rows(root / "comparisons.csv")
    assert compared["test"] == "paired t over seeds"
    # a record written before runs were named by method and structure (family and mode
    # columns) stands in for its runs just the same
    legacy = (record.read_text().replace("dataset,method,structure,", "dataset,family,mode,", 1)
              .replace("bbc_news,lora,circulant,", "bbc_news,circulant,lora,")
              .replace("bbc_news,lora,lowrank,", "bbc_news,lowrank,lora,"))
    assert legacy.count(",circulant,lora,") == 3
    record.write_text(legacy)
    shutil.rmtree(root)
    capsys.readouterr()
    assert main(argv + ["--records", str(record)]) == 0
    assert capsys.readouterr().out.count("recorded as done, skipped") == 6
    assert sorted((r["structure"], r["lr"], r["seed"], r["test"]) for r in _rows(
        root / "results.csv")) == sorted((r["structure"], r["lr"], r["seed"], r["test"])
                                         for r in rows)
    # a record of the same run with other settings is refused
    record.write_text(record.read_text().replace("total_steps=2", "total_steps=3"))
    with pytest.raises(sweep.SweepError, match="different settings"):
        main(argv + ["--records", str(record)])
    with pytest.raises(sweep.SweepError, match="not a sweep results.csv"):
        record.write_text("a,b\n1,2\n")
        main(argv + ["--records", str(record)])


def _row(lr, validation, test, seed=0, loss=0.5, status="done", head_lr=None,
         structure="toeplitz"):
    return dict(dataset="d", method="lora", structure=structure, hparams="", lr=lr,
                head_lr=lr if head_lr is None else head_lr, seed=seed, status=status,
                metric="accuracy", validation=validation if status == "done" else "",
                validation_loss=loss, test=test if status == "done" else "", trainable=10,
                wall_seconds=1.0)


def test_the_choice_follows_validation_not_test():
    # validation and test disagree: lr 1e-2 is best on test, 1e-3 on validation
    rows = [_row(1e-3, 0.80, 0.70), _row(1e-2, 0.75, 0.90), _row(1e-1, 0.60, 0.50)]
    (picked,) = selection.select(rows)
    assert picked["lr"] == 1e-3 and picked["test"] == 0.70 and picked["tried"] == 3
    assert picked["edge"] == "lr at min"
    # ties on the metric go to the lower validation loss, then to the smaller lr
    tie = [_row(1e-3, 0.8, 0.1, loss=0.7), _row(3e-3, 0.8, 0.2, loss=0.6), _row(1e-2, 0.8, 0.3,
                                                                                loss=0.6)]
    assert selection.select(tie)[0]["lr"] == 3e-3
    assert selection.select(tie)[0]["edge"] == ""  # inside the grid
    # a diverged run counts as tried, is never chosen, and the value below it is no edge
    failed = [_row(1e-3, 0.7, 0.7), _row(1e-2, 0.8, 0.8), _row(1e-1, "", "", status="failed")]
    (picked,) = selection.select(failed)
    assert picked["lr"] == 1e-2 and picked["failed"] == 1 and picked["edge"] == ""
    # a separate head lr is an axis of its own
    heads = [_row(1e-3, 0.7, 0.7, head_lr=1e-3), _row(1e-3, 0.9, 0.8, head_lr=1e-2),
             _row(1e-2, 0.6, 0.9, head_lr=1e-3), _row(1e-2, 0.5, 0.6, head_lr=1e-2)]
    (picked,) = selection.select(heads)
    assert (picked["lr"], picked["head_lr"]) == (1e-3, 1e-2)
    assert picked["edge"] == "lr at min; head_lr at max"


def test_the_reference_is_named_by_a_families_item():
    """--reference speaks the command line's words (a structure, or a method without one) and
    finds the method the table names by method and structure."""
    from surm.sweep import results

    def runs(method, structure, hparams, trainable):
        return [dict(_row(1e-3, 0.5, 0.5), method=method, structure=structure, hparams=hparams,
                     trainable=trainable)]
    groups = {("d", "lora", "lowrank", "rank=8"): runs("lora", "lowrank", "rank=8", 80),
              ("d", "lora", "lowrank", "rank=1"): runs("lora", "lowrank", "rank=1", 10),
              ("d", "adapter", "circulant", ""): runs("adapter", "circulant", "", 5),
              ("d", "houlsby", "-", "rank=12"): runs("houlsby", "-", "rank=12", 90),
              ("d", "probe", "-", ""): runs("probe", "-", "", 1)}
    assert results.find_reference(groups, None) == ("lora", "lowrank", "rank=1")  # LoRA
    assert results.find_reference(groups, "lowrank:rank=8") == ("lora", "lowrank", "rank=8")
    assert results.find_reference(groups, "houlsby") == ("houlsby", "-", "rank=12")
    assert results.find_reference(groups, "linear_probe") == ("probe", "-", "")
    assert results.find_reference(groups, "circulant") == ("adapter", "circulant", "")
    with pytest.raises(sweep.SweepError, match="matches 2 methods"):
        results.find_reference(groups, "lowrank")


def test_perplexity_is_chosen_and_judged_lowest_first():
    rows = [{**_row(1e-3, 30.0, 29.0), "metric": "perplexity"},
            {**_row(1e-2, 20.0, 35.0), "metric": "perplexity"},
            {**_row(1e-1, 90.0, 80.0), "metric": "perplexity"}]
    (picked,) = selection.select(rows)  # the lowest validation perplexity, whatever the test
    assert picked["lr"] == 1e-2 and picked["test"] == 35.0 and picked["edge"] == ""
    from surm.sweep import results
    low = [{**_row(1e-2, 20.0, t, seed=s, structure="circulant"), "metric": "perplexity"}
           for s, t in enumerate((20.0, 21.0, 20.5, 20.2, 20.8))]
    high = [{**_row(1e-2, 30.0, t + 10, seed=s, structure="lowrank"), "metric": "perplexity"}
            for s, t in enumerate((20.3, 21.1, 20.6, 20.4, 20.9))]
    ref, ((key, verdict),) = results.compare(low + high, "lowrank")
    assert key[2] == "circulant" and verdict.outcome == "win"  # lower perplexity wins
    # a method with no seed in common with the reference yet is not compared, but counts in
    # the correction (at p = 1): the circulant's p is doubled, not left alone
    later = [{**_row(1e-2, 20.0, 20.0, seed=s, structure="toeplitz"), "metric": "perplexity"}
             for s in (7, 8)]
    _, ((key, partial),) = results.compare(low + high + later, "lowrank")
    assert key[2] == "circulant" and verdict.p_holm == verdict.comparison.p
    assert partial.p_holm == pytest.approx(min(1.0, 2 * verdict.comparison.p))
    assert (verdict.family, partial.family) == (1, 2)
    note = results.chosen_table(low + high + later, reference="lowrank")[-1]
    assert "over the 2 comparisons of this table (1 of them without a seed in common" in note
    for r in low + high:
        r["metric"] = "accuracy"
    assert results.compare(low + high, "lowrank")[1][0][1].outcome == "loss"


def test_the_choice_waits_for_every_run_and_needs_validation():
    assert selection.select([_row(1e-3, 0.8, 0.7), _row(1e-2, 0.9, 0.9, status="pending")]) == []
    assert selection.unsettled([_row(1e-3, 0.8, 0.7), _row(1e-2, 0.9, 0.9, status="pending")])
    with pytest.raises(sweep.SweepError, match="eval_every > 0"):
        selection.select([_row(1e-3, "", 0.7), _row(1e-2, "", 0.9)])
    (only,) = selection.select([_row(1e-3, "", 0.7)])  # one lr: nothing to choose
    assert only["tried"] == 1


def test_tuned_on_one_seed_the_others_report_at_its_choice():
    rows = [_row(1e-3, 0.8, 0.7, seed=0), _row(1e-2, 0.9, 0.8, seed=0),
            _row(1e-2, 0.5, 0.6, seed=1), _row(1e-3, 0.99, 0.99, seed=1),
            _row(1e-2, 0.6, 0.65, seed=2)]
    picked = selection.select(rows, tune_seed=0)
    assert sorted((r["seed"], r["lr"], r["test"]) for r in picked) == [
        (0, 1e-2, 0.8), (1, 1e-2, 0.6), (2, 1e-2, 0.65)]
    # tuned on every seed, seed 1 picks its own
    assert {(r["seed"], r["lr"]) for r in selection.select(rows)} == {
        (0, 1e-2), (1, 1e-3), (2, 1e-2)}


def test_followups_run_the_other_seeds_at_the_chosen_values(tmp_path):
    grid = sweep.Grid(config=CONFIG, base=(("checkpoint", "random"), ("dataset", "bbc_news")),
                      families=tuple(sweep.parse_families(["circulant:lr=1e-3;1e-2:head_lr=lr",
                                                           "lowrank:rank=1:lr=1e-3;1e-2"])),
                      modes=("lora",), seeds=(0, 1, 2), tune_seed=0)
    runs = sweep.plan(grid, tmp_path)
    assert len(runs) == 4 and {r.meta["seed"] for r in runs} == {0}
    assert {(r.meta["lr"], r.meta["head_lr"]) for r in runs if r.meta["structure"] == "circulant"} \
        == {(1e-3, 1e-3), (1e-2, 1e-2)}  # head_lr=lr: the head at each lr
    rows = [dict(r.meta, status="done", validation=0.9 if r.meta["lr"] == 1e-2 else 0.8,
                 validation_loss=1.0, test=0.5) for r in runs if r.meta["structure"] == "circulant"]
    # one of circulant's two lrs has not run yet: nothing can follow, whatever the other gave
    assert sweep.plan_followups(grid, tmp_path, rows[1:]) == ([], 2)
    followups, waiting = sweep.plan_followups(grid, tmp_path, rows)
    assert waiting == 1  # lowrank has not been tuned yet
    assert sorted(r.meta["seed"] for r in followups) == [1, 2]
    assert all(r.meta["lr"] == r.meta["head_lr"] == 1e-2 for r in followups)
    assert all(r.workdir.name == f"circulant_lora_lr0.01_seed{r.meta['seed']}" for r in followups)
    with pytest.raises(sweep.SweepError, match="tune on one of the seeds"):
        sweep.Grid(config=CONFIG, families=grid.families, seeds=(1, 2), tune_seed=0)


def test_print_commands_dedupes_baselines_and_matches_grid_file(tmp_path, capsys):
    families = ("circulant,lowrank:rank=1;4,houlsby:rank=8,bitfit,linear_probe,"
                "full:lr=1e-5;1e-4:head_lr=1e-3")
    argv = ["--config", CONFIG, "--base", "checkpoint=random", "--families", families,
            "--modes", "lora,adapter", "--seeds", "0,1", "--datasets", "bbc_news,tweet_sentiment",
            "--set", "total_steps=20", "--root", str(tmp_path / "a"), "--print_commands"]
    assert main(argv) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    # (2 circulant + 4 lowrank + houlsby + bitfit + probe + 2 full) x 2 datasets x 2 seeds
    assert len(lines) == 11 * 2 * 2
    workdirs = [shlex.split(line)[3] for line in lines]
    assert len(set(workdirs)) == len(workdirs)
    assert sum("/bbc_news/bitfit_lr" in w for w in workdirs) == 2
    assert sum("houlsby_rank-8_adapter" in w for w in workdirs) == 4
    assert sum("/full_lr1e-05_hlr0.001_seed" in w for w in workdirs) == 4

    grid = {"config": CONFIG, "base": {"checkpoint": "random"},
            "families": families.split(","), "modes": ["lora", "adapter"], "seeds": [0, 1],
            "datasets": ["bbc_news", "tweet_sentiment"], "set": {"total_steps": 20},
            "root": str(tmp_path / "a")}
    (tmp_path / "grid.json").write_text(json.dumps(grid))
    commands = tmp_path / "commands.sh"
    assert main(["--grid", str(tmp_path / "grid.json"), "--write_commands", str(commands)]) == 0
    assert commands.read_text().strip().splitlines() == lines


def test_failed_run_is_recorded_and_the_sweep_goes_on(tmp_path):
    root = tmp_path / "sweep"
    argv = grid_argv(root, tmp_path / "data", families="circulant", seeds="0",
                     base="dataset=bbc_news,checkpoint=/nonexistent/bert")
    assert main(argv) == 1
    (error,) = root.glob("bbc_news/circulant_lora_*_seed0/error.txt")
    assert error.read_text().startswith("exit status 1") and "not found" in error.read_text()
    assert "- failed:" in (root / "results.md").read_text()


def test_budget_matcher_is_exact():
    config = sweep.load_config(CONFIG, "checkpoint=random")
    n, layers = config.model.bert.hidden_size, config.model.bert.num_layers
    targets = 2 * layers  # query and value in every layer, n x n each
    budget = 2 * n * targets  # exactly lowrank rank 1

    found = {m.structure: m for m in sweep.match_budget(
        config, budget, ["lowrank", "ldr", "block_circulant", "circulant", "toeplitz", "dense",
                         "symmetric_toeplitz"])}
    assert found["lowrank"].hparams == {"rank": 1} and found["lowrank"].params == budget
    assert found["ldr"].hparams == {"rank": 1} and found["ldr"].fits
    assert found["block_circulant"].hparams == {"block_size": n // 2}
    assert found["circulant"].hparams == {"form": "hadamard"}
    assert found["symmetric_toeplitz"].hparams == {"form": "product"}
    assert found["symmetric_toeplitz"].params == budget  # the authors' T(a)T(b): 2n per matrix
    assert found["toeplitz"].params == (2 * n - 1) * targets and found["toeplitz"].fits
    assert not found["dense"].fits and found["dense"].params == n * n * targets

    # The count is the trainer's: build the real model and count what it trains.
    with config.unlocked():
        config.peft.structure, config.peft.hparams = "lowrank", {"rank": 1}
    counts = surm_inspect.describe(config)
    assert counts["adapter"] == counts["adapters_total"] == budget
    assert counts["trainable"] == found["lowrank"].counts["trainable"]

    (over,) = sweep.match_budget(config, budget - 1, ["lowrank"])
    assert over.hparams == {"rank": 1} and not over.fits
    (listed,) = sweep.match_budget(config, 10 * budget, ["lowrank:rank=2;4;16:lr=1e-3;1e-2"])
    assert listed.hparams == {"rank": 4}


def test_budget_cli_prints_the_matches(capsys):
    argv = ["--config", CONFIG, "--base", "checkpoint=random", "--families", "lowrank,houlsby",
            "--modes", "lora", "--budget", "256", "--match_only"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    lowrank = next(line for line in out.splitlines() if line.startswith("lora     lowrank"))
    assert "rank=1" in lowrank and lowrank.endswith("fits")
    houlsby = next(line for line in out.splitlines() if line.startswith("houlsby"))
    assert "OVER" in houlsby


@pytest.mark.parametrize("families,message", [
    ("lowrnk", "unknown family 'lowrnk'"),
    ("lowrank:rank", "is not KEY=V1;V2"),
    ("lowrank:ranks=4", "unknown config argument 'ranks'"),
    ("circulant:factors=4x4", "family=kronecker only"),
    ("circulant:lr=fast", "must be positive numbers"),
    ("circulant:lr=-1e-3", "must be positive numbers"),
    ("circulant:head_lr=lr", "lists no lr"),
    ("circulant:alpha=16", "needs a family with an explicit rank"),
])
def test_bad_grids_fail_before_running(tmp_path, families, message):
    with pytest.raises(sweep.SweepError, match=message):
        main(["--config", CONFIG, "--families", families, "--root", str(tmp_path)])
    assert not any(tmp_path.iterdir())


def test_grid_syntax():
    (fam,) = sweep.parse_families(["kronecker:rank=1;2:factors=16x48:lr=1e-3;1e-2:alpha=2"])
    assert fam.name == "kronecker"
    assert fam.combos() == [{"rank": 1, "factors": (16, 48), "alpha": 2},
                            {"rank": 2, "factors": (16, 48), "alpha": 2}]
    assert fam.tuned() == [{"lr": 1e-3}, {"lr": 1e-2}]
    with pytest.raises(sweep.SweepError, match="--set"):
        main(["--config", CONFIG, "--families", "lowrank", "--set", "total_steps",
              "--root", "unused"])


def test_the_methods_own_knobs_reach_the_runs(tmp_path):
    """LoRA's alpha, the authors' forms and Kronecker factor shapes, from a sweep grid."""
    grid = sweep.Grid(config=CONFIG, base=(("checkpoint", "random"),), families=tuple(
        sweep.parse_families(["lowrank:rank=4:alpha=8", "circulant:form=hadamard",
                              "symmetric_toeplitz:form=product",
                              "kronecker:factors=2x16:scale=0.5"])), modes=("lora",))
    by_family = {r.meta["structure"]: r for r in sweep.plan(grid, tmp_path)}
    assert by_family["lowrank"].meta["hparams"] == "alpha=8,rank=4"
    assert by_family["circulant"].meta["hparams"] == "form=hadamard"
    assert by_family["kronecker"].meta["hparams"] == "factors=2x16,rank=1,scale=0.5"
    config = sweep.load_config(CONFIG, "checkpoint=random,family=lowrank,rank=4,alpha=8")
    assert peft.config_to_spec(config.peft).update_scale == 2.0


def test_dataset_folders_are_safe_names():
    assert dataset_folder("glue/sst2") == "glue-sst2"
    a = dataset_folder("csv:/tmp/x/my data.csv?text=a&label=b")
    b = dataset_folder("csv:/tmp/x/my data.csv?text=a&label=c")
    assert a.startswith("csv-my_data-") and a != b
    assert all(c.isalnum() or c in "_.-" for c in a)


def test_old_script_command_still_works(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "sweep.py"), "--config", CONFIG,
                           "--base", "checkpoint=random", "--families", "lowrank", "--modes",
                           "lora", "--budget", "256", "--match_only"], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0 and "lowrank" in done.stdout


def test_widening_a_grid_whose_choice_sits_at_its_edge(tmp_path):
    grid = sweep.Grid(config=CONFIG, base=(("checkpoint", "random"), ("dataset", "bbc_news")),
                      families=tuple(sweep.parse_families(
                          ["circulant:lr=1e-3;3e-3;1e-2:head_lr=lr"])),
                      modes=("lora",), seeds=(0, 1), tune_seed=0)
    score = {1e-3: 0.80, 3e-3: 0.70, 1e-2: 0.60, 3e-4: 0.85, 1e-4: 0.90, 3e-5: 0.1}

    def rows_of(runs):
        return [dict(r.meta, status="done", validation=score[r.meta["lr"]], validation_loss=1.0,
                     test=0.5) for r in runs]

    rows = rows_of(sweep.plan(grid, tmp_path))
    assert runner.plan_widening(grid, tmp_path, rows, widen=0) == []
    (wider,) = runner.plan_widening(grid, tmp_path, rows, widen=2)  # best at the smallest lr
    assert wider.meta["lr"] == wider.meta["head_lr"] == 3e-4  # one half-decade further down
    assert sweep.plan_followups(grid, tmp_path, rows, widen=2) == ([], 1)  # not final yet
    rows += rows_of([wider])
    (wider,) = runner.plan_widening(grid, tmp_path, rows, widen=2)
    assert wider.meta["lr"] == 1e-4
    rows += rows_of([wider])
    assert runner.plan_widening(grid, tmp_path, rows, widen=2) == []  # two beyond: the limit
    (follow,), _ = sweep.plan_followups(grid, tmp_path, rows, widen=2)
    assert follow.meta["lr"] == 1e-4 and follow.meta["seed"] == 1
    (picked,) = selection.select(rows, tune_seed=0)
    assert picked["lr"] == 1e-4 and picked["edge"] == "lr at min" and picked["tried"] == 5
    # a grid on the 1-3-10 lattice widens onto it (1e-5 below 3e-5, not 9e-6)
    assert runner._one_step_out([3e-5, 1e-4, 3e-4], [3e-5, 1e-4, 3e-4], "min", 2) == 1e-5
    assert runner._one_step_out([3e-5, 1e-4, 3e-4], [3e-5, 1e-4, 3e-4], "max", 2) == 1e-3


def test_a_widening_run_stopped_before_it_finished_runs_again(tmp_path):
    grid = sweep.Grid(config=CONFIG, base=(("checkpoint", "random"), ("dataset", "bbc_news")),
                      families=tuple(sweep.parse_families(["circulant:lr=1e-3;1e-2:head_lr=lr"])),
                      modes=("lora",), seeds=(0, 1), tune_seed=0)
    rows = [dict(r.meta, status="done", validation=0.9 if r.meta["lr"] == 1e-3 else 0.5,
                 validation_loss=1.0, test=0.5) for r in sweep.plan(grid, tmp_path)]
    (wider,) = runner.plan_widening(grid, tmp_path, rows, widen=1)
    rows.append(dict(wider.meta, status="pending"))  # killed while it ran
    assert [r.workdir for r in runner.plan_widening(grid, tmp_path, rows, widen=1)] == [
        wider.workdir]
    assert sweep.plan_followups(grid, tmp_path, rows, widen=1) == ([], 1)


def _long_sweep(root, data_dir):
    """A sweep of one run that never ends by itself, logging every step."""
    sets = ["total_steps=100000", "eval_every=0", "ckpt_every=100000", "log_every=1",
            "input.batch_size=8", f"input.data_dir={data_dir}"]
    argv = ["--config", CONFIG, "--base", BASE, "--families", "circulant", "--modes", "lora",
            "--seeds", "0", *[a for s in sets for a in ("--set", s)], "--root", str(root)]
    return subprocess.Popen([sys.executable, "-m", "surm.sweep", *argv], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _when_training(sweep_proc, root, steps_past=0):
    """The run's workdir, once it has logged ``steps_past`` + 2 steps more than it had."""
    deadline = time.time() + 300
    while True:
        found = list(root.glob("bbc_news/*/metrics.jsonl"))
        if found and sum('"train_loss"' in line for line in
                         found[0].read_text().splitlines()) >= steps_past + 2:
            return found[0].parent
        assert sweep_proc.poll() is None, sweep_proc.communicate()
        assert time.time() < deadline
        time.sleep(0.05)


def _checkpoint_steps(workdir):
    return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


def test_stopping_a_sweep_stops_its_run_at_a_step_boundary_never_kills_it(tmp_path):
    """SIGTERM to the sweep alone (a scheduler's stop, `kill PID`) is passed on to its run,
    which saves the step it reached; the sweep exits 143 and records no failure. A sweep
    killed with kill -9 takes its run down the same way (the run is told when its sweep
    ends), instead of leaving it running unwatched and holding its workdir."""
    root = tmp_path / "sweep"
    proc = _long_sweep(root, tmp_path / "data")
    workdir = _when_training(proc, root)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 143, err[-3000:]
    assert err.strip().splitlines()[-1] == "interrupted; run the same command again to resume"
    (first,) = _checkpoint_steps(workdir)
    log = (workdir / "train.log").read_text()
    assert f"stopped by SIGTERM: the checkpoint of step {first} is in" in log
    assert not (workdir / "error.txt").exists() and "FAILED" not in out
    workdir_files.check_free(workdir)  # nothing holds it: the run has ended

    proc = _long_sweep(root, tmp_path / "data")
    _when_training(proc, root, steps_past=first)
    proc.kill()
    proc.wait()
    deadline = time.time() + 120
    while "stopped by SIGTERM" not in (workdir / "train.log").read_text():
        assert time.time() < deadline, (workdir / "train.log").read_text()[-3000:]
        time.sleep(0.1)
    log = (workdir / "train.log").read_text()
    assert f"Resumed from {workdir / 'checkpoints'} at step {first}" in log
    while True:  # the run ends just after its last line
        try:
            workdir_files.check_free(workdir)
            break
        except workdir_files.WorkdirBusyError:
            assert time.time() < deadline
            time.sleep(0.1)
    assert _checkpoint_steps(workdir)[-1] > first


def test_a_run_held_by_another_process_is_skipped_not_recorded_as_failed(tmp_path, capsys,
                                                                        monkeypatch):
    """A workdir another process holds (a second sweep on the same root, a run still
    stopping) is not a failure: the sweep skips it, records nothing and goes on; a run that
    finds its workdir taken once started exits 75 (EX_TEMPFAIL), which the sweep reads the
    same way."""
    grid = sweep.Grid(config=CONFIG, base=tuple(a.split("=") for a in BASE.split(",")),
                      families=tuple(sweep.parse_families(["circulant"])), modes=("lora",),
                      seeds=(0,), sets=tuple(a.split("=", 1) for a in TINY))
    (run,) = runner.plan(grid, tmp_path / "sweep")
    with workdir_files.hold(run.workdir):
        assert runner.run_all([run]) == []
        assert "in use by another process, skipped (not recorded" in capsys.readouterr().out
        assert sorted(p.name for p in run.workdir.iterdir()) == [workdir_files.LOCK]
        # taken between the sweep's check and the run's start
        monkeypatch.setattr(workdir_files, "check_free", lambda workdir: None)
        assert runner.execute(run, None) == "busy"
        assert "is in use by another run" in (run.workdir / "train.log").read_text()
        assert not (run.workdir / "error.txt").exists()
