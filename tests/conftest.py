"""Test-wide JAX settings: compile time dominates on CPU, so most XLA optimisations are off."""

import os

os.environ.setdefault("XLA_FLAGS", "")
import jax  # noqa: E402

jax.config.update("jax_disable_most_optimizations", True)
