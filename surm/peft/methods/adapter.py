"""A structured adapter after a sublayer's output projection: h <- h + scale * (act(S(h)) + b),
S a square (d_out, d_out) matrix of any family. The non-linearity means it does not merge."""
from __future__ import annotations

import jax.numpy as jnp

from surm import structured
from surm.peft.methods.base import ACTIVATIONS, Method, scale_of


class Adapter(Method):
    name = "adapter"
    adapters = True
    default_targets = ("houlsby",)

    def init(self, key, spec, target, d_in, d_out):
        fam = structured.get(target.structure)
        node = {"S": fam.init(key, d_out, d_out, init=spec.init, **dict(target.hparams)),
                "bias": jnp.zeros((d_out,))}
        if spec.learn_scale:
            node["scale"] = jnp.asarray(target.update_scale, jnp.float32)
        return node

    def matrix(self, d_in, d_out):
        return d_out, d_out  # on the layer's output

    def apply(self, node, spec, target, x, y, dropout):
        S = node["S"]
        act = ACTIVATIONS[spec.activation]
        update = act(structured.get(S.family).apply(S, y)) + node["bias"].astype(y.dtype)
        return y + dropout(scale_of(node, target) * update).astype(y.dtype)


METHOD = Adapter()
