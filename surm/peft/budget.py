"""Matching PEFT methods to a parameter budget, exactly, from a model's parameter shapes.

For each method (family and mode), ``match`` finds the hyper-parameters whose trainable
parameters beyond the classification head (the adapters; the biases for bitfit) come closest to
the budget without going over (the smallest setting, with ``fits=False``, when none fits). The
knobs searched are the ones each family declares (``structured.Family.searchable``: rank,
block_size, form; the Houlsby bottleneck), restricted to the values the caller lists. Counts come
from ``surm.peft.count`` on shapes (``jax.eval_shape``): no model is initialised.

    counter = budget.ParamCounter(shapes, peft_config)      # shapes: the base params' shapes
    m = budget.match(counter, "lowrank", "lora", {}, 20_000)
"""
from __future__ import annotations

import dataclasses
import itertools
import math
from typing import Any, Callable, Mapping, Sequence

import jax

from surm import structured
from surm.peft.report import count
from surm.peft import spec as spec_lib
from surm.peft.spec import PeftSpec, config_to_spec
from surm.peft.surgery import init, targets
from surm.structured.base import DIVISOR, RANK

#: what the baselines that are not structured families can search
BASELINE_SEARCHABLE = {"houlsby": {"rank": RANK}}


def searchable(family: str) -> Mapping[str, Any]:
    if family in structured.FAMILIES:
        return structured.get(family).searchable
    return BASELINE_SEARCHABLE.get(family, {})


def _key(hparams: Mapping[str, Any]) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(hparams.items()))


class ParamCounter:
    """Exact trainable-parameter counts of PEFT specs on one model, from its shapes only."""

    def __init__(self, shapes, peft_config: Mapping[str, Any]):
        self.shapes = shapes
        self.peft = dict(peft_config)
        self._cache: dict = {}
        self.head = self.counts("linear_probe", None, {})["trainable"]

    def spec(self, family: str, mode: str | None, hparams: Mapping) -> PeftSpec:
        return config_to_spec({**self.peft, "family": family, "hparams": dict(hparams),
                               "mode": mode or self.peft.get("mode", "lora")})

    def counts(self, family: str, mode: str | None, hparams: Mapping) -> dict:
        spec = self.spec(family, mode, hparams)
        trainable, _ = jax.eval_shape(lambda p: init(p, spec, jax.random.PRNGKey(0)),
                                      self.shapes)
        return count(self.shapes, trainable, spec)

    def params(self, family: str, mode: str | None, hparams: Mapping) -> int | None:
        """Parameters beyond the head; None for an invalid setting (e.g. rank too large)."""
        key = (family, mode, _key(hparams))
        if key not in self._cache:
            try:
                self._cache[key] = self.counts(family, mode, hparams)["trainable"] - self.head
            except ValueError:
                self._cache[key] = None
        return self._cache[key]

    def matrix_dims(self, family: str, mode: str | None) -> list[int]:
        """The sides of the structured matrices: (d_in, d_out) per target in lora mode, the
        output side (d_out, d_out) in adapter mode."""
        spec = self.spec(family, mode, {})
        return [d for d_in, d_out in targets(self.shapes, spec).values()
                for d in ((d_in, d_out) if spec.method == "lora" else (d_out,))]


@dataclasses.dataclass(frozen=True)
class Match:
    family: str
    mode: str | None  # as given (None: the config's default)
    hparams: dict
    counts: dict  # surm.peft.count of the chosen setting
    params: int  # trainable parameters beyond the classification head
    fits: bool

    def row(self, budget: int) -> str:
        mode = self.counts["mode"] if spec_lib.has_adapters(self.family) else "-"
        verdict = "fits" if self.fits else "OVER: no setting fits"
        return (f"{self.family:<18} {mode:<8} {_key(self.hparams) or '-':<22} "
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


def candidates(counter: ParamCounter, family: str, mode: str | None,
               listed: Mapping[str, Sequence[Any]], budget: int) -> list[dict]:
    """Settings worth counting: the listed values, the family's searchable knobs, and for a
    rank the largest that fits."""
    domains = {k: tuple(v) for k, v in listed.items()}
    ranks = []
    for name, kind in searchable(family).items():
        if name in domains:
            continue
        if kind == RANK:
            ranks.append(name)
        elif kind == DIVISOR:
            g = math.gcd(*counter.matrix_dims(family, mode))
            domains[name] = tuple(k for k in range(1, g + 1) if g % k == 0)
        else:
            domains[name] = tuple(kind)
    out = []
    for combo in itertools.product(*domains.values()):
        hp = dict(zip(domains, combo))
        for name in ranks:
            hp[name] = largest_fitting(
                lambda r: counter.params(family, mode, {**hp, name: r}), budget)
        out.append(hp)
    return out


def match(counter: ParamCounter, family: str, mode: str | None,
          listed: Mapping[str, Sequence[Any]], budget: int) -> Match:
    """The setting of ``family`` closest to ``budget`` without going over (see module doc)."""
    if budget < 1:
        raise ValueError(f"a budget must be a positive number of parameters, got {budget}")
    scored = [(counter.params(family, mode, hp), hp)
              for hp in candidates(counter, family, mode, listed, budget)]
    valid = [(n, hp) for n, hp in scored if n is not None]
    if not valid:
        try:  # the family's own explanation
            counter.counts(family, mode, scored[0][1])
            reason = ""
        except ValueError as e:
            reason = f": {e}"
        raise ValueError(f"budget matching {family}: no valid setting{reason}")
    fitting = [(n, hp) for n, hp in valid if n <= budget]
    n, hp = max(fitting, key=lambda x: x[0]) if fitting else min(valid, key=lambda x: x[0])
    return Match(family, mode, hp, counter.counts(family, mode, hp), n, bool(fitting))


def format_matches(matches: Sequence[Match], budget: int) -> str:
    header = (f"{'family':<18} {'mode':<8} {'hparams':<22} {'params':>12} {'adapter':>12} "
              f"{'trainable':>12}  {'of budget':>9}")
    return "\n".join([f"budget: {budget:,} parameters beyond the classification head", header]
                     + [m.row(budget) for m in matches])
