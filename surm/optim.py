"""The optimizer: optax, over the trainable tree only.

Three parameter groups, each with its own learning rate and the same schedule (linear warm-up,
then linear or cosine decay to 0): ``adapters`` (the structured/LoRA/adapter params: lr),
``head`` (lr ``head_lr``) and ``base`` (other base leaves that train in full: biases for BitFit,
LayerNorms, everything for full fine-tuning: lr). Weight decay skips biases, LayerNorms and
learned scales. Gradients are clipped by global norm first.
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import jax
import numpy as np
import optax

from surm.peft.spec import HEAD_NAMES

GROUPS = ("adapters", "head", "base")


def _names(path) -> list[str]:
    return [str(getattr(k, "key", getattr(k, "name", k))) for k in path]


def group_of(path) -> str:
    names = _names(path)
    if names[0] == "adapters":
        return "adapters"
    return "head" if len(names) > 1 and names[1] in HEAD_NAMES else "base"


def decays(path) -> bool:
    names = _names(path)
    return not (names[-1] in ("bias", "scale") or any("LayerNorm" in n or n == "encoder_norm"
                                                       for n in names))


def unit_schedule(total_steps: int, warmup_frac: float, kind: str) -> optax.Schedule:
    """The schedule's shape, peaking at 1: linear warm-up, then linear or cosine decay to 0
    (or constant)."""
    warmup = int(round(warmup_frac * total_steps))
    ramp = optax.linear_schedule(0.0, 1.0, max(warmup, 1))
    rest = {"constant": lambda: optax.constant_schedule(1.0),
            "linear": lambda: optax.linear_schedule(1.0, 0.0, max(total_steps - warmup, 1)),
            "cosine": lambda: optax.cosine_decay_schedule(1.0, max(total_steps - warmup, 1))}
    if kind not in rest:
        raise ValueError(f"optimizer.schedule must be linear, cosine or constant, got {kind!r}")
    return optax.join_schedules([ramp, rest[kind]()], [warmup])


def schedule(lr: float, total_steps: int, warmup_frac: float, kind: str) -> optax.Schedule:
    """The learning rate at each step: ``lr`` times ``unit_schedule``."""
    unit = unit_schedule(total_steps, warmup_frac, kind)
    return lambda step: lr * unit(step)


def _descend(unit: optax.Schedule, lr: float) -> optax.GradientTransformation:
    """Scale updates by ``-lr * unit(step)``, with ``lr`` held in the optimizer state (not
    compiled in as a constant): runs that differ only in their learning rates compile to the
    same program, which the persistent compilation cache then shares."""
    return optax.chain(optax.scale_by_schedule(unit),
                       optax.inject_hyperparams(optax.scale)(step_size=-lr))


def _holds_lr(node) -> bool:
    return hasattr(node, "hyperparams") and hasattr(node, "inner_state")


def with_lrs_of(restored, fresh):
    """``restored`` (an optimizer state from a checkpoint) with the learning rates of ``fresh``
    (``tx.init`` under the current config): a resumed run trains at the lrs its config gives
    now, e.g. a lower one after a divergence."""
    return jax.tree.map(lambda r, f: r._replace(hyperparams=f.hyperparams) if _holds_lr(r) else r,
                        restored, fresh, is_leaf=_holds_lr)


# (field, lowest, highest, highest included, an example of a good value) of the numbers in an
# ``optimizer`` block; None: the field may be left out (head_lr: None or 0 means lr).
_RANGES = (("lr", 0.0, math.inf, False, "1e-3"), ("head_lr", 0.0, math.inf, False, "1e-3"),
           ("weight_decay", 0.0, math.inf, False, "0.01"),
           ("warmup_frac", 0.0, 1.0, True, "0.06"), ("grad_clip", 0.0, math.inf, False, "1.0"),
           ("b1", 0.0, 1.0, False, "0.9"), ("b2", 0.0, 1.0, False, "0.999"),
           ("momentum", 0.0, 1.0, True, "0.9"))


def check(cfg: Mapping[str, Any]) -> None:
    """Raises ValueError (one line naming the field and a good value) for an ``optimizer``
    block that would train on NaN, Inf or negative numbers, before anything is compiled."""
    if "lr" not in cfg or cfg["lr"] is None:
        raise ValueError("optimizer.lr is missing; set it, e.g. --config.optimizer.lr=1e-3")
    for field, low, high, closed, example in _RANGES:
        value = cfg.get(field)
        if value is None and field != "lr":
            continue
        ok = (isinstance(value, (int, float)) and not isinstance(value, bool)
              and abs(value) <= float(np.finfo(np.float32).max)
              and low <= value and (value <= high if closed else value < high))
        if not ok:
            bound = "]" if closed else ")"
            raise ValueError(f"optimizer.{field}={value!r} is not a number in [{low:g}, "
                             f"{high:g}{bound} (finite in float32); set e.g. "
                             f"--config.optimizer.{field}={example}")
    if cfg.get("name", "adamw") not in ("adamw", "sgd"):
        raise ValueError(f"optimizer.name must be adamw or sgd, got {cfg['name']!r}")
    if cfg.get("schedule", "linear") not in ("linear", "cosine", "constant"):
        raise ValueError(f"optimizer.schedule must be linear, cosine or constant, got "
                         f"{cfg['schedule']!r}")


def make(cfg: Mapping[str, Any], total_steps: int, trainable) -> tuple[
        optax.GradientTransformation, dict[str, optax.Schedule]]:
    """(optimizer, {group: schedule}) for the ``optimizer`` block of a config."""
    lrs = {"adapters": cfg["lr"], "head": cfg.get("head_lr") or cfg["lr"], "base": cfg["lr"]}
    unit = unit_schedule(total_steps, cfg.get("warmup_frac", 0.0), cfg.get("schedule", "linear"))
    schedules = {g: (lambda step, lr=lrs[g]: lr * unit(step)) for g in GROUPS}
    mask = jax.tree_util.tree_map_with_path(lambda p, _: decays(p), trainable)
    weight_decay = cfg.get("weight_decay", 0.0)
    name = cfg.get("name", "adamw")
    if name == "adamw":
        make_one = lambda lr: optax.chain(  # optax.adamw, its lr a state value
            optax.scale_by_adam(b1=cfg.get("b1", 0.9), b2=cfg.get("b2", 0.999)),
            optax.add_decayed_weights(weight_decay, mask), _descend(unit, lr))
    elif name == "sgd":
        make_one = lambda lr: optax.chain(
            optax.add_decayed_weights(weight_decay, mask),
            optax.trace(decay=cfg.get("momentum", 0.9)), _descend(unit, lr))
    else:
        raise ValueError(f"optimizer.name must be adamw or sgd, got {name!r}")
    labels = jax.tree_util.tree_map_with_path(lambda p, _: group_of(p), trainable)
    tx = optax.multi_transform({g: make_one(lrs[g]) for g in GROUPS}, labels)
    clip = cfg.get("grad_clip") or 0.0
    return (optax.chain(optax.clip_by_global_norm(clip), tx) if clip > 0 else tx), schedules
