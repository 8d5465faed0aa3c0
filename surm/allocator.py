"""Host memory allocation tuned for XLA's CPU backend (Linux, glibc).

XLA's CPU runtime allocates each step's scratch buffer (hundreds of MiB for a BERT step: the
activations kept for the backward pass, the gradients) with ``malloc`` and frees it when the
step ends. glibc serves a request that large with a fresh ``mmap`` every time, and the kernel
then zero-fills it page by page as the step first touches it: on MiniLM-L6 full fine-tuning,
batch 32 x 64, 160,000 page faults and about 0.4 s of system time per step, a quarter of the
step (``scripts/bench_peer.py``). ``configure()`` makes glibc keep such blocks in its heap
instead, so the next step reuses the same, already mapped, memory:

- ``M_MMAP_MAX = 0``: no allocation is served by its own ``mmap``;
- ``M_ARENA_MAX = 1``: every thread allocates from the main heap (the per-thread arenas are
  capped at 64 MiB and would fall back to ``mmap``);
- ``M_TRIM_THRESHOLD``: 2 GiB of free memory at the top of the heap before it is returned.

The cost: the process keeps its peak heap (it does not shrink back after a large step), and
allocation-heavy multi-threaded host code shares one arena. ``surm.train``, ``surm.generate``
and the benchmark scripts call it first thing; call it yourself at the start of a program that
trains with surm on the CPU (before JAX runs anything: threads that already allocated keep
their arenas). ``SURM_MALLOC=default`` in the environment turns it off. Elsewhere (macOS,
musl, Windows) it does nothing.
"""
from __future__ import annotations

import ctypes
import os
import platform

# mallopt parameters, from glibc's malloc.h.
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8
_SETTINGS = ((_M_MMAP_MAX, 0), (_M_ARENA_MAX, 1), (_M_TRIM_THRESHOLD, 2**31 - 1))
_done: bool | None = None


def configure() -> bool:
    """Applies the settings above once per process; returns whether they are in force."""
    global _done
    if _done is not None:
        return _done
    _done = False
    if os.environ.get("SURM_MALLOC", "").lower() == "default":
        return False
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    _done = all(mallopt(param, value) == 1 for param, value in _SETTINGS)
    return _done
