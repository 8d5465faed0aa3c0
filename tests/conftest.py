"""Shared pytest setup: JAX on the CPU, 64-bit off, deterministic host behaviour, and
compilation made cheap.

The tests compile far more than they compute (tiny models, a few steps each), so

- XLA's backend optimisation is off (``--xla_backend_optimization_level=0``) unless
  ``XLA_FLAGS`` is set: the programs compute the same values (to float rounding; the tests'
  tolerances are for float32), compiled in about half the time;
- one persistent compilation cache serves the session: the xdist workers and the training
  subprocesses the tests start (they inherit the environment) load a program another compiled
  (the same tiny model trained by a reference run, a killed run and its resume; the same
  eager op in two workers) instead of compiling it again. A cached executable is the compiled
  program itself.
"""
import atexit
import os
import shutil
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("XLA_FLAGS", "--xla_backend_optimization_level=0")

if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _cache = tempfile.mkdtemp(prefix="surm-tests-jax-cache-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)
