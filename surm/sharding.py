"""The device mesh and every sharding of a run, from one rule table.

Mesh axes (config ``mesh.data``, ``mesh.fsdp``, ``mesh.model``; -1 takes the devices the others
leave, and where data and fsdp both say -1, fsdp takes them):

- ``data``: plain data parallelism; whatever is not split over fsdp or model is replicated
  along it.
- ``fsdp``: data parallelism with the state split ZeRO-3 style: every leaf of at least
  ``MIN_SPLIT`` numbers, frozen base, trainable parameters and optimizer state alike, is split
  over fsdp along its largest axis that divides (an embedding along its vocabulary where it
  divides).
- ``model``: Megatron-style tensor parallelism. The layers that start a block (q, k, v, the MLP
  input: ``column``) split their output axis, the layers that end it (the attention output,
  the MLP output: ``row``) their input axis, so that each attention and each MLP block needs
  one reduction of its output and none inside. Which layers play which role is a regex per
  role, given by the caller (the trainer asks the PEFT target presets:
  ``surm.peft.spec.role_patterns``).

Batches split over data and fsdp together (``BATCH_AXES``). The mesh is built from the
hardware (``jax.experimental.mesh_utils``: the devices' physical topology, and on several
slices the hybrid mesh with data across slices); ``device_order`` records it.

A rule is (regex on the leaf's path, which axis ``model`` splits); the first that matches a
leaf's path wins, and FSDP is added to every leaf large enough. The same rules serve the
optimizer state: its leaves' paths end like the parameters' they mirror.
"""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

AXES = ("data", "fsdp", "model")
BATCH_AXES = ("data", "fsdp")
MIN_SPLIT = 2 ** 14  # numbers: smaller leaves stay replicated over fsdp (adapters, biases)


def mesh_shape(cfg: Mapping[str, Any], n_devices: int) -> tuple[int, int, int]:
    """(data, fsdp, model) from the config (a legacy boolean fsdp: True is -1, False 1)."""
    model, data = int(cfg.get("model", 1)), int(cfg.get("data", -1))
    fsdp = cfg.get("fsdp", 1)
    fsdp = (-1 if fsdp else 1) if isinstance(fsdp, bool) else int(fsdp)
    if fsdp == -1 and data == -1:
        data = 1  # fsdp takes every device the model axis leaves
    for name, n in (("model", model), ("data", data), ("fsdp", fsdp)):
        if n == 0 or n < -1:
            raise ValueError(f"mesh.{name}={n} must be a positive number of devices (or -1 "
                             f"for the rest)")
    fixed = model * max(data, 1) * max(fsdp, 1)
    if fixed > n_devices:
        raise ValueError(f"mesh data={data} x fsdp={fsdp} x model={model} needs more than the "
                         f"{n_devices} devices; set mesh.data=-1 to use them all")
    if -1 in (data, fsdp):
        if n_devices % fixed:
            raise ValueError(f"mesh data={data} x fsdp={fsdp} x model={model}: {fixed} does "
                             f"not divide the {n_devices} devices")
        data, fsdp = (n_devices // fixed if n == -1 else n for n in (data, fsdp))
    return data, fsdp, model  # fewer than all: the first devices (one process only)


def make_mesh(cfg: Mapping[str, Any], devices: Sequence[Any] | None = None) -> Mesh:
    """The mesh of ``cfg`` over ``devices`` (default: every device), laid out by the
    hardware's topology; the first devices where it takes fewer than all."""
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(cfg, len(devices))
    used = math.prod(shape)
    if jax.process_count() > 1 and used != len(devices):
        raise ValueError("a multi-process mesh must use every device: set mesh.data=-1")
    devices = devices[:used]
    slices = {getattr(d, "slice_index", 0) for d in devices}
    if len(slices) > 1 and shape[0] % len(slices) == 0:
        # several slices (multi-slice TPU): data parallel across them (DCN), the rest within
        per_slice = (shape[0] // len(slices), *shape[1:])
        grid = mesh_utils.create_hybrid_device_mesh(per_slice, (len(slices), 1, 1), devices)
    else:
        try:
            grid = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
        except (AssertionError, NotImplementedError, ValueError):
            grid = np.asarray(devices).reshape(shape)  # a topology it does not know: in order
    return Mesh(grid, AXES)


def device_order(mesh: Mesh) -> dict[str, Any]:
    """The mesh as recorded in a run: its axes and sizes, and the device ids in mesh order."""
    return {"axes": dict(mesh.shape), "device_ids": np.vectorize(lambda d: d.id)(
        mesh.devices).tolist(), "platform": mesh.devices.flat[0].platform}


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_axes(mesh: Mesh) -> tuple[str, ...]:
    return tuple(a for a in BATCH_AXES if a in mesh.shape)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(batch_axes(mesh)))


def batch_devices(mesh: Mesh) -> int:
    return math.prod(mesh.shape[a] for a in batch_axes(mesh))


# ---- the rule table -------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Rule:
    """Leaves whose path matches ``pattern`` split axis ``model_axis`` over ``model`` (None:
    not at all); ``vocab``: an embedding table (FSDP prefers its first axis)."""

    pattern: str
    model_axis: int | None = None
    vocab: bool = False


EMBEDDING = r"(.*/)?(embed\w*|wte|tok_embeddings)/(embedding|kernel)"


def rules(column: str | None = None, row: str | None = None) -> tuple[Rule, ...]:
    """Megatron pairs for the layers matching the regexes ``column`` (q, k, v, MLP input) and
    ``row`` (attention output, MLP output): a column kernel (d_in, d_out) or (d_in, heads,
    head_dim) splits its axis 1 and its bias its axis 0; a row kernel (d_in, d_out) or
    (heads, head_dim, d_out) its axis 0 (its bias, added after the reduction, is whole)."""
    out = []
    if column:
        out += [Rule(rf"({column})/kernel", 1), Rule(rf"({column})/bias", 0)]
    if row:
        out += [Rule(rf"({row})/kernel", 0)]
    return tuple(out) + (Rule(EMBEDDING, vocab=True),)


def path_name(path) -> str:
    """A pytree key path as "a/b/c" (dict keys, attributes and indices alike)."""
    parts = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
    return "/".join(parts)


def spec_for(name: str, shape: tuple[int, ...], mesh: Mesh,
             table: Sequence[Rule] = (), min_split: int = MIN_SPLIT) -> P:
    """The PartitionSpec of one leaf (module docstring)."""
    spec: list[Any] = [None] * len(shape)
    rule = next((r for r in table if re.search(rf"(?:^|/)(?:{r.pattern})$", name)), None)
    model = mesh.shape.get("model", 1)
    if (model > 1 and rule is not None and rule.model_axis is not None
            and rule.model_axis < len(shape) and shape[rule.model_axis] % model == 0):
        spec[rule.model_axis] = "model"
    fsdp = mesh.shape.get("fsdp", 1)
    if fsdp > 1 and math.prod(shape) >= min_split:
        order = sorted(range(len(shape)), key=lambda a: -shape[a])
        if rule is not None and rule.vocab and shape:
            order = [0] + [a for a in order if a != 0]
        for axis in order:
            if spec[axis] is None and shape[axis] % fsdp == 0:
                spec[axis] = "fsdp"
                break
    return P(*spec)


def shardings(tree, mesh: Mesh, table: Sequence[Rule] = (), min_split: int = MIN_SPLIT):
    """A NamedSharding per leaf of ``tree`` (arrays or shape structs): parameters, frozen or
    trainable, and optimizer state alike."""
    return jax.tree_util.tree_map_with_path(
        lambda p, x: NamedSharding(mesh, spec_for(path_name(p), tuple(np.shape(x)), mesh, table,
                                                  min_split)), tree)


def per_device_bytes(tree) -> int:
    """The bytes of ``tree``'s arrays held by one device (the first): what a sharding saves."""
    first = jax.devices()[0]
    return sum(s.data.nbytes for x in jax.tree.leaves(tree) for s in x.addressable_shards
               if s.device == first)


def global_batch(local: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """This process's rows -> arrays over all processes, split over the batch axes."""
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
            for k, v in local.items()}


def to_host(tree):
    """``tree`` as numpy arrays on every process, whatever its sharding (a leaf split over
    other processes' devices is gathered)."""
    def one(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable and not x.is_fully_replicated:
            from jax.experimental import multihost_utils
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(jax.device_get(x))
    return jax.tree.map(one, tree)
