"""Low displacement rank matrices: W = sum_{i<r} C(g_i) S(h_i), a circulant times a skew-circulant.

For this W, Z_1 W - W Z_{-1} has rank <= 2r (Z_f: the f-unit-circulant shift): displacement rank
r in the sense of the SURM paper. Row-vector convention: apply(p, x) == x @ W^T, i.e. each term
skew-convolves x with h_i and then convolves with g_i; the r terms are summed in the frequency
domain so the product costs one forward FFT of x, r skew products and one inverse FFT.

Square by nature: a (d_in, d_out) rectangle is the leading block of the n x n matrix,
n = max(d_in, d_out): 2 r n parameters. Init (zero delta, the authors'): g = 0, h ~ N(0, 0.02^2).
No closed-form best fit: ``fit`` runs Adam from the best circulant (g_0 = that fit, h_0 = e_0).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from surm.structured import circulant
from surm.structured.base import RANK, ArraySpec, Family, fit_by_descent


class LDR(Family):
    name = "ldr"
    searchable = {"rank": RANK}
    rectangular = "leading (d_in, d_out) block of an n x n LDR matrix, n = max(d_in, d_out): 2rn params"

    def hparams(self, d_in, d_out, **hp):
        self._no_unknown(hp, ("rank",))
        return {"rank": self._positive_int(hp, "rank", 1)}

    def arrays(self, d_in, d_out, hp):
        r, n = hp["rank"], max(d_in, d_out)
        return {"g": ArraySpec((r, n)), "h": ArraySpec((r, n), ("normal", 0.02))}

    def _apply(self, p, x):
        g, h = p["g"], p["h"]
        n = g.shape[-1]
        x = x.astype(jnp.float32)
        # Skew (negacyclic) products of length n = cyclic ones of length 2n with [h, -h].
        X = jnp.fft.rfft(x, 2 * n)[..., None, :]
        H = jnp.fft.rfft(jnp.concatenate([h, -h], axis=-1))
        z = jnp.fft.irfft(X * H, 2 * n)[..., :n]
        Y = jnp.sum(jnp.fft.rfft(z) * jnp.fft.rfft(g), axis=-2)
        return jnp.fft.irfft(Y, n)[..., :p.d_out]

    def _fit(self, M, hp, key, steps, lr):
        r, n = hp["rank"], max(M.shape)
        scale = jnp.sum(M * M)
        c = circulant.Circulant().fit_tied(M, {"form": "plain"})
        kg, kh = jax.random.split(key)
        start = {"g": (1e-3 * jax.random.normal(kg, (r, n))).at[0].set(c),
                 "h": (1e-3 * jax.random.normal(kh, (r, n))).at[0].set(jnp.eye(n)[0])}
        eye = jnp.eye(M.shape[0])

        def loss(q):
            p = self._params(M.shape[0], M.shape[1], hp, q)
            return jnp.sum((self._apply(p, eye) - M) ** 2) / scale

        return fit_by_descent(loss, start, steps=steps, lr=lr)
