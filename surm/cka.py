"""CKA (centred kernel alignment, Kornblith et al. 2019) between fine-tuned models.

Two views, both against a full fine-tuning run (at its own tuned lr):

- **Weights.** For every matrix a lora-mode run adapts, linear CKA between the full run's update
  ``W_full - W0`` and the run's update ``scale * to_dense(S)`` (rows as examples). A structured
  family can only reach what its matrices can express: a circulant update cannot be aligned with
  a low-rank one however it is trained. So each matrix also gets the family's **ceiling**, the
  CKA between ``delta_full`` and its best Frobenius approximation in the family
  (``fam.fit(delta_full)``, same hyper-parameters), and the run is judged by achieved / ceiling.
  A Gaussian matrix of the same shape gives the floor.
- **Representations.** Per layer, linear CKA between the layer outputs of the two models on the
  same held-out examples (the first N of the validation split; a text example's output is the
  mean over its real tokens, an image's over its tokens). Any method can be compared this way,
  adapters included; full vs full at another seed is the reference for how alike two good
  fine-tunings are.
"""
from __future__ import annotations

import re
from typing import Mapping, Sequence

import jax
import numpy as np

from surm import data, peft, structured
from surm.peft import tree
from surm.runs import Run


def linear_cka(x: np.ndarray, y: np.ndarray) -> float:
    """Linear CKA of two matrices with the same number of rows (float64):
    ||Xc^T Yc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F), Xc = X - column means."""
    x = np.asarray(x, np.float64).reshape(len(x), -1)
    y = np.asarray(y, np.float64).reshape(len(y), -1)
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"CKA compares matrices with the same rows: {x.shape} vs {y.shape}")
    x = x - x.mean(0)
    y = y - y.mean(0)
    cross = np.linalg.norm(x.T @ y) ** 2
    norms = np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y)
    if norms == 0:
        raise ValueError("CKA of a zero update is undefined (did the run train?)")
    return float(cross / norms)


def method_name(spec: peft.PeftSpec) -> str:
    """'lora circulant (form=hadamard)', 'full'."""
    hp = ",".join(f"{k}={v}" for k, v in sorted(spec.method_hparams.items()))
    return f"{spec.label}{f' ({hp})' if hp else ''}"


def weight_updates(run: Run) -> dict[str, np.ndarray]:
    """{module path: its kernel's update as a (d_in, d_out) matrix}: every kernel of a full
    fine-tuning run, the adapted ones of a lora-mode run."""
    modules = peft.linear_modules(run.base)
    base = tree.flatten(run.base)
    if run.spec.method == "full":
        tuned = tree.flatten(run.params)
        return {p: (np.asarray(tuned[f"{p}/kernel"], np.float64)
                    - np.asarray(base[f"{p}/kernel"], np.float64)).reshape(modules[p])
                for p in modules if f"{p}/kernel" in tuned}
    if not run.spec.mergeable:
        raise ValueError(f"{run.workdir}: a {run.spec.label} run has no weight "
                         f"update matrix to compare (CKA of weights needs full fine-tuning or a "
                         f"lora-mode run; compare representations instead)")
    out = {}
    for path, node in tree.flatten(run.trainable["adapters"], stop=lambda n: "S" in n).items():
        S = node["S"]
        scale = float(node.get("scale", run.spec.update_scale))
        out[path] = scale * np.asarray(structured.get(S.family).to_dense(S), np.float64)
    return out


def ceiling(delta_full: np.ndarray, like: structured.Params) -> float:
    """CKA between ``delta_full`` and its best approximation in ``like``'s family and shape."""
    fam = structured.get(like.family)
    fit = fam.fit(np.asarray(delta_full, np.float32), **like.hparams)
    return linear_cka(delta_full, np.asarray(fam.to_dense(fit), np.float64))


def compare_weights(full: Run, run: Run, seed: int = 0,
                    paths: Sequence[str] | None = None) -> dict:
    """Per adapted matrix (or per matrix of ``paths``): CKA with the full run's update, the
    family's ceiling (None for full vs full) and a random floor; and their means."""
    deltas_full, deltas = weight_updates(full), weight_updates(run)
    if paths is not None:
        deltas = {p: deltas[p] for p in paths}
    nodes = ({} if run.spec.method == "full" else
             tree.flatten(run.trainable["adapters"], stop=lambda n: "S" in n))
    rng = np.random.default_rng(seed)
    per = {}
    for path, delta in deltas.items():
        if path not in deltas_full:
            raise ValueError(f"the full run has no matrix {path}")
        ref = deltas_full[path]
        per[path] = {"cka": linear_cka(ref, delta),
                     "ceiling": ceiling(ref, nodes[path]["S"]) if path in nodes else None,
                     "random": linear_cka(ref, rng.standard_normal(ref.shape))}
    cka = [v["cka"] for v in per.values()]
    out = {"method": method_name(run.spec), "matrices": len(per), "mean": float(np.mean(cka)),
           "min": float(np.min(cka)), "max": float(np.max(cka)),
           "random_mean": float(np.mean([v["random"] for v in per.values()])),
           "per_matrix": per}
    if nodes:
        out["ceiling_mean"] = float(np.mean([v["ceiling"] for v in per.values()]))
        out["of_ceiling"] = float(np.mean([v["cka"] / v["ceiling"] for v in per.values()]))
    return out


def _natural(path: str) -> list:
    """'layer/10' after 'layer/9'."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path)]


def _is_layer(module, method_name: str) -> bool:
    from surm.models import bert, vit
    return method_name == "__call__" and isinstance(module, (bert.BertLayer, vit.Encoder1DBlock))


def layer_outputs(run: Run, examples: int = 512, batch_size: int = 64) -> list[np.ndarray]:
    """The output of every encoder layer on the first ``examples`` validation examples, one
    (examples, width) array per layer (text: mean over real tokens; images: over tokens)."""
    from surm import config_fields, tasks  # the trainer's preprocessing

    dataset = data.get_dataset(run.config.input.dataset,
                               run.config.input.get("data_dir") or None)
    prep = tasks.preprocessors(config_fields.complete(run.config), dataset)[1]
    source = dataset.source("validation", first=examples)
    modality = run.data_spec.modality
    frozen = run.frozen

    @jax.jit
    def forward(trainable, frozen, inputs):
        _, state = peft.apply(run.model, frozen, trainable, run.spec, *inputs,
                              capture_intermediates=_is_layer)
        found = tree.flatten(state["intermediates"], stop=lambda n: "__call__" in n)
        return [found[k]["__call__"][0] for k in sorted(found, key=_natural)]

    layers: list[list[np.ndarray]] = []
    for batch in data.make_eval_batches(source, prep, global_batch_size=batch_size,
                                        shard_index=0, shard_count=1):
        inputs = run.entry.inputs(batch)
        outs = forward(run.trainable, frozen, inputs)
        keep = np.asarray(batch["mask"], bool)
        weights = (np.asarray(batch["attention_mask"], np.float64) if modality == "text"
                   else np.ones(outs[0].shape[:2]))[..., None]
        for i, out in enumerate(outs):
            pooled = (np.asarray(out, np.float64) * weights).sum(1) / weights.sum(1)
            if len(layers) <= i:
                layers.append([])
            layers[i].append(pooled[keep])
    return [np.concatenate(parts) for parts in layers]


def compare_representations(reference: Sequence[np.ndarray],
                            other: Sequence[np.ndarray]) -> dict:
    """Per layer CKA between two models' ``layer_outputs``, and the mean."""
    if len(reference) != len(other):
        raise ValueError(f"{len(reference)} layers vs {len(other)}: not the same architecture")
    per = [linear_cka(a, b) for a, b in zip(reference, other)]
    return {"per_layer": per, "mean": float(np.mean(per)), "last": per[-1]}


def report(full: Run, runs: Mapping[str, Run], full_other: Run | None = None,
           examples: int = 512) -> dict:
    """Weight CKA (lora-mode runs) and representation CKA (every run) against ``full``;
    ``full_other`` (full fine-tuning at another seed) is the reference of both."""
    reference = layer_outputs(full, examples)
    out = {"full": str(full.workdir), "examples": examples, "runs": {}}
    every = dict(runs)
    if full_other is not None:
        every = {"full (other seed)": full_other, **every}
    # full vs full over the matrices the lora-mode runs adapt (q and v by default)
    adapted = sorted({p for run in runs.values() if run.spec.mergeable
                      for p in peft.targets(run.base, run.spec)})
    for name, run in every.items():
        entry = {"workdir": str(run.workdir), "method": method_name(run.spec),
                 "representations": compare_representations(reference,
                                                             layer_outputs(run, examples))}
        if run.spec.mergeable or (run.spec.method == "full" and adapted):
            weights = compare_weights(full, run, paths=None if run.spec.mergeable else adapted)
            entry["weights"] = {k: v for k, v in weights.items() if k != "per_matrix"}
        out["runs"][name] = entry
    return out
