"""L∞ PGD built from small pure parts, used by training (inner maximisation) and evaluation.

An attack is composed of

* an **objective** ``objective(x_adv, aux) -> (per_sample_loss [N], new_aux)`` that is MAXIMISED (PGD ascends
  the gradient of ``sum_i loss_i`` w.r.t. ``x_adv``); ``aux`` threads state through the steps, e.g. the
  student's BatchNorm statistics when the attack runs in train mode and updates them (ARD / IAD), or ``None``;
* a **random start** (:func:`random_start`): ``'uniform'`` x + U(−ε, ε) (ARD, IAD, PGD-20 evaluation),
  ``'normal'`` x + σ·N(0, I) with σ = 0.001 (TRADES / RSLAD / AdaAD / MTARD), or ``'none'``;
* a **step** (:func:`pgd_step`): x' ← Π(x' + α·sign(∇_{x'} Σ_i loss_i)), with the projection
  Π(v) = clip(clip(v, x − ε, x + ε), clip_min, clip_max) (:func:`project_linf`).

:func:`pgd_linf` runs the start and ``num_steps`` steps and returns ``stop_gradient(x_adv)``.  The objective
constructors below all take a ``logits_fn(x, aux) -> (logits [N, C], aux)`` and are written with the per-sample
losses of ``mdrad_jax.losses`` (cross-entropy, KL, CW margin); whether the network runs with running or batch
statistics during the attack is decided by that function, not here.  :func:`project_linf` is the ε-ball
projection of every attack, AutoAttack's included.

Images are NHWC float32 in [clip_min, clip_max] (default [0, 1]); ε and step sizes are in that pixel scale.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp

from mdrad_jax import losses

Objective = Callable[[jax.Array, Any], tuple[jax.Array, Any]]
LogitsFn = Callable[[jax.Array, Any], tuple[jax.Array, Any]]

INITS = ("uniform", "normal", "none")


# ---------------------------------------------------------------------------------------------
# Parts: start, projection, one step.
# ---------------------------------------------------------------------------------------------
def project_linf(x_adv, x, *, eps, clip_min=0.0, clip_max=1.0):
  """Π(x_adv) = clip(clip(x_adv, x − ε, x + ε), clip_min, clip_max): the ε-ball around x ∩ the image box."""
  x_adv = jnp.clip(x_adv, x - eps, x + eps)
  return jnp.clip(x_adv, clip_min, clip_max)


def random_start(x, key, *, init="uniform", eps, normal_std=0.001, clip_min=0.0, clip_max=1.0, clip: bool = True):
  """Starting point of the attack, projected onto the ε-ball ∩ [clip_min, clip_max] when ``clip``.

  ``clip=False`` keeps the raw start, as the ARD / IAD / RSLAD / MTARD / AdaAD / TRADES training loops do
  (their first gradient is taken there; the first step's projection then brings the iterate back).

  * ``'uniform'``: x + U(−ε, ε) elementwise;
  * ``'normal'``: x + normal_std·N(0, 1) elementwise;
  * ``'none'``: x itself (``key`` may be None).
  """
  if init not in INITS:
    raise ValueError(f"unknown PGD init {init!r}; valid: {INITS}")
  if init == "none":
    x0 = x
  elif key is None:
    raise ValueError(f"PGD init {init!r} needs a PRNG key, got None")
  elif init == "uniform":
    x0 = x + jax.random.uniform(key, x.shape, x.dtype, minval=-eps, maxval=eps)
  else:
    x0 = x + normal_std * jax.random.normal(key, x.shape, x.dtype)
  if not clip:
    return x0
  return project_linf(x0, x, eps=eps, clip_min=clip_min, clip_max=clip_max)


def pgd_step(objective: Objective, x_adv, x, aux=None, *, eps, step_size, clip_min=0.0, clip_max=1.0):
  """One ascent step: x' ← Π(x' + step_size·sign(∇_{x'} Σ_i objective(x', aux)_i)).  Returns (x', new_aux)."""

  def total(xa):
    loss, new_aux = objective(xa, aux)
    return jnp.sum(loss), new_aux

  grad, new_aux = jax.grad(total, has_aux=True)(x_adv)
  x_adv = x_adv + step_size * jnp.sign(grad).astype(x_adv.dtype)
  return project_linf(x_adv, x, eps=eps, clip_min=clip_min, clip_max=clip_max), new_aux


# ---------------------------------------------------------------------------------------------
# The attacks.
# ---------------------------------------------------------------------------------------------
def pgd_linf(
  objective: Objective,
  x,
  key,
  *,
  eps,
  step_size,
  num_steps: int,
  init="uniform",
  normal_std=0.001,
  aux=None,
  unroll: bool = True,
  clip_min=0.0,
  clip_max=1.0,
  clip_start: bool = True,
):
  """L∞ projected gradient ascent on ``objective``; returns ``(stop_gradient(x_adv), aux)``.

  x⁰ = Π(start(x)),  x^{t+1} = Π(x^t + step_size·sign(∇_x Σ_i ℓ_i(x^t))),  t = 0..num_steps−1,
  Π = projection onto {‖x' − x‖∞ ≤ ε} ∩ [clip_min, clip_max]^d.

  Args:
    objective: ``objective(x_adv, aux) -> (per_sample_loss [N], new_aux)``, maximised.
    x: clean images (any shape; NHWC by convention), treated as a constant.
    key: PRNG key for the random start (unused, may be None, with ``init='none'``).
    eps, step_size: ball radius and sign-step size, in pixel units.
    num_steps: number of ascent steps (a Python int); 0 returns the projected start.
    init: ``'uniform'`` | ``'normal'`` | ``'none'`` (see :func:`random_start`).
    normal_std: σ of the ``'normal'`` start.
    aux: initial auxiliary state threaded through the objective calls (e.g. BatchNorm stats), or None.
    unroll: True → the steps are unrolled at trace time (faster on CPU); False → a rolled ``lax.fori_loop``.
    clip_min, clip_max: the valid pixel range.
    clip_start: project the random start before the first step (False: as most official training loops;
      with ``num_steps=0`` the start is projected regardless).
  """
  if int(num_steps) != num_steps or num_steps < 0:
    raise ValueError(f"num_steps must be a non-negative integer, got {num_steps!r}")
  num_steps = int(num_steps)
  x = jax.lax.stop_gradient(x)
  x_adv = random_start(
    x,
    key,
    init=init,
    eps=eps,
    normal_std=normal_std,
    clip_min=clip_min,
    clip_max=clip_max,
    clip=clip_start or num_steps == 0,
  )

  def body(_, carry):
    xa, a = carry
    return pgd_step(objective, xa, x, a, eps=eps, step_size=step_size, clip_min=clip_min, clip_max=clip_max)

  if unroll:
    carry = (x_adv, aux)
    for i in range(num_steps):
      carry = body(i, carry)
    x_adv, aux = carry
  elif num_steps > 0:
    x_adv, aux = jax.lax.fori_loop(0, num_steps, body, (x_adv, aux))
  return jax.lax.stop_gradient(x_adv), aux


def fgsm(
  objective: Objective, x, key=None, *, eps, init="none", normal_std=0.001, aux=None, clip_min=0.0, clip_max=1.0
):
  """FGSM: one sign step of size ε, x' = Π(x⁰ + ε·sign(∇ Σ_i ℓ_i(x⁰))); no random start by default.

  (IAD's evaluation uses ``init='uniform'``; advertorch / most papers use none.)
  """
  return pgd_linf(
    objective,
    x,
    key,
    eps=eps,
    step_size=eps,
    num_steps=1,
    init=init,
    normal_std=normal_std,
    aux=aux,
    unroll=True,
    clip_min=clip_min,
    clip_max=clip_max,
  )


# ---------------------------------------------------------------------------------------------
# Objectives.  Each returns objective(x_adv, aux) -> (per-sample loss [N], aux).
# ---------------------------------------------------------------------------------------------
def ce_objective(logits_fn: LogitsFn, labels) -> Objective:
  """ℓ_i = CE(z(x'_i), y_i) = −log softmax(z(x'_i))_{y_i}  (PGD-AT, ARD, IAD, MTARD, PGD-20 evaluation)."""

  def objective(x_adv, aux):
    logits, aux = logits_fn(x_adv, aux)
    return losses.cross_entropy(logits, labels, reduction="none"), aux

  return objective


def kl_objective(logits_fn: LogitsFn, target_probs, *, temperature=1.0) -> Objective:
  """ℓ_i = KL(p_i ‖ softmax(z(x'_i)/τ)) = Σ_c p_ic (log p_ic − log q_ic), target p constant.

  Summed over the batch by PGD, this is RSLAD's inner loss (``KLDivLoss(reduction='none')`` then ``sum``;
  p = softmax(T(x)), τ = 1).  Terms with p_ic = 0 contribute 0.
  """
  p = jax.lax.stop_gradient(target_probs)

  def objective(x_adv, aux):
    logits, aux = logits_fn(x_adv, aux)
    log_q = jax.nn.log_softmax(logits.astype(jnp.float32) / temperature, axis=-1)
    return losses.kl_div(p, log_q, reduction="none"), aux

  return objective


def adaad_objective(student_logits_fn: LogitsFn, teacher_logits_fns, weights=None) -> Objective:
  """AdaAD inner objective: ℓ_i = Σ_k w_ki·KL(softmax(T_k(x'_i)) ‖ softmax(S(x'_i))).

  The gradient w.r.t. x' flows through BOTH the teachers and the student (the teachers are re-evaluated on
  every iterate, as in the official ``adaad_inner_loss``).

  Args:
    student_logits_fn: ``(x, aux) -> (logits [N, C], aux)``.
    teacher_logits_fns: a callable ``x -> logits`` returning [N, C] or stacked [K, N, C], or a sequence of
      K callables ``x -> [N, C]``.
    weights: optional constant per-sample teacher weights [K, N]; default 1/K for every teacher (so a single
      teacher gives the plain KL).
  """
  fns = tuple(teacher_logits_fns) if isinstance(teacher_logits_fns, Sequence) else (teacher_logits_fns,)
  if not fns or not all(callable(f) for f in fns):
    raise ValueError("teacher_logits_fns must be a callable or a non-empty sequence of callables")
  w_const = None if weights is None else jax.lax.stop_gradient(jnp.asarray(weights, jnp.float32))

  def objective(x_adv, aux):
    s_logits, aux = student_logits_fn(x_adv, aux)
    t = [jnp.asarray(f(x_adv), jnp.float32) for f in fns]
    t = jnp.stack(t) if t[0].ndim == 2 else jnp.concatenate(t)
    if t.ndim != 3 or t.shape[1:] != s_logits.shape:
      raise ValueError(
        f"teacher logits {t.shape} do not match student logits {s_logits.shape} "
        "(expected [N, C] per teacher or [K, N, C])"
      )
    k = t.shape[0]
    w = jnp.full(t.shape[:2], 1.0 / k, jnp.float32) if w_const is None else w_const
    if w.shape != t.shape[:2]:
      raise ValueError(f"weights must have shape [K, N] = {t.shape[:2]}, got {w.shape}")
    log_q = jax.nn.log_softmax(s_logits.astype(jnp.float32), axis=-1)
    kl = losses.kl_from_log_probs(jax.nn.log_softmax(t, axis=-1), log_q[None], reduction="none")  # [K, N]
    return jnp.sum(w * kl, axis=0), aux

  return objective


def trades_objective(logits_fn: LogitsFn, clean_logits) -> Objective:
  """TRADES inner objective: ℓ_i = KL(softmax(S(x_i)) ‖ softmax(S(x'_i))), with S(x) a constant."""
  log_p = jax.nn.log_softmax(jax.lax.stop_gradient(clean_logits).astype(jnp.float32), axis=-1)

  def objective(x_adv, aux):
    logits, aux = logits_fn(x_adv, aux)
    log_q = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return losses.kl_from_log_probs(log_p, log_q, reduction="none"), aux

  return objective


def cw_objective(logits_fn: LogitsFn, labels, *, kappa=50.0) -> Objective:
  """CW∞ margin objective (IAD's ``cwloss``): ℓ_i = −max(z_{y_i} − max_{j≠y_i} z_j + κ, 0)."""

  def objective(x_adv, aux):
    logits, aux = logits_fn(x_adv, aux)
    return -jnp.maximum(losses.cw_margin(logits, labels) + kappa, 0.0), aux

  return objective
