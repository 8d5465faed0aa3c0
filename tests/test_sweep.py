"""scripts/sweep.py: a tiny grid end to end, resuming, commands for launchers, budget matching."""
import csv
import importlib.util
import json
import pathlib
import shlex
import shutil
import sys

import pytest

from surm import inspect as surm_inspect

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs" / "default.py")
BASE = "dataset=bbc_news,checkpoint=random,max_length=32"
TINY = ["total_steps=2", "eval_every=2", "ckpt_every=2", "input.batch_size=8",
        "input.eval_batch_size=64"]

_spec = importlib.util.spec_from_file_location("sweep", ROOT / "scripts" / "sweep.py")
sweep = sys.modules["sweep"] = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(sweep)


def grid_argv(root, data_dir, families="circulant,lowrank:rank=1", seeds="0,1", base=BASE):
    sets = [a for s in TINY + [f"input.data_dir={data_dir}"] for a in ("--set", s)]
    return ["--config", CONFIG, "--base", base, "--families", families, "--modes", "lora",
            "--seeds", seeds, *sets, "--root", str(root)]


def test_tiny_grid_runs_collects_and_resumes(tmp_path, capsys):
    root, data_dir = tmp_path / "sweep", tmp_path / "data"
    assert sweep.main(grid_argv(root, data_dir)) == 0
    summaries = sorted(root.glob("bbc_news/*/summary.json"))
    assert [p.parent.name for p in summaries] == [
        "circulant_lora_seed0", "circulant_lora_seed1",
        "lowrank_rank-1_lora_seed0", "lowrank_rank-1_lora_seed1"]

    with (root / "results.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4 and {r["status"] for r in rows} == {"done"}
    assert {(r["family"], r["hparams"], r["adapter"]) for r in rows} == {
        ("circulant", "", "128"), ("lowrank", "rank=1", "256")}
    assert all(0.0 <= float(r["test"]) <= 1.0 and r["test_accuracy"] == r["test"] for r in rows)
    table = (root / "results.md").read_text().splitlines()
    body = [line for line in table if line.startswith("| bbc_news")]
    assert len(body) == 2 and all(" ± " in line and line.split("|")[-3].strip() == "2"
                                  for line in body)
    assert (root / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # Same command again: every run is skipped, nothing is rewritten.
    stamps = [p.stat().st_mtime_ns for p in summaries]
    capsys.readouterr()
    assert sweep.main(grid_argv(root, data_dir)) == 0
    assert capsys.readouterr().out.count("finished before, skipped") == 4
    assert [p.stat().st_mtime_ns for p in summaries] == stamps

    # A third seed: only the unfinished runs are printed, as commands that parse.
    (root / "results.md").unlink()
    assert sweep.main(grid_argv(root, data_dir, seeds="0,1,2") + ["--print_commands"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2
    for line in lines:
        argv = shlex.split(line)
        assert argv[:3] == ["python", "-m", "surm.train"]
        workdir = pathlib.Path(argv[3].removeprefix("--workdir="))
        assert workdir.name.endswith("_lora_seed2") and (workdir / "run.json").exists()
        assert argv[4].startswith(f"--config={CONFIG}:") and "seed=2" in argv[4]
        assert argv[5:] == [f"--config.{s}" for s in TINY + [f"input.data_dir={data_dir}"]]

    assert sweep.main(["--collect_only", "--root", str(root)]) == 0
    assert (root / "results.md").read_text().count("- pending:") == 2

    # The workdirs gone (a fresh clone), the results.csv kept: nothing runs again and the
    # results are rebuilt from the record.
    record = tmp_path / "record.csv"
    record.write_text((root / "results.csv").read_text())
    shutil.rmtree(root)
    capsys.readouterr()
    assert sweep.main(grid_argv(root, data_dir) + ["--records", str(record)]) == 0
    assert capsys.readouterr().out.count("recorded as done, skipped") == 4
    assert not list(root.glob("bbc_news/*/summary.json"))
    with (root / "results.csv").open() as f:
        again = list(csv.DictReader(f))
    assert sorted((r["family"], r["seed"], r["test"]) for r in again) == sorted(
        (r["family"], r["seed"], r["test"]) for r in rows)
    # a record of the same run with other settings is refused
    changed = record.read_text().replace("total_steps=2", "total_steps=3")
    record.write_text(changed)
    with pytest.raises(sweep.SweepError, match="different settings"):
        sweep.main(grid_argv(root, data_dir) + ["--records", str(record)])
    with pytest.raises(sweep.SweepError, match="not a sweep results.csv"):
        record.write_text("a,b\n1,2\n")
        sweep.main(grid_argv(root, data_dir) + ["--records", str(record)])


def test_print_commands_dedupes_baselines_and_matches_grid_file(tmp_path, capsys):
    families = "circulant,lowrank:rank=1;4,houlsby:rank=8,bitfit,linear_probe,full"
    argv = ["--config", CONFIG, "--base", "checkpoint=random", "--families", families,
            "--modes", "lora,adapter", "--seeds", "0,1", "--datasets", "bbc_news,tweet_sentiment",
            "--set", "total_steps=20", "--root", str(tmp_path / "a"), "--print_commands"]
    assert sweep.main(argv) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    # (2 circulant + 4 lowrank + houlsby + 3 baselines) x 2 datasets x 2 seeds
    assert len(lines) == 10 * 2 * 2
    workdirs = [shlex.split(line)[3] for line in lines]
    assert len(set(workdirs)) == len(workdirs)
    assert sum("/bbc_news/bitfit_seed" in w for w in workdirs) == 2
    assert sum("houlsby_rank-8_adapter" in w for w in workdirs) == 4

    grid = {"config": CONFIG, "base": {"checkpoint": "random"},
            "families": families.split(","), "modes": ["lora", "adapter"], "seeds": [0, 1],
            "datasets": ["bbc_news", "tweet_sentiment"], "set": {"total_steps": 20},
            "root": str(tmp_path / "a")}
    (tmp_path / "grid.json").write_text(json.dumps(grid))
    commands = tmp_path / "commands.sh"
    assert sweep.main(["--grid", str(tmp_path / "grid.json"), "--write_commands",
                       str(commands)]) == 0
    assert commands.read_text().strip().splitlines() == lines


def test_failed_run_is_recorded_and_the_sweep_goes_on(tmp_path):
    root = tmp_path / "sweep"
    argv = grid_argv(root, tmp_path / "data", families="circulant", seeds="0",
                     base="dataset=bbc_news,checkpoint=/nonexistent/bert")
    assert sweep.main(argv) == 1
    error = (root / "bbc_news" / "circulant_lora_seed0" / "error.txt").read_text()
    assert error.startswith("exit status 1") and "not found" in error
    assert "- failed:" in (root / "results.md").read_text()


def test_budget_matcher_is_exact():
    config = sweep.load_config(CONFIG, "checkpoint=random")
    n, layers = config.model.bert.hidden_size, config.model.bert.num_layers
    targets = 2 * layers  # query and value in every layer, n x n each
    budget = 2 * n * targets  # exactly lowrank rank 1

    found = {m.family: m for m in sweep.match_budget(
        config, budget, ["lowrank", "ldr", "block_circulant", "circulant", "toeplitz", "dense"])}
    assert found["lowrank"].hparams == {"rank": 1} and found["lowrank"].params == budget
    assert found["ldr"].hparams == {"rank": 1} and found["ldr"].fits
    assert found["block_circulant"].hparams == {"block_size": n // 2}
    assert found["circulant"].hparams == {"form": "hadamard"}
    assert found["toeplitz"].params == (2 * n - 1) * targets and found["toeplitz"].fits
    assert not found["dense"].fits and found["dense"].params == n * n * targets

    # The count is the trainer's: build the real model and count what it trains.
    with config.unlocked():
        config.peft.family, config.peft.hparams = "lowrank", {"rank": 1}
    counts = surm_inspect.describe(config)
    assert counts["adapter"] == counts["adapters_total"] == budget
    assert counts["trainable"] == found["lowrank"].counts["trainable"]

    (over,) = sweep.match_budget(config, budget - 1, ["lowrank"])
    assert over.hparams == {"rank": 1} and not over.fits
    (listed,) = sweep.match_budget(config, 10 * budget, ["lowrank:rank=2;4;16"])
    assert listed.hparams == {"rank": 4}


def test_budget_cli_prints_the_matches(capsys):
    argv = ["--config", CONFIG, "--base", "checkpoint=random", "--families", "lowrank,houlsby",
            "--modes", "lora", "--budget", "256", "--match_only"]
    assert sweep.main(argv) == 0
    out = capsys.readouterr().out
    lowrank = next(line for line in out.splitlines() if line.startswith("lowrank"))
    assert "rank=1" in lowrank and lowrank.endswith("fits")
    houlsby = next(line for line in out.splitlines() if line.startswith("houlsby"))
    assert "adapter" in houlsby and "OVER" in houlsby


@pytest.mark.parametrize("families,message", [
    ("lowrnk", "unknown family 'lowrnk'"),
    ("lowrank:rank", "is not HPARAM=V1;V2"),
    ("lowrank:ranks=4", "unknown config argument 'ranks'"),
    ("circulant:factors=4x4", "family=kronecker only"),
])
def test_bad_grids_fail_before_running(tmp_path, families, message):
    with pytest.raises(sweep.SweepError, match=message):
        sweep.main(["--config", CONFIG, "--families", families, "--root", str(tmp_path)])
    assert not any(tmp_path.iterdir())


def test_grid_syntax():
    (fam,) = sweep.parse_families(["kronecker:rank=1;2:factors=16x48"])
    assert fam.name == "kronecker"
    assert fam.combos() == [{"rank": 1, "factors": (16, 48)}, {"rank": 2, "factors": (16, 48)}]
    with pytest.raises(sweep.SweepError, match="--set"):
        sweep.main(["--config", CONFIG, "--families", "lowrank", "--set", "total_steps",
                    "--root", "unused"])


def test_dataset_folders_are_safe_names():
    assert sweep._dataset_folder("glue/sst2") == "glue-sst2"
    a = sweep._dataset_folder("csv:/tmp/x/my data.csv?text=a&label=b")
    b = sweep._dataset_folder("csv:/tmp/x/my data.csv?text=a&label=c")
    assert a.startswith("csv-my_data-") and a != b
    assert all(c.isalnum() or c in "_.-" for c in a)
