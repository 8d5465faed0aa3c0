"""BitFit: the biases train (with the heads); no adapter."""
from __future__ import annotations

from surm.peft.methods.base import Method


class BitFit(Method):
    name = "bitfit"

    def trains(self, spec, path):
        return path.rsplit("/", 1)[-1] == "bias"


METHOD = BitFit()
