"""Several named adapters of one base model, for inference: PEFT's ``load_adapter``,
``set_adapter``, ``add_weighted_adapter`` and ``delete_adapter``, for a Linen model.

    bank = peft.AdapterSet(model, params)            # the pretrained tree, kept once
    bank.load("sports", "runs/sports/adapters")      # or bank.add(name, trainable, spec)
    bank.load("legal", "runs/legal/adapters")
    bank.set_adapter("sports"); logits = bank(*inputs)
    bank.set_adapter({"sports": 0.7, "legal": 0.3})  # a weighted combination
    merged = bank.merged()                           # plain params of what is active

One adapter runs as ``peft.apply`` runs it (its own spec: method, structure, targets). A
weighted combination is exact and linear: every leaf of the model becomes the base plus
``sum_i w_i * (what adapter i changes in it)``: its folded update (lora-mode structured
matrices and LoRA merge into the kernels) and the leaves it trains in full (the head, biases,
full fine-tuning). It needs adapters that merge: an adapter-mode (bottleneck) or Houlsby
adapter is not a weight change and is refused by name.
"""
from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp

from surm.peft import io, surgery, tree
from surm.peft.spec import PeftSpec


class AdapterSet:
    """Named adapters over one base (module docstring). ``layers``: the
    ``surm.peft.layers.trace`` of the model, where its adapters were made with one."""

    def __init__(self, model, base_params: Mapping, layers: Mapping | None = None):
        self.model, self.base, self.layers = model, base_params, layers
        self._adapters: dict[str, tuple[dict, PeftSpec, dict]] = {}
        self._active: dict[str, float] | None = None

    # ---- adding and removing -----------------------------------------------------------------
    def add(self, name: str, trainable: Mapping, spec: PeftSpec) -> None:
        """Adds ``trainable`` (as ``peft.init`` made it and training changed it) under
        ``name``; the first one added becomes active."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"an adapter's name must be a non-empty string, got {name!r}")
        if name in self._adapters:
            raise ValueError(f"an adapter named {name!r} is already loaded; delete_adapter("
                             f"{name!r}) first, or give another name")
        _, frozen = surgery.split(self.base, spec, self.layers)
        missing = sorted(set(tree.flatten(trainable.get("base", {})))
                         - set(tree.flatten(self.base)))
        if missing:
            raise ValueError(f"adapter {name!r} trains leaves this base does not have: "
                             f"{', '.join(missing[:3])}; it was made for another model")
        self._adapters[name] = (dict(trainable), spec, frozen)
        if self._active is None:
            self._active = {name: 1.0}

    def load(self, name: str, folder, *, check_base: bool = True) -> None:
        """Adds the adapters ``peft.save`` wrote in ``folder`` (checked against this base
        unless ``check_base=False``)."""
        trainable, spec = io.load(folder, self.base, self.layers, check_base=check_base)
        self.add(name, trainable, spec)

    def delete_adapter(self, name: str) -> None:
        self._get(name)
        del self._adapters[name]
        if self._active and name in self._active:
            self._active = None

    @property
    def names(self) -> list[str]:
        return list(self._adapters)

    # ---- choosing ----------------------------------------------------------------------------
    def set_adapter(self, which: str | Mapping[str, float]) -> None:
        """One adapter by name, or ``{name: weight}`` for a weighted combination."""
        weights = {which: 1.0} if isinstance(which, str) else dict(which)
        if not weights:
            raise ValueError("set_adapter needs a name or a {name: weight} mapping")
        for name, w in weights.items():
            self._get(name)
            if not isinstance(w, (int, float)) or w != w or abs(w) == float("inf"):
                raise ValueError(f"the weight of {name!r} must be a finite number, got {w!r}")
        if len(weights) > 1 or next(iter(weights.values())) != 1.0:
            for name in weights:
                spec = self._adapters[name][1]
                if self._adapters[name][0].get("adapters") and not spec.mergeable:
                    raise ValueError(
                        f"adapter {name!r} ({spec.method}) is not a weight change, so it has "
                        f"no weighted combination; combine lora-mode adapters, or "
                        f"set_adapter({name!r}) alone")
        self._active = {k: float(v) for k, v in weights.items()}

    @property
    def active(self) -> dict[str, float] | None:
        return None if self._active is None else dict(self._active)

    # ---- running -----------------------------------------------------------------------------
    def __call__(self, *args, **kwargs) -> Any:
        """The model with the active adapter (or combination), as ``peft.apply`` (one adapter)
        or ``model.apply`` of the merged parameters (a combination)."""
        name = self._single()
        if name is not None:
            trainable, spec, frozen = self._adapters[name]
            return surgery.apply(self.model, frozen, trainable, spec, *args, **kwargs)
        return self.model.apply({"params": self.merged()}, *args, **kwargs)

    def merged(self) -> dict:
        """Plain parameters of the model with the active adapter or combination folded in."""
        if self._active is None:
            raise ValueError("no adapter is active: add one, or set_adapter(name)")
        base = dict(self.base)
        total = None
        for name, w in self._active.items():
            change = jax.tree.map(lambda m, b: (m - b.astype(jnp.float32)) * w,
                                  self._folded(name), base)
            total = change if total is None else jax.tree.map(jnp.add, total, change)
        return jax.tree.map(lambda b, d: (b.astype(jnp.float32) + d).astype(b.dtype), base,
                            total)

    # ---- helpers -----------------------------------------------------------------------------
    def _get(self, name: str):
        if name not in self._adapters:
            raise KeyError(f"no adapter named {name!r}; loaded: "
                           f"{', '.join(self._adapters) or 'none'}")
        return self._adapters[name]

    def _single(self) -> str | None:
        if self._active is None:
            raise ValueError("no adapter is active: add one, or set_adapter(name)")
        if len(self._active) == 1 and next(iter(self._active.values())) == 1.0:
            return next(iter(self._active))
        return None

    def _folded(self, name: str) -> dict:
        """The model's parameters under adapter ``name`` alone, in float32."""
        trainable, spec, frozen = self._adapters[name]
        params = surgery.full_params(frozen, trainable)
        if trainable.get("adapters"):
            params = surgery.merge(params, trainable["adapters"], spec)
        return jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)

