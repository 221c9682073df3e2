"""mdrad_jax: adversarially robust distillation from multiple standard teachers in JAX/Flax."""

__version__ = "0.1.0"
