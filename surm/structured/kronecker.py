"""Kronecker products: M = sum_r A_r (x) B_r, A_r (n1, m1), B_r (n2, m2), d_in = n1 n2, d_out = m1 m2.

Natively rectangular. The product reshapes x to (..., n1, n2) and contracts with the two small
factors: the (d_in, d_out) matrix is never built. ``rank`` r > 1 sums r Kronecker products.
Parameters: r (n1 m1 + n2 m2). By default the factor sizes are the divisors that minimise that
count with every factor larger than 1 x 1, and among those the squarest factors; a prime side
has no such split and raises ValueError
(pass ``factors=(n1, m1)``, pad the layer, or use a family that takes any size).

Init (zero delta): A ~ U(-1/sqrt(n1), 1/sqrt(n1)), B = 0, as LoRA's A and B.
Best fit: Van Loan-Pitsianis, the rank-r SVD of the rearranged matrix R[(i,a),(j,b)] =
M[i n2 + j, a m2 + b], for which A (x) B corresponds to vec(A) vec(B)^T.
"""
from __future__ import annotations

import itertools
import math

import jax.numpy as jnp
import numpy as np

from surm.structured.base import RANK, ArraySpec, Family, divisors


def _is_prime(n: int) -> bool:
    return n > 1 and divisors(n) == [1, n]


class Kronecker(Family):
    name = "kronecker"
    searchable = {"rank": RANK}

    def hparams(self, d_in, d_out, **hp):
        self._no_unknown(hp, ("factors", "rank"))
        rank = self._positive_int(hp, "rank", 1)
        if hp.get("factors") is None:
            n1, m1 = self._best_factors(d_in, d_out)
        else:
            try:
                n1, m1 = (int(f) for f in hp["factors"])
            except (TypeError, ValueError):
                raise ValueError(f"kronecker: factors must be a pair (n1, m1), got "
                                 f"{hp['factors']!r}") from None
            if n1 < 1 or m1 < 1 or d_in % n1 or d_out % m1:
                raise ValueError(
                    f"kronecker: factors=({n1}, {m1}) must divide (d_in, d_out) = ({d_in}, "
                    f"{d_out}); divisors of {d_in}: {divisors(d_in)}, of {d_out}: {divisors(d_out)}")
        n2, m2 = d_in // n1, d_out // m1
        if rank > min(n1 * m1, n2 * m2):
            raise ValueError(f"kronecker: rank {rank} exceeds min(n1*m1, n2*m2) = "
                             f"{min(n1 * m1, n2 * m2)} for factors ({n1}, {m1}) x ({n2}, {m2})")
        return {"factors": (n1, m1), "rank": rank}

    @staticmethod
    def _best_factors(d_in: int, d_out: int) -> tuple[int, int]:
        for name, d in (("d_in", d_in), ("d_out", d_out)):
            if d == 1 or _is_prime(d):
                raise ValueError(
                    f"kronecker: {name} = {d} has no split n1 * n2 with both factors > 1, so "
                    f"there is no Kronecker structure to use. Pass factors=(n1, m1) explicitly, "
                    f"pad the layer to a composite size, or use circulant/toeplitz/lowrank, "
                    f"which take any size")
        def cost(f):
            n1, m1 = f
            n2, m2 = d_in // n1, d_out // m1
            # Fewest parameters, then the squarest factors: a 2 x 128 (x) 128 x 2 split has as
            # many numbers as 16 x 16 (x) 16 x 16 but cannot even represent the identity.
            return n1 * m1 + n2 * m2, abs(math.log(n1 / m1)) + abs(math.log(n2 / m2))

        return min(itertools.product(divisors(d_in)[1:-1], divisors(d_out)[1:-1]), key=cost)

    def arrays(self, d_in, d_out, hp):
        (n1, m1), r = hp["factors"], hp["rank"]
        return {"A": ArraySpec((r, n1, m1), ("uniform", 1.0 / np.sqrt(n1))),
                "B": ArraySpec((r, d_in // n1, d_out // m1))}

    def _apply(self, p, x):
        A, B = p["A"].astype(x.dtype), p["B"].astype(x.dtype)
        _, n1, m1 = A.shape
        _, n2, m2 = B.shape
        t = jnp.einsum("...ij,rjb->...rib", x.reshape(*x.shape[:-1], n1, n2), B)
        y = jnp.einsum("...rib,ria->...ab", t, A)
        return y.reshape(*x.shape[:-1], m1 * m2)

    def _to_dense(self, p):
        return jnp.einsum("ria,rjb->ijab", p["A"], p["B"]).reshape(p.d_in, p.d_out)

    def _fit(self, M, hp, key, steps, lr):
        (n1, m1), r = hp["factors"], hp["rank"]
        n2, m2 = M.shape[0] // n1, M.shape[1] // m1
        R = M.reshape(n1, n2, m1, m2).transpose(0, 2, 1, 3).reshape(n1 * m1, n2 * m2)
        U, s, Vt = jnp.linalg.svd(R, full_matrices=False)
        root = jnp.sqrt(s[:r])
        return {"A": (U[:, :r] * root).T.reshape(r, n1, m1),
                "B": (Vt[:r] * root[:, None]).reshape(r, n2, m2)}
