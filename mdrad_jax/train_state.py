"""The train state: one pytree holding everything a run needs to resume.

``params`` and ``batch_stats`` are dicts with a ``'model'`` entry (the network being trained) and a
``'projectors'`` entry (feature projectors of feature-distillation methods, one per teacher; empty otherwise).
The optimizer updates both; ``model_variables`` returns the network alone, which is what evaluation and later
distillation runs load.  ``method_state`` holds a method's adaptive quantities as arrays (MTARD's weights, B-MTARD's
temperatures...), so they are compiled, sharded and checkpointed with the rest.  ``rng`` is the raw data of a
typed key (``jax.random.key_data``, uint32 [2]) so that checkpoints hold a plain array; the step rewraps it
(``jax.random.wrap_key_data``).
"""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  method_state: Any
  rng: jax.Array
  tx: optax.GradientTransformation = flax.struct.field(pytree_node=False)

  @classmethod
  def create(cls, *, params, batch_stats, tx, rng, method_state=None):
    return cls(
      step=jnp.zeros((), jnp.int32),
      params=params,
      batch_stats=batch_stats,
      opt_state=tx.init(params),
      method_state={} if method_state is None else method_state,
      rng=rng,
      tx=tx,
    )

  def apply_gradients(self, grads, **changes):
    updates, opt_state = self.tx.update(grads, self.opt_state, self.params)
    params = optax.apply_updates(self.params, updates)
    return self.replace(step=self.step + 1, params=params, opt_state=opt_state, **changes)

  def model_variables(self) -> dict:
    """``{'params', 'batch_stats'}`` of the trained network alone (no projectors)."""
    return model_variables(self.params, self.batch_stats)


def model_variables(params, batch_stats) -> dict:
  variables = {"params": params["model"]}
  if batch_stats.get("model"):
    variables["batch_stats"] = batch_stats["model"]
  return variables


def split_variables(variables: dict):
  """Model variables from ``init`` → (params, batch_stats) entries for the ``'model'`` slot."""
  return variables["params"], variables.get("batch_stats", {})
