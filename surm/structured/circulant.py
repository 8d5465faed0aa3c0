"""Circulant and skew-circulant matrices (f-circulant with f = 1 and f = -1).

Both are square by nature. A (d_in, d_out) rectangle is the leading block of the n x n matrix,
n = max(d_in, d_out): the input is zero-padded to n and the first d_out outputs are kept. It costs
n parameters (the same as the square matrix of the larger side) and keeps full rank
min(d_in, d_out) generically.

Row-vector convention: apply(p, x) == x @ M with M[i, j] = c[(j - i) mod n], i.e. M is the
transpose of scipy.linalg.circulant(c): x @ M is the circular convolution c * x. For the skew
circulant, entries that wrap around (j < i) change sign.

Forms: "plain" (default): one vector c of n numbers, zero at init. "hadamard" (the authors'
parameterisation): c = a * b elementwise, a ~ N(0, 1), b = 0 at init (2n numbers).
"""
from __future__ import annotations

from typing import Any, Mapping

import jax.numpy as jnp
import numpy as np

from surm.structured import fft
from surm.structured.base import ArraySpec, Params, TiedFamily

FORMS = ("plain", "hadamard")


class Circulant(TiedFamily):
    name = "circulant"
    searchable = {"form": FORMS}
    rectangular = "leading (d_in, d_out) block of an n x n circulant, n = max(d_in, d_out): n params"
    #: f of the f-circulant: entries that wrap around are multiplied by it
    wrap_sign = 1.0

    def hparams(self, d_in, d_out, **hp):
        self._no_unknown(hp, ("form",))
        return {"form": self._choice(hp, "form", self.searchable["form"])}

    def arrays(self, d_in, d_out, hp):
        n = max(d_in, d_out)
        if hp["form"] == "hadamard":
            return {"a": ArraySpec((n,), ("normal", 1.0)), "b": ArraySpec((n,))}
        return {"c": ArraySpec((n,))}

    def theta(self, p: Params):
        return p["a"] * p["b"] if p.hparams["form"] == "hadamard" else p["c"]

    def tie(self, d_in, d_out, hp):
        n = max(d_in, d_out)
        i, j = np.indices((d_in, d_out))
        sign = np.where(j >= i, 1.0, self.wrap_sign)
        return (j - i) % n, sign

    def kernel(self, theta):
        return theta

    def _apply(self, p, x):
        return fft.conv(x, self.kernel(self.theta(p)), p.d_out)

    def _fit(self, M, hp, key, steps, lr):
        c = self.fit_tied(M, hp)
        if hp["form"] == "hadamard":
            root = jnp.sqrt(jnp.abs(c))
            return {"a": jnp.sign(c) * root, "b": root}
        return {"c": c}


class SkewCirculant(Circulant):
    name = "skew_circulant"
    rectangular = ("leading (d_in, d_out) block of an n x n skew-circulant, n = max(d_in, d_out): "
                   "n params")
    wrap_sign = -1.0

    def kernel(self, theta):
        # A negacyclic convolution of length n is the cyclic one of length 2n with [c, -c].
        return jnp.concatenate([theta, -theta])
