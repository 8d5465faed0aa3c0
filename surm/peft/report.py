"""Trainable-parameter report, like PEFT's print_trainable_parameters, per targeted module."""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from surm.peft import tree
from surm.peft.spec import PeftSpec
from surm.peft.surgery import _is_target


def _size(node: Any) -> int:
    return int(sum(np.size(v) for v in tree.flatten(node).values()))


def count(base_params: Mapping, trainable: Mapping, spec: PeftSpec) -> dict[str, Any]:
    """Counts: per adapter module, the adapters in all (and their structured matrices alone),
    the base leaves that train in full, the total, the base model size and the share."""
    per_module = {path: _size(node) for path, node in
                  tree.flatten(trainable.get("adapters", {}), stop=_is_target).items()}
    structured_part = sum(
        _size(node["S"]) for node in
        tree.flatten(trainable.get("adapters", {}), stop=_is_target).values() if "S" in node)
    base_trainable = _size(trainable.get("base", {}))
    base = _size(base_params)
    total = sum(per_module.values()) + base_trainable
    structures = {path: _structure_of(spec, path) for path in per_module}
    return {"method": spec.method, "structure": spec.structure,
            "targets": list(per_module), "structures": structures,
            "per_module": per_module, "adapter": structured_part,
            "adapters_total": sum(per_module.values()), "base_trainable": base_trainable,
            "trainable": total, "base": base, "share": total / base if base else 0.0}


def _structure_of(spec: PeftSpec, path: str) -> str:
    """A target's structure and its hyper-parameters ('lowrank rank=4'), or the method's name
    where it has no structure (houlsby)."""
    if spec.structure is None:
        return spec.method
    target = spec.target(path)
    return " ".join([target.structure, *(f"{k}={v}" for k, v in target.hparams)])


def format_report(counts: Mapping[str, Any]) -> str:
    structures = counts["structures"]
    kinds = sorted(set(structures.values()))
    what = (kinds[0] if len(kinds) == 1 else
            ", ".join(f"{k} on {sum(v == k for v in structures.values())}" for k in kinds))
    lines = [f"PEFT {counts['method']}, {what or counts['structure'] or counts['method']}: "
             f"{len(counts['targets'])} targeted modules"]
    width = max((len(p) for p in counts["per_module"]), default=10)
    swidth = max((len(v) for v in structures.values()), default=0)
    for path, n in counts["per_module"].items():
        shown = f"  {structures[path]:<{swidth}}" if len(kinds) > 1 else ""
        lines.append(f"  {path:<{width}}{shown}  {n:>12,}")
    lines += [f"  {'adapters (structured matrices alone: ' + format(counts['adapter'], ',') + ')':<{width}}  "
              f"{counts['adapters_total']:>12,}",
              f"  {'base leaves trained in full (head, ...)':<{width}}  {counts['base_trainable']:>12,}",
              f"trainable params: {counts['trainable']:,} || base params: {counts['base']:,} || "
              f"trainable%: {100 * counts['share']:.4f}"]
    return "\n".join(lines)
