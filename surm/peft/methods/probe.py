"""The linear probe: the heads alone train."""
from __future__ import annotations

from surm.peft.methods.base import Method


class Probe(Method):
    name = "probe"


METHOD = Probe()
