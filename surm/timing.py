"""Timing for the benchmark scripts: medians of calls interleaved in rounds, so that the drift
of a shared machine hits every candidate alike."""
from __future__ import annotations

import statistics
import time
from typing import Callable, Mapping

ROUND = 5  # timed calls of one candidate before the next one's


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
