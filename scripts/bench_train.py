"""Train-step time and memory of SURM against LoRA and full fine-tuning; merged inference cost.

    python scripts/bench_train.py                     # MiniLM-L6, ViT-S/16, ViT-B/16
    python scripts/bench_train.py --json              # ... and one JSON object, last
    python scripts/bench_train.py --models minilm_l6 --steps 10 --families circulant,toeplitz
    python scripts/bench_train.py --models smollm2 --text_batch 4 --seq_len 128   # causal LM

Everything is measured in one process, one model after the other, each method with the same
jitted step the trainer uses (``surm.train.make_step_fns``: forward, backward, AdamW update)
on synthetic batches:

- step time: the median of ``--steps`` steps after ``--warmup`` steps (compilation excluded),
  each step blocked on;
- memory: the peak the compiled step needs, from XLA's buffer assignment
  (arguments + outputs + temporaries - donated aliases; ``Compiled.memory_analysis()``), which
  on the CPU is exact and noise-free, unlike process RSS. The frozen base weights are arguments,
  so every PEFT method pays for them; ``temp`` (activations and gradients) is printed too;
- merged inference: the forward pass of the base model with the adapters merged into its
  weights (``surm.peft.merge``) against the same model's base weights: the same program, so
  the ratio measures only noise.

Methods (targets q, v, lora mode): ``surm`` = each of ``--families`` (default circulant: one
vector per matrix, d params), LoRA at rank 1 (2d params per matrix: the smallest LoRA, the
nearest budget from above), LoRA at rank 8 (the usual default), the linear probe (the head
only: a forward pass, no backward through the frozen encoder), BitFit (biases and head) and
full fine-tuning. The
headline ratios take the first family (on the path ``auto`` picks when several are timed)
against LoRA r=1: ``surm_over_lora_time``,
``surm_over_lora_memory``, ``surm_over_full_time``, ``merged_over_base_time``, printed last in
one JSON object (worst over the models) with ``--json``, the per-model figures under
``models``. ``--lora_paths structured,dense,mixed`` times each family on each way of computing
its update (``surm.peft.lora_path_for``: the FFT product on the activations; the update folded
into the kernel inside the step, its gradient by the kernel's matmul or by the family's
product); ``auto`` takes the one the trainer takes. Timings on a shared machine are noisy:
compare ratios within one run.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys

import jax
import numpy as np

from surm import allocator, models, peft, structured
from surm.models import factory
from surm.timing import TrainStep, interleaved_medians

MODELS = {  # name: model config
    "minilm_l6": dict(name="bert", checkpoint="minilm_l6", pooling="mean"),
    "vit_s16": dict(name="vit", checkpoint="random", variant="S/16", image_size=224),
    "vit_b16": dict(name="vit", checkpoint="random", variant="B/16", image_size=224),
    "vit_ti16": dict(name="vit", checkpoint="random", variant="Ti/16", image_size=224),
    # causal LM (next-token loss over the batch); the head is the tied embedding: no probe
    "smollm2": dict(name="llama", checkpoint="smollm2"),
    "llama_tiny": dict(name="llama", checkpoint="random"),
}
OPTIMIZER = dict(name="adamw", lr=1e-3, head_lr=1e-3, weight_decay=0.0, b1=0.9, b2=0.999,
                 momentum=0.9, grad_clip=1.0, schedule="linear", warmup_frac=0.0)
NUM_CLASSES = 10


def methods(families: list[str], paths: list[str],
            causal_lm: bool = False) -> dict[str, tuple[peft.PeftSpec, str]]:
    """name -> (spec, lora_path); a family timed on several paths is named ``family[path]``.
    A causal LM has no head and (Llama) no biases: no probe, no BitFit."""
    out = {}
    for f in families:
        spec = peft.PeftSpec.create(structure=f, targets="qv")
        for path in paths:
            out[f if len(paths) == 1 else f"{f}[{path}]"] = (spec, path)
    for rank in (1, 8):
        out[f"lora_r{rank}"] = (peft.PeftSpec.create(structure="lowrank", targets="qv",
                                                     hparams={"rank": rank}), "auto")
    for name in (("full",) if causal_lm else ("linear_probe", "bitfit", "full")):
        out[name] = (peft.PeftSpec.create(method=peft.spec.from_family(name)[0]), "auto")
    return out


def make_batch(modality: str, batch: int, seq_len: int, image_size: int, rng: np.random.Generator,
               causal_lm: bool = False):
    if causal_lm:
        ids = rng.integers(1000, 20000, size=(batch, seq_len)).astype(np.int32)
        return {"input_ids": ids, "loss_mask": np.ones_like(ids)}
    labels = rng.integers(0, NUM_CLASSES, size=batch).astype(np.int32)
    if modality == "image":
        return {"image": rng.uniform(-1, 1, (batch, image_size, image_size, 3)).astype(np.float32),
                "label": labels}
    ids = rng.integers(1000, 20000, size=(batch, seq_len)).astype(np.int32)
    return {"input_ids": ids, "attention_mask": np.ones_like(ids),
            "token_type_ids": np.zeros_like(ids), "label": labels}


def memory_bytes(compiled) -> dict[str, int]:
    m = compiled.memory_analysis()
    if m is None:
        return {"peak": 0, "temp": 0}
    peak = (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
            - m.alias_size_in_bytes)
    return {"peak": int(peak), "temp": int(m.temp_size_in_bytes)}


def bench_model(name: str, families: list[str], args) -> dict:
    cfg = dict(MODELS[name])
    entry = models.get(cfg["name"])
    model_inputs = entry.inputs  # batch -> the model call's inputs
    modality = entry.modality
    causal = models.is_causal_lm(entry)
    if modality == "image":
        cfg["image_size"] = args.image_size
        if args.vit_depth:
            cfg["depth"] = args.vit_depth
    model, params, _ = factory.build(cfg, NUM_CLASSES)
    rng = np.random.default_rng(0)
    batch_size = args.text_batch if modality == "text" else args.image_batch
    batch = jax.device_put(make_batch(modality, batch_size, args.seq_len, args.image_size, rng,
                                      causal))
    inputs = {k: v for k, v in batch.items() if k not in ("label", "loss_mask")}
    out = {"model": name, "batch": batch_size,
           "input": f"{args.seq_len} tokens" if modality == "text" else f"{args.image_size} px",
           "methods": {}}
    if modality == "image" and args.vit_depth:
        out["depth"] = args.vit_depth
    steppers, trained_spec, first = {}, None, None
    for method, (spec, path) in methods(families, args.lora_paths, causal).items():
        if causal:
            spec = dataclasses.replace(spec, heads=())
        steppers[method] = stepper = TrainStep(model, params, spec, batch, model_inputs,
                                               OPTIMIZER, lora_path=path, causal_lm=causal)
        trainable = stepper.state["trainable"]
        counts = peft.count(params, trainable, spec)
        mem = memory_bytes(stepper.compiled)
        out["methods"][method] = {"peak_mb": mem["peak"] / 2**20, "temp_mb": mem["temp"] / 2**20,
                                  "trainable": counts["trainable"], "adapter": counts["adapter"]}
        if trained_spec is None:  # the first family gives the headline
            trained_spec, surm = spec, method
            first = jax.tree.leaves(trainable["adapters"], is_leaf=lambda n: isinstance(
                n, structured.Params))[0]
    # ... on the path auto picks when several are timed
    several = len(args.lora_paths) > 1
    out["lora_path"] = peft.lora_path_for(trained_spec, first,
                                          "auto" if several else args.lora_paths[0], train=True)
    if several and f"{families[0]}[{out['lora_path']}]" in steppers:
        surm = f"{families[0]}[{out['lora_path']}]"
    seconds = interleaved_medians(steppers, args.warmup, args.steps)
    for method, entry in out["methods"].items():
        entry["step_ms"] = 1e3 * seconds[method]
        print(f"  {name:10s} {method:18s} trainable {entry['trainable']:>11,}  step "
              f"{entry['step_ms']:8.1f} ms  peak {entry['peak_mb']:8.1f} MiB  temp "
              f"{entry['temp_mb']:7.1f} MiB", flush=True)
    trained = jax.device_get(steppers[surm].state["trainable"])
    del steppers

    # merged inference: the base model's forward with merged weights vs with its own weights
    frozen = peft.split(params, trained_spec)[1]
    merged = peft.merge(peft.full_params(frozen, trained), trained["adapters"], trained_spec)
    forward = jax.jit(lambda p, x: model.apply({"params": p}, *model_inputs(x)))
    f_base = forward.lower(params, inputs).compile()
    f_merged = forward.lower(merged, inputs).compile()
    assert np.isfinite(np.asarray(f_merged(merged, inputs))).all()
    t = interleaved_medians({"base": lambda: jax.block_until_ready(f_base(params, inputs)),
                             "merged": lambda: jax.block_until_ready(f_merged(merged, inputs))},
                            args.warmup, args.steps)
    base_s, merged_s = t["base"], t["merged"]
    out["inference"] = {"base_ms": 1e3 * base_s, "merged_ms": 1e3 * merged_s}
    m = out["methods"]
    out["ratios"] = {
        "surm_over_lora_time": m[surm]["step_ms"] / m["lora_r1"]["step_ms"],
        "surm_over_lora_memory": m[surm]["peak_mb"] / m["lora_r1"]["peak_mb"],
        "surm_over_lora8_time": m[surm]["step_ms"] / m["lora_r8"]["step_ms"],
        "surm_over_full_time": m[surm]["step_ms"] / m["full"]["step_ms"],
        "surm_over_full_memory": m[surm]["peak_mb"] / m["full"]["peak_mb"],
        **({} if causal else {"probe_over_full_time": m["linear_probe"]["step_ms"]
                                                         / m["full"]["step_ms"]}),
        "merged_over_base_time": merged_s / base_s,
    }
    print(f"  {name}: " + ", ".join(f"{k} {v:.3f}" for k, v in out["ratios"].items())
          + f"  (inference base {1e3 * base_s:.1f} ms, merged {1e3 * merged_s:.1f} ms)",
          flush=True)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--models", default="minilm_l6,vit_s16,vit_b16",
                   help=f"from {', '.join(MODELS)}")
    p.add_argument("--families", default="circulant",
                   help="structured families to time (the first one gives the headline ratios)")
    p.add_argument("--lora_paths", default="auto",
                   help="comma-separated lora paths of the structured families (auto, structured, "
                        "dense, mixed: see surm.peft.lora_path_for); the headline takes auto's "
                        "pick")
    p.add_argument("--steps", type=int, default=20, help="timed steps (median)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps after compilation")
    p.add_argument("--text_batch", type=int, default=16)
    p.add_argument("--seq_len", type=int, default=64)
    p.add_argument("--image_batch", type=int, default=4)
    p.add_argument("--image_size", type=int, default=224)
    p.add_argument("--vit_depth", type=int, default=0,
                   help="blocks of the ViTs (default: the variant's; fewer for a quick check)")
    p.add_argument("--json", action="store_true", help="print one JSON object last")
    args = p.parse_args(argv)
    allocator.configure()  # as surm.train runs
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = sorted(set(models) - set(MODELS))
    if unknown:
        p.error(f"unknown model(s) {unknown}; choose from {', '.join(MODELS)}")
    families = [f.strip() for f in args.families.split(",") if f.strip()]
    args.lora_paths = [x.strip() for x in args.lora_paths.split(",") if x.strip()]
    bad = sorted(set(args.lora_paths) - set(peft.LORA_PATHS))
    if bad or not args.lora_paths:
        p.error(f"--lora_paths {bad or '(empty)'}: choose from {', '.join(peft.LORA_PATHS)}")
    print(f"devices: {jax.devices()}; median of {args.steps} steps after {args.warmup} warm-up",
          flush=True)
    results = [bench_model(m, families, args) for m in models]
    keys = list(dict.fromkeys(k for r in results for k in r["ratios"]))
    summary = {k: max(r["ratios"][k] for r in results if k in r["ratios"]) for k in keys}
    summary["command"] = " ".join(["python scripts/bench_train.py", *(argv or sys.argv[1:])])
    summary["surm_family"] = families[0]
    summary["lora_path"] = {r["model"]: r["lora_path"] for r in results}
    summary["lora_reference"] = "lowrank rank 1, same targets (q, v)"
    summary["models"] = {r["model"]: r for r in results}
    print("worst over models: " + ", ".join(f"{k} {summary[k]:.3f}" for k in keys), flush=True)
    if args.json:
        print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
