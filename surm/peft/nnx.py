"""PEFT on Flax NNX models: the specs, adapters, merges and adapter files of the Linen surgery
(``surm.peft.surgery``) on ``nnx.Linear``, ``nnx.LinearGeneral`` and ``nnx.Einsum`` layers.

    from surm.peft import nnx as peft_nnx
    model = peft_nnx.inject(model, spec, nnx.Rngs(0))        # in place; returns the model
    optimizer = nnx.Optimizer(model, optax.adam(1e-3), wrt=peft_nnx.Trainable)
    grads = nnx.grad(loss_fn, argnums=nnx.DiffState(0, peft_nnx.Trainable))(model, batch)
    optimizer.update(model, grads)
    peft_nnx.save(folder, model)        # adapters.safetensors + peft_spec.json, as surm.peft.io
    model, spec = peft_nnx.load(folder, fresh_model)
    peft_nnx.merge(model); peft_nnx.unmerge(model); plain = peft_nnx.unload(peft_nnx.merge(model))

Paths: a module's path is its attribute path joined with '/' (``layers/0/linear``, ``out``), a
parameter's the module's and its name (``out/kernel``). The spec's target and head rules, its
errors (a rule that matches nothing, a targeted head, a layer that cannot be adapted) and the
warning for a model whose output layer is no head are the Linen surgery's, run on the model's
parameters and layers by path; the adapter nodes are the ones ``surgery.init`` makes for those
paths and key, so a model and its Linen twin get the same adapters.

State: each targeted layer is replaced, in its parent, by an ``Adapted`` module that holds the
layer (``base``) and the method's node (``surm.peft.methods``) as ``Adapter`` variables, one per
array, in the node's own layout (``adapter/S/c``); its call is the layer's, plus the method's
update on the layer's input and output seen as rows (``surm.peft.layers``). The structured
families are called as they are: the wrapper only stores and reshapes. The base parameters that
train in full (heads, bitfit's biases, every one under ``full``) are retyped in place to
``Trained`` (a shared parameter stays shared). Both types subclass ``nnx.Param``, so
``nnx.Param`` still means every parameter, and ``Trainable`` (either type) is the filter for
``nnx.split``, ``nnx.state``, ``nnx.DiffState`` and ``nnx.Optimizer(wrt=...)``: frozen weights get
no gradient and no optimizer state.

Merging keeps the wrappers, so it can be undone (like PEFT's merge_adapter): ``merge`` folds
``scale * to_dense(S)`` into each kernel (through its layout) and the wrapper then runs its
layer alone; ``unmerge`` takes it out again. ``unload`` gives the plain model back: each wrapper
replaced by its layer (whose kernel holds the update if merged), ``Trained`` parameters retyped
to what they were. A merged model is for inference: its adapters get no gradient.

Adapter dropout is an ``nnx.Dropout`` in each wrapper (the spec's rate, on the update's input),
so ``model.eval()`` / ``model.train()`` and ``nnx.view(model, deterministic=...)`` switch it.
Layers stacked by ``nnx.vmap`` (one kernel per layer, for ``nnx.scan``) get stacked adapters.
"""
from __future__ import annotations

import contextlib
import functools
import json
import os
import pathlib
from typing import Any, Iterator, Mapping

import flax.linen as linen
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from surm.peft import io, methods, surgery, tree
from surm.peft import layers as layers_lib
from surm.peft.layers import Layout
from surm.peft.spec import PeftSpec

LAYERS = (nnx.Linear, nnx.LinearGeneral, nnx.Einsum)


class Adapter(nnx.Param):
    """An array of an adapter node: it trains."""


class Trained(nnx.Param):
    """A base parameter that trains in full under the spec: a head's, bitfit's biases, every one
    under ``full``."""


Trainable = nnx.Any(Adapter, Trained)  # the filter of everything that trains


@functools.lru_cache(maxsize=None)
def _trained_type(cls: type) -> type:
    """The ``Trained`` type of a parameter of type ``cls`` (still an instance of ``cls``)."""
    return Trained if cls is nnx.Param else type(f"Trained{cls.__name__}", (Trained, cls), {})


def _untrained_type(cls: type) -> type:
    return nnx.Param if cls is Trained else cls.__bases__[1]


# ---- the layers --------------------------------------------------------------------------------

def _in_axes(layer: nnx.Module, equation: str | None = None) -> tuple[int, ...]:
    """The axes of one layer's kernel contracted with the input; ValueError when the layer is
    not one (d_in, d_out) matrix."""
    if isinstance(layer, nnx.Einsum):
        return layers_lib._einsum_axes(equation or layer.einsum_str)[0]
    if isinstance(layer, nnx.LinearGeneral):
        if layer.batch_axis:
            raise ValueError("LinearGeneral with batch_axis has one kernel per batch index, not "
                             "one matrix")
        return tuple(range(len(layer.in_features)))
    return (0,)


def _layer_ndim(layer: nnx.Module) -> int:
    """The number of axes of one layer's kernel (more in the kernel: a stack)."""
    if isinstance(layer, nnx.Einsum):
        return len(layer.kernel_shape)
    if isinstance(layer, nnx.LinearGeneral):
        return len(layer.in_features) + len(layer.out_features)
    return 2


def _layout(layer: nnx.Module) -> Layout:
    shape = tuple(int(s) for s in layer.kernel.shape)
    return Layout(shape, _in_axes(layer), len(shape) - _layer_ndim(layer))


def _identity(a):
    return a


def _rows(layer: nnx.Module, layout: Layout, x, equation: str | None):
    """(x as rows (..., d_in), rows (..., d_out) -> the output's shape, and its inverse), by
    ``surm.peft.layers.as_rows`` on the Linen layer of the same form."""
    if isinstance(layer, nnx.Einsum):
        twin = linen.Einsum(shape=layout.layer_shape, einsum_str=equation or layer.einsum_str)
    elif isinstance(layer, nnx.LinearGeneral):
        twin = linen.DenseGeneral(features=layer.out_features, axis=layer.axis)
    else:
        return x, _identity, _identity
    return layers_lib.as_rows(twin, (x,), {}, layout)


# ---- the wrapper -------------------------------------------------------------------------------

def _leaf_names(node: Any) -> tuple[str, ...]:
    """The '/'-joined names of a node's arrays in ``jax.tree`` order, as ``tree.flatten`` names
    them (a structured.Params' arrays under its own name)."""
    def name(keypath):
        return "/".join(str(getattr(k, "key", getattr(k, "idx", ""))) for k in keypath
                        if not isinstance(k, jax.tree_util.GetAttrKey))
    return tuple(name(kp) for kp, _ in jax.tree_util.tree_flatten_with_path(node)[0])


def _nest(flat: Mapping[str, Any]) -> nnx.Dict:
    return nnx.Dict({k: _nest(v) if isinstance(v, Mapping) else v
                     for k, v in tree.unflatten(flat).items()})


class Adapted(nnx.Module):
    """A targeted layer (``base``) with the adapter node of ``spec``'s method (``adapter``).

    Its call is the layer's plus the method's update; once ``merged``, the layer's alone."""

    def __init__(self, base: nnx.Module, node: Mapping, spec: PeftSpec, path: str,
                 rngs: nnx.Rngs):
        self.base = base
        self.spec = spec
        self.path = path
        self.target = spec.target(path)
        leaves, self.treedef = jax.tree.flatten(node)
        self.names = _leaf_names(node)
        self.adapter = _nest({n: Adapter(v) for n, v in zip(self.names, leaves)})
        self.dropout = nnx.Dropout(spec.dropout, rngs=rngs) if spec.dropout > 0 else None
        self.merged = False
        self.disabled = False  # disable_adapter(): the layer's call alone

    def adapter_variables(self) -> dict[str, Adapter]:
        """{name in the node ('S/c'): its variable}."""
        def at(name):
            v = self.adapter
            for part in name.split("/"):
                v = v[part]
            return v
        return {n: at(n) for n in self.names}

    def node(self) -> dict:
        """The adapter node of ``surm.peft.methods`` (current values)."""
        values = [v.get_value() for v in self.adapter_variables().values()]
        return jax.tree.unflatten(self.treedef, values)

    def __call__(self, inputs, *args, **kwargs):
        y = self.base(inputs, *args, **kwargs)
        if self.merged or self.disabled:
            return y
        equation = None
        if isinstance(self.base, nnx.Einsum):
            equation = kwargs.get("einsum_str", args[0] if args else None)
        kernel_shape = tuple(int(s) for s in self.base.kernel.shape)
        if len(kernel_shape) != _layer_ndim(self.base):
            raise ValueError(f"{self.path}: a stacked layer's kernel {kernel_shape} is called "
                             "whole; call it one layer at a time (nnx.scan)")
        layout = Layout(kernel_shape, _in_axes(self.base, equation))
        x, back, forth = _rows(self.base, layout, inputs, equation)
        dropout = self.dropout if self.dropout is not None else _identity
        method = methods.get(self.spec.method)
        return back(method.apply(self.node(), self.spec, self.target, x, forth(y), dropout))


# ---- walking the model -------------------------------------------------------------------------

def _walk(model: Any) -> Iterator[tuple[str, tuple, Any]]:
    """(path, path parts, node) of every module and parameter; a wrapper's layer (``base``)
    has the wrapper's path, as it had before the wrapper."""
    graph = list(nnx.iter_graph(model))  # children may come before their wrapper
    wrapped = {tuple(parts) for parts, node in graph if isinstance(node, Adapted)}
    for parts, node in graph:
        if not isinstance(node, (nnx.Module, nnx.Param)):
            continue
        kept = [str(p) for i, p in enumerate(parts)
                if not (p == "base" and tuple(parts[:i]) in wrapped)]
        yield "/".join(kept), tuple(parts), node


def linear_layers(model: nnx.Module) -> dict[str, Layout | str]:
    """{module path: Layout} of the model's linear layers (``nnx.Linear``, ``LinearGeneral``,
    ``Einsum``; a stack of them made by ``nnx.vmap``); a layer that cannot be adapted maps to
    the reason, which a target rule selecting it reports."""
    found: dict[str, Layout | str] = {}
    for path, _, node in _walk(model):
        if isinstance(node, LAYERS):
            try:
                found[path] = _layout(node)
            except ValueError as e:
                found[path] = f"{type(node).__name__} at {path}: {e}"
    return found


def _params(model: nnx.Module) -> dict[str, nnx.Param]:
    """{parameter path: variable} of the base parameters (not the adapters)."""
    return {path: node for path, _, node in _walk(model)
            if isinstance(node, nnx.Param) and not isinstance(node, Adapter)}


def wrappers(model: nnx.Module) -> dict[str, Adapted]:
    """{module path: wrapper} of the adapted layers."""
    return {path: node for path, _, node in _walk(model) if isinstance(node, Adapted)}


def _replace(model: nnx.Module, old: nnx.Module, new: nnx.Module) -> nnx.Module:
    """Put ``new`` where the graph holds ``old`` (every parent of a shared module); the model,
    or ``new`` when ``old`` is the model itself."""
    if old is model:
        return new
    holders = [(parts, parent, key) for parts, parent in nnx.iter_graph(model)
               if nnx.graph.is_graph_node(parent) and not isinstance(parent, nnx.Variable)
               for key, child in nnx.iter_children(parent) if child is old]
    for parts, parent, key in holders:
        if isinstance(parent, tuple):
            raise ValueError(f"cannot replace the layer at {'/'.join(map(str, (*parts, key)))}: "
                             "it sits in a tuple; hold layers in an nnx.List")
        if isinstance(key, int) or isinstance(parent, (dict, list)):
            parent[key] = new
        else:
            setattr(parent, key, new)
    return model


# ---- inject and the trainable state ------------------------------------------------------------

def _as_rngs(rngs: nnx.Rngs | int | jax.Array) -> nnx.Rngs:
    return rngs if isinstance(rngs, nnx.Rngs) else nnx.Rngs(rngs)


def inject(model: nnx.Module, spec: PeftSpec, rngs: nnx.Rngs | int | jax.Array = 0
           ) -> nnx.Module:
    """Adapt ``model`` in place under ``spec`` and return it (the wrapper, when the model is
    itself a targeted layer): targeted layers become ``Adapted``, the base parameters that train
    in full become ``Trained``. ``rngs``: the adapters' initial values (``rngs.params()``) and
    the adapter dropout's stream.

    The errors and the head warning of ``surm.peft.surgery.init``; a model that has adapters or
    ``Trained`` parameters already is an error."""
    params = _params(model)
    if wrappers(model) or any(isinstance(v, Trained) for v in params.values()):
        raise ValueError("the model has peft adapters already: unload it first "
                         "(surm.peft.nnx.unload)")
    rngs = _as_rngs(rngs)
    layers = linear_layers(model)
    base_params = tree.unflatten({p: v.get_value() for p, v in params.items()})
    key = rngs.params()
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.key_data(key)  # surgery stacks keys as raw uint32 pairs
    trainable, _ = surgery.init(base_params, spec, key, layers)
    for path in tree.flatten(trainable["base"]):
        var = params[path]
        var.__class__ = _trained_type(type(var))
    modules = {path: node for path, _, node in _walk(model) if isinstance(node, nnx.Module)}
    for path in surgery.target_layouts(base_params, spec, layers):
        node = functools.reduce(lambda d, k: d[k], path.split("/"), trainable["adapters"])
        layer = modules[path]
        model = _replace(model, layer, Adapted(layer, node, spec, path, rngs))
    return model


def _variables(model: nnx.Module) -> dict[str, nnx.Variable]:
    """{file name: variable} of the trainable state: 'adapters/<module path>/<node name>' and
    'base/<parameter path>', the names of ``surm.peft.io``'s files."""
    out = {f"adapters/{path}/{name}": var for path, w in wrappers(model).items()
           for name, var in w.adapter_variables().items()}
    out |= {f"base/{path}": var for path, var in _params(model).items()
            if isinstance(var, Trained)}
    return out


def trainable(model: nnx.Module) -> dict:
    """The trainable state as the Linen surgery's tree: {"adapters": {<module path>: node},
    "base": {<parameter path>: array}} (nested; paths as in ``wrappers``)."""
    flat = {name: var.get_value() for name, var in _variables(model).items()}
    out = tree.unflatten(flat)
    return {"adapters": out.get("adapters", {}), "base": out.get("base", {})}


def spec_of(model: nnx.Module) -> PeftSpec | None:
    """The spec the model's adapters were made with; None when it has no wrappers."""
    specs = {w.spec for w in wrappers(model).values()}
    if len(specs) > 1:
        raise ValueError("the model's adapters come from several peft specs")
    return next(iter(specs), None)


# ---- merge, unmerge, unload --------------------------------------------------------------------

def _fold(w: Adapted, sign: float) -> None:
    kernel = w.base.kernel
    params = tree.unflatten({f"{w.path}/kernel": kernel.get_value()})
    adapters = tree.unflatten({w.path: w.node()})
    fold = surgery.merge if sign > 0 else surgery.unmerge
    kernel.set_value(tree.flatten(fold(params, adapters, w.spec))[f"{w.path}/kernel"])


def merge(model: nnx.Module) -> nnx.Module:
    """Fold each adapter's ``scale * to_dense(S)`` into its layer's kernel, in place; the
    wrappers then run their layers alone (outputs equal to float rounding). A spec whose update
    is no fixed matrix (adapter mode, houlsby) is the ValueError of ``surgery.merge``."""
    for w in wrappers(model).values():
        if not w.merged:
            _fold(w, 1.0)
            w.merged = True
    return model


def unmerge(model: nnx.Module) -> nnx.Module:
    """Undo ``merge`` (to float rounding), in place."""
    for w in wrappers(model).values():
        if w.merged:
            _fold(w, -1.0)
            w.merged = False
    return model


@contextlib.contextmanager
def disable_adapter(model: nnx.Module) -> Iterator[nnx.Module]:
    """``with disable_adapter(model):`` the model runs without its adapters (PEFT's context of
    the same name: the base model's outputs; leaves that train in full stay as trained). A
    merged model has its update in its kernels: unmerge it first."""
    ws = wrappers(model)
    if any(w.merged for w in ws.values()):
        raise ValueError("disable_adapter: the model is merged (its kernels hold the update); "
                         "unmerge(model) first")
    for w in ws.values():
        w.disabled = True
    try:
        yield model
    finally:
        for w in ws.values():
            w.disabled = False


def report(model: nnx.Module) -> str:
    """One line, as PEFT's ``print_trainable_parameters``: the trainable numbers (adapters and
    the leaves that train in full), all of the model's, and the share."""
    train = sum(int(np.size(v.get_value())) for v in _variables(model).values())
    base = sum(int(np.size(v.get_value())) for v in _params(model).values()
               if not isinstance(v, Trained))
    total = train + base
    return (f"trainable params: {train:,} || all params: {total:,} || "
            f"trainable%: {100 * train / total if total else 0:.4f}")


def unload(model: nnx.Module) -> nnx.Module:
    """The plain model, in place: each wrapper replaced by its layer (with the update in its
    kernel if merged; the base layer as it was if not), ``Trained`` parameters back to their
    own type. ``unload(merge(model))`` is the merged model with no overhead."""
    for var in _params(model).values():
        if isinstance(var, Trained):
            var.__class__ = _untrained_type(type(var))
    for w in wrappers(model).values():
        model = _replace(model, w, w.base)
    return model


# ---- adapter files -----------------------------------------------------------------------------

def base_identity(model: nnx.Module, spec: PeftSpec) -> dict:
    """The identity of the model's frozen weights under ``spec``: the hash a Linen twin of the
    model gives too (``surm.peft.io.base_identity``; the parameter paths are the same), so a
    file moves between the two checked."""
    params = tree.unflatten({path: np.asarray(var.get_value())
                             for path, var in _params(model).items()})
    return io.base_identity(params, spec, type(model).__name__)


def save(folder: str | os.PathLike, model: nnx.Module, spec: PeftSpec | None = None, *,
         base: bool = True) -> None:
    """Write the trainable state and the spec as ``surm.peft.io.save`` does (the same files a
    Linen model's adapters make), with the identity of the model's frozen weights, which
    ``load`` checks (``base=False``: none). ``spec``: the wrappers' own by default; needed for
    the methods without adapters (bitfit, probe, full)."""
    own = spec_of(model)
    if spec is None and own is None:
        raise ValueError("the model has no adapters, so its spec is not known: pass spec=")
    if spec is not None and own is not None and spec != own:
        raise ValueError("save: the spec given is not the one the model's adapters were made "
                         "with")
    io.save(folder, trainable(model), spec or own,
            base=base_identity(model, spec or own) if base else None)


def load(folder: str | os.PathLike, model: nnx.Module,
         rngs: nnx.Rngs | int | jax.Array = 0, *, check_base: bool = True
         ) -> tuple[nnx.Module, PeftSpec]:
    """(model, spec): ``save``'s files put into ``model``, in place. A plain model is injected
    with the file's spec first; an adapted one must have been made with it. A missing,
    unexpected or mis-shaped tensor, or a model whose frozen weights are not those the adapters
    were trained on (``check_base=False`` loads anyway), is an error naming it (and leaves a
    plain model plain)."""
    folder = pathlib.Path(folder)
    for name in (io.WEIGHTS, io.SPEC):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{folder / name} not found: an adapter folder holds "
                                    f"{io.WEIGHTS} and {io.SPEC} (written by surm.peft.nnx.save "
                                    "or surm.peft.io.save)")
    spec = PeftSpec.from_json((folder / io.SPEC).read_text())
    own = spec_of(model)
    injected = own is None and not any(isinstance(v, Trained) for v in _params(model).values())
    if injected:
        model = inject(model, spec, rngs)
    elif own is not None and own != spec:
        raise ValueError(f"{folder / io.SPEC} is not the spec the model's adapters were made "
                         f"with: unload the model, or load into a plain one")
    variables = _variables(model)
    got = io.read_tensors(folder / io.WEIGHTS)
    want = {k: tuple(v.shape) for k, v in variables.items()}
    problems = io.mismatches(want, got)
    recorded = folder / io.BASE
    if not problems and check_base and recorded.is_file():
        try:
            sha = json.loads(recorded.read_text())["sha256"]
        except (ValueError, KeyError, TypeError):
            sha = None
        mine = base_identity(model, spec)["sha256"]
        if sha != mine:
            problems = [f"the adapters were trained on other frozen weights (sha256 {sha}, this "
                        f"model's {mine}): load them into the model they were trained on, or "
                        f"pass check_base=False"]
    if problems:
        if injected:
            unload(model)  # the model as it came
        raise ValueError(f"{folder / io.WEIGHTS} does not fit this model and spec:\n  "
                         + "\n  ".join(problems))
    for name, var in variables.items():
        var.set_value(jnp.asarray(np.asarray(got[name]), var.get_value().dtype))
    return model, spec
