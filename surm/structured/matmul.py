"""The unstructured baselines: low rank (LoRA's B A) and dense (full fine-tuning of the update).

Both multiply in x's dtype (the parameters are cast), as a Flax Dense would.

lowrank: M = A B, A (d_in, r) ~ U(-1/sqrt(d_in), 1/sqrt(d_in)), B (r, d_out) = 0 at init (LoRA);
r (d_in + d_out) parameters; best fit: the truncated SVD (Eckart-Young).
dense: M = W, d_in d_out parameters, zero at init; best fit: M itself.
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from surm.structured.base import RANK, ArraySpec, Family


class LowRank(Family):
    name = "lowrank"
    searchable = {"rank": RANK}

    def hparams(self, d_in, d_out, **hp):
        self._no_unknown(hp, ("rank",))
        r = self._positive_int(hp, "rank", 8)
        if r > min(d_in, d_out):
            raise ValueError(f"lowrank: rank {r} exceeds min(d_in, d_out) = {min(d_in, d_out)}; "
                             f"use a smaller rank or the dense family")
        return {"rank": r}

    def arrays(self, d_in, d_out, hp):
        r = hp["rank"]
        return {"A": ArraySpec((d_in, r), ("uniform", 1.0 / np.sqrt(d_in))),
                "B": ArraySpec((r, d_out))}

    def _apply(self, p, x):
        return (x @ p["A"].astype(x.dtype)) @ p["B"].astype(x.dtype)

    def _to_dense(self, p):
        return p["A"] @ p["B"]

    def _fit(self, M, hp, key, steps, lr):
        r = hp["rank"]
        U, s, Vt = jnp.linalg.svd(M, full_matrices=False)
        root = jnp.sqrt(s[:r])
        return {"A": U[:, :r] * root, "B": root[:, None] * Vt[:r]}


class Dense(Family):
    name = "dense"

    def arrays(self, d_in, d_out, hp):
        return {"W": ArraySpec((d_in, d_out))}

    def _apply(self, p, x):
        return x @ p["W"].astype(x.dtype)

    def _to_dense(self, p):
        return p["W"]

    def _fit(self, M, hp, key, steps, lr):
        return {"W": M}
