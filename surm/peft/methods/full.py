"""Full fine-tuning: every weight trains."""
from __future__ import annotations

from surm.peft.methods.base import Method


class Full(Method):
    name = "full"

    def trains(self, spec, path):
        return True


METHOD = Full()
