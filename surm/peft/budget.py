"""Matching PEFT methods to a parameter budget, exactly, from a model's parameter shapes.

For each method (and its structure), ``match`` finds the hyper-parameters whose trainable
parameters beyond the classification head (the adapters; the biases for bitfit) come closest to
the budget without going over (the smallest setting, with ``fits=False``, when none fits). The
knobs searched are the ones each structure declares (``structured.Family.searchable``: rank,
block_size, form; the Houlsby bottleneck), restricted to the values the caller lists. Counts come
from ``surm.peft.count`` on shapes (``jax.eval_shape``): no model is initialised.

    counter = budget.ParamCounter(shapes, peft_config)      # shapes: the base params' shapes
    m = budget.match(counter, "lora", "lowrank", {}, 20_000)
"""
from __future__ import annotations

import dataclasses
import itertools
import math
from typing import Any, Callable, Mapping, Sequence

import jax

from surm import structured
from surm.peft.report import count
from surm.peft.spec import STRUCTURED_METHODS, PeftSpec, config_to_spec
from surm.peft.surgery import init, targets
from surm.structured.base import DIVISOR, RANK

#: what the methods without a structure can search
BASELINE_SEARCHABLE = {"houlsby": {"rank": RANK}}


def searchable(method: str | None, structure: str | None) -> Mapping[str, Any]:
    if structure is not None:
        return structured.get(structure).searchable
    return BASELINE_SEARCHABLE.get(method, {})


def _key(hparams: Mapping[str, Any]) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(hparams.items()))


class ParamCounter:
    """Exact trainable-parameter counts of PEFT specs on one model, from its shapes only."""

    def __init__(self, shapes, peft_config: Mapping[str, Any]):
        self.shapes = shapes
        self.peft = dict(peft_config)
        self._cache: dict = {}
        self.head = self.counts("probe", None, {})["trainable"]

    def spec(self, method: str | None, structure: str | None, hparams: Mapping) -> PeftSpec:
        """``method`` None: the config's own (lora or adapter) for ``structure``."""
        if method is None:
            method = self.peft["method"] if self.peft["method"] in STRUCTURED_METHODS else "lora"
        return config_to_spec({**self.peft, "method": method, "structure": structure,
                               "hparams": dict(hparams)})

    def counts(self, method: str | None, structure: str | None, hparams: Mapping) -> dict:
        spec = self.spec(method, structure, hparams)
        trainable, _ = jax.eval_shape(lambda p: init(p, spec, jax.random.PRNGKey(0)),
                                      self.shapes)
        return count(self.shapes, trainable, spec)

    def params(self, method: str | None, structure: str | None, hparams: Mapping) -> int | None:
        """Parameters beyond the head; None for an invalid setting (e.g. rank too large)."""
        key = (method, structure, _key(hparams))
        if key not in self._cache:
            try:
                self._cache[key] = self.counts(method, structure, hparams)["trainable"] - self.head
            except ValueError:
                self._cache[key] = None
        return self._cache[key]

    def matrix_dims(self, method: str | None, structure: str | None) -> list[int]:
        """The sides of the structured matrices: (d_in, d_out) per target for lora, the output
        side (d_out, d_out) for adapters."""
        spec = self.spec(method, structure, {})
        return [d for d_in, d_out in targets(self.shapes, spec).values()
                for d in ((d_in, d_out) if spec.method == "lora" else (d_out,))]


@dataclasses.dataclass(frozen=True)
class Match:
    method: str | None  # as given (None: the config's own, for a structure)
    structure: str | None
    hparams: dict
    counts: dict  # surm.peft.count of the chosen setting
    params: int  # trainable parameters beyond the classification head
    fits: bool

    def row(self, budget: int) -> str:
        verdict = "fits" if self.fits else "OVER: no setting fits"
        return (f"{self.counts['method']:<8} {self.structure or '-':<18} "
                f"{_key(self.hparams) or '-':<22} "
                f"{self.params:>12,} {self.counts['adapter']:>12,} {self.counts['trainable']:>12,}"
                f"  {100 * self.params / budget:8.1f}%  {verdict}")


def largest_fitting(count_of: Callable[[int], int | None], budget: int) -> int:
    """The largest k >= 1 with count_of(k) <= budget (1 if none), for count_of increasing in k
    and valid (not None) up to some bound: doubling, then bisection."""
    if count_of(1) is None or count_of(1) > budget:
        return 1
    fits, above = 1, 2
    while (c := count_of(above)) is not None and c <= budget:
        fits, above = above, above * 2
    while above - fits > 1:
        mid = (fits + above) // 2
        c = count_of(mid)
        fits, above = (mid, above) if c is not None and c <= budget else (fits, mid)
    return fits


def candidates(counter: ParamCounter, method: str | None, structure: str | None,
               listed: Mapping[str, Sequence[Any]], budget: int) -> list[dict]:
    """Settings worth counting: the listed values, the structure's (or method's) searchable
    knobs, and for a rank the largest that fits."""
    domains = {k: tuple(v) for k, v in listed.items()}
    ranks = []
    for name, kind in searchable(method, structure).items():
        if name in domains:
            continue
        if kind == RANK:
            ranks.append(name)
        elif kind == DIVISOR:
            g = math.gcd(*counter.matrix_dims(method, structure))
            domains[name] = tuple(k for k in range(1, g + 1) if g % k == 0)
        else:
            domains[name] = tuple(kind)
    out = []
    for combo in itertools.product(*domains.values()):
        hp = dict(zip(domains, combo))
        for name in ranks:
            hp[name] = largest_fitting(
                lambda r: counter.params(method, structure, {**hp, name: r}), budget)
        out.append(hp)
    return out


def match(counter: ParamCounter, method: str | None, structure: str | None,
          listed: Mapping[str, Sequence[Any]], budget: int) -> Match:
    """The setting of ``method`` (``structure``) closest to ``budget`` without going over (see
    the module doc); ``method`` None: the config's own, lora or adapter."""
    if budget < 1:
        raise ValueError(f"a budget must be a positive number of parameters, got {budget}")
    scored = [(counter.params(method, structure, hp), hp)
              for hp in candidates(counter, method, structure, listed, budget)]
    valid = [(n, hp) for n, hp in scored if n is not None]
    if not valid:
        try:  # the family's own explanation
            counter.counts(method, structure, scored[0][1])
            reason = ""
        except ValueError as e:
            reason = f": {e}"
        raise ValueError(f"budget matching {structure or method}: no valid setting{reason}")
    fitting = [(n, hp) for n, hp in valid if n <= budget]
    n, hp = max(fitting, key=lambda x: x[0]) if fitting else min(valid, key=lambda x: x[0])
    return Match(method, structure, hp, counter.counts(method, structure, hp), n, bool(fitting))


def format_matches(matches: Sequence[Match], budget: int) -> str:
    header = (f"{'method':<8} {'structure':<18} {'hparams':<22} {'params':>12} {'adapter':>12} "
              f"{'trainable':>12}  {'of budget':>9}")
    return "\n".join([f"budget: {budget:,} parameters beyond the classification head", header]
                     + [m.row(budget) for m in matches])
