"""Structured products split over the batch on a device mesh.

XLA's automatic partitioner does not split an FFT along its batch axes: on a data-parallel mesh
a jitted circulant product gathers the whole global batch and every device transforms every
example (``c64[16,64,193]`` on each of 8 devices). Inside ``over_batch(mesh, axes)`` (the
trainer enters it around its step functions, so it holds while they are traced),
``Family.apply`` runs its product under ``jax.shard_map``: each device transforms only its own
rows (the leading axis of x, split over ``axes``), the parameters replicated; the gradient of
the parameters is summed over the devices by shard_map's transpose. Outside the context, or
where the leading axis does not divide over the devices, the product is the plain one.

    with partition.over_batch(mesh, ("data", "fsdp")):
        lowered = jax.jit(step, ...).lower(...)
"""
from __future__ import annotations

import contextlib
import contextvars
import math
from typing import Callable, Sequence

import jax
from jax.sharding import Mesh, PartitionSpec as P

_BATCH: contextvars.ContextVar = contextvars.ContextVar("surm_batch_axes", default=None)


@contextlib.contextmanager
def over_batch(mesh: Mesh | None, axes: Sequence[str]):
    """Structured products traced inside split their rows over ``axes`` of ``mesh`` (a no-op
    when those axes hold one device)."""
    axes = tuple(a for a in axes if mesh is not None and mesh.shape.get(a, 1) > 1)
    token = _BATCH.set((mesh, axes) if axes else None)
    try:
        yield
    finally:
        _BATCH.reset(token)


def devices_over_batch() -> int:
    """How many ways the products traced now split their rows (1: not split)."""
    ctx = _BATCH.get()
    return 1 if ctx is None else math.prod(ctx[0].shape[a] for a in ctx[1])


def rows_split(product: Callable, params, x: jax.Array) -> jax.Array:
    """``product(params, x)``, under shard_map over x's leading axis when inside
    ``over_batch`` and that axis divides over its devices."""
    ctx = _BATCH.get()
    if ctx is None or x.ndim < 2 or x.shape[0] % devices_over_batch():
        return product(params, x)
    mesh, axes = ctx

    def local(params, x):
        token = _BATCH.set(None)  # a product inside is already per device
        try:
            return product(params, x)
        finally:
            _BATCH.reset(token)

    rows = P(axes)
    return jax.shard_map(local, mesh=mesh, in_specs=(P(), rows), out_specs=rows,
                         check_vma=False)(params, x)
