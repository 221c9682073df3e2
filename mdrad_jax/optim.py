"""Optimisers and learning-rate schedules (optax), as the adversarial-distillation papers use them.

Every official code base in this family uses SGD with momentum and *coupled* weight decay (PyTorch's
``weight_decay`` adds ``wd * w`` to the gradient before momentum), applied to every parameter, BatchNorm's
scale and bias included.  ``create_optimizer`` reproduces that with ``optax.add_decayed_weights`` before
``optax.sgd``.

Schedules are given in epochs in the config and converted to steps here:

* ``piecewise``: ``lr * factor**k`` after the k-th boundary (e.g. 0.1 → 0.01 at 100 → 0.001 at 150).
* ``ard_faithful``: the schedule the ARD and IAD code actually run: their ``adjust_learning_rate`` multiplies a
  fresh copy of the base lr at every boundary, so the lr is ``lr * factor`` after the first boundary and stays
  there (0.1 → 0.01 at 100 → 0.01 at 150; it never reaches 0.001).
* ``cosine``: cosine decay from ``lr`` to 0 over the run, with an optional linear warm-up.
* ``constant``.
"""

from __future__ import annotations

from collections.abc import Sequence

import optax

SCHEDULES = ("piecewise", "ard_faithful", "cosine", "constant")


def learning_rate_schedule(
  *,
  name: str,
  base_lr: float,
  steps_per_epoch: int,
  num_epochs: int,
  boundaries: Sequence[float] = (),
  factor: float = 0.1,
  warmup_epochs: float = 0.0,
) -> optax.Schedule:
  """Builds the learning-rate schedule; boundaries and warm-up are in epochs (may be fractional)."""
  if steps_per_epoch <= 0:
    raise ValueError(f"steps_per_epoch must be positive, got {steps_per_epoch}")
  total = max(1, int(round(num_epochs * steps_per_epoch)))
  warmup = int(round(warmup_epochs * steps_per_epoch))
  bounds = sorted(int(round(b * steps_per_epoch)) for b in boundaries)
  if name == "constant":
    sched = optax.constant_schedule(base_lr)
  elif name == "piecewise":
    sched = optax.piecewise_constant_schedule(base_lr, {b: factor for b in bounds})
  elif name == "ard_faithful":
    sched = optax.piecewise_constant_schedule(base_lr, {b: factor for b in bounds[:1]})
  elif name == "cosine":
    sched = optax.cosine_decay_schedule(base_lr, decay_steps=max(1, total - warmup))
  else:
    raise ValueError(f"optim.schedule must be one of {SCHEDULES}, got {name!r}")
  if warmup > 0:
    sched = optax.join_schedules([optax.linear_schedule(0.0, base_lr, warmup), sched], [warmup])
  return sched


def create_optimizer(optim_config, *, steps_per_epoch: int, num_epochs: int):
  """Returns ``(optax.GradientTransformation, schedule)`` from an ``optim`` config block.

  Fields: ``name`` ('sgd' | 'adam'), ``lr``, ``momentum``, ``nesterov``, ``weight_decay``, ``schedule``,
  ``boundaries`` (epochs), ``factor``, ``warmup_epochs``, ``grad_clip_norm`` (0 = off).
  """
  sched = learning_rate_schedule(
    name=optim_config.schedule,
    base_lr=optim_config.lr,
    steps_per_epoch=steps_per_epoch,
    num_epochs=num_epochs,
    boundaries=tuple(optim_config.boundaries),
    factor=optim_config.factor,
    warmup_epochs=optim_config.warmup_epochs,
  )
  parts = []
  if optim_config.grad_clip_norm:
    parts.append(optax.clip_by_global_norm(optim_config.grad_clip_norm))
  if optim_config.weight_decay:
    parts.append(optax.add_decayed_weights(optim_config.weight_decay))
  if optim_config.name == "sgd":
    parts.append(optax.sgd(sched, momentum=optim_config.momentum or None, nesterov=bool(optim_config.nesterov)))
  elif optim_config.name == "adam":
    parts.append(optax.adam(sched))
  else:
    raise ValueError(f"optim.name must be 'sgd' or 'adam', got {optim_config.name!r}")
  return optax.chain(*parts), sched
