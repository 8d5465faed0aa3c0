"""Helpers shared by the checkpoint loaders: expected parameter shapes and the mismatch report."""
from __future__ import annotations

from collections.abc import Callable, Mapping

import flax
import flax.linen as nn
import jax
import numpy as np


def expected_shapes(model: nn.Module, *inputs) -> dict[str, tuple[int, ...]]:
    """'/'-joined parameter path -> shape, from an abstract `init` (nothing is allocated)."""
    variables = jax.eval_shape(model.init, jax.random.key(0), *inputs)
    flat = flax.traverse_util.flatten_dict(variables["params"], sep="/")
    return {path: tuple(leaf.shape) for path, leaf in flat.items()}


def check_tree(
    found: Mapping[str, np.ndarray],
    expected: Mapping[str, tuple[int, ...]],
    source: str,
    origin: Callable[[str], str] = lambda path: path,
) -> None:
    """Raises one ValueError listing every missing, unexpected and mis-shaped tensor.

    Args:
      found: '/'-joined parameter path -> array, already renamed to the model's names.
      expected: '/'-joined parameter path -> shape the model wants.
      source: the checkpoint's path, for the message.
      origin: maps a model path to the name the checkpoint file uses, for the message.
    """
    problems = []
    for path in sorted(expected.keys() - found.keys()):
        problems.append(f"  missing     {path}: model expects {expected[path]}")
    for path in sorted(found.keys() - expected.keys()):
        problems.append(f"  unexpected  {origin(path)}: checkpoint has {tuple(found[path].shape)}")
    for path in sorted(found.keys() & expected.keys()):
        if tuple(found[path].shape) != expected[path]:
            problems.append(
                f"  mis-shaped  {origin(path)}: checkpoint has {tuple(found[path].shape)}, "
                f"model expects {expected[path]}")
    if problems:
        raise ValueError(
            f"Checkpoint {source} does not fit the model ({len(problems)} problem(s)):\n"
            + "\n".join(problems))


def unflatten(flat: Mapping[str, np.ndarray]) -> dict:
    """'/'-joined paths -> nested dict of float32 numpy arrays, the layout `model.apply` takes."""
    return flax.traverse_util.unflatten_dict(
        {path: np.asarray(value, np.float32) for path, value in flat.items()}, sep="/")
