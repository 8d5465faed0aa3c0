"""The device mesh and the shardings of the train step.

Mesh axes ``data`` and ``model`` (config ``mesh.data``, ``mesh.model``; data=-1 takes all the
devices; a smaller product uses the first devices). Batches split over ``data``. The frozen base is replicated, or with ``mesh.fsdp`` each
large leaf is split over ``data`` along its first divisible axis, and kernels split their last
axis over ``model`` when it divides (tensor parallel). Adapters, head and optimizer state are
replicated (they are small). XLA inserts the collectives.
"""
from __future__ import annotations

from typing import Any, Mapping

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P


def make_mesh(cfg: Mapping[str, Any]) -> Mesh:
    devices = jax.devices()
    model = int(cfg.get("model", 1))
    data = int(cfg.get("data", -1))
    if model < 1 or len(devices) % model:
        raise ValueError(f"mesh.model={model} must divide the {len(devices)} devices")
    data = len(devices) // model if data == -1 else data
    if data < 1 or data * model > len(devices):
        raise ValueError(f"mesh data={data} x model={model} needs more than the "
                         f"{len(devices)} devices; set mesh.data=-1 to use them all")
    if jax.process_count() > 1 and data * model != len(devices):
        raise ValueError("a multi-process mesh must use every device: set mesh.data=-1")
    return Mesh(np.asarray(devices[:data * model]).reshape(data, model), ("data", "model"))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P("data"))


def _base_spec(shape: tuple[int, ...], name: str, mesh: Mesh, fsdp: bool,
               min_size: int) -> P:
    spec: list[Any] = [None] * len(shape)
    model = mesh.shape["model"]
    if model > 1 and name == "kernel" and shape[-1] % model == 0:
        spec[-1] = "model"
    if fsdp and np.prod(shape) >= min_size:
        for axis, n in enumerate(shape):
            if spec[axis] is None and n % mesh.shape["data"] == 0:
                spec[axis] = "data"
                break
    return P(*spec)


def base_shardings(frozen, mesh: Mesh, fsdp: bool = False, min_size: int = 2 ** 14):
    """A NamedSharding per frozen leaf (see the module docstring)."""
    return jax.tree_util.tree_map_with_path(
        lambda p, x: NamedSharding(mesh, _base_spec(tuple(x.shape), str(getattr(p[-1], "key", "")),
                                                    mesh, fsdp, min_size)), frozen)


def global_batch(local: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """This process's rows -> arrays over all processes, split over ``data``."""
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
            for k, v in local.items()}
