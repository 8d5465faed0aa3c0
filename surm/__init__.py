"""surm: Structured Unrestricted-Rank Matrices for parameter-efficient fine-tuning in JAX/Flax."""

__version__ = "0.1.0"
