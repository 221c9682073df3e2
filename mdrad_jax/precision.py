"""Mixed precision: which parts of a step compute in bfloat16, and checks that the master copy stays float32.

Three independent switches, all float32 by default:

* ``config.teacher_dtype``: the frozen teachers' convolutions/dense layers (their stored variables stay
  float32; Flax casts them per use);
* ``config.model.dtype``: the student's convolutions/dense layers in the attack and in the outer loss;
* ``config.attack.dtype``: the student's forwards/backwards inside the inner maximisation (PGD) only, so the
  most expensive part of a step can run in bfloat16 while the outer loss stays float32 ('' = as the student).

Whatever the compute dtype, the models keep their parameters float32 (``param_dtype``), compute BatchNorm
statistics, global pooling, the classifier and the returned logits/features in float32, and every loss is
computed from float32 logits; gradients, parameters and optimizer state are float32 (``check_master_weights``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

COMPUTE_DTYPES = ("float32", "bfloat16")


def compute_dtype(name, what: str = "dtype") -> jnp.dtype:
  """``'float32'`` / ``'bfloat16'`` (or a dtype) -> ``jnp.dtype``; anything else is a one-line error."""
  try:
    dt = jnp.dtype(name)
  except TypeError:
    dt = None
  if dt is None or dt.name not in COMPUTE_DTYPES:
    raise ValueError(f"{what} must be one of {COMPUTE_DTYPES}, got {name!r}")
  return dt


def check_config(config) -> None:
  """Validates the dtype fields of a run's config (model.dtype, teacher_dtype, attack.dtype)."""
  compute_dtype(config.model.dtype, "config.model.dtype")
  compute_dtype(config.teacher_dtype, "config.teacher_dtype")
  attack_dtype = config.attack.dtype
  if attack_dtype:
    compute_dtype(attack_dtype, "config.attack.dtype")


def with_dtype(module, name):
  """A copy of a Flax model computing in dtype ``name`` (same parameters and variable structure)."""
  dt = compute_dtype(name)
  if not hasattr(module, "dtype"):
    raise ValueError(f"model {type(module).__name__} has no compute dtype to change")
  return module.clone(dtype=dt)


def floating_dtypes(tree) -> set[str]:
  return {
    np.dtype(x.dtype).name
    for x in jax.tree.leaves(tree)
    if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.floating)
  }


def check_master_weights(state) -> None:
  """Raises if the parameters or the optimizer state of a ``TrainState`` are not all float32."""
  for what, tree in (("parameters", state.params), ("optimizer state", state.opt_state)):
    bad = floating_dtypes(tree) - {"float32"}
    if bad:
      raise ValueError(f"{what} must be float32 (master copy), found {sorted(bad)}")
