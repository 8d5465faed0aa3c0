"""Toeplitz and symmetric Toeplitz matrices, multiplied through a circulant embedding.

Toeplitz is natively rectangular: M[i, j] = t[j - i + d_in - 1], one number per diagonal,
d_in + d_out - 1 parameters. The product embeds the diagonals in a circulant of 5-smooth length
n >= d_in + d_out - 1, so that the circular convolution never wraps onto a used output.

Symmetric Toeplitz (the authors' choice) is square by nature: M[i, j] = v[|i - j|]. A rectangle
is the leading block of the m x m matrix, m = max(d_in, d_out): m parameters. Its "product" form is
the authors' T(a) T(b): a (d_in) gives the d_in x d_in factor, b (m) the d_in x d_out one, a random
and b zero at init (d_in + m parameters); it has no closed-form fit (gradient descent).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from surm.structured import fft
from surm.structured.base import ArraySpec, TiedFamily, fit_by_descent


def toeplitz_kernel(t, d_in: int, d_out: int):
    """The circulant kernel whose convolution is x @ M for the Toeplitz M of diagonals t."""
    n = fft.fast_length(d_in + d_out - 1)
    pad = jnp.zeros((n - (d_in + d_out - 1),), t.dtype)
    return jnp.concatenate([t[d_in - 1:], pad, t[:d_in - 1]])


def symmetric_diagonals(v, d_in: int, d_out: int):
    """The Toeplitz diagonals t of the symmetric M[i, j] = v[|i - j|] of shape (d_in, d_out)."""
    return jnp.concatenate([v[1:d_in][::-1], v[:d_out]])


class Toeplitz(TiedFamily):
    name = "toeplitz"
    vector = "t"

    def arrays(self, d_in, d_out, hp):
        return {"t": ArraySpec((d_in + d_out - 1,))}

    def tie(self, d_in, d_out, hp):
        i, j = np.indices((d_in, d_out))
        return j - i + d_in - 1, np.ones((d_in, d_out))

    def _apply(self, p, x):
        return fft.conv(x, toeplitz_kernel(p["t"], p.d_in, p.d_out), p.d_out)

    def _fit(self, M, hp, key, steps, lr):
        return {"t": self.fit_tied(M, hp)}


class SymmetricToeplitz(TiedFamily):
    name = "symmetric_toeplitz"
    searchable = {"form": ("plain", "product")}
    vector = "v"
    rectangular = ("leading (d_in, d_out) block of an m x m symmetric Toeplitz, m = max(d_in, "
                   "d_out): m params (product form: d_in + m)")

    def hparams(self, d_in, d_out, **hp):
        self._no_unknown(hp, ("form",))
        return {"form": self._choice(hp, "form", self.searchable["form"])}

    def arrays(self, d_in, d_out, hp):
        m = max(d_in, d_out)
        if hp["form"] == "product":
            return {"a": ArraySpec((d_in,), ("normal", 0.02)), "b": ArraySpec((m,))}
        return {"v": ArraySpec((m,))}

    def tie(self, d_in, d_out, hp):
        i, j = np.indices((d_in, d_out))
        return np.abs(i - j), np.ones((d_in, d_out))

    @staticmethod
    def _product(v, x, d_in, d_out):
        return fft.conv(x, toeplitz_kernel(symmetric_diagonals(v, d_in, d_out), d_in, d_out),
                        d_out)

    def _apply(self, p, x):
        if p.hparams["form"] == "product":
            x = self._product(p["a"], x, p.d_in, p.d_in)
            return self._product(p["b"], x, p.d_in, p.d_out)
        return self._product(p["v"], x, p.d_in, p.d_out)

    def _dense(self, v, d_in, d_out):
        idx, _ = self.tie(d_in, d_out, {})
        return v[idx]

    def _to_dense(self, p):
        if p.hparams["form"] == "product":
            return self._dense(p["a"], p.d_in, p.d_in) @ self._dense(p["b"], p.d_in, p.d_out)
        return self._dense(p["v"], p.d_in, p.d_out)

    def _fit(self, M, hp, key, steps, lr):
        v = self.fit_tied(M, hp)
        if hp["form"] == "plain":
            return {"v": v}
        d_in, d_out = M.shape
        scale = jnp.sum(M * M)

        def loss(q):
            D = self._dense(q["a"], d_in, d_in) @ self._dense(q["b"], d_in, d_out)
            return jnp.sum((D - M) ** 2) / scale

        # Warm start at T(e_0) T(v) = T(v), the best plain fit.
        start = {"a": jnp.zeros((d_in,)).at[0].set(1.0) + 1e-3 * jax.random.normal(key, (d_in,)),
                 "b": v}
        return fit_by_descent(loss, start, steps=steps, lr=lr)
