"""Parameter-tree surgery: inject adapters, run the model with them, merge them back.

The pretrained tree is never edited. The trainable state is its own pytree::

    trainable = {"adapters": {<module path mirrored>: {"S": structured.Params, ...}},
                 "base":     {<the base leaves that train in full: head, biases, ...>}}

and ``frozen`` is the base tree without those leaves, so gradients and optimizer state exist only
for ``trainable``. The model code knows nothing of this: ``apply`` intercepts the ``__call__`` of
the targeted ``nn.Dense``/``nn.DenseGeneral`` modules (Flax method interception) and adds the
update to their output.

A kernel's 2-D view: its leading axes (as many as the kernel has beyond its bias) are the inputs,
the rest the outputs, so ViT's (D, heads, D/heads) attention kernels are (D, D) matrices.
"""
from __future__ import annotations

import functools
import zlib
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from surm import structured
from surm.peft import tree
from surm.peft.spec import PeftSpec, match_targets, trains_in_full

_ACT = {"gelu": nn.gelu, "relu": nn.relu, "tanh": jnp.tanh, "identity": lambda x: x}


def _is_target(node: Any) -> bool:
    return isinstance(node, Mapping) and ("S" in node or "down" in node)


def linear_modules(base_params: Mapping) -> dict[str, tuple[int, int]]:
    """{module path: (d_in, d_out)} for every module with a 2-D or 3-D ``kernel``.

    Convolutions (4-D kernels) and embedding tables are not linear modules here."""
    out = {}
    flat = tree.flatten(base_params)
    for path, leaf in flat.items():
        module, _, name = path.rpartition("/")
        shape = tuple(leaf.shape)  # arrays or jax.ShapeDtypeStruct alike
        if name != "kernel" or len(shape) not in (2, 3):
            continue
        bias = flat.get(f"{module}/bias")
        n_out = len(bias.shape) if bias is not None else 1
        out[module] = (int(np.prod(shape[:len(shape) - n_out])), int(np.prod(shape[-n_out:])))
    return out


def targets(base_params: Mapping, spec: PeftSpec) -> dict[str, tuple[int, int]]:
    """{path: (d_in, d_out)} of the modules that get an adapter (empty for bitfit/probe/full)."""
    if not spec.has_adapters:
        return {}
    modules = linear_modules(base_params)
    return {p: modules[p] for p in match_targets(spec.targets, modules)}


def _init_target(key, spec: PeftSpec, d_in: int, d_out: int) -> dict:
    if spec.family == "houlsby":
        r = dict(spec.hparams)["rank"]
        return {"down": {"kernel": 0.02 * jax.random.normal(key, (d_out, r)),
                         "bias": jnp.zeros((r,))},
                "up": {"kernel": jnp.zeros((r, d_out)), "bias": jnp.zeros((d_out,))}}
    fam = structured.get(spec.family)
    shape = (d_in, d_out) if spec.mode == "lora" else (d_out, d_out)
    node = {"S": fam.init(key, *shape, init=spec.init, **dict(spec.hparams))}
    if spec.mode == "adapter":
        node["bias"] = jnp.zeros((d_out,))
    if spec.learn_scale:
        node["scale"] = jnp.asarray(spec.update_scale, jnp.float32)
    return node


def _key_for(rng, path: str):
    return jax.random.fold_in(rng, zlib.crc32(path.encode()) & 0x7FFFFFFF)


def inject(base_params: Mapping, spec: PeftSpec, rng) -> dict:
    """The adapter tree for ``base_params``: one node per targeted module, mirroring its path."""
    return tree.unflatten({path: _init_target(_key_for(rng, path), spec, d_in, d_out)
                           for path, (d_in, d_out) in targets(base_params, spec).items()})


def split(base_params: Mapping, spec: PeftSpec) -> tuple[dict, dict]:
    """(trainable base leaves, frozen rest) of the pretrained tree."""
    flat = tree.flatten(base_params)
    train = {p: v for p, v in flat.items() if trains_in_full(spec, p)}
    if not train and not spec.has_adapters:
        raise ValueError("nothing to train: the model has no head named 'head' or "
                         "'classifier' and the spec adds no adapters")
    frozen = {p: v for p, v in flat.items() if p not in train}
    return tree.unflatten(train), tree.unflatten(frozen)


def init(base_params: Mapping, spec: PeftSpec, rng) -> tuple[dict, dict]:
    """(trainable, frozen): everything a train step needs besides the model."""
    trainable_base, frozen = split(base_params, spec)
    return {"adapters": inject(base_params, spec, rng), "base": trainable_base}, frozen


def full_params(frozen: Mapping, trainable: Mapping) -> dict:
    """The model's parameter tree: the frozen leaves with the trainable base leaves in place."""
    return tree.overlay(frozen, trainable.get("base", {}))


def _lora_update(S: structured.Params, scale, x):
    return scale * structured.get(S.family).apply(S, x)


@jax.custom_vjp
def _update_gradient(S: structured.Params, scale, x):
    """Zeros shaped like the lora update ``scale * S(x)``, whose VJP is that update's VJP for
    ``S`` and ``scale`` (none for ``x``). Added to the output of a layer whose kernel already
    holds the update (detached), it gives the adapter its gradient through the family's fast
    product, while the forward pass and the input gradient are the folded kernel's."""
    return jnp.zeros((*x.shape[:-1], S.d_out), jnp.result_type(scale, x))


def _update_gradient_fwd(S, scale, x):
    return _update_gradient(S, scale, x), (S, scale, x)


def _update_gradient_bwd(res, g):
    S, scale, x = res
    _, vjp = jax.vjp(lambda S, scale: _lora_update(S, scale, x), S, scale)
    return (*vjp(g), jnp.zeros_like(x))


_update_gradient.defvjp(_update_gradient_fwd, _update_gradient_bwd)


class _Interceptor:
    def __init__(self, spec: PeftSpec, adapters: Mapping, rng,
                 gradient_only: Mapping | None = None):
        self.spec = spec
        self.nodes = tree.flatten(adapters, stop=_is_target)
        self.rng = rng
        # lora_path "mixed": the update is in the kernel; only its gradient is added here
        self.gradient_only = dict(gradient_only or {})

    def _dropout(self, path: str, x):
        if self.rng is None or self.spec.dropout == 0.0:
            return x
        keep = jax.random.bernoulli(_key_for(self.rng, path), 1.0 - self.spec.dropout, x.shape)
        return jnp.where(keep, x / (1.0 - self.spec.dropout), 0).astype(x.dtype)

    def __call__(self, next_fun, args, kwargs, context):
        module = context.module
        if context.method_name != "__call__" or not isinstance(module, (nn.Dense, nn.DenseGeneral)):
            return next_fun(*args, **kwargs)
        path = "/".join(module.path)
        node = self.nodes.get(path)
        y = next_fun(*args, **kwargs)
        folded = self.gradient_only.get(path)
        if node is None and folded is None:
            return y
        axis = getattr(module, "axis", -1)
        n_in = len(axis) if isinstance(axis, (tuple, list)) else 1
        x = args[0]
        batch = x.shape[:x.ndim - n_in]
        if folded is not None:
            scale = jnp.asarray(folded.get("scale", self.spec.update_scale), jnp.float32)
            zero = _update_gradient(folded["S"], scale, x.reshape(*batch, -1))
            return y + zero.reshape(y.shape).astype(y.dtype)
        scale = node.get("scale", self.spec.update_scale)
        if self.spec.mode == "lora":
            S = node["S"]
            delta = structured.get(S.family).apply(S, self._dropout(path, x.reshape(*batch, -1)))
            return y + (scale * delta).reshape(y.shape).astype(y.dtype)
        h = y.reshape(*batch, -1)
        act = _ACT[self.spec.activation]
        if "down" in node:  # Houlsby bottleneck
            d, u = node["down"], node["up"]
            z = act(h @ d["kernel"].astype(h.dtype) + d["bias"].astype(h.dtype))
            update = z @ u["kernel"].astype(h.dtype) + u["bias"].astype(h.dtype)
        else:
            S = node["S"]
            update = act(structured.get(S.family).apply(S, h)) + node["bias"].astype(h.dtype)
        update = self._dropout(path, scale * update)
        return (h + update.astype(h.dtype)).reshape(y.shape)


LORA_PATHS = ("auto", "structured", "dense", "mixed")

# How many times more flops per second a backend runs the folded weight gradient's matmul than a
# family's product (XLA's flop count of S(x)), for lora_path="auto". CPU: the crossovers of
# scripts/bench_lora_path.py (1024 rows; docs/RESULTS.md): mixed beats dense for circulant at
# width 256 (rate < 5.3), dense beats mixed for Toeplitz at 384 (rate >= 3.5) and loses at 512
# (rate < 4.6); bench_train's choices on MiniLM-L6, ViT-S/16 and ViT-B/16 agree. GPU: fitted to
# scripts/bench_train.py on one H200 (ViT-S/16, ViT-B/16: the per-matrix cost of the structured
# and dense paths gives 41 for circulant, 52 for Toeplitz; the lower is kept), before the mixed
# path existed. TPUs are unmeasured and take the GPU's figure.
MATMUL_OVER_FFT_RATE = {"cpu": 4.0, "gpu": 40.0, "tpu": 40.0}


def check_lora_path(spec: PeftSpec, path: str, train: bool = False) -> None:
    """Raise a ValueError when ``path`` is not a lora path or cannot be taken for ``spec``."""
    if path not in LORA_PATHS:
        raise ValueError(f"lora_path={path!r} is not one of {LORA_PATHS}")
    if path not in ("dense", "mixed"):
        return
    if not spec.mergeable:
        raise ValueError(f"lora_path={path!r} is not possible here: a {spec.family}/{spec.mode} "
                         f"spec has no weight update to fold. Use lora_path='structured' (or "
                         f"'auto')")
    if train and spec.dropout > 0:
        raise ValueError(f"lora_path={path!r} is not possible here: adapter dropout acts on "
                         "the update's input, which a folded kernel cannot do. Use "
                         "lora_path='structured' (or 'auto'), or peft.dropout=0")


@functools.lru_cache(maxsize=None)
def _flops_per_row(family: str, d_in: int, d_out: int, hp: tuple, arrays: tuple) -> float | None:
    fam = structured.get(family)
    S = structured.Params(family, d_in, d_out, hp,
                          {name: jax.ShapeDtypeStruct(shape, dtype) for name, shape, dtype in arrays})
    counts = []
    for rows in (1, 2):
        cost = jax.jit(fam.apply).lower(S, jax.ShapeDtypeStruct((rows, d_in), jnp.float32))
        cost = cost.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        if not cost or "flops" not in cost:
            return None
        counts.append(float(cost["flops"]))
    return counts[1] - counts[0]


def flops_per_row(S: structured.Params) -> float | None:
    """XLA's flop count of ``apply(S, x)`` for one more row of x (the per-token cost, excluding
    work on the parameters alone, such as a kernel's FFT); None where XLA gives none."""
    arrays = tuple(sorted((k, tuple(v.shape), jnp.dtype(v.dtype).name)
                          for k, v in S.arrays.items()))
    return _flops_per_row(S.family, S.d_in, S.d_out, S.hp, arrays)


def lora_path_for(spec: PeftSpec, S, path: str = "auto", train: bool = False) -> str:
    """How ``apply`` computes the lora-mode update of one structured matrix ``S``:
    ``"structured"``, ``"dense"`` or ``"mixed"``.

    - ``structured``: ``y = x W + scale * S(x)``, the family's fast product (FFTs, Kronecker
      factors) on the activations, forward and backward; nothing of size d_in x d_out is formed.
    - ``dense``: ``y = x (W + scale * to_dense(S))``: the update is materialised and folded into
      the kernel inside the step (differentiably). The forward pass is the base model's; the
      backward pass adds one weight-gradient matmul (2 d_in d_out flops per row of x) and a
      transient d_in x d_out buffer.
    - ``mixed``: folded as in ``dense`` for the forward pass and the input gradient, but the
      kernel's update is detached and the adapter's gradient comes from the family's product
      (for the FFT families: the FFTs of x and of the output gradient, one product's worth of
      work per row) instead of the weight-gradient matmul.
    - ``auto``: in training, a cost model between the two folded paths: ``dense`` when its
      2 d_in d_out flops per row are fewer than ``MATMUL_OVER_FFT_RATE[backend]`` times XLA's
      flop count of ``S(x)`` per row (what ``mixed`` spends), else ``mixed``; ``structured``
      (which spends about three products per row) for LoRA (``lowrank``: its factors are
      matmuls already), adapter mode and adapter dropout. Outside training (no gradient) a
      mergeable update is folded: ``dense``, the base model's cost.

    The folded paths are not possible with adapter dropout in training (dropout acts on the
    update's input).
    """
    check_lora_path(spec, path, train)
    if path != "auto":
        return path
    if not spec.mergeable:
        return "structured"
    if not train:
        return "dense"
    if spec.family == "lowrank" or spec.dropout > 0:
        return "structured"
    ratio = MATMUL_OVER_FFT_RATE.get(jax.default_backend())
    per_row = flops_per_row(S)
    if ratio is None or not per_row:
        return "mixed"
    return "dense" if 2 * S.d_in * S.d_out <= ratio * per_row else "mixed"


def apply(model: nn.Module, frozen: Mapping, trainable: Mapping, spec: PeftSpec, *args,
          train: bool = False, rng=None, method=None, lora_path: str = "auto", **kwargs):
    """Run ``model`` with the base parameters and the adapters of ``trainable``.

    With ``train=True`` pass ``rng``: it feeds the model's dropout and the adapters' dropout.
    ``lora_path`` picks how a lora-mode update is computed, per target (see
    ``lora_path_for``); every path gives the same outputs and gradients up to float rounding."""
    if train and rng is None and spec.dropout > 0:
        raise ValueError("apply(train=True) with dropout needs an rng")
    check_lora_path(spec, lora_path, train)
    params = full_params(frozen, trainable)
    adapters = trainable.get("adapters", {})
    mixed = {}
    if spec.mergeable:
        nodes = tree.flatten(adapters, stop=_is_target)
        paths = {p: lora_path_for(spec, n["S"], lora_path, train) for p, n in nodes.items()}
        dense = {p: nodes[p] for p, how in paths.items() if how == "dense"}
        mixed = {p: nodes[p] for p, how in paths.items() if how == "mixed"}
        if dense:
            params = _fold(params, tree.unflatten(dense), spec, 1.0)
        if mixed:
            params = _fold(params, tree.unflatten(mixed), spec, 1.0, detach=True)
        adapters = tree.unflatten({p: nodes[p] for p, how in paths.items()
                                   if how == "structured"})
    model_rng = adapter_rng = None
    if train and rng is not None:
        model_rng, adapter_rng = jax.random.split(rng)
    interceptor = _Interceptor(spec, adapters, adapter_rng, gradient_only=mixed)
    extra = {"method": method} if method is not None else {}
    with nn.intercept_methods(interceptor):
        return model.apply({"params": params}, *args, train=train,
                           rngs={"dropout": model_rng} if model_rng is not None else None,
                           **extra, **kwargs)


def _fold(base_params: Mapping, adapters: Mapping, spec: PeftSpec, sign: float,
          detach: bool = False) -> dict:
    if not spec.mergeable:
        why = ("adapter mode applies a non-linearity after S, so its update is not a fixed "
               "matrix" if spec.mode == "adapter" else f"{spec.family} adds no weight update")
        raise ValueError(f"cannot merge a {spec.family}/{spec.mode} spec: {why}. Export the "
                         f"adapters instead, or use mode='lora' to get a mergeable update")
    flat = tree.flatten(base_params)
    for path, node in tree.flatten(adapters, stop=_is_target).items():
        kernel = flat[f"{path}/kernel"]
        S = node["S"]
        delta = structured.get(S.family).to_dense(S) * node.get("scale", spec.update_scale)
        if detach:  # its gradient comes another way (lora_path "mixed")
            delta = jax.lax.stop_gradient(delta)
        flat[f"{path}/kernel"] = (kernel + sign * delta.reshape(kernel.shape)).astype(kernel.dtype)
    return tree.unflatten(flat)


def merge(base_params: Mapping, adapters: Mapping, spec: PeftSpec) -> dict:
    """Plain parameters with ``scale * to_dense(S)`` folded into each targeted kernel."""
    return _fold(base_params, adapters, spec, 1.0)


def unmerge(merged_params: Mapping, adapters: Mapping, spec: PeftSpec) -> dict:
    """The inverse of ``merge`` (up to float rounding)."""
    return _fold(merged_params, adapters, spec, -1.0)
