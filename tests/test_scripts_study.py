"""surm.cka with scripts/cka.py, scripts/bench_train.py, scripts/bench_lora_path.py and
scripts/study.py."""
import importlib.util
import json
import pathlib
import sys

import numpy as np
import pytest

from surm import cka, sweep
from surm.sweep import runner
from surm.sweep.__main__ import main as sweep_main

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _script(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = sys.modules[name] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


cka_script = _script("cka")
bench_train = _script("bench_train")
bench_lora_path = _script("bench_lora_path")
study = _script("study")


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


def test_cka_ceilings_and_representations_on_tiny_runs(tmp_path, capsys):
    from test_sweep import grid_argv  # its tiny runs: circulant and LoRA r=1 compile once
    from surm.runs import load_run
    root = tmp_path / "sweep"
    assert sweep_main(grid_argv(root, tmp_path / "data", seeds="0,1",
                                families="full,circulant,lowrank:rank=1,houlsby:rank=2")) == 0
    runs = {p.name.split("_lr")[0] + p.name[-6:]: p for p in (root / "bbc_news").iterdir()}
    assert cka_script.main(["--full", str(runs["full_seed0"]), "--full_other",
                            str(runs["full_seed1"]), "--examples", "40", "--json", "--runs",
                            str(runs["circulant_lora_seed0"]),
                            str(runs["lowrank_rank-1_lora_seed0"]),
                            str(runs["houlsby_rank-2_adapter_seed0"])]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    by_method = {r["method"]: r for r in out["runs"].values()}
    for r in out["runs"].values():
        layers = r["representations"]["per_layer"]
        assert len(layers) == 2 and all(0.0 <= v <= 1.0 + 1e-9 for v in layers)  # 2 blocks
    assert "weights" not in by_method["houlsby (rank=2) [adapter]"]  # adapters: no matrix
    lora = by_method["lowrank (rank=1) [lora]"]["weights"]
    assert lora["matrices"] == 4 and 0.0 <= lora["mean"] <= 1.0 + 1e-9
    assert by_method["full"]["weights"]["matrices"] == 4  # full vs full on the same q, v
    assert "ceiling_mean" not in by_method["full"]["weights"]

    # The ceiling of a rank-1 update is the CKA of the full update's best rank-1 approximation
    # (numpy's SVD, Eckart-Young), whatever the run learned.
    full = load_run(runs["full_seed0"])
    delta = cka.weight_updates(full)
    like = load_run(runs["lowrank_rank-1_lora_seed0"])
    path = "encoder/layer/0/attention/self/query"
    S = like.trainable["adapters"]["encoder"]["layer"]["0"]["attention"]["self"]["query"]["S"]
    u, s, vt = np.linalg.svd(delta[path])
    best = s[0] * np.outer(u[:, 0], vt[0])
    assert cka.ceiling(delta[path], S) == pytest.approx(cka.linear_cka(delta[path], best),
                                                         abs=1e-4)
    # the circulant ceiling: the mean of each wrapped diagonal (scipy's circulant as oracle)
    import scipy.linalg
    circ = load_run(runs["circulant_lora_seed0"])
    C = circ.trainable["adapters"]["encoder"]["layer"]["0"]["attention"]["self"]["query"]["S"]
    n = delta[path].shape[0]
    col = [np.mean([delta[path][(i + k) % n, i] for i in range(n)]) for k in range(n)]
    assert cka.ceiling(delta[path], C) == pytest.approx(
        cka.linear_cka(delta[path], scipy.linalg.circulant(col)), abs=1e-4)
    with pytest.raises(FileNotFoundError, match="finished surm.train workdir"):
        load_run(tmp_path)


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
                            "linear_probe", "bitfit", "full"}
    # the probe is a forward pass and the head: no activations kept for a backward pass
    assert methods["linear_probe"]["temp_mb"] < methods["bitfit"]["temp_mb"] / 2
    assert out["probe_over_full_time"] > 0
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


def test_study_parts_are_valid_grids(tmp_path, monkeypatch):
    """Every run the study plans resolves through its config (a typo fails here, not hours in),
    and the text parts plan every method at each of its lrs."""
    monkeypatch.setattr(study, "ROOT", tmp_path)
    counts = {part.name: len(study._planned(part, [])) for part in study.PARTS}
    # per dataset: 8 structured (5 lora, 3 adapter) + 5 LoRA/Houlsby/BitFit at 3 lrs, probe at 3
    # head lrs, full at 3 x 2
    assert counts["text_full"] == counts["text_k64"] == 2 * (13 * 3 + 3 + 6)
    assert counts["text_matched_k5"] == 2 * 4 * 3
    assert counts["vit_mnist"] == 4 * 3 + 2 * 3 + 3 + 6
    assert counts["lm_bbc"] == (5 + 3 + 1) * 3  # 5 families, LoRA r=1/4/8, full: 3 lrs each
    assert all(count > 0 for count in counts.values())


def test_study_report_rebuilds_from_its_record(tmp_path, monkeypatch):
    """A fresh clone has the record (docs/results/*.csv) and no workdirs: the report chooses
    each method's lr from the record alone, and leaves out methods still tuning."""
    monkeypatch.setattr(study, "ROOT", tmp_path / "sweeps")
    monkeypatch.setattr(study, "RECORDS", tmp_path / "records")
    monkeypatch.setattr(study, "DOC", tmp_path / "RESULTS.md")
    study.RECORDS.mkdir()
    part = study.BY_NAME["text_matched_k5"]
    planned = study._planned(part, [])
    score = {1e-3: 0.6, 3e-3: 0.7, 1e-2: 0.5}  # inside every grid: nothing widens

    def row(run, seed=0, test=None):
        m = run.meta
        return dict(m, seed=seed, status="done", validation=score[m["lr"]], validation_loss=1.0,
                    test=test if test is not None else score[m["lr"]] - 0.1, trainable=100,
                    adapter=10, base=1000, wall_seconds=5.0, workdir="sweeps/gone",
                    settings=json.dumps(list(run.settings)))

    rows = [row(r) for r in planned if r.meta["family"] != "ldr"]  # ldr: still tuning
    rows += [row(runner.Run(r.settings, r.workdir, {**r.meta, "seed": seed}), seed, 0.55)
             for r in planned if r.meta["family"] != "ldr" and r.meta["lr"] == 3e-3
             for seed in (1, 2)]
    sweep.write_csv(rows, part.record)
    study.report([part])
    doc = study.DOC.read_text()
    assert "## Equal budgets with few examples" in doc
    table = doc.split("## Equal budgets with few examples")[1]
    lora = next(line for line in table.splitlines() if line.startswith("| lowrank (rank=1)"))
    # seed 0 at its best validation (lr 3e-3: test 0.6), seeds 1 and 2 there (0.55)
    assert "0.5667 ± 0.0289 (lr 0.003)" in lora
    assert not any(line.startswith("| ldr") for line in table.splitlines())  # still tuning
    # the record is the study's: rewritten with the same finished runs
    assert len(sweep.read_records([part.record])) == len(rows)


def test_study_table_of_a_language_model_ranks_perplexity_lowest_first(tmp_path, monkeypatch):
    """lm_bbc: the lr with the lowest validation perplexity is chosen, the best SURM method is
    the one with the lowest validation perplexity, and a lower test perplexity wins."""
    monkeypatch.setattr(study, "ROOT", tmp_path)
    part = study.BY_NAME["lm_bbc"]
    keep = {"circulant", "toeplitz", "lowrank"}
    planned = [r for r in study._planned(part, []) if r.meta["family"] in keep
               and r.meta["hparams"] in ("", "rank=1")]
    assert {r.meta["metric"] for r in planned} == {"perplexity"}
    # validation perplexity per lr: the middle one of the grid is the lowest for every method
    low, mid, high = sorted({r.meta["lr"] for r in planned})
    val = {low: 40.0, mid: 30.0, high: 35.0}
    test = {"circulant": 28.0, "toeplitz": 33.0, "lowrank": 31.0}  # at the chosen lr
    shift = {"circulant": 0.0, "toeplitz": 1.0, "lowrank": 0.5}

    rows = [dict(r.meta, seed=seed, status="done", validation=val[r.meta["lr"]] + shift[
        r.meta["family"]], validation_loss=1.0, test=test[r.meta["family"]] + 0.1 * seed
        + (100.0 if r.meta["lr"] != mid else 0.0), trainable=10, adapter=10, base=1000,
        wall_seconds=5.0, workdir="gone", settings="[]")
        for r in planned for seed in ((0, 1, 2) if r.meta["lr"] == mid else (0,))]
    table, notes = study.comparison_table(part, rows)
    circ = next(line for line in table if line.startswith("| circulant"))
    assert f"28.1000 ± 0.1000 | {mid:g}" in circ
    note = notes[0]
    assert "best SURM on validation: circulant [lora], test 28.1000" in note
    assert "vs LoRA r=1 (31.1000, 10 params): best SURM wins; of 2 SURM methods 1 win, " \
           "0 tie, 1 lose" in note


def test_bench_train_times_a_causal_lm_without_probe_or_bitfit(capsys):
    assert bench_train.main(["--models", "llama_tiny", "--steps", "1", "--warmup", "0",
                             "--seq_len", "8", "--text_batch", "2", "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    methods = out["models"]["llama_tiny"]["methods"]
    assert set(methods) == {"circulant", "lora_r1", "lora_r8", "full"}
    assert "probe_over_full_time" not in out and out["surm_over_lora_time"] > 0
    assert methods["full"]["trainable"] > 100 * methods["circulant"]["trainable"]


def test_bench_peer_without_pytorch_says_how_to_install_it(monkeypatch, capsys):
    bench_peer = _script("bench_peer")
    for name in ("torch", "transformers", "peft"):
        monkeypatch.setitem(sys.modules, name, None)  # as on a machine without them
    assert bench_peer.main(["--steps", "1"]) == 2
    err = capsys.readouterr().err
    assert "not project dependencies" in err and "pip install torch transformers peft" in err
    with pytest.raises(SystemExit):
        bench_peer.main(["--methods", "lora_r8,prefix"])
