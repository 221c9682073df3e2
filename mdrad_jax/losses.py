"""Distillation and adversarial-training losses: building blocks and one outer loss per method.

This module is the one home of the per-sample losses: cross-entropy, KL (``reduction='none'``) and the CW
margin, on which the attack objectives (``mdrad_jax.attacks``) and AutoAttack (``mdrad_jax.autoattack``) build.
Everything here is a pure, jit-able function of arrays.  Conventions:

* logits are ``[N, C]``; stacked teacher logits are ``[K, N, C]``; labels are int ``[N]``;
* KL(P‖Q) = Σ_c P_c (log P_c − log Q_c) with the TEACHER / target distribution first (PyTorch's
  ``KLDivLoss(log_softmax(student), softmax(teacher))``);
* KL reductions (they change the effective learning rate, so every method states its own):

  ===============  ====================================================================================
  ``'batchmean'``  Σ_{i,c} / N      (AdaAD CIFAR-100, IAD-I/II, TRADES, CA-MKD, SA-MDRAD)
  ``'elem_mean'``  Σ_{i,c} / (N·C)  (PyTorch ``KLDivLoss()`` default: ARD, AdaAD CIFAR-10, RSLAD, MTARD)
  ``'sum'``        Σ_{i,c}
  ``'none'``       per-sample Σ_c, shape [N]
  ===============  ====================================================================================

  RSLAD / MTARD additionally multiply their KL terms by 10 on CIFAR-100 (``kl_scale=10``) and use the
  pointwise form −p·log q + p·log(p + 1e-5) (``rslad_eps=True``), which only changes the constant entropy term.
* Method losses take keyword arguments only and return ``(scalar_loss, metrics)`` where ``metrics`` maps each
  term's name to a 0-d float32 array.  Teacher logits/features are treated as constants (``stop_gradient``).
* The un-attacked input x is the ``clean`` view (``student_clean_logits``, ``teacher_clean_logits``, metrics
  ``kl_clean``, ``ce_clean``); the ``*_nat_*`` keyword names of earlier releases still work, with a
  ``DeprecationWarning`` (:data:`RENAMED_KEYWORDS`).
"""

from __future__ import annotations

import functools
import inspect
import warnings
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp

REDUCTIONS = ("batchmean", "elem_mean", "sum", "none")
CE_REDUCTIONS = ("mean", "sum", "none")
RECTIFIERS = ("none", "swap", "adr", "dynamic")
DYNAMIC_TARGETS = ("student", "label")
FUSIONS = ("uniform", "camkd", "ptrue", "entropy")
RSLAD_LOG_EPS = 1e-5

sg = jax.lax.stop_gradient

# Keyword names of earlier releases (``nat`` for the clean, un-attacked view), accepted until the next release.
RENAMED_KEYWORDS = {
  "student_nat_logits": "student_clean_logits",
  "teacher_nat_logits": "teacher_clean_logits",
  "loss_nat": "loss_clean",
  "entropy_nat": "entropy_clean",
}


def _accepts_old_keywords(fn):
  """Lets ``fn`` be called with the :data:`RENAMED_KEYWORDS` names it has today's names of, with a
  ``DeprecationWarning``; passing both spellings of one argument is a ``TypeError``."""
  params = inspect.signature(fn).parameters
  renamed = {old: new for old, new in RENAMED_KEYWORDS.items() if new in params}

  @functools.wraps(fn)
  def wrapper(*args, **kwargs):
    for old in renamed.keys() & kwargs.keys():
      new = renamed[old]
      if new in kwargs:
        raise TypeError(f"{fn.__name__}() got both {old!r} and its new name {new!r}")
      warnings.warn(f"{fn.__name__}(): keyword {old!r} is deprecated, use {new!r}", DeprecationWarning, stacklevel=2)
      kwargs[new] = kwargs.pop(old)
    return fn(*args, **kwargs)

  return wrapper


# ---------------------------------------------------------------------------------------------
# Input checks.
# ---------------------------------------------------------------------------------------------
def _check_choice(what: str, value, choices) -> None:
  if value not in choices:
    raise ValueError(f"unknown {what} {value!r}; valid: {choices}")


def _f32(x):
  return jnp.asarray(x, jnp.float32)


def _check_logits(name: str, z, ndim: int = 2) -> None:
  if z.ndim != ndim:
    raise ValueError(f"{name} must have {ndim} dims ({'[N, C]' if ndim == 2 else '[K, N, C]'}), got shape {z.shape}")


def _check_same(name_a: str, a, name_b: str, b) -> None:
  if a.shape != b.shape:
    raise ValueError(f"{name_a} {a.shape} and {name_b} {b.shape} must have the same shape")


def _check_labels(labels, n: int) -> None:
  if labels.shape != (n,):
    raise ValueError(f"labels must have shape [N] = ({n},), got {labels.shape}")


def _stack_teachers(name: str, z):
  """[N, C] or [K, N, C] → [K, N, C] float32."""
  z = _f32(z)
  if z.ndim == 2:
    return z[None]
  _check_logits(name, z, 3)
  return z


def _single_teacher(name: str, z):
  """[N, C] or [1, N, C] → [N, C] float32 (methods defined for one teacher)."""
  z = _f32(z)
  if z.ndim == 3 and z.shape[0] == 1:
    return z[0]
  if z.ndim != 2:
    raise ValueError(f"{name} must be [N, C] (or [1, N, C]) for this single-teacher method, got {z.shape}")
  return z


def _is_static(value, target: float) -> bool:
  """True iff ``value`` is a Python number equal to ``target`` (traced values are never 'static')."""
  return isinstance(value, (int, float)) and float(value) == target


# ---------------------------------------------------------------------------------------------
# KL divergence, cross-entropy and the CW margin (also the per-sample losses of attacks.py and autoattack.py).
# ---------------------------------------------------------------------------------------------
def reduce_per_sample(per_sample, *, num_classes: int, reduction: str):
  """Applies a KL reduction to per-sample values v_i (already summed over classes).

  'none' → v;  'sum' → Σ_i v_i;  'batchmean' → Σ_i v_i / N;  'elem_mean' → Σ_i v_i / (N·C).
  """
  _check_choice("KL reduction", reduction, REDUCTIONS)
  if reduction == "none":
    return per_sample
  total = jnp.sum(per_sample)
  if reduction == "sum":
    return total
  n = per_sample.shape[0]
  return total / n if reduction == "batchmean" else total / (n * num_classes)


def kl_div(target_probs, student_log_probs, *, reduction: str = "batchmean", rslad_eps: bool = False):
  """KL(P‖Q) from target probabilities P [N, C] and student log-probabilities log Q [N, C].

  Pointwise term: P·(log P − log Q) (0·log 0 = 0), or with ``rslad_eps`` RSLAD/MTARD's
  −P·log Q + P·log(P + 1e-5).  Summed over classes, then reduced per ``reduction`` (see module docstring).
  """
  _check_choice("KL reduction", reduction, REDUCTIONS)
  p, log_q = _f32(target_probs), _f32(student_log_probs)
  _check_same("target_probs", p, "student_log_probs", log_q)
  if rslad_eps:
    pointwise = -p * log_q + p * jnp.log(p + RSLAD_LOG_EPS)
  else:
    pointwise = jax.scipy.special.xlogy(p, p) - p * log_q
  return reduce_per_sample(jnp.sum(pointwise, axis=-1), num_classes=p.shape[-1], reduction=reduction)


def kl_from_logits(
  teacher_logits,
  student_logits,
  *,
  temperature=1.0,
  student_temperature=None,
  reduction: str = "batchmean",
  rslad_eps: bool = False,
):
  """KL(softmax(t/τ) ‖ softmax(s/τ_s)) with τ_s = τ unless ``student_temperature`` is given.

  No τ² factor here (methods apply their own).  Gradients flow into both arguments; callers
  ``stop_gradient`` the teacher side.  With ``rslad_eps`` the pointwise term is −p·log q + p·log(p + 1e-5).
  """
  _check_choice("KL reduction", reduction, REDUCTIONS)
  t, s = _f32(teacher_logits), _f32(student_logits)
  _check_same("teacher_logits", t, "student_logits", s)
  tau_s = temperature if student_temperature is None else student_temperature
  log_p = jax.nn.log_softmax(t / temperature, axis=-1)
  log_q = jax.nn.log_softmax(s / tau_s, axis=-1)
  if not rslad_eps:
    return kl_from_log_probs(log_p, log_q, reduction=reduction)
  p = jnp.exp(log_p)
  pointwise = -p * log_q + p * jnp.log(p + RSLAD_LOG_EPS)
  return reduce_per_sample(jnp.sum(pointwise, axis=-1), num_classes=t.shape[-1], reduction=reduction)


def kl_from_log_probs(target_log_probs, student_log_probs, *, reduction: str = "batchmean"):
  """KL(P‖Q) = Σ_c P_c (log P_c − log Q_c) from log-probabilities, with P = exp(log P).

  The rows are the last axis; ``student_log_probs`` broadcasts against ``target_log_probs`` (e.g. one student
  [N, C] against K teachers [K, N, C], giving [K, N] with ``reduction='none'``).  Reduced as in
  :func:`reduce_per_sample` over the leading axis otherwise.
  """
  _check_choice("KL reduction", reduction, REDUCTIONS)
  log_p, log_q = _f32(target_log_probs), _f32(student_log_probs)
  p = jnp.exp(log_p)
  return reduce_per_sample(jnp.sum(p * (log_p - log_q), axis=-1), num_classes=log_p.shape[-1], reduction=reduction)


def cross_entropy(logits, labels, *, reduction: str = "mean"):
  """CE(z, y) = −log softmax(z)_y per sample; 'mean' (default), 'sum' or 'none' ([N])."""
  _check_choice("cross-entropy reduction", reduction, CE_REDUCTIONS)
  z = _f32(logits)
  _check_logits("logits", z)
  _check_labels(labels, z.shape[0])
  logp = jax.nn.log_softmax(z, axis=-1)
  ce = -jnp.take_along_axis(logp, labels[:, None].astype(jnp.int32), axis=-1)[:, 0]
  if reduction == "none":
    return ce
  return jnp.sum(ce) if reduction == "sum" else jnp.mean(ce)


def cw_margin(logits, labels):
  """Carlini-Wagner margin per sample, z_y − max_{j≠y} z_j, shape [N] (negative once the point is misclassified).

  The CW∞ attack objective is −max(margin + κ, 0); AutoAttack's Square attack minimises the margin itself.
  """
  z = _f32(logits)
  _check_logits("logits", z)
  _check_labels(labels, z.shape[0])
  y = labels.astype(jnp.int32)
  z_y = jnp.take_along_axis(z, y[:, None], axis=-1)[:, 0]
  others = jnp.where(jax.nn.one_hot(y, z.shape[-1], dtype=bool), -jnp.inf, z)
  return z_y - jnp.max(others, axis=-1)


def _neg_entropy_rslad(probs):
  """mean_{i,c} p·log(p + 1e-5): B-MTARD's (negative) teacher entropy, averaged over all N·C entries."""
  return jnp.mean(probs * jnp.log(probs + RSLAD_LOG_EPS))


# ---------------------------------------------------------------------------------------------
# Rectifiers: repair the teacher's prediction where it is wrong.
# ---------------------------------------------------------------------------------------------
def rectify_swap(logits, labels):
  """Max/ground-truth swap: where argmax_c z_c = j ≠ y, exchange z_j and z_y; otherwise unchanged.

  ``logits`` is [N, C] or [K, N, C] (labels [N] broadcast over teachers).  Values are moved exactly, so after
  the swap the true class holds the maximum and every other entry is untouched.
  """
  z = jnp.asarray(logits)
  num_classes = z.shape[-1]
  _check_labels(labels, z.shape[-2])
  m = jnp.argmax(z, axis=-1)  # [..., N]
  y = jnp.broadcast_to(labels.astype(jnp.int32), m.shape)
  oh_m = jax.nn.one_hot(m, num_classes, dtype=bool)
  oh_y = jax.nn.one_hot(y, num_classes, dtype=bool)
  z_m = jnp.max(z, axis=-1, keepdims=True)
  z_y = jnp.take_along_axis(z, y[..., None], axis=-1)
  wrong = (m != y)[..., None]
  swapped = jnp.where(oh_m, z_y, jnp.where(oh_y, z_m, z))
  return jnp.where(wrong, swapped, z)


def rectify_adr(probs, labels, lam):
  """ADR interpolation: λ_i = clip(λ − (max_c p_ic − p_iy), 0, 1);  p̃_i = λ_i·p_i + (1 − λ_i)·onehot(y_i).

  ``probs`` is [N, C] or [K, N, C]; ``lam`` a scalar (may be an annealed array).
  """
  p = _f32(probs)
  _check_labels(labels, p.shape[-2])
  y = jnp.broadcast_to(labels.astype(jnp.int32), p.shape[:-1])
  onehot = jax.nn.one_hot(y, p.shape[-1], dtype=p.dtype)
  p_y = jnp.sum(p * onehot, axis=-1, keepdims=True)
  lam_i = jnp.clip(lam - (jnp.max(p, axis=-1, keepdims=True) - p_y), 0.0, 1.0)
  return lam_i * p + (1.0 - lam_i) * onehot


def rectify_none(logits, labels):
  """Identity rectifier (returns ``logits`` unchanged)."""
  del labels
  return logits


# What each rectifier does to the logits before the softmax (ADR then works on the probabilities).
_LOGIT_RECTIFIERS = {"none": rectify_none, "swap": rectify_swap, "adr": rectify_none, "dynamic": rectify_swap}


def dynamic_trust(student_adv_logits, labels, *, beta=1.0):
  """Per-sample trust in the teachers, λ_i = (1 − P_S(y_i | x'_i))^β, from the student's current adversarial
  prediction at τ = 1 (stop-gradient), shape [N].  A sample the student already classifies robustly and
  confidently gets λ → 0 (the teachers' guidance is trusted less); one it fails on gets λ → 1."""
  s = sg(_f32(student_adv_logits))
  _check_logits("student_adv_logits", s)
  _check_labels(labels, s.shape[0])
  p_y = jnp.take_along_axis(jax.nn.softmax(s, axis=-1), labels.astype(jnp.int32)[:, None], axis=-1)[:, 0]
  return sg(jnp.power(jnp.clip(1.0 - p_y, 0.0, 1.0), beta))


def rectify_dynamic(
  p_hat, student_adv_logits, labels, *, student_clean_logits=None, target="student", temperature=1.0, beta=1.0
):
  """Dynamic rectification (INFERRED): p̃_i = λ_i·p̂_i + (1 − λ_i)·q_i with λ_i = :func:`dynamic_trust`.

  ``p_hat`` [N, C] is the fused (swap-rectified) teacher target; the fallback q_i is the student's own clean
  prediction softmax(S(x_i)/τ) (``target='student'``, stop-gradient: the introspection of IAD) or the
  one-hot label (``target='label'``).  The rectification follows the student as it trains: the more robust
  the student is on a sample, the less that sample's target comes from the standard teachers.  Returns
  ``(p̃ [N, C], λ [N])``, both stop-gradient.
  """
  _check_choice("dynamic_target", target, DYNAMIC_TARGETS)
  p = sg(_f32(p_hat))
  lam = dynamic_trust(student_adv_logits, labels, beta=beta)
  if target == "student":
    if student_clean_logits is None:
      raise ValueError("rectify_dynamic: target='student' needs student_clean_logits")
    q = sg(jax.nn.softmax(_f32(student_clean_logits) / temperature, axis=-1))
  else:
    q = jax.nn.one_hot(labels, p.shape[-1], dtype=p.dtype)
  _check_same("fallback target", q, "p_hat", p)
  return sg(lam[:, None] * p + (1.0 - lam[:, None]) * q), lam


def rectify(kind: str, teacher_logits, labels, *, temperature=1.0, adr_lambda=0.9):
  """Rectified, tempered teacher probabilities (stop-gradient), [N, C] or [K, N, C] like the input.

  * ``'none'``: softmax(z/τ);
  * ``'swap'``: softmax(rectify_swap(z, y)/τ);
  * ``'adr'``:  rectify_adr(softmax(z/τ), y, adr_lambda);
  * ``'dynamic'``: the teacher part of the dynamic rectifier, i.e. ``'swap'``; the student-dependent mixing
    of :func:`rectify_dynamic` is applied to the fused target by :func:`sa_mdrad_loss`, which has the
    student's outputs.
  """
  _check_choice("rectifier", kind, RECTIFIERS)
  z = _LOGIT_RECTIFIERS[kind](sg(_f32(teacher_logits)), labels)
  p = jax.nn.softmax(z / temperature, axis=-1)
  if kind == "adr":
    p = rectify_adr(p, labels, adr_lambda)
  return sg(p)


# ---------------------------------------------------------------------------------------------
# Fusion of K teachers: per-sample weights from the teachers' (unrectified) predictions.
# ---------------------------------------------------------------------------------------------
def fusion_weights(kind: str, teacher_logits, labels):
  """Per-sample teacher weights w [K, N] (stop-gradient; w ≥ 0 and Σ_k w_ki = 1), from τ = 1 predictions.

  * ``'uniform'``: w_ki = 1/K;
  * ``'camkd'`` (CA-MKD): w_ki = (1 − softmax_k(CE(z_ki, y_i))) / (K − 1); K = 1 → 1;
  * ``'ptrue'``: w_ki = p_ki(y_i) / Σ_j p_ji(y_i) (computed as softmax_k of log p_ki(y_i));
  * ``'entropy'`` (EBKD): w_ki = (1 − H_ki / Σ_j H_ji) / (K − 1), H = −Σ_c p log p; K = 1 → 1; uniform where
    every teacher is one-hot (Σ_j H_ji = 0).  EBKD's raw weights sum to K − 1; dividing by K − 1 makes them sum
    to 1.
  """
  _check_choice("fusion", kind, FUSIONS)
  z = sg(_stack_teachers("teacher_logits", teacher_logits))
  k, n, _ = z.shape
  _check_labels(labels, n)
  if kind == "uniform" or (k == 1 and kind != "ptrue"):
    return jnp.full((k, n), 1.0 / k, jnp.float32)
  logp = jax.nn.log_softmax(z, axis=-1)
  y = jnp.broadcast_to(labels.astype(jnp.int32)[None, :, None], (k, n, 1))
  logp_y = jnp.take_along_axis(logp, y, axis=-1)[..., 0]  # [K, N]
  if kind == "camkd":
    w = (1.0 - jax.nn.softmax(-logp_y, axis=0)) / (k - 1)
  elif kind == "ptrue":
    w = jax.nn.softmax(logp_y, axis=0)
  else:
    ent = -jnp.sum(jnp.exp(logp) * logp, axis=-1)  # [K, N]
    total = jnp.sum(ent, axis=0, keepdims=True)
    safe = jnp.where(total > 0, total, 1.0)
    w = jnp.where(total > 0, (1.0 - ent / safe) / (k - 1), 1.0 / k)
  return sg(w)


def fused_soft_target(teacher_logits, labels, *, rectifier="swap", fusion="camkd", temperature=4.0, adr_lambda=0.9):
  """SA-MDRAD target: p̂_i = Σ_k w_ki·p̃_ki, with p̃ = rectify(rectifier, z, y, τ) and w = fusion_weights(z).

  Fusion weights are computed from the UNRECTIFIED logits, so a teacher that had to be rectified is
  down-weighted.  Returns ``(p_hat [N, C], weights [K, N])``, both stop-gradient.
  """
  z = _stack_teachers("teacher_logits", teacher_logits)
  w = fusion_weights(fusion, z, labels)
  p = rectify(rectifier, z, labels, temperature=temperature, adr_lambda=adr_lambda)
  return sg(jnp.sum(w[..., None] * p, axis=0)), w


# ---------------------------------------------------------------------------------------------
# Feature regression.
# ---------------------------------------------------------------------------------------------
def feature_mse(projected, teacher_feat):
  """Per-sample MSE between projected student and teacher feature maps: mean_{h,w,c}(P − F)², shape [N]."""
  a, b = _f32(projected), _f32(teacher_feat)
  _check_same("projected features", a, "teacher features", b)
  if a.ndim < 2:
    raise ValueError(f"features must be [N, ...], got shape {a.shape}")
  return jnp.mean(jnp.square(a - sg(b)).reshape(a.shape[0], -1), axis=-1)


def weighted_feature_loss(projected: Sequence, teacher_feats: Sequence, weights=None):
  """L_feat = Σ_k (1/N) Σ_i w_ki·mean_{hwc}(P_k(f_S)_i − f_{T_k,i})²  (SA-MDRAD §1.4 Step E).

  ``projected`` / ``teacher_feats``: K feature maps each (a list, or arrays stacked on a leading K axis;
  teacher k's map may have its own shape).  ``weights`` [K, N], default 1 (plain sum over teachers).
  """
  if len(projected) != len(teacher_feats):
    raise ValueError(f"got {len(projected)} projected feature maps for {len(teacher_feats)} teacher maps")
  if len(projected) == 0:
    raise ValueError("weighted_feature_loss needs at least one (projected, teacher) feature pair")
  total = jnp.zeros((), jnp.float32)
  for k in range(len(projected)):
    mse = feature_mse(projected[k], teacher_feats[k])
    if weights is not None:
      w = sg(_f32(weights))
      if w.shape != (len(projected), mse.shape[0]):
        raise ValueError(f"weights must have shape [K, N] = {(len(projected), mse.shape[0])}, got {w.shape}")
      mse = w[k] * mse
    total = total + jnp.mean(mse)
  return total


# ---------------------------------------------------------------------------------------------
# Method losses.
# ---------------------------------------------------------------------------------------------
def _metrics(**terms):
  return {k: _f32(v) for k, v in terms.items()}


@_accepts_old_keywords
def sa_mdrad_loss(
  *,
  student_adv_logits,
  teacher_clean_logits,
  labels,
  student_clean_logits=None,
  teacher_adv_logits=None,
  projected_features=None,
  teacher_features=None,
  rectifier="dynamic",
  fusion="camkd",
  temperature=4.0,
  alpha=5.0 / 6.0,
  feature_weight=1.0,
  ce_weight=0.0,
  adr_lambda=0.9,
  reduction="batchmean",
  dynamic_target="label",
  dynamic_beta=1.0,
):
  """SA-MDRAD outer loss (multi-teacher, sample-aware rectification, adaptive fusion, logits + features).

  RECONSTRUCTION (INFERRED): the paper's full text and code are unavailable; this implements the configurable
  family of the project spec (§1.4) built from the abstract's vocabulary and confirmed components
  (DR-KD / DGAD swap rectification, ADR interpolation, CA-MKD confidence-aware fusion and feature loss):

    p̂^v_i = Σ_k w^v_ki·p̃^v_ki,  p̃ = rectify(z_k, y)/τ,  w = fusion(z_k, y)       (v = clean, adv view)
    L_adv  = τ²·KL(p̂^{adv} ‖ softmax(S(x')/τ))        (reduced per ``reduction``, default batchmean)
    L_clean  = τ²·KL(p̂^{clean} ‖ softmax(S(x)/τ))
    L_feat = Σ_k (1/N) Σ_i w^{clean}_ki·mean_{hwc}(P_k(f_S(x'))_i − f_{T_k}(x_i))²
    L      = α·L_adv + (1 − α)·L_clean + λ_f·L_feat + λ_ce·CE(S(x'), y)

  With ``rectifier='dynamic'`` (the default) both fused targets (swap-rectified) are then mixed per sample with a
  fallback by :func:`rectify_dynamic`: p̂_i ← λ_i·p̂_i + (1 − λ_i)·q_i, λ_i = (1 − P_S(y_i|x'_i))^β, q_i the
  one-hot label (``dynamic_target='label'``, default) or the student's own clean prediction at τ ('student').
  The defaults are the best member of the family in the Fashion-MNIST study (docs/methods.md §6.3).

  Teacher view: the clean-view targets come from ``teacher_clean_logits`` = T_k(x) [K, N, C]; the adv-view targets
  from ``teacher_adv_logits`` = T_k(x') when given (V-adv), else from T_k(x) too (V-clean, default).

  Args:
    student_adv_logits: S(x') [N, C] (train mode).
    teacher_clean_logits: T_k(x) [K, N, C] (or [N, C] for one teacher).
    labels: y [N].
    student_clean_logits: S(x) [N, C]; required unless α is the Python number 1.
    teacher_adv_logits: optional T_k(x') [K, N, C] (V-adv).
    projected_features / teacher_features: K maps each (P_k(f_S(x')) and f_{T_k}(x)); required unless
      ``feature_weight`` is the Python number 0.
    rectifier: 'dynamic' (default) | 'swap' | 'adr' | 'none'.  fusion: 'camkd' (default) | 'ptrue' | 'entropy' | 'uniform'.
    temperature: τ (default 4).  alpha: α (default 5/6; may be an array, e.g. MTARD's adaptive w_adv).
    feature_weight: λ_f (default 1).  ce_weight: λ_ce (default 0).  adr_lambda: λ of the 'adr' rectifier.
    reduction: KL reduction (default 'batchmean').
    dynamic_target / dynamic_beta: fallback q ('label', default | 'student') and β (default 1) of the 'dynamic'
      rectifier.
  """
  if student_clean_logits is None and not _is_static(alpha, 1.0):
    raise ValueError("sa_mdrad_loss: student_clean_logits is required unless alpha == 1")
  use_features = projected_features is not None and teacher_features is not None
  if not use_features and not _is_static(feature_weight, 0.0):
    raise ValueError("sa_mdrad_loss: projected_features and teacher_features are required unless feature_weight == 0")
  s_adv = _f32(student_adv_logits)
  _check_logits("student_adv_logits", s_adv)
  _check_labels(labels, s_adv.shape[0])
  t_clean = sg(_stack_teachers("teacher_clean_logits", teacher_clean_logits))
  if t_clean.shape[1:] != s_adv.shape:
    raise ValueError(f"teacher_clean_logits {t_clean.shape} do not match student logits {s_adv.shape}")
  target_kw = dict(rectifier=rectifier, fusion=fusion, temperature=temperature, adr_lambda=adr_lambda)
  p_clean, w_clean = fused_soft_target(t_clean, labels, **target_kw)
  if teacher_adv_logits is not None:
    t_adv = sg(_stack_teachers("teacher_adv_logits", teacher_adv_logits))
    _check_same("teacher_adv_logits", t_adv, "teacher_clean_logits", t_clean)
    p_adv, _ = fused_soft_target(t_adv, labels, **target_kw)
  else:
    p_adv = p_clean
  dyn_lambda = None
  if rectifier == "dynamic":
    if dynamic_target == "student" and student_clean_logits is None:
      raise ValueError("sa_mdrad_loss: rectifier='dynamic' with dynamic_target='student' needs student_clean_logits")
    dyn_kw = dict(
      student_clean_logits=student_clean_logits, target=dynamic_target, temperature=temperature, beta=dynamic_beta
    )
    p_adv, dyn_lambda = rectify_dynamic(p_adv, s_adv, labels, **dyn_kw)
    p_clean, _ = rectify_dynamic(p_clean, s_adv, labels, **dyn_kw)

  def tempered_kl(p, s):
    log_q = jax.nn.log_softmax(s / temperature, axis=-1)
    return temperature**2 * kl_div(p, log_q, reduction=reduction)

  kl_adv = tempered_kl(p_adv, s_adv)
  if student_clean_logits is None:
    kl_clean = jnp.zeros_like(kl_adv)
  else:
    s_clean = _f32(student_clean_logits)
    _check_same("student_clean_logits", s_clean, "student_adv_logits", s_adv)
    kl_clean = tempered_kl(p_clean, s_clean)

  if not use_features:
    feat = jnp.zeros((), jnp.float32)
  else:
    feat = weighted_feature_loss(projected_features, teacher_features, w_clean)

  ce = cross_entropy(s_adv, labels)
  loss = alpha * kl_adv + (1.0 - alpha) * kl_clean + feature_weight * feat + ce_weight * ce

  y = jnp.broadcast_to(labels[None], t_clean.shape[:2])
  teacher_correct = jnp.argmax(t_clean, axis=-1) == y
  extra = {} if dyn_lambda is None else {"dynamic_trust": jnp.mean(dyn_lambda)}
  return loss, _metrics(
    kl_adv=kl_adv,
    kl_clean=kl_clean,
    feature=feat,
    ce=ce,
    teacher_acc=jnp.mean(teacher_correct),
    fusion_max_weight=jnp.mean(jnp.max(w_clean, axis=0)),
    **extra,
  )


def kd_loss(*, student_logits, teacher_logits, labels=None, temperature=4.0, alpha=0.9, reduction="batchmean"):
  """Clean Hinton KD: L = α·τ²·KL(softmax(T(x)/τ) ‖ softmax(S(x)/τ)) + (1 − α)·CE(S(x), y).

  ``teacher_logits`` [N, C], or [K, N, C] to average the KL over K teachers.  ``labels`` are required unless α is
  the Python number 1.
  """
  s = _f32(student_logits)
  _check_logits("student_logits", s)
  t = sg(_stack_teachers("teacher_logits", teacher_logits))
  if t.shape[1:] != s.shape:
    raise ValueError(f"teacher_logits {t.shape} do not match student_logits {s.shape}")
  kl = jnp.mean(
    jnp.stack([kl_from_logits(t[k], s, temperature=temperature, reduction=reduction) for k in range(t.shape[0])]),
    axis=0,
  )
  kl = temperature**2 * kl
  if labels is None:
    if not _is_static(alpha, 1.0):
      raise ValueError("kd_loss: labels are required unless alpha == 1")
    ce = jnp.zeros((), jnp.float32)
  else:
    ce = cross_entropy(s, labels)
  return alpha * kl + (1.0 - alpha) * ce, _metrics(kl=kl, ce=ce)


def pgd_at_loss(*, student_adv_logits, labels):
  """PGD-AT (Madry / SAT): L = CE(S(x'), y), batch mean."""
  ce = cross_entropy(student_adv_logits, labels)
  return ce, _metrics(ce_adv=ce)


@_accepts_old_keywords
def trades_loss(*, student_clean_logits, student_adv_logits, labels, beta=6.0, reduction="batchmean"):
  """TRADES: L = CE(S(x), y) + β·KL(softmax(S(x)) ‖ softmax(S(x'))), KL batchmean by default.

  As in the official code, the clean distribution is NOT detached: gradients flow through both sides.
  """
  s_clean, s_adv = _f32(student_clean_logits), _f32(student_adv_logits)
  _check_same("student_clean_logits", s_clean, "student_adv_logits", s_adv)
  ce = cross_entropy(s_clean, labels)
  kl = kl_from_logits(s_clean, s_adv, reduction=reduction)
  return ce + beta * kl, _metrics(ce_clean=ce, kl_robust=kl)


@_accepts_old_keywords
def ard_loss(
  *,
  student_adv_logits,
  teacher_clean_logits,
  student_clean_logits=None,
  labels=None,
  temperature=30.0,
  alpha=1.0,
  reduction="elem_mean",
):
  """ARD: L = α·τ²·KL(softmax(T(x)/τ) ‖ softmax(S(x')/τ)) + (1 − α)·CE(S(x), y).

  Official defaults: τ = 30, α = 1 (so no CE term), KL ``nn.KLDivLoss()`` = 'elem_mean' on every dataset.
  ``student_clean_logits`` and ``labels`` are required unless α is the Python number 1.
  """
  s_adv = _f32(student_adv_logits)
  t = sg(_single_teacher("teacher_clean_logits", teacher_clean_logits))
  kl = temperature**2 * kl_from_logits(t, s_adv, temperature=temperature, reduction=reduction)
  if student_clean_logits is None or labels is None:
    if not _is_static(alpha, 1.0):
      raise ValueError("ard_loss: student_clean_logits and labels are required unless alpha == 1")
    ce = jnp.zeros((), jnp.float32)
  else:
    ce = cross_entropy(student_clean_logits, labels)
  return alpha * kl + (1.0 - alpha) * ce, _metrics(kl_adv=kl, ce_clean=ce)


@_accepts_old_keywords
def rslad_loss(
  *,
  student_adv_logits,
  student_clean_logits,
  teacher_clean_logits,
  alpha=5.0 / 6.0,
  reduction="elem_mean",
  kl_scale=1.0,
  rslad_eps=True,
):
  """RSLAD: L = s·[α·KL(T(x) ‖ S(x')) + (1 − α)·KL(T(x) ‖ S(x))], τ = 1.

  Official code: custom pointwise KL −p·log q + p·log(p + 1e-5) (``rslad_eps=True``), ``torch.mean`` over all
  N·C entries ('elem_mean'), s = ``kl_scale`` = 1 on CIFAR-10 and 10 on CIFAR-100.
  """
  s_adv, s_clean = _f32(student_adv_logits), _f32(student_clean_logits)
  _check_same("student_adv_logits", s_adv, "student_clean_logits", s_clean)
  t = sg(_single_teacher("teacher_clean_logits", teacher_clean_logits))
  kw = dict(reduction=reduction, rslad_eps=rslad_eps)
  kl_adv = kl_scale * kl_from_logits(t, s_adv, **kw)
  kl_clean = kl_scale * kl_from_logits(t, s_clean, **kw)
  return alpha * kl_adv + (1.0 - alpha) * kl_clean, _metrics(kl_adv=kl_adv, kl_clean=kl_clean)


@_accepts_old_keywords
def adaad_loss(
  *,
  student_adv_logits,
  teacher_adv_logits,
  student_clean_logits=None,
  teacher_clean_logits=None,
  alpha=1.0,
  reduction="elem_mean",
):
  """AdaAD: L = α·KL(T(x') ‖ S(x')) + (1 − α)·KL(T(x) ‖ S(x)), τ = 1.

  Official code: 'elem_mean' (``nn.KLDivLoss()``) on CIFAR-10, 'batchmean' on CIFAR-100; default α = 1 (only the
  adversarial term).  The clean pair is required unless α is the Python number 1.
  """
  s_adv = _f32(student_adv_logits)
  t_adv = sg(_single_teacher("teacher_adv_logits", teacher_adv_logits))
  kl_adv = kl_from_logits(t_adv, s_adv, reduction=reduction)
  if student_clean_logits is None or teacher_clean_logits is None:
    if not _is_static(alpha, 1.0):
      raise ValueError("adaad_loss: student_clean_logits and teacher_clean_logits are required unless alpha == 1")
    kl_clean = jnp.zeros_like(kl_adv)
  else:
    t_clean = sg(_single_teacher("teacher_clean_logits", teacher_clean_logits))
    kl_clean = kl_from_logits(t_clean, student_clean_logits, reduction=reduction)
  return alpha * kl_adv + (1.0 - alpha) * kl_clean, _metrics(kl_adv=kl_adv, kl_clean=kl_clean)


def introspection_trust(teacher_adv_logits, labels, *, beta=0.1):
  """IAD's trust weight a_i = softmax(T(x'_i))_{y_i}^β (τ = 1), stop-gradient, shape [N]."""
  t = sg(_single_teacher("teacher_adv_logits", teacher_adv_logits))
  _check_labels(labels, t.shape[0])
  p_y = jnp.take_along_axis(jax.nn.softmax(t, axis=-1), labels[:, None].astype(jnp.int32), axis=-1)[:, 0]
  return sg(p_y**beta)


@_accepts_old_keywords
def iad1_loss(
  *,
  student_adv_logits,
  student_clean_logits,
  teacher_clean_logits,
  teacher_adv_logits,
  labels,
  introspection_on,
  temperature=1.0,
  alpha=1.0,
  beta=0.1,
  detach_self_target=False,
  reduction="batchmean",
):
  """IAD-I (on ARD).  With a_i = P_T(y_i | x'_i)^β (stop-gradient) and on ∈ {0, 1}:

    L = α·τ²·KL(T(x)/τ ‖ S(x')/τ) + on·α·(1/N) Σ_i (1 − a_i)·KL(S(x_i) ‖ S(x'_i)) + (1 − α)·CE(S(x), y)

  KL are 'batchmean' in the official code.  ``introspection_on`` is an array (bool or 0/1 float), e.g.
  ``epoch >= begin`` with begin = 60, so the switch is traceable.  The self target S(x) is not detached
  (faithful to the official code) unless ``detach_self_target``.  Defaults: τ = 1, α = 1, β = 0.1.
  """
  s_adv, s_clean = _f32(student_adv_logits), _f32(student_clean_logits)
  _check_same("student_adv_logits", s_adv, "student_clean_logits", s_clean)
  t_clean = sg(_single_teacher("teacher_clean_logits", teacher_clean_logits))
  _check_same("teacher_clean_logits", t_clean, "student_adv_logits", s_adv)
  on = _f32(introspection_on)
  a = introspection_trust(teacher_adv_logits, labels, beta=beta)
  num_classes = s_adv.shape[-1]
  kl_teacher = temperature**2 * kl_from_logits(t_clean, s_adv, temperature=temperature, reduction=reduction)
  self_target = sg(s_clean) if detach_self_target else s_clean
  kl_self_i = kl_from_logits(self_target, s_adv, reduction="none")
  kl_self = reduce_per_sample((1.0 - a) * kl_self_i, num_classes=num_classes, reduction=reduction)
  ce = cross_entropy(s_clean, labels)
  loss = alpha * kl_teacher + on * alpha * kl_self + (1.0 - alpha) * ce
  return loss, _metrics(kl_teacher=kl_teacher, kl_self=kl_self, ce_clean=ce, trust=jnp.mean(a), introspection_on=on)


@_accepts_old_keywords
def iad2_loss(
  *,
  student_adv_logits,
  student_clean_logits,
  teacher_at_adv_logits,
  teacher_st_adv_logits,
  labels,
  introspection_on,
  temperature=1.0,
  alpha1=0.5,
  alpha2=0.25,
  beta=0.1,
  detach_self_target=False,
  reduction="batchmean",
):
  """IAD-II (on AKD2: adversarially-trained teacher T_at + standard teacher T_st, both queried on x').

  With a_i = P_{T_at}(y_i | x'_i)^β (stop-gradient) and on ∈ {0, 1}, ā_i = on·a_i + (1 − on):

    L = (1 − α1 − α2)·CE(S(x'), y)
        + α1·τ²·[ (1/N) Σ_i ā_i·KL(T_at(x'_i)/τ ‖ S(x'_i)/τ) + on·(1/N) Σ_i (1 − a_i)·KL(S(x_i) ‖ S(x'_i)) ]
        + α2·τ²·KL(T_st(x')/τ ‖ S(x')/τ)

  ('batchmean' KL; official defaults τ = 1, α1 = 0.5, α2 = 0.25, β = 0.1, begin = 40.)
  """
  s_adv, s_clean = _f32(student_adv_logits), _f32(student_clean_logits)
  _check_same("student_adv_logits", s_adv, "student_clean_logits", s_clean)
  t_at = sg(_single_teacher("teacher_at_adv_logits", teacher_at_adv_logits))
  t_st = sg(_single_teacher("teacher_st_adv_logits", teacher_st_adv_logits))
  _check_same("teacher_at_adv_logits", t_at, "student_adv_logits", s_adv)
  _check_same("teacher_st_adv_logits", t_st, "student_adv_logits", s_adv)
  on = _f32(introspection_on)
  a = introspection_trust(t_at, labels, beta=beta)
  num_classes = s_adv.shape[-1]
  tau2 = temperature**2
  red = lambda v: reduce_per_sample(v, num_classes=num_classes, reduction=reduction)  # noqa: E731
  kl_at_i = kl_from_logits(t_at, s_adv, temperature=temperature, reduction="none")
  kl_at = tau2 * red((on * a + (1.0 - on)) * kl_at_i)
  self_target = sg(s_clean) if detach_self_target else s_clean
  kl_self = tau2 * red(on * (1.0 - a) * kl_from_logits(self_target, s_adv, reduction="none"))
  kl_st = tau2 * kl_from_logits(t_st, s_adv, temperature=temperature, reduction=reduction)
  ce = cross_entropy(s_adv, labels)
  loss = (1.0 - alpha1 - alpha2) * ce + alpha1 * (kl_at + kl_self) + alpha2 * kl_st
  return loss, _metrics(ce_adv=ce, kl_at=kl_at, kl_self=kl_self, kl_st=kl_st, trust=jnp.mean(a), introspection_on=on)


# ---------------------------------------------------------------------------------------------
# MTARD / B-MTARD: adaptive loss weights (and B-MTARD's teacher temperatures) as pure array state.
# ---------------------------------------------------------------------------------------------
class MTARDState(NamedTuple):
  """Adaptive quantities of MTARD / B-MTARD (0-d arrays; a pytree, so it lives in and checkpoints with the
  train state).  The ``*_nat`` fields are the clean view's; their names are the keys checkpoints store them
  under, so they keep the spelling of earlier releases and old checkpoints restore."""

  w_adv: jax.Array
  w_nat: jax.Array
  tau_adv: jax.Array
  tau_nat: jax.Array
  init_loss_adv: jax.Array
  init_loss_nat: jax.Array
  initialized: jax.Array


def mtard_init_state() -> MTARDState:
  """w_adv = w_clean = 1/2, τ_adv = τ_clean = 1, initial losses unset (recorded by the first update)."""
  half, one = jnp.full((), 0.5, jnp.float32), jnp.ones((), jnp.float32)
  return MTARDState(
    w_adv=half,
    w_nat=half,
    tau_adv=one,
    tau_nat=one,
    init_loss_adv=one,
    init_loss_nat=one,
    initialized=jnp.zeros((), bool),
  )


@_accepts_old_keywords
def mtard_update_state(
  state: MTARDState,
  loss_adv,
  loss_clean,
  *,
  lr_w=0.025,
  beta=1.0,
  balanced=False,
  entropy_adv=None,
  entropy_clean=None,
  lr_tau=0.001,
  tau_min=1.0,
  tau_max=10.0,
) -> MTARDState:
  """One MTARD (or B-MTARD with ``balanced``) update from the current KL losses (treated as constants).

  On the first call (``initialized`` false) L0 = the current losses.  Then with r_v = (L_v / L0_v)^β:

  * MTARD:   w_clean ← w_clean − lr_w·(w_clean − r_clean/(r_adv + r_clean)),  w_adv = 1 − w_clean;
  * B-MTARD: r_v ← r_v / mean(r); both w_v ← w_v − lr_w·(w_v − r_v/(r_adv + r_clean)); clipped at 0 and
    renormalised to sum 1; and, when the (negative) teacher entropies H_v = mean p·log(p + 1e-5) are given,
    τ_adv ← clip(τ_adv − lr_tau·sign(H_adv/H_clean − 1), τ_min, τ_max),
    τ_clean ← clip(τ_clean − lr_tau·sign(H_clean/H_adv − 1), τ_min, τ_max).

  ``lr_w`` (0.025) and ``lr_tau`` (0.001) decay ×0.1 with the learning rate in the official code: pass the
  current values (arrays are fine).
  """
  l_adv, l_clean = sg(_f32(loss_adv)), sg(_f32(loss_clean))
  init = state.initialized
  l0_adv = jnp.where(init, state.init_loss_adv, l_adv)
  l0_clean = jnp.where(init, state.init_loss_nat, l_clean)
  r_adv = (l_adv / l0_adv) ** beta
  r_clean = (l_clean / l0_clean) ** beta
  tau_adv, tau_clean = state.tau_adv, state.tau_nat
  if not balanced:
    w_clean = state.w_nat - lr_w * (state.w_nat - r_clean / (r_adv + r_clean))
    w_adv = 1.0 - w_clean
  else:
    mean_r = (r_adv + r_clean) / 2.0
    r_adv, r_clean = r_adv / mean_r, r_clean / mean_r
    w_clean = jnp.maximum(state.w_nat - lr_w * (state.w_nat - r_clean / (r_adv + r_clean)), 0.0)
    w_adv = jnp.maximum(state.w_adv - lr_w * (state.w_adv - r_adv / (r_adv + r_clean)), 0.0)
    coef = 1.0 / (w_adv + w_clean)
    w_adv, w_clean = w_adv * coef, w_clean * coef
    if entropy_adv is not None and entropy_clean is not None:
      h_adv, h_clean = sg(_f32(entropy_adv)), sg(_f32(entropy_clean))
      tau_adv = jnp.clip(tau_adv - lr_tau * jnp.sign(h_adv / h_clean - 1.0), tau_min, tau_max)
      tau_clean = jnp.clip(tau_clean - lr_tau * jnp.sign(h_clean / h_adv - 1.0), tau_min, tau_max)
  return MTARDState(
    w_adv=_f32(w_adv),
    w_nat=_f32(w_clean),
    tau_adv=_f32(tau_adv),
    tau_nat=_f32(tau_clean),
    init_loss_adv=_f32(l0_adv),
    init_loss_nat=_f32(l0_clean),
    initialized=jnp.ones((), bool),
  )


@_accepts_old_keywords
def mtard_loss(
  *,
  student_adv_logits,
  student_clean_logits,
  teacher_adv_logits,
  teacher_clean_logits,
  state: MTARDState,
  lr_w=0.025,
  beta=1.0,
  balanced=False,
  lr_tau=0.001,
  reduction="elem_mean",
  kl_scale=1.0,
  use_updated_weights=True,
):
  """MTARD (B-MTARD with ``balanced``): L = w_adv·KL(T_adv(x') ‖ S(x')) + w_clean·KL(T_clean(x) ‖ S(x)).

  KL: RSLAD's pointwise form with the teacher tempered by the state's τ_v (always 1 for MTARD) and the student
  untempered, no τ² factor, 'elem_mean' times ``kl_scale`` (1 on CIFAR-10, 10 on CIFAR-100).  T_adv is the
  robust teacher queried on x', T_clean the clean teacher on x.

  Ordering (official code): the weights applied at this step are those already updated with this step's losses
  (``use_updated_weights=True``); the temperatures used are the state's current ones.  The loss does not return
  the new state: persist it after the step with
  ``mtard_update_state(state, m['kl_adv'], m['kl_clean'], entropy_adv=m['teacher_neg_entropy_adv'],
  entropy_clean=m['teacher_neg_entropy_clean'], lr_w=..., beta=..., balanced=..., lr_tau=...)`` on the returned
  metrics ``m`` (the same pure computation, so it yields exactly the weights used here).
  """
  s_adv, s_clean = _f32(student_adv_logits), _f32(student_clean_logits)
  _check_same("student_adv_logits", s_adv, "student_clean_logits", s_clean)
  t_adv = sg(_single_teacher("teacher_adv_logits", teacher_adv_logits))
  t_clean = sg(_single_teacher("teacher_clean_logits", teacher_clean_logits))
  kw = dict(student_temperature=1.0, reduction=reduction, rslad_eps=True)
  kl_adv = kl_scale * kl_from_logits(t_adv, s_adv, temperature=state.tau_adv, **kw)
  kl_clean = kl_scale * kl_from_logits(t_clean, s_clean, temperature=state.tau_nat, **kw)
  h_adv = _neg_entropy_rslad(jax.nn.softmax(t_adv / state.tau_adv, axis=-1))
  h_clean = _neg_entropy_rslad(jax.nn.softmax(t_clean / state.tau_nat, axis=-1))
  new = mtard_update_state(
    state,
    kl_adv,
    kl_clean,
    lr_w=lr_w,
    beta=beta,
    balanced=balanced,
    entropy_adv=h_adv,
    entropy_clean=h_clean,
    lr_tau=lr_tau,
  )
  w_adv, w_clean = (new.w_adv, new.w_nat) if use_updated_weights else (state.w_adv, state.w_nat)
  loss = w_adv * kl_adv + w_clean * kl_clean
  return loss, _metrics(
    kl_adv=kl_adv,
    kl_clean=kl_clean,
    w_adv=w_adv,
    w_clean=w_clean,
    tau_adv=state.tau_adv,
    tau_clean=state.tau_nat,
    teacher_neg_entropy_adv=h_adv,
    teacher_neg_entropy_clean=h_clean,
  )


def bmtard_loss(**kwargs):
  """B-MTARD: :func:`mtard_loss` with ``balanced=True`` (normalised weight update + temperature balancing)."""
  if "balanced" in kwargs:
    raise ValueError("bmtard_loss always uses balanced=True; call mtard_loss to choose")
  return mtard_loss(balanced=True, **kwargs)
