"""One module per PEFT method, each a ``Method`` (``base.py``): its adapter node, how it changes
a targeted layer's output, whether it merges, its default targets, the base leaves it trains.

    lora      y = x W0 + scale * S(x), S structured            lora.py
    adapter   h <- h + scale * (act(S(h)) + b), S structured    adapter.py
    houlsby   h <- h + scale * up(act(down(h)))                 houlsby.py
    bitfit    the biases train                                  bitfit.py
    probe     the heads alone train                             probe.py
    full      every weight trains                               full.py
"""
from __future__ import annotations

from surm.peft.methods import adapter, bitfit, full, houlsby, lora, probe
from surm.peft.methods.base import Method

METHODS: dict[str, Method] = {m.METHOD.name: m.METHOD
                              for m in (lora, adapter, houlsby, bitfit, probe, full)}


def get(name: str) -> Method:
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown peft method {name!r}; known: {', '.join(METHODS)}") from None


__all__ = ["METHODS", "Method", "get"]
