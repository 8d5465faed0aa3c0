"""The Houlsby bottleneck adapter: h <- h + scale * up(act(down(h))), dense down (d_out, rank)
and up (rank, d_out) projections; up starts at zero."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from surm.peft.methods.base import ACTIVATIONS, Method, scale_of


class Houlsby(Method):
    name = "houlsby"
    adapters = True
    default_targets = ("houlsby",)

    def init(self, key, spec, target, d_in, d_out):
        r = dict(target.hparams)["rank"]
        return {"down": {"kernel": 0.02 * jax.random.normal(key, (d_out, r)),
                         "bias": jnp.zeros((r,))},
                "up": {"kernel": jnp.zeros((r, d_out)), "bias": jnp.zeros((d_out,))}}

    def apply(self, node, spec, target, x, y, dropout):
        d, u = node["down"], node["up"]
        act = ACTIVATIONS[spec.activation]
        z = act(y @ d["kernel"].astype(y.dtype) + d["bias"].astype(y.dtype))
        update = z @ u["kernel"].astype(y.dtype) + u["bias"].astype(y.dtype)
        return y + dropout(scale_of(node, target) * update).astype(y.dtype)


METHOD = Houlsby()
