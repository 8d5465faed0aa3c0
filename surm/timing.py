"""Timing for the benchmark scripts: medians of calls interleaved in rounds, so that the drift
of a shared machine hits every candidate alike, and the trainer's compiled step as such a call
(`TrainStep`)."""
from __future__ import annotations

import statistics
import time
from typing import Callable, Mapping

ROUND = 5  # timed calls of one candidate before the next one's


class TrainStep:
    """The trainer's step (``surm.train.make_step_fns``: forward, backward, optimizer update)
    of one PEFT method on one fixed batch, jitted and compiled; each call runs one step on the
    state the previous one left (donated) and returns its loss, so it blocks until the step is
    done. ``state`` before the first call holds the initial adapters (``state["trainable"]``);
    ``compiled`` is the XLA executable (memory analysis, HLO text)."""

    def __init__(self, model, params, spec, batch, inputs, optimizer, *, lora_path="auto",
                 causal_lm: bool = False, total_steps: int = 1000):
        import jax
        import jax.numpy as jnp

        from surm import optim, peft
        from surm.train import initial_state, make_step_fns
        trainable, self.frozen = peft.init(params, spec, jax.random.PRNGKey(1))
        tx, _ = optim.make(optimizer, total_steps, trainable)
        # A copy: the step donates its state, which must not alias ``params``.
        self.state = jax.tree.map(jnp.copy, initial_state(trainable, tx, jax.random.PRNGKey(2)))
        from surm import tasks
        task = tasks.TASKS["causal_lm" if causal_lm else "classification"]
        step, _ = make_step_fns(model, spec, tx, inputs, task, lora_path=lora_path)
        self.compiled = jax.jit(step, donate_argnums=(0,)).lower(
            self.state, self.frozen, batch).compile()
        self.batch = batch

    def __call__(self) -> float:
        self.state, metrics = self.compiled(self.state, self.frozen, self.batch)
        return float(metrics["loss"])


def interleaved_medians(calls: Mapping[str, Callable[[], object]], warmup: int,
                        steps: int) -> dict[str, float]:
    """Median seconds per call of each ``calls[name]()`` (which blocks): ``warmup`` untimed calls
    each, then rounds of ``ROUND`` timed calls of one after the other's."""
    for fn in calls.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in calls}
    for _ in range(max(1, steps // ROUND)):
        for name, fn in calls.items():
            for _ in range(min(ROUND, steps)):
                t = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t)
    return {name: statistics.median(t) for name, t in times.items()}
