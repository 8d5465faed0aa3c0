"""Shared pytest setup: JAX on the CPU, 64-bit off, deterministic host behaviour."""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
