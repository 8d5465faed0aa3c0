"""Sharding on 8 simulated devices, checked in the compiled programs, not assumed from losses:
FSDP splits the trainable parameters and the optimizer state, SURM's FFTs split over the batch
(no gathered batch, 1/8 of the transforms per device), tensor parallelism pairs columns and
rows (one reduction per attention and per MLP block), and every mesh computes the loss one
device computes. One subprocess (8 devices must be set before jax starts) measures it all with
the trainer's own step builders; the tests read its report."""
import json
import os
import pathlib
import subprocess
import sys

import pytest

from surm import sharding

ROOT = pathlib.Path(__file__).resolve().parents[1]

SCRIPT = r'''
import json, re
import jax, jax.numpy as jnp, numpy as np, optax
from surm import models, peft, sharding, tasks
from surm.data import registry
from surm.models import factory
from surm.train import step as step_lib

B, T = 16, 16
CFG = {"name": "bert", "checkpoint": "random",
       "bert": dict(hidden_size=128, num_layers=2, num_heads=2, intermediate_size=256,
                    vocab_size=4000)}
entry = models.get("bert")
task = tasks.for_entry(entry)
data_spec = registry.get_spec("bbc_news")
model, params, _ = factory.build(CFG, data_spec.num_classes)
rng = np.random.default_rng(0)
batch = {"input_ids": rng.integers(0, 4000, (B, T)).astype(np.int32),
         "attention_mask": np.ones((B, T), np.int32),
         "token_type_ids": np.zeros((B, T), np.int32),
         "label": rng.integers(0, data_spec.num_classes, (B,)).astype(np.int32)}
report = {}

def compiled(name, spec, mesh, lora_path="structured"):
    """(one train step's loss, the train step's and the eval step's HLO, per-device bytes of
    the trainable state and its optimizer state)."""
    # host copies: the train step donates its state, which may share buffers with params
    trainable, frozen = peft.init(jax.tree.map(np.array, params), spec, jax.random.key(1))
    tx = optax.adam(1e-3)
    state = step_lib.initial_state(trainable, tx, jax.random.key(2))
    train_step, eval_step = step_lib.make_step_fns(model, spec, tx, entry.inputs, task,
                                                   data_spec, lora_path)
    state_sh, frozen_sh = step_lib.state_shardings(state, frozen, mesh)
    keys, ekeys = task.batch_keys(entry), task.eval_keys(entry)
    train, evaluate = step_lib.jit_steps(train_step, eval_step, mesh, state_sh, frozen_sh,
                                         keys, ekeys)
    state = jax.device_put(state, state_sh)
    frozen = jax.device_put(frozen, frozen_sh)
    tb = sharding.global_batch({k: batch[k] for k in keys}, mesh)
    held = sharding.per_device_bytes((state["trainable"], state["opt_state"]))
    hlo = train.lower(state, frozen, tb).compile().as_text()
    ehlo = evaluate.lower(state["trainable"], frozen, {k: tb[k] for k in ekeys}).compile().as_text()
    losses = []
    for _ in range(2):
        state, m = train(state, frozen, tb)
        losses.append(float(m["loss"]))
    return {"losses": losses, "held": held, "hlo": hlo, "eval_hlo": ehlo}

def mesh_of(data, fsdp, model):
    return sharding.make_mesh({"data": data, "fsdp": fsdp, "model": model},
                              jax.devices()[:data * fsdp * model])

def ffts(hlo):
    """(the elements transformed by the fft ops over rows of activations (rank >= 2: not the
    parameters' own transforms), the result shapes of all)"""
    shapes = re.findall(r"= [cf]\d+\[([\d,]*)\][^=]* fft\(", hlo)
    rows = [[int(d) for d in s.split(",")] for s in shapes if s.count(",") >= 1]
    return sum(int(np.prod(s)) for s in rows), shapes

def count(hlo, op):
    """How many ``op`` collectives the program runs, not counting its result's own (the
    outputs gathered to every device)."""
    return len([l for l in hlo.splitlines() if re.search(rf"[\s)]{op}(-start)?\(", l)
                and not l.lstrip().startswith("ROOT")])

full = peft.PeftSpec.create(method="full", heads=["classifier"])
one, fsdp8 = compiled("full", full, mesh_of(1, 1, 1)), compiled("full", full, mesh_of(1, 8, 1))
report["full"] = {"held_one": one["held"], "held_fsdp8": fsdp8["held"],
                  "losses_one": one["losses"], "losses_fsdp8": fsdp8["losses"]}
for mode, path, dropout in (("lora", "structured", 0.0), ("lora", "mixed", 0.0),
                            ("adapter", "structured", 0.1)):
    spec = peft.PeftSpec.create(method=mode, structure="circulant", dropout=dropout,
                                heads=["classifier"])
    a, b = compiled(mode, spec, mesh_of(1, 1, 1), path), compiled(mode, spec, mesh_of(8, 1, 1), path)
    report[f"{mode}_{path}"] = {
        "fft_one": ffts(a["hlo"])[0], "fft_data8": ffts(b["hlo"])[0],
        "fft_shapes_data8": ffts(b["hlo"])[1][:6], "all_gathers": count(b["hlo"], "all-gather"),
        "losses_one": a["losses"], "losses_data8": b["losses"]}
tp = compiled("tp", peft.PeftSpec.create(structure="circulant", heads=["classifier"]),
              mesh_of(4, 1, 2))
report["tp"] = {"eval_all_reduces": count(tp["eval_hlo"], "all-reduce"),
                "eval_all_gathers": count(tp["eval_hlo"], "all-gather"),
                "losses": tp["losses"]}
ref = compiled("tp_ref", peft.PeftSpec.create(structure="circulant", heads=["classifier"]),
               mesh_of(1, 1, 1))
report["tp"]["losses_one"] = ref["losses"]
print("REPORT" + json.dumps(report))
'''


@pytest.fixture(scope="module")
def report():
    env = {**os.environ, "XLA_FLAGS": os.environ.get("XLA_FLAGS", "") +
           " --xla_force_host_platform_device_count=8"}
    out = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-4000:]
    line = next(l for l in out.stdout.splitlines() if l.startswith("REPORT"))
    return json.loads(line[len("REPORT"):])


def test_fsdp_splits_the_trainable_parameters_and_the_optimizer_state(report):
    """Full fine-tuning on fsdp=8: each device holds at most 1/6 of the parameters and Adam
    state one device holds (1/8 of every leaf large enough; biases and norms stay whole)."""
    full = report["full"]
    assert full["held_fsdp8"] <= full["held_one"] / 6, full
    assert full["losses_fsdp8"] == pytest.approx(full["losses_one"], rel=1e-6, abs=1e-6)


@pytest.mark.parametrize("case", ["lora_structured", "lora_mixed", "adapter_structured"])
def test_structured_products_split_over_the_batch(report, case):
    """On data=8 each device transforms its own 2 of the 16 examples: 1/8 of the FFT work of
    one device, no all-gather (of the batch or anything else); the loss as on one device."""
    r = report[case]
    assert r["all_gathers"] == 0, r
    assert r["fft_one"] > 0 and r["fft_data8"] * 8 == r["fft_one"], r
    assert r["losses_data8"] == pytest.approx(r["losses_one"], rel=1e-6, abs=1e-6)


def test_tensor_parallel_pairs_columns_and_rows(report):
    """data=4 x model=2: q, k, v and the MLP input split their outputs, the attention and MLP
    outputs their inputs: the forward pass of 2 layers has one all-reduce per attention and
    per MLP block (4), and gathers nothing but its outputs."""
    tp = report["tp"]
    assert tp["eval_all_reduces"] == 4 and tp["eval_all_gathers"] == 0, tp
    assert tp["losses"] == pytest.approx(tp["losses_one"], rel=1e-6, abs=1e-6)


def test_the_rule_table_and_the_mesh_shape():
    """Rules by path (the optimizer state's paths end like the parameters'); -1 fills; a
    legacy boolean fsdp reads as before; shapes that cannot be built are refused."""
    import jax
    from jax.sharding import Mesh
    mesh = Mesh(__import__("numpy").array(jax.devices()[:1]).reshape(1, 1, 1), sharding.AXES)
    table = sharding.rules(r"(.*/)?attn/q", r"(.*/)?attn/o")

    class FakeMesh:  # the rules read only the axes' sizes
        shape = {"data": 1, "fsdp": 4, "model": 2}
    fake = FakeMesh()
    assert sharding.spec_for("0/mu/base/enc/attn/q/kernel", (256, 512), fake, table) == \
        sharding.P("fsdp", "model")
    assert sharding.spec_for("base/enc/attn/o/kernel", (512, 256), fake, table) == \
        sharding.P("model", "fsdp")
    assert sharding.spec_for("base/enc/attn/q/bias", (512,), fake, table) == sharding.P("model")
    # an embedding splits its vocabulary where it divides, else its width; small leaves stay
    assert sharding.spec_for("base/embeddings/word_embeddings/embedding", (4000, 64), fake,
                             table) == sharding.P("fsdp", None)
    assert sharding.spec_for("base/embeddings/word_embeddings/embedding", (4001, 64), fake,
                             table) == sharding.P(None, "fsdp")
    assert sharding.spec_for("adapters/enc/attn/q/S/c", (512,), fake, table) == sharding.P(None)
    assert sharding.spec_for("x", (), mesh, table) == sharding.P()
    assert sharding.mesh_shape({"data": -1, "fsdp": 1, "model": 2}, 8) == (4, 1, 2)
    assert sharding.mesh_shape({"data": 2, "fsdp": -1, "model": 1}, 8) == (2, 4, 1)
    assert sharding.mesh_shape({"data": -1, "fsdp": -1, "model": 2}, 8) == (1, 4, 2)
    assert sharding.mesh_shape({"data": -1, "fsdp": True, "model": 1}, 8) == (1, 8, 1)
    assert sharding.mesh_shape({"data": -1, "fsdp": False, "model": 1}, 8) == (8, 1, 1)
    assert sharding.mesh_shape({"data": 3, "fsdp": 1, "model": 1}, 8) == (3, 1, 1)  # the first 3
    for bad, message in (({"data": -1, "fsdp": 1, "model": 3}, "does not divide"),
                         ({"data": 0, "fsdp": 1, "model": 1}, "positive number"),
                         ({"data": 4, "fsdp": 4, "model": 1}, "needs more than")):
        with pytest.raises(ValueError, match=message):
            sharding.mesh_shape(bad, 8)
