"""What every PEFT method declares (``surm.peft.methods``)."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Mapping

import flax.linen as nn
import jax.numpy as jnp

if TYPE_CHECKING:
    from surm.peft.spec import PeftSpec, Target

ACTIVATIONS: dict[str, Callable] = {"gelu": nn.gelu, "relu": nn.relu, "tanh": jnp.tanh,
                                    "identity": lambda x: x}


class Method:
    """A PEFT method: the adapter node it puts on a targeted layer, how that node changes the
    layer's output, whether the change folds into the kernel, which base leaves train."""

    name: str = ""
    #: whether targeted layers get an adapter node
    adapters: bool = False
    #: whether the update is a fixed matrix that ``merge`` can fold into the kernel
    mergeable: bool = False
    #: the target rules when a spec names none
    default_targets: tuple[str, ...] = ("qv",)

    def init(self, key, spec: PeftSpec, target: Target, d_in: int, d_out: int) -> dict:
        """The adapter node of one (d_in, d_out) layer."""
        raise NotImplementedError(f"{self.name} puts no adapter on a layer")

    def matrix(self, d_in: int, d_out: int) -> tuple[int, int]:
        """The (rows, columns) of the structured matrix ``S`` of a (d_in, d_out) layer's node."""
        return d_in, d_out

    def apply(self, node: Mapping, spec: PeftSpec, target: Target, x, y,
              dropout: Callable[[Any], Any]):
        """The layer's output with the adapter, in rows: ``x`` (..., d_in) the layer's input,
        ``y`` (..., d_out) its output; ``dropout`` drops the adapter's input in training."""
        raise NotImplementedError(f"{self.name} puts no adapter on a layer")

    def delta(self, node: Mapping, spec: PeftSpec, target: Target):
        """The (d_in, d_out) update ``merge`` folds into the kernel (mergeable methods)."""
        raise NotImplementedError(f"{self.name} has no weight update to fold")

    def trains(self, spec: PeftSpec, path: str) -> bool:
        """Whether the base leaf at ``path`` trains in full for this method, beyond the heads and
        the spec's train_* options."""
        return False


def scale_of(node: Mapping, target: Target):
    """The update's multiplier: the node's learned one (learn_scale) or the target's."""
    return node.get("scale", target.update_scale)
