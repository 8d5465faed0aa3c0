"""scripts/cka.py, scripts/bench_train.py and scripts/study.py."""
import importlib.util
import json
import pathlib
import sys

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _script(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = sys.modules[name] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


cka = _script("cka")
bench_train = _script("bench_train")
bench_lora_path = _script("bench_lora_path")
study = _script("study")
sweep = _script("sweep")


def _gram_cka(x, y):
    """CKA through centred Gram matrices (HSIC form): an independent route to the same value."""
    n = len(x)
    h = np.eye(n) - np.ones((n, n)) / n
    k, l_ = x @ x.T, y @ y.T
    hsic = lambda a, b: np.trace(a @ h @ b @ h)  # noqa: E731
    return hsic(k, l_) / np.sqrt(hsic(k, k) * hsic(l_, l_))


def test_linear_cka_matches_the_gram_form_and_its_invariances():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((40, 12))
    y = x @ rng.standard_normal((12, 7)) + 0.5 * rng.standard_normal((40, 7))
    assert cka.linear_cka(x, y) == pytest.approx(_gram_cka(x, y), rel=1e-10)
    assert cka.linear_cka(x, x) == pytest.approx(1.0)
    q, _ = np.linalg.qr(rng.standard_normal((12, 12)))
    assert cka.linear_cka(x, 3.0 * x @ q + 1.0) == pytest.approx(1.0)  # rotation, scale, shift
    assert cka.linear_cka(x, rng.standard_normal((40, 12))) < 0.5
    with pytest.raises(ValueError, match="same rows"):
        cka.linear_cka(x, y[:10])
    with pytest.raises(ValueError, match="zero update"):
        cka.linear_cka(np.zeros((5, 3)), x[:5])


def test_cka_end_to_end_on_tiny_runs(tmp_path, capsys):
    from test_sweep import grid_argv  # its tiny runs: circulant and LoRA r=1 compile once
    root = tmp_path / "sweep"
    assert sweep.main(grid_argv(root, tmp_path / "data", seeds="0",
                                families="full,circulant,lowrank:rank=1,houlsby:rank=2")) == 0
    runs = root / "bbc_news"
    assert cka.main(["--full", str(runs / "full_seed0"), "--json", "--runs",
                     str(runs / "circulant_lora_seed0"),
                     str(runs / "lowrank_rank-1_lora_seed0")]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for run in out["runs"].values():
        assert run["matrices"] == 4  # q and v of 2 layers
        assert 0.0 <= run["min"] <= run["mean"] <= run["max"] <= 1.0 + 1e-9
    # an adapter-mode run has no weight update matrix: a clear error
    with pytest.raises(ValueError, match="no weight update"):
        cka.weight_updates(runs / "houlsby_rank-2_adapter_seed0")
    with pytest.raises(FileNotFoundError, match="finished surm.train workdir"):
        cka.weight_updates(tmp_path)


def test_bench_train_prints_the_ratios_last(capsys):
    assert bench_train.main(["--models", "vit_ti16", "--vit_depth", "2", "--image_size", "32",
                             "--steps", "2", "--warmup", "1", "--image_batch", "2",
                             "--families", "toeplitz",
                             "--lora_paths", "structured,dense", "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for key in ("surm_over_lora_time", "surm_over_lora_memory", "surm_over_full_time",
                "merged_over_base_time"):
        assert out[key] > 0
    assert out["models"]["vit_ti16"]["depth"] == 2
    methods = out["models"]["vit_ti16"]["methods"]
    assert set(methods) == {"toeplitz[structured]", "toeplitz[dense]", "lora_r1", "lora_r8",
                            "full"}
    # memory from XLA's buffer assignment: full fine-tuning holds gradients and Adam moments of
    # every weight, the PEFT methods only of theirs
    assert methods["full"]["peak_mb"] > 2 * methods["toeplitz[dense]"]["peak_mb"]
    assert methods["toeplitz[dense]"]["trainable"] == methods["toeplitz[structured]"]["trainable"]
    assert methods["toeplitz[dense]"]["trainable"] < methods["lora_r1"]["trainable"]
    assert out["lora_path"]["vit_ti16"] == "dense"  # auto's pick for a 192-wide Toeplitz on a CPU
    ratios = out["models"]["vit_ti16"]["ratios"]  # the headline is the path auto picks
    assert ratios["surm_over_lora_time"] == pytest.approx(
        methods["toeplitz[dense]"]["step_ms"] / methods["lora_r1"]["step_ms"])
    with pytest.raises(SystemExit):
        bench_train.main(["--models", "vit_ti16", "--lora_paths", "fft"])


def test_bench_lora_path_checks_the_paths_agree_and_reports_the_crossover(capsys):
    assert bench_lora_path.main(["--widths", "32,64", "--tokens", "16", "--steps", "1",
                                 "--warmup", "0", "--families", "circulant", "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    fam = out["families"]["circulant"]
    assert [r["width"] for r in fam["rows"]] == [32, 64]
    assert all(r[f"{path}_ms"] > 0 for r in fam["rows"]
               for path in ("frozen", "structured", "dense", "mixed"))
    assert all(r["best"] == min(("structured", "dense", "mixed"), key=lambda p: r[f"{p}_ms"])
               for r in fam["rows"])
    assert fam["dense_max_width"] in (0, 32, 64)


def test_study_commands_are_valid_grids(tmp_path):
    commands = study.sweep_commands(seeds=(0,))
    assert len(commands) == len(study.REGIMES) * len(study.PARTS)
    counts = []
    for cmd in commands:
        assert cmd[1] == "scripts/sweep.py"
        root_at = cmd.index("--root")
        args = sweep.build_parser().parse_args(cmd[2:root_at] + ["--root", str(tmp_path)])
        grid, root = sweep.load_grid(args)
        counts.append(len(sweep.plan(grid, root)))  # resolves every run's config
    # per regime: 7 baselines x 2 datasets, then 8 structured settings x 2 modes x 2 datasets
    assert counts == [14, 32] * len(study.REGIMES)


def test_study_report_rebuilds_from_its_record(tmp_path, monkeypatch):
    """A fresh clone has the record (docs/results/*.csv) and no workdirs: the report takes the
    planned runs from the record, leaves out rows no longer planned, and the sweeps resume
    from it."""
    monkeypatch.setattr(study, "ROOT", tmp_path / "sweeps")
    monkeypatch.setattr(study, "RECORDS", tmp_path / "records")
    study.RECORDS.mkdir()
    root = str(study.ROOT / "full")
    commands = [c for c in study.sweep_commands((0,)) if c[c.index("--root") + 1] == root]
    assert not any("--records" in c for c in commands)
    keys = sorted(study.planned_keys(commands))
    assert len(keys) == 14 + 32

    def row(key, test):
        dataset, family, mode, hparams, seed = key
        return dict(dataset=dataset, family=family, mode=mode, hparams=hparams, seed=seed,
                    status="done", metric="accuracy", test=test, trainable=100, adapter=10,
                    base=1000, wall_seconds=5.0, workdir="sweeps/gone", test_accuracy=test)

    unplanned = ("bbc_news", "circulant", "lora", "block_size=7", "0")
    sweep.write_csv([row(keys[0], 0.5), row(keys[1], 0.75), row(unplanned, 0.9)],
                    study.records_file("full"))
    rows = study._collect("full", commands)
    done = [r for r in rows if r["status"] == "done"]
    assert sorted(sweep.run_key(r) for r in done) == keys[:2]
    assert sorted(r["test"] for r in done) == [0.5, 0.75]  # numbers again, not text
    assert sum(r["status"] == "not run" for r in rows) == len(keys) - 2
    assert len(sweep.read_records([study.records_file("full")])) == 2  # the record, rewritten
    assert (study.RECORDS / "pareto_full.png").exists()
    resumed = [c for c in study.sweep_commands((0,)) if c[c.index("--root") + 1] == root]
    assert all(c[-2:] == ["--records", str(study.records_file("full"))] for c in resumed)
