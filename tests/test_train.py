"""The trainer: smoke runs under mock data, meshes, resume, two processes, failures (kill -9 and
the workdir's other promises: test_train_reliability.py)."""
import importlib.util
import json
import os
import pathlib
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from surm import train
from data_testing import mocked, pretend_prepared, prepared_dir

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY_BERT = dict(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64)


def load_config(name, arg="", **overrides):
    spec = importlib.util.spec_from_file_location("cfg", ROOT / "configs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config(arg)
    for dotted, value in overrides.items():
        node = config
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return config


def xla_flags(devices: int) -> str:
    """The session's XLA flags (conftest.py) with ``devices`` fake CPU devices."""
    return f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}"


def read_metrics(workdir):
    return [json.loads(l) for l in (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()]


def assert_predictions_reproduce_metrics(workdir):
    """Every evaluation in metrics.jsonl has its predictions file, and the metrics computed
    from the stored per-example predictions are the logged ones, exactly."""
    from surm import predictions
    seen = 0
    for line in read_metrics(workdir):
        for role in ("validation", "test"):
            logged = {k[len(role) + 1:]: v for k, v in line.items() if k.startswith(role + "_")}
            if not logged:
                continue
            pred = predictions.read(predictions.path(workdir, role, line["step"]))
            assert predictions.metrics(pred) == logged, (role, line["step"])
            assert np.all(np.diff(pred["index"]) > 0)  # each example once, in split order
            seen += 1
    assert seen >= 2  # validation and test at least
    return seen


def tiny_overrides(data_dir, steps=2):
    return {"total_steps": steps, "eval_every": steps, "ckpt_every": steps, "log_every": 1,
            "input.batch_size": 8, "input.eval_batch_size": 8, "input.data_dir": str(data_dir)}


@pytest.mark.parametrize("config,arg,dataset,metric", [
    ("vit_transfer", "checkpoint=random,variant=Ti/16,image_size=32", "cifar10", "accuracy"),
    ("bert_glue", "task=sst2,checkpoint=random,max_length=16", "glue/sst2", "accuracy"),
    ("bert_glue", "task=stsb,checkpoint=random,max_length=16,family=lowrank,mode=lora",
     "glue/stsb", "spearman"),
])
def test_one_step_and_eval_under_mock_data(tmp_path, config, arg, dataset, metric):
    import tensorflow_datasets.text  # noqa: F401  (registers the GLUE builders for mocking)
    from surm import data
    data_dir = tmp_path / "data"
    pretend_prepared(data.get_spec(dataset).tfds_name, data_dir)
    cfg = load_config(config, arg, **tiny_overrides(data_dir))
    if cfg.model.name == "vit":
        cfg.model.depth = 2  # a random ViT-Ti of 2 blocks
    with mocked(16):
        summary = train.train_and_evaluate(cfg, str(tmp_path / "run"))
    assert np.isfinite(summary[f"test_{metric}"])
    lines = read_metrics(tmp_path / "run")
    assert [l["step"] for l in lines if "train_loss" in l] == [1, 2]
    assert any(f"validation_{metric}" in l for l in lines)
    assert (tmp_path / "run" / "adapters" / "adapters.safetensors").exists()
    assert_predictions_reproduce_metrics(tmp_path / "run")
    plan = json.loads((tmp_path / "run" / "lora_plan.json").read_text())  # decided before jit
    assert plan["backend"] == "cpu" and set(plan["train"]) == set(plan["eval"])


def test_the_last_checkpoint_comes_before_the_final_evaluation_and_test_can_be_limited(
        tmp_path, tmp_path_factory, monkeypatch):
    """A run stopped in its final evaluations keeps its last step; input.test_examples limits
    a classifier's test split; the first step's compilation is not counted as a rate."""
    from surm.checkpointing import kept_steps
    from surm.train import loop
    kw = bbc_overrides(tmp_path_factory, **{"total_steps": 3, "eval_every": 3, "ckpt_every": 3,
                                           "log_every": 1, "input.test_examples": 20})
    seen = []
    real = loop._Run.evaluate

    def evaluate(self, role, at_step):
        seen.append((role, kept_steps(self.workdir)))
        return real(self, role, at_step)
    monkeypatch.setattr(loop._Run, "evaluate", evaluate)
    train.train_and_evaluate(load_config("default", "dataset=bbc_news", **kw), str(tmp_path))
    assert seen == [("validation", [3]), ("test", [3])]
    from surm import predictions
    assert len(predictions.read(predictions.path(tmp_path, "test", 3))["index"]) == 20
    logs = [l for l in read_metrics(tmp_path) if "train_loss" in l]
    assert "examples_per_sec" not in logs[0] and all("examples_per_sec" in l for l in logs[1:])


def bbc_overrides(tmp_path_factory, **extra):
    return {**tiny_overrides(prepared_dir("bbc_news", tmp_path_factory)),
            "model.checkpoint": "random", "model.bert": TINY_BERT, "input.max_length": 32,
            **extra}


def test_bad_configs_fail_before_compiling(tmp_path, tmp_path_factory):
    base = bbc_overrides(tmp_path_factory)
    cases = [
        ("family=circulent", {}, "unknown peft structure"),
        ("targets=attention/self/qeury", {}, "matches no linear module"),
        ("", {"input.batch_size": 6, "mesh.data": 4}, "needs more than the 1 devices"),
        ("", {"model.checkpoint": "/no/such/model"}, "not found"),
        ("dataset=cifar11", {}, "cifar11"),
        ("", {"peft.lora_path": "fft"}, "peft.lora_path='fft' must be one of auto, "),
        ("mode=adapter", {"peft.lora_path": "dense"}, "no weight update to fold"),
    ]
    for arg, extra, message in cases:
        cfg = load_config("default", f"dataset=bbc_news,{arg}".rstrip(","), **{**base, **extra})
        start = time.time()
        with pytest.raises((ValueError, FileNotFoundError), match=message):
            train.train_and_evaluate(cfg, str(tmp_path / (arg.replace("/", "_") or
                                                          "_".join(map(str, extra.values())))))
        assert time.time() - start < 30


def test_resume_continues_where_it_stopped(tmp_path, tmp_path_factory):
    """total_steps=4, then total_steps=8 in the same workdir: the second run starts at 5, once
    the change is asked for. The lora path, a compute choice, may change on resume; the spec,
    the lr, the seed may not, and a refused resume leaves config.json as the run did it."""
    kw = bbc_overrides(tmp_path_factory, **{"eval_every": 100, "ckpt_every": 4,
                                           "total_steps": 4})
    cfg = load_config("default", "dataset=bbc_news", **{**kw, "peft.lora_path": "structured"})
    train.train_and_evaluate(cfg, str(tmp_path / "a"))
    saved = (tmp_path / "a" / "config.json").read_text()
    for arg, extra, message in (
            ("family=ldr,rank=2", {}, r"peft.structure: 'circulant' -> 'ldr'.* new --workdir$"),
            ("", {"optimizer.lr": 0.5}, r"optimizer.lr: .* -> 0.5.*allow_resume_change="
                                        r"optimizer.lr$"),
            ("", {"total_steps": 8, "seed": 3}, r"seed: 0 -> 3; total_steps: 4 -> 8\)"),
            ("", {"total_steps": 8}, r"--allow_resume_change=total_steps$")):
        cfg = load_config("default", f"dataset=bbc_news,{arg}", **{**kw, **extra})
        with pytest.raises(train.ConfigError, match=message):
            train.train_and_evaluate(cfg, str(tmp_path / "a"))
        assert (tmp_path / "a" / "config.json").read_text() == saved
    cfg = load_config("default", "dataset=bbc_news", **{**kw, "total_steps": 8,
                                                        "peft.lora_path": "mixed"})
    summary = train.train_and_evaluate(cfg, str(tmp_path / "a"), ["total_steps"])
    steps = [l["step"] for l in read_metrics(tmp_path / "a") if "train_loss" in l]
    assert steps == list(range(1, 9)) and summary["step"] == 8
    assert sorted(os.listdir(tmp_path / "a" / "checkpoints")) == ["4", "8"]
    change = json.loads((tmp_path / "a" / "config_changes.jsonl").read_text())
    assert change == {"from_step": 4, "changes": {"peft.lora_path": ["structured", "mixed"],
                                                  "total_steps": [4, 8]}}


def _losses(workdir):
    return [(l["step"], l["train_loss"], l["grad_norm"]) for l in read_metrics(workdir)
            if "train_loss" in l]


def _run(args, env=None, **kw):
    return subprocess.Popen([sys.executable, "-m", "surm.train", *args], cwd=ROOT,
                            env={**os.environ, **(env or {})}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **kw)


def _cli(workdir, data_dir, steps, extra=()):
    return ["--config", "configs/default.py:dataset=bbc_news,checkpoint=random,max_length=32",
            "--workdir", str(workdir),
            f"--config.total_steps={steps}", "--config.log_every=1", "--config.eval_every=1000",
            f"--config.ckpt_every=5", "--config.input.batch_size=8",
            "--config.input.eval_batch_size=64", f"--config.input.data_dir={data_dir}",
            *extra]


MESH_SCRIPT = """
import json, sys
sys.path[:0] = [{root!r}, {root!r} + "/tests"]
from test_train import load_config
from surm import train
out = {{}}
for name, data, fsdp, model in (("one", 1, 1, 1), ("data2_fsdp4", 2, 4, 1),
                                ("data4_model2", 4, 1, 2)):
    cfg = load_config("default", "dataset=bbc_news", **json.loads({kw!r}))
    cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.model = data, fsdp, model
    train.train_and_evaluate(cfg, {tmp!r} + "/" + name)
"""


def test_meshes_of_8_fake_devices_match_one_device(tmp_path, tmp_path_factory):
    """data=2 x fsdp=4 (the batch over both, the state split over fsdp), and data=4 x model=2
    (tensor parallel); the update on the mixed path (folded into the sharded kernels, its
    gradient by FFTs split over the batch)."""
    kw = bbc_overrides(tmp_path_factory, **{"total_steps": 4, "eval_every": 100,
                                           "ckpt_every": 100, "peft.lora_path": "mixed"})
    script = MESH_SCRIPT.format(root=str(ROOT), kw=json.dumps(kw), tmp=str(tmp_path))
    env = {**os.environ, "XLA_FLAGS": xla_flags(devices=8)}
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    one = _losses(tmp_path / "one")
    assert len(one) == 4
    for name in ("data2_fsdp4", "data4_model2"):
        other = _losses(tmp_path / name)
        np.testing.assert_allclose(np.array(other), np.array(one), rtol=1e-6, err_msg=name)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_processes(workdir, data_dir, steps, extra=()):
    """``surm.train`` in 2 processes of 2 devices each (gloo over loopback); their output."""
    port = _free_port()
    procs = [_run(_cli(workdir, data_dir, steps, (
        "--distributed", f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
        f"--process_id={i}", *extra)), env={"XLA_FLAGS": xla_flags(devices=2)})
        for i in range(2)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs[0][-3000:] + outs[1][-3000:]


def _one_process(workdir, data_dir, steps, extra=()):
    one = _run(_cli(workdir, data_dir, steps, extra), env={"XLA_FLAGS": xla_flags(devices=4)})
    out, _ = one.communicate(timeout=600)
    assert one.returncode == 0, out


def test_two_processes_match_one_and_resume_across_process_counts(tmp_path, tmp_path_factory):
    """6 steps in 1 process of 4 devices; 3 steps in 2 processes of 2 devices resumed for 3
    more in 1 process; 3 in 1 process resumed in 2 on another mesh (data=2 x fsdp=2): all three
    train on the same global batches and end equal (the data stream is a function of the
    step; the state is restored onto the new mesh)."""
    data_dir = prepared_dir("bbc_news", tmp_path_factory)
    # a constant lr: the schedule would otherwise stretch with total_steps
    flat = ("--config.optimizer.schedule=constant", "--config.optimizer.warmup_frac=0")
    more = (*flat, "--allow_resume_change=total_steps")
    _one_process(tmp_path / "one", data_dir, 6, flat)
    _two_processes(tmp_path / "two_one", data_dir, 3, flat)
    _one_process(tmp_path / "two_one", data_dir, 6, more)
    _one_process(tmp_path / "one_two", data_dir, 3, flat)
    _two_processes(tmp_path / "one_two", data_dir, 6, (*more, "--config.mesh.data=2",
                                                       "--config.mesh.fsdp=2"))
    mesh = json.loads((tmp_path / "one_two" / "mesh.json").read_text())
    assert mesh["axes"] == {"data": 2, "fsdp": 2, "model": 1} and mesh["processes"] == 2
    test = lambda w: [l for l in read_metrics(w) if "test_accuracy" in l][-1]["test_accuracy"]
    for name in ("two_one", "one_two"):
        np.testing.assert_allclose(np.array(_losses(tmp_path / name)),
                                   np.array(_losses(tmp_path / "one")), rtol=1e-6,
                                   err_msg=name)
        assert test(tmp_path / name) == test(tmp_path / "one")
    # process 1's examples come back to process 0, which stores every one once, in order
    from surm import predictions
    two, one = (predictions.read(predictions.path(tmp_path / w, "test", 6))
                for w in ("one_two", "one"))
    np.testing.assert_array_equal(two["index"], one["index"])
    np.testing.assert_array_equal(two["index"], np.arange(len(one["index"])))
    np.testing.assert_allclose(two["logits"], one["logits"], rtol=1e-4, atol=1e-5)
    assert_predictions_reproduce_metrics(tmp_path / "one_two")


def test_nan_stops_the_run_and_keeps_the_checkpoint(tmp_path, tmp_path_factory):
    data_dir = prepared_dir("bbc_news", tmp_path_factory)
    ok = _run(_cli(tmp_path / "w", data_dir, 5))
    out, _ = ok.communicate(timeout=600)
    assert ok.returncode == 0, out
    before = sorted(os.listdir(tmp_path / "w" / "checkpoints"))
    bad = _run(_cli(tmp_path / "w", data_dir, 40, (
        "--config.optimizer.lr=1e30", "--config.optimizer.warmup_frac=0",
        "--allow_resume_change=total_steps,optimizer.lr,optimizer.warmup_frac")))
    out, _ = bad.communicate(timeout=600)
    assert bad.returncode != 0
    assert "NaN/Inf" in out and "last good checkpoint is step 5" in out
    assert sorted(os.listdir(tmp_path / "w" / "checkpoints")) == before


def test_corrupt_checkpoint_is_reported_not_overwritten(tmp_path, tmp_path_factory):
    from surm.checkpointing import CorruptCheckpointError
    kw = bbc_overrides(tmp_path_factory, **{"eval_every": 100, "ckpt_every": 2})
    cfg = load_config("default", "dataset=bbc_news", **{**kw, "total_steps": 2})
    train.train_and_evaluate(cfg, str(tmp_path))
    state_dir = tmp_path / "checkpoints" / "2" / "state"
    victims = sorted(p for p in state_dir.rglob("*") if p.is_file() and p.stat().st_size > 0)
    for p in victims:
        p.write_bytes(b"garbage")
    cfg = load_config("default", "dataset=bbc_news", **{**kw, "total_steps": 4})
    with pytest.raises(CorruptCheckpointError, match="cannot be restored.*left untouched"):
        train.train_and_evaluate(cfg, str(tmp_path), ["total_steps"])
    assert all(p.read_bytes() == b"garbage" for p in victims)
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2"]
