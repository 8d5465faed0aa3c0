"""LoRA with a structured update: y = x W0 + scale * S(x), S from any family (``lowrank`` is
LoRA itself). S starts at zero, so the model starts as the pretrained one; the update merges."""
from __future__ import annotations

import jax.numpy as jnp

from surm import structured
from surm.peft.methods.base import Method, scale_of


class Lora(Method):
    name = "lora"
    adapters = True
    mergeable = True
    default_targets = ("qv",)

    def init(self, key, spec, target, d_in, d_out):
        fam = structured.get(target.structure)
        node = {"S": fam.init(key, d_in, d_out, init=spec.init, **dict(target.hparams))}
        if spec.learn_scale:
            node["scale"] = jnp.asarray(target.update_scale, jnp.float32)
        return node

    def apply(self, node, spec, target, x, y, dropout):
        S = node["S"]
        delta = structured.get(S.family).apply(S, dropout(x))
        return y + (scale_of(node, target) * delta).astype(y.dtype)

    def delta(self, node, spec, target):
        S = node["S"]
        return structured.get(S.family).to_dense(S) * scale_of(node, target)


METHOD = Lora()
