"""Parameter-tree surgery: inject adapters, run the model with them, merge them back.

The pretrained tree is never edited. The trainable state is its own pytree::

    trainable = {"adapters": {<module path mirrored>: {"S": structured.Params, ...}},
                 "base":     {<the base leaves that train in full: heads, biases, ...>}}

and ``frozen`` is the base tree without those leaves, so gradients and optimizer state exist only
for ``trainable``. The model code knows nothing of this: ``apply`` puts each adapter node beside
its layer's kernel (under the reserved name ``__surm__``) and intercepts the calls of the
targeted Linen layers (``nn.Dense``, ``nn.DenseGeneral``, ``nn.Einsum``: Flax method
interception), which read their node from their own scope and add the method's update to their
output. Reading it from the scope is what makes scanned and vmapped layers work: ``nn.scan``
slices a stacked layer's adapters with its kernels.

The layers and the 2-D view of their kernels come from ``surm.peft.layers``: from the parameter
tree alone by default, or from ``layers.trace(model, params, *inputs)`` (pass it as
``layers=``) for DenseGeneral axes, Einsum equations and scanned stacks. The methods themselves
(what a node holds, what it does to an output) live in ``surm.peft.methods``.
"""
from __future__ import annotations

import functools
import warnings
import zlib
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from surm import structured
from surm.models.layers import dropout as _hash_dropout
from surm.peft import layers as layers_lib
from surm.peft import methods, tree
from surm.peft.layers import Layout
from surm.peft.spec import PeftSpec, is_head, match_targets, rule_selects, trains_in_full

SCOPE_KEY = "__surm__"  # an adapter node's name beside its layer's kernel, inside ``apply``
GRADIENT_KEY = "__surm_gradient__"  # lora_path "mixed": a node whose update is in the kernel


def _is_target(node: Any) -> bool:
    return isinstance(node, Mapping) and ("S" in node or "down" in node)


def _layouts(base_params: Mapping, layers: Mapping | None) -> dict[str, Any]:
    return layers_lib.from_params(base_params) if layers is None else dict(layers)


def linear_modules(base_params: Mapping, layers: Mapping | None = None
                   ) -> dict[str, tuple[int, int]]:
    """{module path: (d_in, d_out)} of the linear layers (``surm.peft.layers``); ``layers``: a
    ``layers.trace`` of the model, else the parameter tree's own."""
    return {p: (lay.d_in, lay.d_out) for p, lay in _layouts(base_params, layers).items()
            if isinstance(lay, Layout)}


def target_layouts(base_params: Mapping, spec: PeftSpec, layers: Mapping | None = None
                   ) -> dict[str, Layout]:
    """{path: Layout} of the layers that get an adapter (empty for bitfit, probe and full).
    ValueError for a rule that matches nothing, a targeted head, a targeted layer that cannot
    be adapted, or a pattern that matches no target."""
    if not spec.has_adapters:
        return {}
    found = _layouts(base_params, layers)
    chosen = match_targets(spec.targets, found, spec.head_rules)
    bad = [found[p] for p in chosen if not isinstance(found[p], Layout)]
    if bad:
        raise ValueError("target rules select layers that cannot be adapted:\n  "
                         + "\n  ".join(bad))
    for rule, _ in spec.patterns:
        if not any(rule_selects(rule, p) for p in chosen):
            raise ValueError(f"peft pattern {rule!r} matches none of the targeted layers "
                             f"({len(chosen)}: {', '.join(chosen[:8])}"
                             f"{', ...' if len(chosen) > 8 else ''})")
    return {p: found[p] for p in chosen}


def targets(base_params: Mapping, spec: PeftSpec, layers: Mapping | None = None
            ) -> dict[str, tuple[int, int]]:
    """{path: (d_in, d_out)} of the layers that get an adapter (empty for bitfit/probe/full)."""
    return {p: (lay.d_in, lay.d_out)
            for p, lay in target_layouts(base_params, spec, layers).items()}


def _key_for(rng, path: str):
    return jax.random.fold_in(rng, zlib.crc32(path.encode()) & 0x7FFFFFFF)


def _init_node(key, spec: PeftSpec, path: str, layout: Layout) -> dict:
    method, target = methods.get(spec.method), spec.target(path)

    def one(k):
        return method.init(k, spec, target, layout.d_in, layout.d_out)
    n = 1
    for size in layout.stack_shape:
        one, n = jax.vmap(one), n * size
    keys = key
    if layout.stack:
        keys = jax.random.split(key, n)  # raw (n, 2) or typed (n,) keys alike
        keys = keys.reshape(*layout.stack_shape, *keys.shape[1:])
    node = one(keys)
    if not layout.is_prefix:
        node["layout"] = layout  # a Layout has no leaves: jit, optax and orbax do not see it
    return node


def inject(base_params: Mapping, spec: PeftSpec, rng, layers: Mapping | None = None) -> dict:
    """The adapter tree for ``base_params``: one node per targeted layer, mirroring its path (a
    stacked layer's node stacks one adapter per kernel)."""
    return tree.unflatten({path: _init_node(_key_for(rng, path), spec, path, layout)
                           for path, layout in target_layouts(base_params, spec,
                                                              layers).items()})


def _output_layer_hint(base_params: Mapping, spec: PeftSpec, layers: Mapping | None) -> str:
    found = linear_modules(base_params, layers)
    chosen = set(target_layouts(base_params, spec, layers)) if spec.has_adapters else set()
    last = [p for p in found if p not in chosen][-3:][::-1]
    shown = ", ".join(f"{p} ({found[p][0]} -> {found[p][1]})" for p in last) or "none"
    return (f"no module matches the peft heads {list(spec.head_rules)}, so no output layer "
            f"trains. The model's last untargeted linear layers: {shown}. Name the output "
            f"layer in peft heads (e.g. heads=({last[0]!r},)) to train it in full, or set "
            f"heads=() to say the model has none" if last else
            f"no module matches the peft heads {list(spec.head_rules)}")


def split(base_params: Mapping, spec: PeftSpec, layers: Mapping | None = None
          ) -> tuple[dict, dict]:
    """(trainable base leaves, frozen rest) of the pretrained tree.

    With the default head rules, a model with no head gets a warning naming its likely output
    layers; a spec under which nothing trains is an error."""
    flat = tree.flatten(base_params)
    train = {p: v for p, v in flat.items() if trains_in_full(spec, p)}
    no_head = not any(is_head(spec, p) for p in flat)
    if not train and not spec.has_adapters:
        raise ValueError(f"nothing to train under peft method {spec.method!r}: "
                         + _output_layer_hint(base_params, spec, layers))
    if no_head and spec.heads is None and spec.method != "full":
        warnings.warn(_output_layer_hint(base_params, spec, layers), stacklevel=2)
    frozen = {p: v for p, v in flat.items() if p not in train}
    return tree.unflatten(train), tree.unflatten(frozen)


def init(base_params: Mapping, spec: PeftSpec, rng, layers: Mapping | None = None
         ) -> tuple[dict, dict]:
    """(trainable, frozen): everything a train step needs besides the model. ``layers``: a
    ``surm.peft.layers.trace`` of the model, for layers the parameter tree alone does not
    describe (DenseGeneral axes, Einsum, scanned stacks)."""
    trainable_base, frozen = split(base_params, spec, layers)
    return {"adapters": inject(base_params, spec, rng, layers), "base": trainable_base}, frozen


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


def _check_shape(path: str, node: Mapping, layout: Layout, method) -> None:
    """An adapter made for another matrix than the one its layer calls for (a layout misread
    from the parameters) is an error, never a silently different update."""
    S = node.get("S")
    if S is not None and (S.d_in, S.d_out) != method.matrix(layout.d_in, layout.d_out):
        raise ValueError(_mismatch(path, S, f"{layout.d_in} -> {layout.d_out}"))


def _mismatch(path: str, S, layer: str) -> str:
    return (f"{path}: its adapter was made for a {S.d_in} -> {S.d_out} matrix, but the layer "
            f"computes {layer}; make the adapters with layers=peft.layers.trace(model, params, "
            f"*inputs), which reads the layers as they run")


class _Interceptor:
    """Adds each targeted layer's update to its output; the nodes come from the layer's scope
    (``SCOPE_KEY``, ``GRADIENT_KEY``), sliced as the layer's kernel is."""

    def __init__(self, spec: PeftSpec, rng, training: bool):
        self.spec = spec
        self.method = methods.get(spec.method)
        self.rng = rng
        self.training = training

    def _dropout(self, path: str):
        if not self.training or self.rng is None or self.spec.dropout == 0.0:
            return lambda x: x
        rate = self.spec.dropout

        return lambda x: _hash_dropout(x, rate, _key_for(self.rng, path))

    def __call__(self, next_fun, args, kwargs, context):
        module = context.module
        y = next_fun(*args, **kwargs)
        if not layers_lib._is_layer(module, context.method_name):
            return y
        node = (module.get_variable("params", SCOPE_KEY)
                if module.has_variable("params", SCOPE_KEY) else None)
        folded = (module.get_variable("params", GRADIENT_KEY)
                  if module.has_variable("params", GRADIENT_KEY) else None)
        if node is None and folded is None:
            return y
        path = "/".join(module.path)
        target = self.spec.target(path)
        layout = layers_lib.call_layout(module, args, kwargs)
        _check_shape(path, node if node is not None else folded, layout, self.method)
        x, back, forth = layers_lib.as_rows(module, args, kwargs, layout)
        if folded is not None:
            scale = jnp.asarray(methods.base.scale_of(folded, target), jnp.float32)
            zero = _update_gradient(folded["S"], scale, x)
            return y + back(zero).astype(y.dtype)
        rows = forth(y)
        return back(self.method.apply(node, self.spec, target, x, rows, self._dropout(path)))


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
        raise ValueError(f"lora_path={path!r} is not possible here: a {spec.label} "
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
    work on the parameters alone, such as a kernel's FFT); None where XLA gives none. For a
    stack of matrices (a scanned layer's), one matrix's."""
    specs = structured.get(S.family).arrays(S.d_in, S.d_out, S.hparams)
    arrays = tuple(sorted((k, tuple(specs[k].shape), jnp.dtype(v.dtype).name)
                          for k, v in S.arrays.items()))
    return _flops_per_row(S.family, S.d_in, S.d_out, S.hp, arrays)


def lora_path_for(spec: PeftSpec, S, path: str = "auto", train: bool = False,
                  backend: str | None = None) -> str:
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
    if S.family == "lowrank" or spec.dropout > 0:
        return "structured"
    ratio = MATMUL_OVER_FFT_RATE.get(backend or jax.default_backend())
    per_row = flops_per_row(S)
    if ratio is None or not per_row:
        return "mixed"
    return "dense" if 2 * S.d_in * S.d_out <= ratio * per_row else "mixed"


PLANNED = ("structured", "dense", "mixed")


def plan_lora_paths(spec: PeftSpec, trainable: Mapping, path: str = "auto",
                    train: bool = False, backend: str | None = None) -> dict[str, str]:
    """{target path: "structured" | "dense" | "mixed"}: how ``apply`` computes each lora-mode
    update (``lora_path_for``), decided once, outside any trace (``auto`` compiles each family's
    product to count its flops), for ``backend`` (default: JAX's). A trainer makes the plan
    before it jits its steps, records it, and passes it to ``apply`` as ``lora_path``."""
    check_lora_path(spec, path, train)
    nodes = tree.flatten(trainable.get("adapters", {}), stop=_is_target)
    return {p: (lora_path_for(spec, n["S"], path, train, backend) if spec.mergeable
                else "structured") for p, n in nodes.items()}


def _training(training: bool | None, kwargs: Mapping) -> bool:
    if training is not None:
        return bool(training)
    if "train" in kwargs:
        return bool(kwargs["train"])
    if "deterministic" in kwargs:
        return not kwargs["deterministic"]
    return False


def apply(model: nn.Module, frozen: Mapping, trainable: Mapping, spec: PeftSpec, *args,
          rng=None, training: bool | None = None, method=None,
          lora_path: str | Mapping[str, str] = "auto", disable_adapter: bool = False,
          **kwargs):
    """Run ``model`` with the base parameters and the adapters of ``trainable``:
    ``model.apply({"params": ...}, *args, method=method, **kwargs)``, every argument passed on
    as given (``rngs=`` for the model's own dropout, ``mutable=``, the model's flags).

    ``training`` (default: the call's ``train``, else ``not deterministic``, else False)
    switches the adapters' dropout, for which ``rng`` is the key, and picks the lora path.
    ``lora_path`` picks how a lora-mode update is computed, per target: one of ``LORA_PATHS``
    for all (``auto`` decided here, per target: ``lora_path_for``), or a plan
    (``plan_lora_paths``) made before tracing; every path gives the same outputs and gradients
    up to float rounding. ``disable_adapter=True`` runs the model without the adapters (PEFT's
    ``disable_adapter``: the base model's outputs; leaves that train in full, the head, stay
    as trained)."""
    if disable_adapter:  # the base model as it was: no update (what trains in full stays)
        extra = {"method": method} if method is not None else {}
        return model.apply({"params": full_params(frozen, trainable)}, *args, **extra,
                           **kwargs)
    training = _training(training, kwargs)
    if training and rng is None and spec.dropout > 0:
        raise ValueError("apply in training with adapter dropout needs an rng "
                         "(rng=<a PRNG key>)")
    params = full_params(frozen, trainable)
    nodes = tree.flatten(trainable.get("adapters", {}), stop=_is_target)
    if isinstance(lora_path, Mapping):
        how = dict(lora_path)
        if set(how) != set(nodes) or not set(how.values()) <= set(PLANNED):
            raise ValueError(f"the lora-path plan does not fit these adapters: it names "
                             f"{len(how)} targets for {len(nodes)}; make it with "
                             f"peft.plan_lora_paths on this trainable tree")
        if any(h != "structured" for h in how.values()):
            check_lora_path(spec, "dense", training)
    else:
        how = plan_lora_paths(spec, trainable, lora_path, training)
    dense = {p: nodes[p] for p, h in how.items() if h == "dense"}
    mixed = {p: nodes[p] for p, h in how.items() if h == "mixed"}
    if dense:
        params = _fold(params, tree.unflatten(dense), spec, 1.0)
    if mixed:
        params = _fold(params, tree.unflatten(mixed), spec, 1.0, detach=True)
    scoped = {f"{p}/{SCOPE_KEY}": nodes[p] for p, h in how.items() if h == "structured"}
    scoped |= {f"{p}/{GRADIENT_KEY}": node for p, node in mixed.items()}
    params = tree.overlay(params, tree.unflatten(scoped))
    extra = {"method": method} if method is not None else {}
    with nn.intercept_methods(_Interceptor(spec, rng, training)):
        return model.apply({"params": params}, *args, **extra, **kwargs)


def _fold(base_params: Mapping, adapters: Mapping, spec: PeftSpec, sign: float,
          detach: bool = False) -> dict:
    if not spec.mergeable:
        why = ("adapter mode applies a non-linearity after S, so its update is not a fixed "
               "matrix" if spec.method == "adapter" else f"{spec.method} adds no weight update")
        raise ValueError(f"cannot merge a {spec.label} spec: {why}. Export the "
                         f"adapters instead, or use method='lora' to get a mergeable update")
    method = methods.get(spec.method)
    flat = tree.flatten(base_params)
    for path, node in tree.flatten(adapters, stop=_is_target).items():
        kernel = flat[f"{path}/kernel"]
        S = node["S"]
        try:
            layout = node.get("layout") or layers_lib.derive(kernel.shape, S.d_in, S.d_out)
        except StopIteration:  # no reading of the kernel is a d_in x d_out matrix
            raise ValueError(_mismatch(path, S, f"a kernel of shape {tuple(kernel.shape)}")
                             ) from None
        target = spec.target(path)

        def delta(n):
            return method.delta(n, spec, target)
        for _ in range(layout.stack):
            delta = jax.vmap(delta)
        update = delta({k: v for k, v in node.items() if k != "layout"})
        if detach:  # its gradient comes another way (lora_path "mixed")
            update = jax.lax.stop_gradient(update)
        flat[f"{path}/kernel"] = (kernel + sign * layout.from_matrix(update)).astype(kernel.dtype)
    return tree.unflatten(flat)


def merge(base_params: Mapping, adapters: Mapping, spec: PeftSpec) -> dict:
    """Plain parameters with ``scale * to_dense(S)`` folded into each targeted kernel."""
    return _fold(base_params, adapters, spec, 1.0)


def unmerge(merged_params: Mapping, adapters: Mapping, spec: PeftSpec) -> dict:
    """The inverse of ``merge`` (up to float rounding)."""
    return _fold(merged_params, adapters, spec, -1.0)
