"""The shared machinery of every structured-matrix family.

A family is a stateless object with five functions (the contract of ``surm.structured``):

    p = fam.init(key, d_in, d_out, **hp)   # Params: a pytree of float32 arrays
    y = fam.apply(p, x)                    # (..., d_in) -> (..., d_out), the fast product
    M = fam.to_dense(p)                    # (d_in, d_out), so that apply(p, x) == x @ M
    fam.num_params(d_in, d_out, **hp)      # the number of numbers in p
    p = fam.fit(M, **hp)                   # the params closest to M in Frobenius norm

The row-vector convention of a Flax ``Dense`` kernel is used throughout, so an update merges as
``kernel + scale * to_dense(p)``.

``Params`` carries the shape and the hyper-parameters as static metadata next to the arrays, so
``apply`` and ``to_dense`` need nothing but ``p``. It is a registered pytree whose only leaves are
the arrays: ``jit``, ``grad``, ``vmap``, optax and orbax see a plain dict of arrays.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax

from surm.structured import partition

Array = jax.Array

INITS = ("zero", "random")
RANK, DIVISOR = "rank", "divisor"  # kinds of searchable hyper-parameter (``Family.searchable``)


@dataclasses.dataclass(frozen=True)
class Params:
    """The parameters of one structured matrix of shape (d_in, d_out).

    ``arrays`` are the trainable numbers; ``family``, ``d_in``, ``d_out`` and ``hp`` (sorted
    ``(name, value)`` pairs of the resolved hyper-parameters) are static pytree metadata.
    """

    family: str
    d_in: int
    d_out: int
    hp: tuple[tuple[str, Any], ...]
    arrays: dict[str, Array]

    @property
    def hparams(self) -> dict[str, Any]:
        return dict(self.hp)

    @property
    def shape(self) -> tuple[int, int]:
        return (self.d_in, self.d_out)

    def __getitem__(self, name: str) -> Array:
        return self.arrays[name]

    def replace(self, **arrays: Array) -> "Params":
        """A copy with some arrays replaced (same family, shape and hyper-parameters)."""
        unknown = set(arrays) - set(self.arrays)
        if unknown:
            raise ValueError(f"{self.family} params have no arrays {sorted(unknown)}; "
                             f"they have {sorted(self.arrays)}")
        return dataclasses.replace(self, arrays={**self.arrays, **arrays})


jax.tree_util.register_dataclass(
    Params, data_fields=["arrays"], meta_fields=["family", "d_in", "d_out", "hp"])


@dataclasses.dataclass(frozen=True)
class ArraySpec:
    """Shape of one parameter array and how the default (zero-delta) init fills it.

    ``default``: "zeros", "ones_first" (e_0, the identity of a convolution), ("normal", std) or
    ("uniform", bound). With ``init="zero"`` a family gives zeros to at least one factor of every
    product so the delta is exactly 0, while the other factors are random so that the gradient of
    the zero factor is not zero.
    """

    shape: tuple[int, ...]
    default: Any = "zeros"


def _fill(key: Array, spec: ArraySpec, how: Any) -> Array:
    if how == "zeros":
        return jnp.zeros(spec.shape, jnp.float32)
    if how == "ones_first":
        return jnp.zeros(spec.shape, jnp.float32).at[..., 0].set(1.0)
    kind, size = how
    if kind == "normal":
        return size * jax.random.normal(key, spec.shape, jnp.float32)
    if kind == "uniform":
        return jax.random.uniform(key, spec.shape, jnp.float32, -size, size)
    raise AssertionError(f"unknown fill {how!r}")


def check_dims(family: str, d_in: Any, d_out: Any) -> tuple[int, int]:
    for name, d in (("d_in", d_in), ("d_out", d_out)):
        if isinstance(d, bool) or not isinstance(d, (int, np.integer)) or d < 1:
            raise ValueError(f"{family}: {name} must be a positive int, got {d!r}")
    return int(d_in), int(d_out)


def divisors(n: int) -> list[int]:
    return [k for k in range(1, n + 1) if n % k == 0]


class Family:
    """Base class: subclasses describe their arrays and implement the product."""

    name: str = ""
    #: one line on how a family that is square by nature treats a rectangle
    rectangular: str = "native"
    #: the hyper-parameters a budget match may search (``surm.peft.budget``): name -> a tuple
    #: of values, ``RANK`` (any positive int: the largest that fits is found) or ``DIVISOR``
    #: (the sizes that divide every side of the matrices)
    searchable: Mapping[str, Any] = {}

    # ---- to implement -------------------------------------------------------------------------
    def hparams(self, d_in: int, d_out: int, **hp: Any) -> dict[str, Any]:
        """Validated hyper-parameters with defaults filled in; ValueError on a bad value/shape."""
        self._no_unknown(hp, ())
        return {}

    def arrays(self, d_in: int, d_out: int, hp: Mapping[str, Any]) -> dict[str, ArraySpec]:
        raise NotImplementedError

    def _apply(self, p: Params, x: Array) -> Array:
        raise NotImplementedError

    def _fit(self, M: Array, hp: Mapping[str, Any], key: Array, steps: int,
             lr: float) -> dict[str, Array]:
        raise NotImplementedError

    # ---- the contract -------------------------------------------------------------------------
    def init(self, key: Array, d_in: int, d_out: int, *, init: str = "zero",
             std: float = 0.02, **hp: Any) -> Params:
        """Parameters for a (d_in, d_out) matrix.

        init="zero" (default): the matrix is exactly 0 yet has a non-zero gradient (use as an
        update). init="random": every array ~ N(0, std^2).
        """
        d_in, d_out = check_dims(self.name, d_in, d_out)
        if init not in INITS:
            raise ValueError(f"{self.name}: init must be one of {INITS}, got {init!r}")
        hp = self.hparams(d_in, d_out, **hp)
        specs = self.arrays(d_in, d_out, hp)
        keys = jax.random.split(key, len(specs))
        arrays = {
            name: _fill(k, spec, spec.default if init == "zero" else ("normal", std))
            for k, (name, spec) in zip(keys, sorted(specs.items()))
        }
        return self._params(d_in, d_out, hp, arrays)

    def apply(self, p: Params, x: Array) -> Array:
        """x (..., d_in) -> x @ M (..., d_out), computed the fast way, in x's dtype."""
        self._check_params(p)
        x = jnp.asarray(x)
        if x.ndim < 1 or x.shape[-1] != p.d_in:
            raise ValueError(f"{self.name}: x must have shape (..., {p.d_in}), got {x.shape}")
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise ValueError(f"{self.name}: x must be floating point, got {x.dtype}")
        # on a device mesh, each device multiplies only its own rows (surm.structured.partition)
        return partition.rows_split(self._apply, p, x).astype(x.dtype)

    def to_dense(self, p: Params) -> Array:
        """The (d_in, d_out) float32 matrix M with apply(p, x) == x @ M."""
        self._check_params(p)
        return self._to_dense(p)

    def num_params(self, d_in: int, d_out: int, **hp: Any) -> int:
        d_in, d_out = check_dims(self.name, d_in, d_out)
        hp.pop("init", None), hp.pop("std", None)
        specs = self.arrays(d_in, d_out, self.hparams(d_in, d_out, **hp))
        return sum(math.prod(s.shape) for s in specs.values())

    def fit(self, M: Any, *, key: Array | None = None, steps: int = 2000, lr: float = 1e-2,
            **hp: Any) -> Params:
        """The params of this family closest to M (d_in, d_out) in Frobenius norm.

        Closed forms where they exist; the others (ldr, product forms) fit by Adam for ``steps``
        steps at learning rate ``lr`` from a warm start, deterministic given ``key``."""
        M = jnp.asarray(M, jnp.float32)
        if M.ndim != 2:
            raise ValueError(f"{self.name}.fit: M must be a matrix (d_in, d_out), got {M.shape}")
        d_in, d_out = check_dims(self.name, *M.shape)
        hp = self.hparams(d_in, d_out, **hp)
        key = jax.random.PRNGKey(0) if key is None else key
        return self._params(d_in, d_out, hp, self._fit(M, hp, key, steps, lr))

    # ---- helpers for subclasses ---------------------------------------------------------------
    def _to_dense(self, p: Params) -> Array:
        return self._apply(p, jnp.eye(p.d_in, dtype=jnp.float32))

    def _params(self, d_in, d_out, hp, arrays) -> Params:
        return Params(self.name, d_in, d_out, tuple(sorted(hp.items())),
                      {k: jnp.asarray(v, jnp.float32) for k, v in arrays.items()})

    def _check_params(self, p: Any) -> None:
        if not isinstance(p, Params):
            raise ValueError(f"{self.name}: expected structured.Params, got {type(p).__name__}")
        if p.family != self.name:
            raise ValueError(f"params of family {p.family!r} given to {self.name!r}; "
                             f"use structured.get({p.family!r})")

    def _no_unknown(self, hp: Mapping[str, Any], known: tuple[str, ...]) -> None:
        unknown = sorted(set(hp) - set(known))
        if unknown:
            allowed = ", ".join(known) if known else "none"
            raise ValueError(f"{self.name}: unknown hyper-parameter(s) {unknown}; "
                             f"this family takes: {allowed}")

    def _choice(self, hp: Mapping[str, Any], name: str, choices: tuple[str, ...]) -> str:
        value = hp.get(name, choices[0])
        if value not in choices:
            raise ValueError(f"{self.name}: {name} must be one of {choices}, got {value!r}")
        return value

    def _positive_int(self, hp: Mapping[str, Any], name: str, default: int) -> int:
        value = hp.get(name, default)
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{self.name}: {name} must be a positive int, got {value!r}")
        return int(value)

    def __repr__(self) -> str:
        return f"structured.get({self.name!r})"


class TiedFamily(Family):
    """A family whose matrix ties entries to parameters: M[i, j] = sign[i, j] * theta[idx[i, j]].

    Circulant, skew-circulant, (symmetric) Toeplitz and block-circulant are of this kind. The tie
    gives ``to_dense`` as a gather and the Frobenius best fit in closed form: each parameter is the
    (signed) mean of the entries tied to it.
    """

    #: name of the tied parameter vector in the one-array ("plain") form
    vector: str = "c"

    def tie(self, d_in: int, d_out: int, hp: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray]:
        """(idx, sign): integer indices into the flat tied parameter, and +1/-1 signs."""
        raise NotImplementedError

    def theta(self, p: Params) -> Array:
        """The tied parameter (flat array indexed by ``tie``) from the params."""
        return p[self.vector]

    def _to_dense(self, p: Params) -> Array:
        idx, sign = self.tie(p.d_in, p.d_out, p.hparams)
        return jnp.asarray(sign, jnp.float32) * self.theta(p).reshape(-1)[idx]

    def fit_tied(self, M: Array, hp: Mapping[str, Any]) -> Array:
        idx, sign = self.tie(M.shape[0], M.shape[1], hp)
        size = int(idx.max()) + 1
        total = jax.ops.segment_sum((M * sign).reshape(-1), idx.reshape(-1), size)
        count = np.bincount(idx.reshape(-1), minlength=size)
        return total / jnp.asarray(np.maximum(count, 1), jnp.float32)


def fit_by_descent(loss_params: Callable[[dict], Array], start: dict[str, Array], *,
                   steps: int, lr: float) -> dict[str, Array]:
    """Minimise ``loss_params`` with Adam from ``start``; return the best params seen."""
    opt = optax.adam(lr)

    def step(carry, _):
        params, state, best, best_loss = carry
        loss, grads = jax.value_and_grad(loss_params)(params)
        better = loss < best_loss
        best = jax.tree.map(lambda b, q: jnp.where(better, q, b), best, params)
        best_loss = jnp.minimum(loss, best_loss)
        updates, state = opt.update(grads, state, params)
        return (optax.apply_updates(params, updates), state, best, best_loss), None

    @jax.jit
    def run(start):
        carry = (start, opt.init(start), start, jnp.inf)
        (params, _, best, best_loss), _ = jax.lax.scan(step, carry, None, length=steps)
        last = loss_params(params)
        return jax.tree.map(lambda b, q: jnp.where(last < best_loss, q, b), best, params)

    return run(start)
