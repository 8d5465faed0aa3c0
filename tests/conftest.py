"""Shared pytest setup: JAX on the CPU, 64-bit off, deterministic host behaviour, and one
persistent compilation cache for the session.

The cache is shared by the xdist workers and by the training subprocesses the tests start (they
inherit the environment), so a program compiled once (the same tiny model trained by a reference
run, a killed run and its resume) is loaded, not compiled again. A cached executable is the
compiled program itself: results are unchanged.
"""
import atexit
import os
import shutil
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _cache = tempfile.mkdtemp(prefix="surm-tests-jax-cache-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)
