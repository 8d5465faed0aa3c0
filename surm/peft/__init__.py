"""Parameter-tree surgery: PEFT specs, adapter injection, forward, merge, reports, adapter files.

    spec = peft.PeftSpec.create(method="lora", structure="circulant", targets="qv")
    trainable, frozen = peft.init(base_params, spec, rng)
    logits = peft.apply(model, frozen, trainable, spec, *inputs, train=False)
    merged = peft.merge(peft.full_params(frozen, trainable), trainable["adapters"], spec)

Any Linen model: ``layers = peft.layers.trace(model, params, *inputs)`` finds its linear layers
as they run (Dense, DenseGeneral, Einsum, scanned stacks); pass ``layers=layers`` to ``init``.
Adapter files: ``peft.save(folder, trainable, spec, base=params)`` and ``peft.load(folder,
params)`` (``surm.peft.io``). Several named adapters of one base, one active or a weighted
combination: ``peft.AdapterSet`` (``surm.peft.named``). NNX models: ``surm.peft.nnx`` (imported on first use:
``peft.nnx.inject(model, spec)``).
"""
from surm.peft import io, layers, methods
from surm.peft.io import load, save
from surm.peft.named import AdapterSet
from surm.peft.report import count, format_report
from surm.peft.spec import (BASELINES, METHODS, MODES, PeftSpec, Target, config_to_spec,
                            match_targets)
from surm.peft.surgery import (LORA_PATHS, MATMUL_OVER_FFT_RATE, apply, check_lora_path,
                               flops_per_row, full_params, init, inject, linear_modules,
                               lora_path_for, merge, plan_lora_paths, split, target_layouts,
                               targets, unmerge)



def __getattr__(name):
    if name == "PRESETS":  # computed on each use: a model registered later adds its names
        from surm.peft.spec import presets
        return presets()
    if name == "nnx":  # flax.nnx costs a second to import: only for those who use it
        import importlib
        return importlib.import_module("surm.peft.nnx")
    raise AttributeError(f"module 'surm.peft' has no attribute {name!r}")


__all__ = ["AdapterSet", "BASELINES", "LORA_PATHS", "MATMUL_OVER_FFT_RATE", "METHODS", "MODES", "PRESETS",
           "PeftSpec", "Target", "apply", "check_lora_path", "config_to_spec", "count",
           "flops_per_row", "format_report", "full_params", "init", "inject", "io", "layers",
           "load", "save",
           "linear_modules", "lora_path_for", "match_targets", "merge", "methods",
           "plan_lora_paths", "split", "target_layouts", "targets", "unmerge"]
