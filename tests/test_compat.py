"""What an earlier surm wrote still loads: a classifier's and a causal LM's workdir (config,
adapters with their base identity, outputs, predictions), and a sweep's results.csv.

The fixtures under tests/fixtures/v1 were written by surm's trainer and sweep (tiny random
models: a 2-step circulant run on bbc_news in a sweep, a 2-step causal-LM run on a text file)
before the trainer and the task interface were restructured; they are never rewritten. They
were written under the tests' XLA flags (conftest.py): a random base's weights depend on XLA's
optimisation level in their last bits, and the adapters record their base's exact hash."""
import json
import pathlib
import shutil

import jax.numpy as jnp
import ml_collections
import numpy as np

from surm import config_fields, predictions, runs, sweep
from surm.interop import export
from surm.sweep import records, results, selection
from surm.train import checks

FIXTURES = pathlib.Path(__file__).resolve().parent / "fixtures" / "v1"


def _copy(name, tmp_path):
    return pathlib.Path(shutil.copytree(FIXTURES / name, tmp_path / name))


def test_an_earlier_classifier_workdir_loads_exports_and_its_predictions_hold(tmp_path):
    workdir = _copy("classifier", tmp_path)
    assert "family" in json.loads((workdir / "config.json").read_text())["peft"]
    # its config, read in today's words (peft method and structure), is still a valid config,
    # and a resume with it is not refused for the words it was written in
    config = ml_collections.ConfigDict(runs.read_config(workdir))
    config_fields.check(config)
    assert (config.peft.method, config.peft.structure) == ("lora", "circulant")
    assert checks.resume_changes(config, workdir) == {}
    # its sweep record (run.json, family and mode) reads as a results row
    row = records.read_run(workdir / "run.json")
    assert (row["method"], row["structure"], row["status"]) == ("lora", "circulant", "done")
    run = runs.load_run(workdir)
    assert run.num_classes == 5 and run.spec.structure == "circulant"
    tokens = jnp.ones((2, 32), jnp.int32)
    from surm import peft
    logits = peft.apply(run.model, run.frozen, run.trainable, run.spec, tokens, tokens * 0 + 1)
    assert logits.shape == (2, 5) and np.isfinite(np.asarray(logits)).all()
    written = export.export(workdir, tmp_path / "out")
    assert pathlib.Path(written["merged"]).is_dir()
    lines = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
    test = next(l for l in lines if "test_accuracy" in l)
    pred = predictions.read(predictions.path(workdir, "test", test["step"]))
    assert predictions.metrics(pred)["accuracy"] == test["test_accuracy"]


def test_an_earlier_causal_lm_workdir_generates(tmp_path):
    from surm.generate import Generator
    workdir = _copy("lm", tmp_path)
    config = json.loads((workdir / "config.json").read_text())
    config["input"]["dataset"] = f"text:{FIXTURES / 'lm_text.txt'}"
    (workdir / "config.json").write_text(json.dumps(config))
    gen = Generator.from_workdir(workdir)
    assert isinstance(gen("document", max_tokens=3), str)


def test_an_earlier_sweep_record_reads_chooses_and_compares(tmp_path):
    rows = sweep.read_csv(FIXTURES / "sweep_results.csv")
    assert len(rows) == 1 and rows[0]["status"] == "done"
    (picked,) = selection.select(rows)
    assert (picked["method"], picked["structure"]) == ("lora", "circulant")
    assert picked["tried"] == 1
    results.write_markdown(rows, tmp_path / "results.md")
    assert "| bbc_news | lora | circulant |" in (tmp_path / "results.md").read_text()
    assert sweep.read_records([FIXTURES / "sweep_results.csv"])  # usable as --records


def test_an_earlier_sweep_workdir_is_found_and_not_rerun(tmp_path, monkeypatch):
    """The grid that made the fixture's run (a sweep of the earlier version) plans the same
    workdir name and the same settings today, so a root swept before resumes with nothing
    rerun; its run.json reads as a finished results row."""
    from surm import defaults
    from surm.sweep import runner
    meta = json.loads((FIXTURES / "classifier" / "run.json").read_text())
    table = defaults.load()  # the head lr that run took from the table then
    table["text"]["methods"]["lora circulant"] = {"lr": 1e-3, "head_lr": meta["head_lr"],
                                                  "from": "the fixture's run"}
    monkeypatch.setattr(defaults, "load", lambda path=defaults.FILE: table)
    monkeypatch.chdir(pathlib.Path(__file__).resolve().parents[1])  # configs/ as the run saw it
    grid = sweep.Grid(config="configs/default.py",
                      base=(("dataset", "bbc_news"), ("checkpoint", "random"),
                            ("max_length", "32")),
                      families=tuple(sweep.parse_families(["circulant:lr=0.001"])),
                      modes=("lora",), seeds=(0,),
                      sets=tuple(s.removeprefix("--config.").split("=")
                                 for s in meta["settings"][1:]))
    (run,) = sweep.plan(grid, tmp_path / "root")
    assert list(run.settings) == meta["settings"]
    assert run.workdir.name == "circulant_lora_lr0.001_hlr0.003_seed0"
    shutil.copytree(FIXTURES / "classifier", run.workdir)
    runner.check_records([run])  # the same settings: not refused
    assert run.finished
    (row,) = records.collect(tmp_path / "root")
    assert (row["method"], row["structure"], row["status"]) == ("lora", "circulant", "done")
