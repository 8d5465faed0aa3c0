"""Nested parameter dicts <-> flat '/'-joined paths (structured.Params count as subtrees)."""
from __future__ import annotations

from typing import Any, Callable, Mapping

import jax

from surm.structured import Params


def _leafless(node: Any) -> bool:
    """A pytree node without arrays (``surm.peft.layers.Layout``): static, not a leaf."""
    return (node is not None and not isinstance(node, (Mapping, Params))
            and hasattr(type(node), "__dataclass_fields__")
            and not jax.tree_util.tree_leaves(node))


def flatten(tree: Any, prefix: str = "",
            stop: Callable[[Any], bool] | None = None) -> dict[str, Any]:
    """{'a/b/c': leaf}. ``stop(node)`` true keeps that node whole as one entry."""
    if stop is not None and stop(tree):
        return {prefix: tree}
    if isinstance(tree, Params):
        tree = tree.arrays
    if _leafless(tree):
        return {}
    if isinstance(tree, Mapping):
        out: dict[str, Any] = {}
        for key, value in tree.items():
            out.update(flatten(value, f"{prefix}/{key}" if prefix else str(key), stop))
        return out
    return {prefix: tree}


def unflatten(flat: Mapping[str, Any]) -> dict:
    tree: dict = {}
    for path, value in flat.items():
        *parents, leaf = path.split("/")
        node = tree
        for name in parents:
            node = node.setdefault(name, {})
        node[leaf] = value
    return tree


def fill(template: Any, flat: Mapping[str, Any], prefix: str = "") -> Any:
    """A copy of ``template`` whose leaves are taken from ``flat`` (same paths as ``flatten``)."""
    if isinstance(template, Params):
        return template.replace(**fill(template.arrays, flat, prefix))
    if _leafless(template):
        return template
    if isinstance(template, Mapping):
        return {k: fill(v, flat, f"{prefix}/{k}" if prefix else str(k))
                for k, v in template.items()}
    return flat[prefix]


def overlay(base: Mapping, top: Mapping) -> dict:
    """``base`` with the leaves of ``top`` put in place (nested dicts, no copies of arrays)."""
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = overlay(out[key], value)
        else:
            out[key] = value
    return out
