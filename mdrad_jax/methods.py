"""Training methods: each one is an inner-attack objective plus an outer loss, both pure.

``Method`` declares what the shared train step (``mdrad_jax.train_step``) must compute for it (which teacher
and student views, features, the attack's default random start and BatchNorm mode) and supplies two pure
functions:

* ``make_objective(student_logits, teacher_logits, x, labels, teacher_clean, hparams)`` returns the
  per-sample objective ``objective(x_adv, aux) -> (loss [N], aux)`` that PGD maximises;
* ``loss(outputs, method_state, hparams) -> (scalar, metrics)`` is the outer loss on ``StepOutputs``;
* ``init_state(hparams)`` / ``update_state(method_state, metrics, hparams)`` keep adaptive quantities
  (MTARD's weights...) as arrays in the train state.

``hparams`` is the config's ``method`` block as a dict; every method documents the fields it reads.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from mdrad_jax import attacks


def _no_state(hparams):
  return {}


def _keep_state(state, metrics, hparams):
  return state


@dataclasses.dataclass(frozen=True)
class Method:
  name: str
  loss: Callable[..., tuple[jax.Array, dict]]
  defaults: dict = dataclasses.field(default_factory=dict)  # hyper-parameters and their defaults
  make_objective: Callable[..., Callable] | None = None
  attack_init: str = "uniform"
  attack_bn: str = "eval"
  teacher_views: tuple[str, ...] = ()      # subset of ('clean', 'adv')
  teacher_features: bool = False           # teacher feature maps on the clean batch
  student_views: tuple[str, ...] = ("adv",)  # student train-mode forwards in the outer loss, in order
  student_features: bool = False           # projected student features (one projector per teacher)
  feature_view: str = "adv"
  min_teachers: int = 0
  max_teachers: int | None = 0
  init_state: Callable[[dict], Any] = _no_state
  update_state: Callable[[Any, dict, dict], Any] = _keep_state

  @property
  def inner(self):
    return "pgd" if self.make_objective is not None else None

  def check_teachers(self, k: int) -> None:
    hi = self.max_teachers
    if k < self.min_teachers or (hi is not None and k > hi):
      want = (f"exactly {hi}" if hi == self.min_teachers else
              f"at least {self.min_teachers}" if hi is None else f"{self.min_teachers}..{hi}")
      raise ValueError(f"method {self.name!r} needs {want} teacher(s) in config.teachers, got {k}")


# ---------------------------------------------------------------------------------------------
# Inner objectives (the attack side).
# ---------------------------------------------------------------------------------------------
def ce_inner(*, student_logits, labels, **_):
  """Maximise CE(S(x'), y) (PGD-AT, ARD, IAD, MTARD, SA-MDRAD default)."""
  return attacks.ce_objective(student_logits, labels)


METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
  METHODS[method.name] = method
  return method


def get_method(name: str) -> Method:
  if name not in METHODS:
    raise ValueError(f"unknown method {name!r}; known: {sorted(METHODS)}")
  return METHODS[name]


def _ce(logits, labels):
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def _natural_loss(out, state, hp):
  loss = _ce(out.student_clean, out.labels)
  return loss, {"ce": loss}


register(Method(name="natural", loss=_natural_loss, student_views=("clean",)))
