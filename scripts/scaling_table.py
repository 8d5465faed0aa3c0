"""What one train step costs each device on 8 devices, from the compiled programs (XLA's cost
analysis and the collectives in the HLO), for MiniLM-L6, ViT-S/16 and SmolLM2-135M (random
weights of their real sizes) under a circulant update, LoRA r=8 and full fine-tuning, on the
meshes data=8, fsdp=8 and data=4 x model=2. The trainer's own step builders and sharding rules
(``surm.train.step``); nothing is run, only compiled, so it needs no accelerator:

    python scripts/scaling_table.py --json docs/results/scaling.json

(8 simulated CPU devices are set up here before jax starts.) Per device: GFLOPs of one step,
MB of trainable parameters + optimizer state, MB of the frozen base, and the collectives the
step runs (all-reduce, all-gather, reduce-scatter, all-to-all, collective-permute), with the
single-device figures as the baseline. ``docs/RESULTS.md`` shows the JSON as a table.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from surm import models, peft, sharding, tasks  # noqa: E402
from surm.data import registry  # noqa: E402
from surm.models import factory  # noqa: E402
from surm.train import step as step_lib  # noqa: E402

MODELS = {
    "MiniLM-L6": ({"name": "bert", "checkpoint": "random",
                   "bert": dict(hidden_size=384, num_layers=6, num_heads=12,
                                intermediate_size=1536)}, "bbc_news", 128),
    "ViT-S/16": ({"name": "vit", "checkpoint": "random", "variant": "S/16",
                  "image_size": 224}, "cifar10", None),
    "SmolLM2-135M": ({"name": "llama", "checkpoint": "random",
                      "llama": dict(dim=576, n_layers=30, n_heads=9, n_kv_heads=3,
                                    ffn_dim=1536)}, None, 128),
}
METHODS = {"circulant": dict(structure="circulant"), "LoRA r=8": dict(structure="lowrank", hparams={"rank": 8}),
           "full": dict(method="full")}
MESHES = {"one device": (1, 1, 1), "data=8": (8, 1, 1), "fsdp=8": (1, 8, 1),
          "data=4 x model=2": (4, 1, 2)}
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all",
               "collective-permute")
BATCH = 8


def _batch(entry, model_cfg, keys, length):
    """Shape structs of one global batch of the task's keys."""
    out = {}
    for key in keys:
        if key == "image":
            size = model_cfg["image_size"]
            out[key] = jax.ShapeDtypeStruct((BATCH, size, size, 3), jnp.float32)
        elif key == "label":
            out[key] = jax.ShapeDtypeStruct((BATCH,), jnp.int32)
        else:  # token ids, masks
            out[key] = jax.ShapeDtypeStruct((BATCH, length), jnp.int32)
    return out


def _held(tree, shardings) -> int:
    """Bytes one device holds of ``tree`` under ``shardings`` (from the shard shapes)."""
    return sum(int(np.prod(s.shard_shape(x.shape))) * x.dtype.itemsize
               for x, s in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings)))


def measure(model_name: str, method: str, mesh_name: str) -> dict:
    model_cfg, dataset, length = MODELS[model_name]
    entry = models.get(model_cfg["name"])
    task = tasks.for_entry(entry)
    data_spec = registry.get_spec(dataset) if dataset else None
    model, params, _ = factory.build(model_cfg, data_spec.num_classes if data_spec else 0)
    spec = peft.PeftSpec.create(**METHODS[method], **(
        {"targets": "all-linear"} if entry.task == "causal_lm" else {}))
    trainable, frozen = peft.init(params, spec, jax.random.key(1))
    tx = optax.adamw(1e-3)
    state = jax.eval_shape(lambda t: step_lib.initial_state(t, tx, jax.random.key(2)), trainable)
    frozen = jax.eval_shape(lambda f: f, frozen)
    data, fsdp, tp = MESHES[mesh_name]
    mesh = sharding.make_mesh({"data": data, "fsdp": fsdp, "model": tp},
                              jax.devices()[:data * fsdp * tp])
    train_step, eval_step = step_lib.make_step_fns(model, spec, tx, entry.inputs, task,
                                                   data_spec, "structured")
    state_sh, frozen_sh = step_lib.state_shardings(state, frozen, mesh)
    keys = task.batch_keys(entry)
    batch = _batch(entry, model_cfg, keys, length)
    train, _ = step_lib.jit_steps(train_step, eval_step, mesh, state_sh, frozen_sh, keys,
                                  task.eval_keys(entry))
    start = time.time()
    compiled = train.lower(state, frozen, {k: batch[k] for k in keys}).compile()
    hlo = compiled.as_text()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return {"model": model_name, "method": method, "mesh": mesh_name,
            "gflops": float(cost.get("flops", 0.0)) / 1e9,
            "trainable_and_optimizer_mb": _held((state["trainable"], state["opt_state"]),
                                                (state_sh["trainable"], state_sh["opt_state"]))
            / 2 ** 20,
            "frozen_mb": _held(frozen, frozen_sh) / 2 ** 20,
            "collectives": {c: len(re.findall(rf"[\s)]{c}(-start)?\(", hlo))
                            for c in COLLECTIVES},
            "compile_s": round(time.time() - start, 1)}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", help="write the rows here")
    parser.add_argument("--models", default=",".join(MODELS))
    args = parser.parse_args(argv)
    rows = []
    for model_name in args.models.split(","):
        for method in METHODS:
            for mesh_name in MESHES:
                row = measure(model_name, method, mesh_name)
                rows.append(row)
                c = row["collectives"]
                print(f"{model_name:13s} {method:10s} {mesh_name:17s} "
                      f"{row['gflops']:9.2f} GFLOP  state {row['trainable_and_optimizer_mb']:8.2f}"
                      f" MB  frozen {row['frozen_mb']:8.2f} MB  "
                      + " ".join(f"{k}={v}" for k, v in c.items() if v), flush=True)
                if args.json:  # after every row: a long run interrupted keeps what it measured
                    with open(args.json, "w") as f:
                        json.dump({"devices": 8, "platform": "cpu (simulated devices)",
                                   "batch": BATCH, "rows": rows}, f, indent=1)
    if args.json:
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
