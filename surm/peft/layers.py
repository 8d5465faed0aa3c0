"""The linear layers of a model, and their kernels seen as (d_in, d_out) matrices.

A layer is a module owning a ``kernel`` whose output is linear in its input: Linen's
``nn.Dense``, ``nn.DenseGeneral`` (any ``axis``, any feature shape) and ``nn.Einsum`` (the form
JAX LLM code uses). Its ``Layout`` says which kernel axes the input is contracted with (they
form the matrix's rows, the others its columns, each in kernel order) and how many leading axes
stack one kernel per layer (``nn.scan``, ``nn.vmap``): a stacked layer gets one adapter per
kernel of the stack.

Two ways to find the layers:

- ``from_params(params)``: from the parameter tree alone. A 2-D kernel is (d_in, d_out); a 3-D
  one is split by its bias (ViT's (D, heads, D/heads) attention kernels are (D, D) matrices).
  Enough for the project's ViT and BERT, and for any model of plain ``nn.Dense`` layers.
- ``trace(model, params, *args, **kwargs)``: from one abstract call of the model
  (``jax.eval_shape``, nothing is computed), which sees every layer as it runs: the axes of a
  ``DenseGeneral``, the equation of an ``Einsum``, the kernels a scan stacks. Needed for those.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from surm.peft import tree


@dataclasses.dataclass(frozen=True)
class Layout:
    """How one kernel of shape ``shape`` (in the parameter tree) is a (d_in, d_out) matrix."""

    shape: tuple[int, ...]
    in_axes: tuple[int, ...] = (0,)  # axes of one layer's kernel contracted with the input
    stack: int = 0  # leading axes of ``shape`` that stack one kernel per layer

    @property
    def layer_shape(self) -> tuple[int, ...]:
        return self.shape[self.stack:]

    @property
    def stack_shape(self) -> tuple[int, ...]:
        return self.shape[:self.stack]

    @property
    def out_axes(self) -> tuple[int, ...]:
        return tuple(a for a in range(len(self.layer_shape)) if a not in self.in_axes)

    @property
    def d_in(self) -> int:
        return math.prod(self.layer_shape[a] for a in self.in_axes)

    @property
    def d_out(self) -> int:
        return math.prod(self.layer_shape[a] for a in self.out_axes)

    @property
    def is_prefix(self) -> bool:
        """Whether the input axes lead (Dense, DenseGeneral): then ``derive`` recovers the
        layout from the kernel's shape and the matrix's."""
        return self.in_axes == tuple(range(len(self.in_axes)))

    def _perm(self) -> tuple[int, ...]:
        return tuple(range(self.stack)) + tuple(self.stack + a
                                                for a in self.in_axes + self.out_axes)

    def to_matrix(self, kernel):
        """(*stack, d_in, d_out) from a kernel of this layout."""
        return jnp.transpose(kernel, self._perm()).reshape(*self.stack_shape, self.d_in,
                                                          self.d_out)

    def from_matrix(self, matrix):
        """The kernel-shaped array of a (*stack, d_in, d_out) matrix (``to_matrix``'s
        inverse)."""
        layer = self.layer_shape
        grouped = matrix.reshape(*self.stack_shape, *(layer[a] for a in self.in_axes),
                                 *(layer[a] for a in self.out_axes))
        perm = self._perm()
        inverse = tuple(perm.index(i) for i in range(len(perm)))
        return jnp.transpose(grouped, inverse)


# A Layout has no arrays: as a pytree node it has no leaves, so it can sit in an adapter node
# (where the kernel's input axes do not lead) without jit, optax or orbax seeing it.
jax.tree_util.register_dataclass(Layout, data_fields=[], meta_fields=["shape", "in_axes",
                                                                      "stack"])


def derive(kernel_shape: tuple[int, ...], d_in: int, d_out: int) -> Layout:
    """The layout of a kernel whose input axes lead, from its shape and its matrix's: the
    leading axes beyond one (d_in, d_out) kernel are a stack."""
    shape = tuple(int(s) for s in kernel_shape)
    stack = next(s for s in range(len(shape) + 1) if math.prod(shape[s:]) == d_in * d_out)
    layer = shape[stack:]
    k = next(k for k in range(len(layer) + 1) if math.prod(layer[:k]) == d_in)
    return Layout(shape, tuple(range(k)), stack)


def from_params(params: Mapping) -> dict[str, Layout | str]:
    """{module path: Layout} for every module with a 2-D or 3-D ``kernel`` (module docstring).

    A 3-D kernel is read only where its bias says how: the bias spans the output axes, the
    kernel's trailing ones (a DenseGeneral such as ViT's (D, heads, D/heads) attention). Any
    other (no bias, as an Einsum; a bias that is not the kernel's trailing axes, as a layer
    stacked by ``nn.scan``) maps to the reason a rule that selects it reports: its layout
    needs ``trace``. Convolutions (4-D kernels) and embedding tables are not linear layers
    here."""
    out: dict[str, Layout | str] = {}
    flat = tree.flatten(params)
    for path, leaf in flat.items():
        module, _, name = path.rpartition("/")
        shape = tuple(int(s) for s in leaf.shape)  # arrays or jax.ShapeDtypeStruct alike
        if name != "kernel" or len(shape) not in (2, 3):
            continue
        if len(shape) == 2:
            out[module] = Layout(shape, (0,))
            continue
        bias = flat.get(f"{module}/bias")
        n_out = len(bias.shape) if bias is not None else 0
        if 0 < n_out < len(shape) and tuple(int(s) for s in bias.shape) == shape[-n_out:]:
            out[module] = Layout(shape, tuple(range(len(shape) - n_out)))
        else:
            out[module] = (f"{module}: its kernel {shape} has 3 axes that the parameters alone "
                           "do not explain (an Einsum, a DenseGeneral without bias, or a layer "
                           "under nn.scan / nn.vmap): pass layers=peft.layers.trace(model, "
                           "params, *inputs) so that the layers are read as they run")
    return out


# ---- the layers as they run ----------------------------------------------------------------------

def _einsum_labels(equation: str) -> tuple[str, str, str]:
    equation = equation.replace(" ", "")
    if "..." in equation or "->" not in equation or equation.count(",") != 1:
        raise ValueError(f"einsum {equation!r}: only 'x,kernel->out' equations without '...' "
                         "are adaptable")
    inputs, out = equation.split("->")
    x, k = inputs.split(",")
    return x, k, out


def _einsum_axes(equation: str) -> tuple[tuple[int, ...], str, str, str]:
    """(kernel input axes, x labels, kernel labels, out labels); ValueError when the kernel is
    not a linear map of the flattened input (a kernel axis shared with both sides, summed, or an
    input axis summed away)."""
    x, k, out = _einsum_labels(equation)
    shared = [c for c in k if c in x and c in out]
    dropped = [c for c in k if c not in x and c not in out] + [c for c in x
                                                               if c not in k and c not in out]
    if shared or dropped:
        raise ValueError(f"einsum {equation!r}: axes {shared + dropped} are batched or summed "
                         "on one side only, so the kernel is not one (d_in, d_out) matrix")
    return tuple(i for i, c in enumerate(k) if c in x), x, k, out


def equation_of(module: nn.Module, args: tuple, kwargs: Mapping) -> str:
    """The equation an ``nn.Einsum`` call uses (the call's ``einsum_str`` or the module's)."""
    given = kwargs.get("einsum_str", args[1] if len(args) > 1 else None)
    return given if given is not None else module.einsum_str


def call_layout(module: nn.Module, args: tuple, kwargs: Mapping) -> Layout:
    """The layout of one layer's kernel in a call of ``module`` (unstacked: the kernel as the
    call sees it); ValueError for a layer that is not adaptable."""
    kernel = module.get_variable("params", "kernel")
    shape = tuple(int(s) for s in kernel.shape)
    if isinstance(module, nn.Einsum):
        return Layout(shape, _einsum_axes(equation_of(module, args, kwargs))[0])
    if isinstance(module, nn.DenseGeneral):
        if module.batch_dims:
            raise ValueError("DenseGeneral with batch_dims has one kernel per batch index, not "
                             "one matrix")
        axis = module.axis if isinstance(module.axis, (tuple, list)) else (module.axis,)
        return Layout(shape, tuple(range(len(axis))))
    return Layout(shape, (0,))


def _is_layer(module: Any, method_name: str) -> bool:
    return method_name == "__call__" and isinstance(module, (nn.Dense, nn.DenseGeneral,
                                                             nn.Einsum))


def as_rows(module: nn.Module, args: tuple, kwargs: Mapping, layout: Layout
            ) -> tuple[Any, Callable[[Any], Any], Callable[[Any], Any]]:
    """(the call's input as rows (..., d_in), a function from rows (..., d_out) to the shape of
    the call's output, and its inverse): the layer's matrix acts on rows."""
    x = args[0] if args else kwargs["inputs"]
    if isinstance(module, nn.Einsum):
        _, xl, kl, ol = _einsum_axes(equation_of(module, args, kwargs))
        ins = "".join(kl[a] for a in layout.in_axes)
        outs = "".join(kl[a] for a in layout.out_axes)
        rest = "".join(c for c in xl if c not in ins)
        sizes = dict(zip(xl, x.shape)) | dict(zip(kl, layout.layer_shape))
        lead = tuple(sizes[c] for c in rest)
        rows = jnp.einsum(f"{xl}->{rest}{ins}", x).reshape(*lead, layout.d_in)

        def back(r):
            return jnp.einsum(f"{rest}{outs}->{ol}",
                              r.reshape(*lead, *(sizes[c] for c in outs)))

        def forth(y):
            return jnp.einsum(f"{ol}->{rest}{outs}", y).reshape(*lead, layout.d_out)
        return rows, back, forth
    if isinstance(module, nn.DenseGeneral):
        axis = module.axis if isinstance(module.axis, (tuple, list)) else (module.axis,)
        axis = tuple(a % x.ndim for a in axis)
        moved = jnp.moveaxis(x, axis, tuple(range(x.ndim - len(axis), x.ndim)))
        lead = moved.shape[:x.ndim - len(axis)]
        features = layout.layer_shape[len(axis):]
        return (moved.reshape(*lead, layout.d_in), lambda r: r.reshape(*lead, *features),
                lambda y: y.reshape(*lead, layout.d_out))
    return x, lambda r: r, lambda y: y


def trace(model: nn.Module, params: Mapping, *args, method=None, **kwargs) -> dict[str, Any]:
    """{module path: Layout} of every linear layer the call ``model.apply({"params": params},
    *args, **kwargs)`` runs, found abstractly; a layer that cannot be adapted maps to the reason
    (a string), which a target rule selecting it reports."""
    found: dict[str, Any] = {}
    full = {path.rpartition("/")[0]: tuple(int(s) for s in leaf.shape)
            for path, leaf in tree.flatten(params).items() if path.endswith("/kernel")}

    def record(next_fun, call_args, call_kwargs, context):
        module = context.module
        out = next_fun(*call_args, **call_kwargs)
        if _is_layer(module, context.method_name):
            path = "/".join(module.path)
            try:
                layout = call_layout(module, call_args, call_kwargs)
            except ValueError as e:
                found[path] = f"{type(module).__name__} at {path}: {e}"
            else:
                shape = full.get(path, layout.shape)
                found[path] = dataclasses.replace(layout, shape=shape,
                                                  stack=len(shape) - len(layout.shape))
        return out

    extra = {"method": method} if method is not None else {}
    with nn.intercept_methods(record):
        # the call's arguments are closed over: flags such as train=True stay Python values
        jax.eval_shape(lambda p: model.apply({"params": p}, *args, **extra, **kwargs), params)
    order = {p: i for i, p in enumerate(full)}
    return dict(sorted(found.items(), key=lambda kv: order.get(kv[0], len(order))))
