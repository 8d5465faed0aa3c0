"""The trainer's promises about its workdir: only finite checkpoints, bad numbers refused before
anything is built, a refused run writes nothing, one run per workdir, a corrupt checkpoint is
one line and an earlier step can be resumed, and SIGKILL at any moment resumes bitwise."""
import math
import os
import pathlib
import random
import re
import signal
import subprocess
import sys
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
import safetensors.numpy

from surm import data, optim, train, workdir as workdir_lock
from surm.models import factory
from surm.train import step as train_step
from surm.checkpointing import CorruptCheckpointError, kept_steps
from data_testing import prepared_dir
from test_data_local import sentiment_rows, write_table
from test_train import ROOT, _losses, bbc_overrides, load_config, read_metrics


def snapshot(root):
    """Every path under ``root`` (itself included) with its mtime and bytes; None if absent."""
    root = pathlib.Path(root)
    if not root.exists():
        return None
    return {str(p.relative_to(root)): (p.stat().st_mtime_ns,
                                       p.read_bytes() if p.is_file() else None)
            for p in (root, *root.rglob("*"))}


def saved_state(workdir, step):
    """The ``state`` item of a checkpoint as numpy arrays, read without a template."""
    path = pathlib.Path(workdir) / "checkpoints" / str(step) / "state"
    return ocp.StandardCheckpointer().restore(path)


def _unbuildable(*args, **kwargs):
    raise AssertionError("the model was built: the config should have been refused before")


# -- NaN/Inf: a saved checkpoint holds only finite values ------------------------------------

def _poison(where):
    """An optax stage that, from the second step on, makes the update (``params``) or its own
    state (``opt_state``) NaN while the loss and gradient stay finite."""
    def init(params):
        return {"count": jnp.zeros((), jnp.int32), "x": jnp.zeros(())}

    def update(updates, state, params=None):
        nan = jnp.where(state["count"] >= 1, jnp.nan, 0.0)
        if where == "params":
            updates = jax.tree.map(lambda u: u + nan, updates)
        return updates, {"count": state["count"] + 1,
                         "x": state["x"] + (nan if where == "opt_state" else 0.0)}
    return optax.GradientTransformation(init, update)


@pytest.mark.parametrize("where", ["params", "opt_state"])
def test_a_non_finite_update_is_never_saved(tmp_path, tmp_path_factory, monkeypatch, where):
    make = optim.make

    def poisoned(cfg, total_steps, trainable):
        tx, schedules = make(cfg, total_steps, trainable)
        return optax.chain(tx, _poison(where)), schedules

    monkeypatch.setattr(optim, "make", poisoned)
    kw = bbc_overrides(tmp_path_factory, **{"total_steps": 3, "ckpt_every": 1,
                                           "eval_every": 100})
    cfg = load_config("default", "dataset=bbc_news", **kw)
    with pytest.raises(FloatingPointError, match="updated parameters or optimizer state became "
                                                 "NaN/Inf at step 2.*last good checkpoint is "
                                                 "step 1"):
        train.train_and_evaluate(cfg, str(tmp_path))
    assert kept_steps(tmp_path) == [1]
    leaves = jax.tree.leaves(saved_state(tmp_path, 1))
    floats = [x for x in leaves if np.issubdtype(np.asarray(x).dtype, np.floating)]
    assert floats and all(np.isfinite(x).all() for x in floats)


def test_a_checkpoint_holding_nan_is_refused_on_resume(tmp_path, tmp_path_factory, monkeypatch):
    """Checkpoints from before the step checked the new state may hold NaN: resuming from one
    is refused, naming the earlier kept steps, instead of failing again one step later."""
    make = optim.make

    def poisoned(cfg, total_steps, trainable):
        tx, schedules = make(cfg, total_steps, trainable)
        return optax.chain(tx, _poison("params")), schedules

    monkeypatch.setattr(optim, "make", poisoned)
    all_finite = train_step._all_finite
    monkeypatch.setattr(train_step, "_all_finite", lambda tree: True)  # the older step check
    kw = bbc_overrides(tmp_path_factory, **{"total_steps": 3, "ckpt_every": 1,
                                           "eval_every": 100})
    with pytest.raises(FloatingPointError, match="at step 3"):
        train.train_and_evaluate(load_config("default", "dataset=bbc_news", **kw), str(tmp_path))
    assert kept_steps(tmp_path) == [1, 2]  # step 2 holds NaN
    monkeypatch.setattr(train_step, "_all_finite", all_finite)
    with pytest.raises(CorruptCheckpointError, match=r"checkpoints/2 holds NaN/Inf values .* "
                                                     r"--config.restore_step=N \(kept: 1\)"):
        train.train_and_evaluate(load_config("default", "dataset=bbc_news", **kw), str(tmp_path))


def test_bad_optimizer_numbers_are_refused_before_anything_is_built(tmp_path, tmp_path_factory,
                                                                    monkeypatch):
    monkeypatch.setattr(factory, "build", _unbuildable)
    base = bbc_overrides(tmp_path_factory)
    cases = [("lr", math.nan), ("lr", -1e-3), ("lr", 1e39), ("head_lr", math.inf),
             ("weight_decay", -0.1), ("weight_decay", math.nan), ("warmup_frac", 1.5),
             ("grad_clip", math.nan), ("grad_clip", -1.0), ("b2", 1.0), ("momentum", -0.5)]
    for field, value in cases:
        cfg = load_config("default", "dataset=bbc_news",
                          **{**base, f"optimizer.{field}": value})
        with pytest.raises(train.ConfigError,
                           match=rf"^optimizer\.{field}=.*; set e\.g\. --config\.optimizer\."
                                 rf"{field}=[0-9.e-]+$"):
            train.train_and_evaluate(cfg, str(tmp_path / "w"))
        assert not (tmp_path / "w").exists()
    # The command line: lr=nan as a config argument.
    cfg = load_config("default", "dataset=bbc_news,lr=nan", **base)
    with pytest.raises(train.ConfigError, match="optimizer.lr=nan"):
        train.train_and_evaluate(cfg, str(tmp_path / "w"))


# -- A refused run writes nothing ------------------------------------------------------------

def test_refused_runs_leave_the_workdir_as_it_was(tmp_path, tmp_path_factory, monkeypatch):
    monkeypatch.setenv("SURM_DATA_DIR", str(tmp_path / "cache"))
    base = bbc_overrides(tmp_path_factory)
    # Late errors (found only once the model is built) on a new workdir: it is not created.
    for arg, message in (("targets=attention/self/qeury", "matches no linear module"),
                         ("family=lowrank,rank=-2", "rank")):
        cfg = load_config("default", f"dataset=bbc_news,{arg}", **base)
        with pytest.raises(ValueError, match=message):
            train.train_and_evaluate(cfg, str(tmp_path / "new"))
        assert not (tmp_path / "new").exists()

    # A workdir that holds a run on a local file; the file then changes.
    csv = write_table(tmp_path / "data" / "a.csv", sentiment_rows())
    cfg = load_config("default", f"dataset=csv:{csv}", **base)
    workdir = tmp_path / "run"
    workdir.mkdir()
    (workdir / "config.json").write_text(cfg.to_json_best_effort(indent=2))
    data.get_dataset(f"csv:{csv}").record_run(workdir)
    time.sleep(0.01)  # a rewrite would show in the mtimes
    before = snapshot(workdir)
    write_table(csv, sentiment_rows()[:-1])
    with pytest.raises(ValueError, match="holds a run on other data"):
        train.train_and_evaluate(cfg, str(workdir))
    assert snapshot(workdir) == before
    write_table(csv, sentiment_rows())
    monkeypatch.setattr(factory, "build", _unbuildable)
    for arg, extra, message in (("family=ldr,rank=2", {}, r"another config \(.*peft.structure: 'circulant' -> 'ldr'"),
                                ("", {"restore_step": 4}, r"restore_step=4 is not a checkpoint "
                                                          r"kept in .* \(kept: none\)")):
        cfg = load_config("default", f"dataset=csv:{csv},{arg}".rstrip(","),
                          **{**base, **extra})
        with pytest.raises(ValueError, match=message):
            train.train_and_evaluate(cfg, str(workdir))
        assert snapshot(workdir) == before


# -- One run per workdir ---------------------------------------------------------------------

HOLDER = """
import sys, time
from surm import workdir
with workdir.hold(sys.argv[1]):
    print("held", flush=True)
    time.sleep(600)
"""


def test_a_held_workdir_refuses_a_second_run_and_a_killed_holder_frees_it(
        tmp_path, tmp_path_factory, monkeypatch):
    workdir = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(workdir)], cwd=ROOT,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        before = snapshot(workdir)
        busy = rf"^{re.escape(str(workdir))} is in use by another run \(pid {holder.pid}\)"
        monkeypatch.setattr(factory, "build", _unbuildable)
        cfg = load_config("default", "dataset=bbc_news", **bbc_overrides(tmp_path_factory))
        start = time.time()
        with pytest.raises(workdir_lock.WorkdirBusyError, match=busy):
            train.train_and_evaluate(cfg, str(workdir))
        assert time.time() - start < 20
        with pytest.raises(workdir_lock.WorkdirBusyError, match=busy):
            with workdir_lock.hold(workdir):
                pass
        assert snapshot(workdir) == before
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with workdir_lock.hold(workdir):  # the kill released it
        assert (workdir / workdir_lock.LOCK).read_text().strip() == str(os.getpid())
    with workdir_lock.hold(workdir):  # and so does the end of a `with`
        pass


# -- A corrupt checkpoint: one line; an earlier kept step resumes ----------------------------

def test_a_corrupt_checkpoint_is_one_line_and_restore_step_resumes_an_earlier_one(
        tmp_path, tmp_path_factory):
    kw = bbc_overrides(tmp_path_factory, **{"total_steps": 2, "ckpt_every": 1,
                                           "eval_every": 100})
    cfg = load_config("default", "dataset=bbc_news", **kw)
    train.train_and_evaluate(cfg, str(tmp_path))
    adapters = (tmp_path / "adapters" / "adapters.safetensors").read_bytes()
    assert kept_steps(tmp_path) == [1, 2]
    for p in (tmp_path / "checkpoints" / "2" / "state").rglob("d/*"):
        p.write_bytes(b"garbage")

    flags = [f"--config.{k}={v}" for k, v in kw.items() if k != "model.bert"]
    out = subprocess.run([sys.executable, "-m", "surm.train", "--config",
                          "configs/default.py:dataset=bbc_news,checkpoint=random",
                          "--workdir", str(tmp_path), *flags], cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 1
    errors = [l for l in out.stderr.splitlines() if l.strip()]
    assert len(errors) == 1, out.stderr[-3000:]
    assert re.match(r"error: checkpoint .*/checkpoints/2 cannot be restored .* resume from an "
                    r"earlier kept step with --config.restore_step=N \(kept: 1\)", errors[0])

    before = snapshot(tmp_path)
    with pytest.raises(ValueError, match=r"restore_step=5 is not a checkpoint kept in .* "
                                         r"\(kept: 1, 2\)"):
        train.train_and_evaluate(load_config("default", "dataset=bbc_news",
                                             **{**kw, "restore_step": 5}), str(tmp_path))
    assert snapshot(tmp_path) == before

    train.train_and_evaluate(load_config("default", "dataset=bbc_news",
                                         **{**kw, "restore_step": 1}), str(tmp_path))
    assert (tmp_path / "adapters" / "adapters.safetensors").read_bytes() == adapters
    assert kept_steps(tmp_path) == [1, 2]
    saved_state(tmp_path, 2)  # step 2 was written again: readable
    assert [l["step"] for l in read_metrics(tmp_path) if "train_loss" in l] == [1, 2]


# -- Fault injection: SIGKILL at any moment, then a rerun ends bitwise equal ------------------

STEPS = 4
# (phase, step): kill while step's asynchronous save is being written ("saving": its
# orbax-checkpoint-tmp folder exists), or just after it was committed ("saved"); the seed
# draws a delay after that moment.
MOMENTS = [("saving", 1), ("saved", 2), ("saving", 4)]


def _cli(workdir, data_dir):
    return [sys.executable, "-m", "surm.train", "--config",
            "configs/default.py:dataset=bbc_news,checkpoint=random,max_length=32",
            "--workdir", str(workdir), f"--config.total_steps={STEPS}",
            "--config.ckpt_every=1", "--config.log_every=1", "--config.eval_every=0",
            "--config.input.batch_size=8", "--config.input.eval_batch_size=64",
            f"--config.input.data_dir={data_dir}"]


def _start(workdir, data_dir):
    return subprocess.Popen(_cli(workdir, data_dir), cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _kill_at(proc, workdir, phase, step, delay):
    """SIGKILLs ``proc`` at the moment; returns whether a save was under way when it died."""
    ckpts = workdir / "checkpoints"
    tmp = f"{step}.orbax-checkpoint-tmp"
    deadline = time.time() + 300
    while True:
        names = os.listdir(ckpts) if ckpts.is_dir() else []
        if str(step) in names or (phase == "saving" and any(n.startswith(tmp) for n in names)):
            break
        assert proc.poll() is None, f"ended before the moment: {proc.communicate()[0][-3000:]}"
        assert time.time() < deadline
        time.sleep(0.002)
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return any("orbax-checkpoint-tmp" in n for n in os.listdir(ckpts))


def test_sigkill_at_any_moment_then_rerun_equals_an_uninterrupted_run(tmp_path,
                                                                       tmp_path_factory):
    data_dir = prepared_dir("bbc_news", tmp_path_factory)
    start = time.time()
    results = {}

    def kill_and_rerun(seed, phase, step):
        try:
            workdir = tmp_path / f"kill{seed}"
            delay = random.Random(seed).uniform(0, 0.02 if phase == "saving" else 0.1)
            mid_save = _kill_at(_start(workdir, data_dir), workdir, phase, step, delay)
            kept = kept_steps(workdir)
            rerun = _start(workdir, data_dir)
            out, _ = rerun.communicate(timeout=600)
            results[seed] = (mid_save, kept, out, rerun.returncode)
        except BaseException as e:  # reported by the test's thread
            results[seed] = e

    ref = _start(tmp_path / "ref", data_dir)
    # The victims start once the reference has compiled (its first checkpoint): they load its
    # programs from the persistent compilation cache instead of compiling them again.
    ref_ckpts = tmp_path / "ref" / "checkpoints"
    while ref.poll() is None and not (ref_ckpts.is_dir() and os.listdir(ref_ckpts)):
        time.sleep(0.05)
    threads = [threading.Thread(target=kill_and_rerun, args=(seed, *moment))
               for seed, moment in enumerate(MOMENTS)]
    for t in threads:
        t.start()
    out, _ = ref.communicate(timeout=600)
    assert ref.returncode == 0, out[-3000:]
    for t in threads:
        t.join()

    want = (tmp_path / "ref" / "adapters" / "adapters.safetensors").read_bytes()
    test_metrics = lambda w: [l for l in read_metrics(w) if "test_accuracy" in l]
    for seed, (phase, step) in enumerate(MOMENTS):
        if isinstance(results[seed], BaseException):
            raise results[seed]
        mid_save, kept, out, rc = results[seed]
        workdir = tmp_path / f"kill{seed}"
        assert rc == 0, f"{phase} {step}: {out[-3000:]}"
        assert ("Resumed from" in out) == bool(kept), (kept, out[-3000:])
        got = workdir / "adapters" / "adapters.safetensors"
        if got.read_bytes() != want:
            a, b = (safetensors.numpy.load_file(p) for p in (tmp_path / "ref" / "adapters" /
                                                              "adapters.safetensors", got))
            for k in a:
                np.testing.assert_array_equal(a[k], b[k], err_msg=f"{phase} {step}: {k}")
            pytest.fail(f"{phase} {step}: the adapters file differs from the reference's")
        assert _losses(workdir) == _losses(tmp_path / "ref"), (phase, step)
        assert test_metrics(workdir) == test_metrics(tmp_path / "ref"), (phase, step)
        # Nothing left behind: no half-written save, the same checkpoints, the lock free.
        assert sorted(os.listdir(workdir / "checkpoints")) == \
            sorted(os.listdir(tmp_path / "ref" / "checkpoints"))
        with workdir_lock.hold(workdir):
            pass
    assert any(results[seed][0] for seed in range(len(MOMENTS))), \
        "no kill landed during an asynchronous save"
    print(f"fault injection: {time.time() - start:.0f} s; killed mid-save: "
          f"{[results[seed][0] for seed in range(len(MOMENTS))]}; kept at the kill: "
          f"{[results[seed][1] for seed in range(len(MOMENTS))]}")


# -- Ctrl-C and SIGTERM: a step boundary, a checkpoint, one line, 130 / 143 -----------------------

@pytest.mark.parametrize("signum,when", [(signal.SIGINT, "compiling"),
                                         (signal.SIGTERM, "training")])
def test_a_signal_stops_at_a_step_boundary_and_the_rerun_resumes(tmp_path, tmp_path_factory,
                                                                 signum, when):
    """SIGINT during the first compilation (it used to crash the process) or SIGTERM while
    training: the run saves the step it reached, says how to resume in one line and exits
    128 + the signal; the same command then finishes the run."""
    data_dir = prepared_dir("bbc_news", tmp_path_factory)
    cli = [a.replace("--config.ckpt_every=1", "--config.ckpt_every=1000")
           for a in _cli(tmp_path, data_dir)]
    proc = subprocess.Popen(cli, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    ready = (lambda: (tmp_path / "config.json").exists()) if when == "compiling" else (
        lambda: sum("train_loss" in line for line in
                    (tmp_path / "metrics.jsonl").read_text().splitlines()) >= 2
        if (tmp_path / "metrics.jsonl").exists() else False)
    deadline = time.time() + 300
    while not ready():
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        assert time.time() < deadline
        time.sleep(0.01)
    if when == "compiling":
        time.sleep(0.5)  # config.json is written just before the shardings and the compile
    proc.send_signal(signum)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signum, out[-3000:]
    assert "Traceback" not in out
    last = out.strip().splitlines()[-1]
    kept = kept_steps(tmp_path)
    name = signal.Signals(signum).name
    if kept:
        assert last == (f"stopped by {name}: the checkpoint of step {kept[0]} is in "
                        f"{tmp_path / 'checkpoints'}; run the same command to resume")
    else:  # the signal came before the first step ended
        assert when == "compiling" and last == (f"stopped by {name}: before the first step; "
                                                f"nothing was trained")
    rerun = subprocess.run(cli, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert (f"Resumed from {tmp_path / 'checkpoints'} at step {kept[0]}" in rerun.stderr
            if kept else "Resumed" not in rerun.stderr)
    assert [s for s, *_ in _losses(tmp_path)] == list(range(1, STEPS + 1))


DISK_FULL = """
import errno, sys
from absl import app
from surm import cli
from surm.train.__main__ import main
from surm.checkpointing import Checkpoints
real = Checkpoints.save
def save(self, step, *args, **kwargs):
    if step >= 4:  # the disk fills up at the second save
        raise OSError(errno.ENOSPC, "No space left on device", str(self.directory / str(step)))
    return real(self, step, *args, **kwargs)
Checkpoints.save = save
sys.argv = ["surm.train", *sys.argv[1:]]
app.run(main, flags_parser=cli.parse_flags)
"""


def test_a_full_disk_is_one_line_and_keeps_the_last_good_checkpoint(tmp_path, tmp_path_factory):
    data_dir = prepared_dir("bbc_news", tmp_path_factory)
    args = [a.replace("--config.ckpt_every=1", "--config.ckpt_every=2")
            for a in _cli(tmp_path, data_dir)[3:]]  # the flags of surm.train
    done = subprocess.run([sys.executable, "-c", DISK_FULL, *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 1, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last == f"error: the disk is full: {tmp_path / 'checkpoints' / '4'}", last
    assert kept_steps(tmp_path) == [2]


def test_without_file_locks_a_marker_names_the_holder(tmp_path, monkeypatch):
    """Where flock fails (some network and bucket mounts), each holder's own marker
    (`.held.<host>.<pid>.<token>`) names it: a live holder is refused (also one in the same
    process, as flock refuses it), a killed one's marker deleted, another host's named with the
    fix; a refused run leaves no marker, and a holder's is gone when it ends."""
    import errno
    import socket

    def no_locks(fd, op):
        raise OSError(errno.EOPNOTSUPP, "Operation not supported")
    monkeypatch.setattr(workdir_lock.fcntl, "flock", no_locks)
    workdir = tmp_path / "run"
    markers = lambda: sorted(p.name for p in workdir.glob(workdir_lock.MARKER + ".*"))
    here = f"{workdir_lock.MARKER}.{socket.gethostname()}"
    with workdir_lock.hold(workdir):
        held = markers()
        assert len(held) == 1 and held[0].startswith(f"{here}.{os.getpid()}.")
        with pytest.raises(workdir_lock.WorkdirBusyError, match=rf"pid {os.getpid()};.*delete"):
            with workdir_lock.hold(workdir):
                pass
        assert markers() == held  # the refused hold took its own marker away
        with pytest.raises(workdir_lock.WorkdirBusyError, match=rf"pid {os.getpid()} on host"):
            workdir_lock.check_free(workdir)
    assert markers() == []
    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()
    (workdir / f"{here}.{ended.pid}.0").touch()  # a killed run's marker
    workdir_lock.check_free(workdir)
    with workdir_lock.hold(workdir):
        assert [m.split(".")[-2] for m in markers()] == [str(os.getpid())]
    (workdir / f"{workdir_lock.MARKER}.other-host.12345.0").touch()
    with pytest.raises(workdir_lock.WorkdirBusyError, match=r"pid 12345 on host other-host.*"
                                                            r"delete the file"):
        with workdir_lock.hold(workdir):
            pass
    assert markers() == [f"{workdir_lock.MARKER}.other-host.12345.0"]
