"""surm.cka with scripts/cka.py, scripts/bench_train.py, scripts/bench_lora_path.py and
surm.study."""
import importlib.util
import json
import pathlib
import re
import sys

import numpy as np
import pytest

from surm import cka, sweep
from surm.study import parts as study_parts, report as study_report, run as study_run
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
    assert "weights" not in by_method["houlsby (rank=2)"]  # adapters: no matrix
    lora = by_method["lora lowrank (rank=1)"]["weights"]
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
    each method at each of its lrs, and the seeds the comparisons need."""
    monkeypatch.setattr(study_parts, "ROOT", tmp_path)
    counts = {part.name: len(study_run._planned(part, [])) for part in study_parts.PARTS}
    # few-shot: LoRA r=1 and three SURM families at equal budgets, and the probe, 3 lrs each;
    # full fine-tuning at 3 x 2 (its tuning seed only: a reference curve)
    assert counts["vit_k5"] == counts["vit_k10"] == counts["vit_k50"] == 5 * 3 + 6
    # bbc: circulant and block-circulant in both modes, Houlsby, LoRA r=1/r=8, probe at 3 lrs;
    # full at 3 x 2
    assert counts["text_bbc"] == 8 * 3 + 6
    # tweets: circulant in both modes, Houlsby, LoRA r=1/r=8, probe; full at 3 x 2
    assert counts["text_tweets"] == 6 * 3 + 6
    assert counts["lm_bbc5"] == 8  # the lrs lm_bbc chose: one each
    seeds = {part.name: len(part.seeds) for part in study_parts.PARTS}
    assert seeds["vit_k5"] == seeds["vit_k10"] == 10 and min(seeds.values()) == 5
    vit, tweets = study_parts.BY_NAME["vit_k5"], study_parts.BY_NAME["text_tweets"]
    full = dict(method="full", structure="-")
    assert vit.seeds_of(full) == (0,) and tweets.seeds_of(full) == tweets.seeds
    assert vit.seeds_of(dict(method="lora", structure="circulant")) == vit.seeds
    # every comparison the report judges names methods the parts run
    names = {p.name: {study_report.display(r.meta) for r in study_run._planned(p, [])} for p in study_parts.PARTS}
    for _, _, pairs in study_report._tables():
        for part, ours, theirs in pairs:
            assert {ours, theirs} <= names[part], (part, ours, theirs)


def _fake_record(part, rows_for, tmp_path, n=400):
    """A record of ``part`` as a fresh clone has it: its CSV and its archive of test
    predictions, the workdirs gone. ``rows_for(run)`` gives (validation, seed -> accuracy) for
    a tuning run."""
    from surm import predictions
    from surm.sweep import archive
    rng = np.random.default_rng(0)
    label = rng.integers(0, 10, n)
    rows, tried = [], set()
    while True:  # the runs planned, then those that widen a grid where a choice is at its edge
        runs = [r for r in study_run._planned(part, rows) if sweep.run_key(r.meta) not in tried]
        if not runs:
            break
        new = _fake_runs(part, runs, rows_for, rng, label, tmp_path, len(rows), n)
        tried |= {sweep.run_key(r.meta) for r in runs} | {sweep.run_key(r) for r in new}
        rows += new
    sweep.write_csv(archive.write(rows, part.record), part.record)
    for file in (tmp_path / "gone").iterdir():
        file.unlink()
    return rows


def _fake_runs(part, runs, rows_for, rng, label, tmp_path, start, n):
    from surm import predictions
    rows = []
    for run in runs:
        val, acc = rows_for(run.meta)
        if val is None:  # not finished
            continue
        seeds = part.seeds if acc is not None else (0,)
        for seed in seeds:
            accuracy = acc(seed) if acc is not None else 0.3
            right = rng.uniform(size=n) < accuracy
            logits = np.eye(10, dtype=np.float32)[np.where(right, label, (label + 1) % 10)]
            file = tmp_path / "gone" / f"{start + len(rows)}.npz"
            predictions.write(file, predictions.make("classification", np.arange(n), logits,
                                                     label, ("accuracy",)))
            test = predictions.metrics(predictions.read(file))["accuracy"]
            rows.append(dict(run.meta, seed=seed, status="done", validation=val,
                             validation_loss=1.0, test=test, trainable=100, adapter=10,
                             base=1000, wall_seconds=5.0, workdir="sweeps/gone",
                             settings=json.dumps(list(run.settings)),
                             curve=json.dumps([[20, val - 0.1], [80, val]]),
                             predictions=str(file)))
    return rows


def test_study_report_rebuilds_from_its_record(tmp_path, monkeypatch, capsys):
    """A fresh clone has the record (CSV and archived test predictions) and no workdirs: the
    report chooses each method's lr on validation, judges every SURM method against LoRA r=1
    paired by seed over seeds and test examples, Holm-corrected, and says what it found."""
    monkeypatch.setattr(study_parts, "ROOT", tmp_path / "sweeps")
    monkeypatch.setattr(study_parts, "RECORDS", tmp_path / "records")
    monkeypatch.setattr(study_parts, "DOC", tmp_path / "RESULTS.md")
    study_parts.RECORDS.mkdir()
    part = study_parts.BY_NAME["vit_k5"]
    lift = {"circulant": 0.25, "symmetric_toeplitz": 0.0, "ldr": -0.25}  # true differences

    def rows_for(meta):  # the middle lr of each grid is best on validation; ldr still tuning
        if meta["structure"] == "ldr" and meta["lr"] == 1e-2:
            return None, None
        if meta["method"] == "full":  # best at head lr 3e-3, below which the grid widens
            return (0.7 if (meta["lr"], meta["head_lr"]) == (1e-4, 3e-3) else 0.5), None
        if meta["lr"] != (1e-2 if meta["method"] == "probe" else 3e-3):
            return 0.5, None
        return 0.7, lambda seed: 0.5 + lift.get(meta["structure"], 0.0) + 0.01 * seed

    rows = _fake_record(part, rows_for, tmp_path)
    study_report.report([part])
    doc = study_parts.DOC.read_text()
    table = doc.split("## Low-resource images")[1]
    lora = next(line for line in table.splitlines() if line.startswith("| LoRA r=1 |"))
    assert "(lr 0.003)" in lora and "[10 seeds]" not in lora
    assert "| majority class (best constant) |" in table
    assert "| linear probe | 100 | 0.5" in table and "(lr 0.01)" in table
    # full fine-tuning ran its tuning seed alone: one seed, said so, and not judged
    full = next(line for line in table.splitlines() if line.startswith("| full fine-tuning |"))
    assert "[tuning seed only: a reference curve, not compared]" in full and " of 10 seeds" not in full
    assert "full fine-tuning at the tuning seed alone" in table
    compared = [line for line in table.splitlines() if line.startswith("| vit_k5 |")]
    verdicts = {line.split("|")[2].strip(): line.split("|")[-2].strip() for line in compared}
    # circulant is better by 0.25 on every seed; symmetric Toeplitz is LoRA's equal; LDR has
    # not finished its tuning and is not judged
    assert verdicts == {"circulant C(a·b)": "**win**",
                        "symmetric Toeplitz T(a)T(b)": "**no detectable difference**"}
    # LDR's comparison, still waiting, counts in the correction (at p = 1) and is named so
    assert "Holm-corrected over the 3 comparisons of this table (1 of them still waiting" in table
    assert "1 not judged yet (their runs have not finished): LDR r=1 [lora] vs LoRA r=1" in doc
    assert "bootstrap over seeds x examples" in table  # from the archived predictions
    assert "circulant C(a·b) vs LoRA r=1 (vit_k5): win (+0.2" in doc  # the claims table
    assert (study_parts.RECORDS / "curves_vit_k5.png").exists()
    # the record is the study's: rewritten with the same finished runs
    assert len(sweep.read_records([part.record])) == len(rows)
    # the plan counts what is left, a still-tuning method with its other seeds, and the time
    # it takes at the median wall time of the finished runs (5 s each here)
    capsys.readouterr()
    study_run.plan_summary([part])
    line = capsys.readouterr().out.splitlines()[0]
    found = re.search(r"(\d+) to go,\s+1 methods still tuning .* \((\d+) runs at 5 s\)", line)
    assert found and int(found[2]) == int(found[1]) + len(part.seeds) - 1, line

    # A record whose archive keys an older version wrote (keys name runs by their key): the
    # report rewrites record and archive and judges from the predictions all the same.
    from surm import predictions
    from surm.sweep import archive
    keys = {r["predictions"].partition("#")[2] for r in sweep.read_csv(part.record)}
    with np.load(archive.path_for(part.record)) as z:
        arrays = {("old" + k if k.split(".")[0] in keys else k): z[k] for k in z.files}
    predictions.write(archive.path_for(part.record), arrays)
    text = part.record.read_text()
    for key in keys:
        text = text.replace("#" + key, "#old" + key)
    part.record.write_text(text)
    study_report.report([part])
    assert "bootstrap over seeds x examples" in study_parts.DOC.read_text().split(
        "## Low-resource images")[1]
    # a record naming predictions its archive lacks is refused, not judged without them
    ref = sweep.read_csv(part.record)[0]["predictions"]
    with pytest.raises(ValueError, match="record and its archive are from different writes"):
        archive.load_scores(ref + "x")


def test_study_table_of_a_language_model_ranks_perplexity_lowest_first(tmp_path, monkeypatch):
    """lm_bbc5: a lower test perplexity wins, judged paired by seed (the t-test alone where no
    predictions are kept), and the untouched model's perplexity comes from the record."""
    monkeypatch.setattr(study_parts, "ROOT", tmp_path)
    monkeypatch.setattr(study_parts, "RECORDS", tmp_path / "records")
    part = study_parts.BY_NAME["lm_bbc5"]
    test = {"circulant": 28.0, "toeplitz": 33.0, "lowrank": 31.0}
    rows = [dict(r.meta, seed=seed, status="done", validation=test[r.meta["structure"]],
                 validation_loss=1.0, test=test[r.meta["structure"]] + 0.1 * seed
                 + 0.01 * (seed % 2) * (r.meta["structure"] == "toeplitz"), trainable=10,
                 adapter=10, base=1000, wall_seconds=5.0, workdir="gone", settings="[]",
                 curve=json.dumps([[0, 47.7], [8, 40.0], [32, 30.0]]))
            for r in study_run._planned(part, []) if r.meta["structure"] in test
            and r.meta["hparams"] in ("", "rank=1") for seed in part.seeds]
    judged = study_report.judge([(part, "circulant [lora]", "LoRA r=1"),
                          (part, "Toeplitz [lora]", "LoRA r=1")], {part.name: rows})
    assert [(j.ours, j.verdict.outcome) for j in judged] == [("circulant [lora]", "win"),
                                                             ("Toeplitz [lora]", "loss")]
    assert judged[0].verdict.comparison.test == "paired t over seeds"
    assert study_report._untouched(rows) == 47.7


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
