"""Structured matrix families: fast products, dense materialisation, parameter counts, best fits.

    from surm import structured
    fam = structured.get("circulant")
    p = fam.init(key, d_in, d_out, **hp)   # zero delta by default; init="random" for random
    y = fam.apply(p, x)                    # == x @ fam.to_dense(p)
    fam.num_params(d_in, d_out, **hp)
    p = fam.fit(M, **hp)                   # best Frobenius approximation of M

Families and their hyper-parameters:
    circulant, skew_circulant   form="plain" | "hadamard"          n = max(d_in, d_out) params
    toeplitz                                                       d_in + d_out - 1
    symmetric_toeplitz          form="plain" | "product"           max(d_in, d_out)
    kronecker                   factors=(n1, m1), rank=1           rank (n1 m1 + n2 m2)
    ldr                         rank=1                             2 rank max(d_in, d_out)
    block_circulant             block_size=gcd(d_in, d_out)        d_in d_out / block_size
    lowrank                     rank=8                             rank (d_in + d_out)
    dense                                                          d_in d_out
Each module's docstring says how a family that is square by nature treats a rectangle.
"""
from __future__ import annotations

from surm.structured.base import Family, Params
from surm.structured.block_circulant import BlockCirculant
from surm.structured.circulant import Circulant, SkewCirculant
from surm.structured.kronecker import Kronecker
from surm.structured.ldr import LDR
from surm.structured.matmul import Dense, LowRank
from surm.structured.toeplitz import SymmetricToeplitz, Toeplitz

_REGISTRY: dict[str, Family] = {
    fam.name: fam for fam in (Circulant(), SkewCirculant(), Toeplitz(), SymmetricToeplitz(),
                              Kronecker(), LDR(), BlockCirculant(), LowRank(), Dense())
}

FAMILIES: tuple[str, ...] = tuple(_REGISTRY)


def get(name: str) -> Family:
    """The family called ``name``; ValueError listing the known names otherwise."""
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown structured family {name!r}; known families: "
                         f"{', '.join(FAMILIES)}") from None


__all__ = ["FAMILIES", "Family", "Params", "get"]
