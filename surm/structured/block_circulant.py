"""Block-circulant matrices (as in C3A): a grid of b x b circulant blocks.

Natively rectangular when the block size b divides both d_in and d_out: (d_in/b)(d_out/b) blocks
of b numbers, d_in d_out / b parameters. Block (p, q) of M is the row-vector circulant of
c[p, q] (see ``circulant``). The product takes one FFT of length b per input block, contracts the
block grid in the frequency domain, and one inverse FFT per output block.
Default b: gcd(d_in, d_out), the fewest parameters; b = d_in = d_out is one circulant.
"""
from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from surm.structured.base import DIVISOR, ArraySpec, TiedFamily, divisors


class BlockCirculant(TiedFamily):
    name = "block_circulant"
    searchable = {"block_size": DIVISOR}

    def hparams(self, d_in, d_out, **hp):
        self._no_unknown(hp, ("block_size",))
        g = math.gcd(d_in, d_out)
        if hp.get("block_size") is None and g == 1:
            raise ValueError(f"block_circulant: no block size > 1 divides both d_in = {d_in} and "
                             f"d_out = {d_out}; use circulant or toeplitz, which take any size")
        b = self._positive_int(hp, "block_size", g)
        if d_in % b or d_out % b:
            raise ValueError(f"block_circulant: block_size {b} must divide both d_in = {d_in} and "
                             f"d_out = {d_out}; sizes that do: {divisors(g)}")
        return {"block_size": b}

    def arrays(self, d_in, d_out, hp):
        b = hp["block_size"]
        return {"c": ArraySpec((d_in // b, d_out // b, b))}

    def tie(self, d_in, d_out, hp):
        b = hp["block_size"]
        i, j = np.indices((d_in, d_out))
        block = (i // b) * (d_out // b) + j // b
        return block * b + (j % b - i % b) % b, np.ones((d_in, d_out))

    def _apply(self, p, x):
        c = p["c"]
        n_in, n_out, b = c.shape
        X = jnp.fft.rfft(x.astype(jnp.float32).reshape(*x.shape[:-1], n_in, b))
        Y = jnp.einsum("...pf,pqf->...qf", X, jnp.fft.rfft(c))
        return jnp.fft.irfft(Y, b).reshape(*x.shape[:-1], n_out * b)

    def _fit(self, M, hp, key, steps, lr):
        b = hp["block_size"]
        return {"c": self.fit_tied(M, hp).reshape(M.shape[0] // b, M.shape[1] // b, b)}
