"""The optimizer: optax, over the trainable tree only.

Three parameter groups, each with its own learning rate and the same schedule (linear warm-up,
then linear or cosine decay to 0): ``adapters`` (the structured/LoRA/adapter params: lr),
``head`` (lr ``head_lr``) and ``base`` (other base leaves that train in full: biases for BitFit,
LayerNorms, everything for full fine-tuning: lr). Weight decay skips biases, LayerNorms and
learned scales. Gradients are clipped by global norm first.
"""
from __future__ import annotations

from typing import Any, Mapping

import jax
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


def schedule(lr: float, total_steps: int, warmup_frac: float, kind: str) -> optax.Schedule:
    warmup = int(round(warmup_frac * total_steps))
    if kind == "constant":
        return optax.join_schedules([optax.linear_schedule(0.0, lr, max(warmup, 1)),
                                     optax.constant_schedule(lr)], [warmup])
    decay = {"linear": lambda: optax.linear_schedule(lr, 0.0, max(total_steps - warmup, 1)),
             "cosine": lambda: optax.cosine_decay_schedule(lr, max(total_steps - warmup, 1))}
    if kind not in decay:
        raise ValueError(f"optimizer.schedule must be linear, cosine or constant, got {kind!r}")
    return optax.join_schedules([optax.linear_schedule(0.0, lr, max(warmup, 1)), decay[kind]()],
                                [warmup])


def make(cfg: Mapping[str, Any], total_steps: int, trainable) -> tuple[
        optax.GradientTransformation, dict[str, optax.Schedule]]:
    """(optimizer, {group: schedule}) for the ``optimizer`` block of a config."""
    lrs = {"adapters": cfg["lr"], "head": cfg.get("head_lr") or cfg["lr"], "base": cfg["lr"]}
    schedules = {g: schedule(lrs[g], total_steps, cfg.get("warmup_frac", 0.0),
                             cfg.get("schedule", "linear")) for g in GROUPS}
    mask = jax.tree_util.tree_map_with_path(lambda p, _: decays(p), trainable)
    name = cfg.get("name", "adamw")
    if name == "adamw":
        make_one = lambda s: optax.adamw(s, b1=cfg.get("b1", 0.9), b2=cfg.get("b2", 0.999),
                                         weight_decay=cfg.get("weight_decay", 0.0), mask=mask)
    elif name == "sgd":
        make_one = lambda s: optax.chain(
            optax.add_decayed_weights(cfg.get("weight_decay", 0.0), mask=mask),
            optax.sgd(s, momentum=cfg.get("momentum", 0.9)))
    else:
        raise ValueError(f"optimizer.name must be adamw or sgd, got {name!r}")
    labels = jax.tree_util.tree_map_with_path(lambda p, _: group_of(p), trainable)
    tx = optax.multi_transform({g: make_one(schedules[g]) for g in GROUPS}, labels)
    clip = cfg.get("grad_clip") or 0.0
    return (optax.chain(optax.clip_by_global_norm(clip), tx) if clip > 0 else tx), schedules
