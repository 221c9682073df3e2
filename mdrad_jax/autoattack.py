"""AutoAttack (L∞) in JAX: APGD-CE, APGD-T, FAB-T and Square, and the driver that chains them.

The attacks follow the reference algorithm of Croce & Hein (``autoattack``, ``set_version('standard')``):

* APGD: step size 2ε, momentum 0.75 (1 at the first step), step-size halving at the checkpoints
  p_0 = 0, p_1 = 0.22, p_{j+1} = p_j + max(p_j − p_{j−1} − 0.03, 0.06) when the loss oscillated
  (increased in at most a fraction ρ of the steps since the last checkpoint) or did not improve since a
  checkpoint without halving; the iterate is then restarted from the best point.
* APGD-T: APGD on the targeted DLR loss against the classes ranked 2..n_target_classes+1 by the clean logits.
* FAB-T: the targeted fast adaptive boundary attack with the exact L∞ projection onto the linearised decision
  hyperplane intersected with the box [0, 1]; a point counts only if the perturbation found is within ε.
* Square: the random-search attack on the margin loss, p_init = 0.8 and the reference schedule of p (not
  rescaled to the number of queries, as AutoAttack runs it).  As in the reference, one square position and
  one sign per channel are drawn per query for the whole batch, and positions are drawn in [0, H − s), so the
  last row and column change only through the initial stripes or a square covering the whole image.

Every attack is a function of ``(x, y, mask, key)`` over a fixed-size batch, built from pure parts (start,
one iteration, merge of a run's result) that are compiled separately and called from a host loop: XLA:CPU runs
a model several times slower inside a compiled loop than as a top-level program (docs/performance.md).  ``_apgd_single_run`` and
``_fab_single_run`` chain the same parts in a ``lax`` loop.  ``mask`` marks the real rows of a padded batch.  The public functions (``apgd``, ``apgd_targeted``,
``fab_targeted``, ``square``) attack a whole array in one batch and return ``x`` itself for every point that
was not turned into an adversarial example, as the reference does.  ``autoattack`` is the Python driver: it
batches the still-robust points, runs each attack only on them, and re-checks every returned point; inside a
batch, an attack's restarts and targets run one after another while a point is left robust
(``_attack_still_robust``).

Cross-entropy and the margin are those of ``mdrad_jax.losses``, the ε-ball projection is
``attacks.project_linf``, the padding of a short batch ``batching.pad_rows``.  A model is any
``logits_fn(x) -> logits [N, C]``: pure, deterministic, in evaluation mode.  Images are NHWC
float32 in [0, 1], labels int32.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
import sys
import time
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from mdrad_jax import attacks
from mdrad_jax import batching
from mdrad_jax import losses

Array = jax.Array
LogitsFn = Callable[[Array], Array]

STANDARD_ATTACKS = ("apgd-ce", "apgd-t", "fab-t", "square")
APGD_SUBSET_ATTACKS = ("apgd-ce", "apgd-t")
VERSION_LABELS = {
  "standard": "AutoAttack (standard: APGD-CE, APGD-T, FAB-T, Square)",
  "apgd": "AutoAttack (APGD-CE + APGD-T subset)",
}
TITLES = {"apgd-ce": "APGD-CE", "apgd-t": "APGD-T", "fab-t": "FAB-T", "square": "Square"}  # names in reports
_NOT_FOUND = 1e10


# ----------------------------------------------------------------------------------------------------------
# Losses: AutoAttack's own DLR losses (cross-entropy and the CW margin come from mdrad_jax.losses)


def dlr_loss(logits: Array, y: Array) -> Array:
  """Difference-of-logits-ratio loss per sample: −(z_y − max_{j≠y} z_j) / (z_π1 − z_π3 + 1e−12)."""
  z_sorted = jnp.sort(logits, axis=1)
  z_y = jnp.take_along_axis(logits, y[:, None], axis=1)[:, 0]
  top_is_y = jnp.argmax(logits, axis=1) == y
  z_other = jnp.where(top_is_y, z_sorted[:, -2], z_sorted[:, -1])
  return -(z_y - z_other) / (z_sorted[:, -1] - z_sorted[:, -3] + 1e-12)


def dlr_loss_targeted(logits: Array, y: Array, y_target: Array) -> Array:
  """Targeted DLR loss per sample: −(z_y − z_t) / (z_π1 − (z_π3 + z_π4)/2 + 1e−12)."""
  z_sorted = jnp.sort(logits, axis=1)
  z_y = jnp.take_along_axis(logits, y[:, None], axis=1)[:, 0]
  z_t = jnp.take_along_axis(logits, y_target[:, None], axis=1)[:, 0]
  return -(z_y - z_t) / (z_sorted[:, -1] - 0.5 * (z_sorted[:, -3] + z_sorted[:, -4]) + 1e-12)


def ce_loss(logits: Array, y: Array) -> Array:
  """Cross-entropy per sample: ``losses.cross_entropy(..., reduction='none')`` (kept for compatibility)."""
  return losses.cross_entropy(logits, y, reduction="none")


def margin_loss(logits: Array, y: Array) -> Array:
  """z_y − max_{j≠y} z_j per sample: ``losses.cw_margin`` (kept for compatibility)."""
  return losses.cw_margin(logits, y)


# ----------------------------------------------------------------------------------------------------------
# Small helpers


def _bcast(v: Array, x: Array) -> Array:
  """Reshapes a per-sample vector [N] to broadcast against x [N, ...]."""
  return v.reshape((-1,) + (1,) * (x.ndim - 1))


def _linf(d: Array) -> Array:
  return jnp.max(jnp.abs(d.reshape(d.shape[0], -1)), axis=1)


def _predict(logits_fn: LogitsFn, x: Array) -> Array:
  return jnp.argmax(logits_fn(x), axis=1).astype(jnp.int32)


def _check_inputs(x, y, eps) -> None:
  if x.ndim < 2:
    raise ValueError(f"x must be a batch [N, ...] of inputs, got shape {tuple(x.shape)}")
  if y.shape != (x.shape[0],):
    raise ValueError(f"y must have shape ({x.shape[0]},) to match x, got {tuple(y.shape)}")
  if not (isinstance(eps, numbers.Real) and eps > 0):
    raise ValueError(f"eps must be a positive number, got {eps!r}")


def _num_classes(logits_fn: LogitsFn, x: Array) -> int:
  return int(jax.eval_shape(logits_fn, jax.ShapeDtypeStruct(x.shape, x.dtype)).shape[1])


# ----------------------------------------------------------------------------------------------------------
# APGD


def apgd_checkpoints(n_iter: int) -> list[int]:
  """Iterations (1-based counts of steps done) after which APGD may halve its step size.

  The reference computes them incrementally: the first after max(⌊0.22·n_iter⌋, 1) steps, then each
  interval shrinks by max(⌊0.03·n_iter⌋, 1) down to max(⌊0.06·n_iter⌋, 1).
  """
  first = max(int(0.22 * n_iter), 1)
  min_len = max(int(0.06 * n_iter), 1)
  decr = max(int(0.03 * n_iter), 1)
  out, k, counter = [], first, 0
  for i in range(n_iter):
    counter += 1
    if counter == k:
      out.append(i + 1)
      k = max(k - decr, min_len)
      counter = 0
  return out


def _checkpoint_tables(n_iter: int) -> tuple[np.ndarray, np.ndarray]:
  """Per iteration i (0-based): whether a checkpoint falls after it, and the length of the interval it closes."""
  is_ckpt = np.zeros(n_iter, bool)
  window = np.ones(n_iter, np.int32)
  prev = 0
  for c in apgd_checkpoints(n_iter):
    is_ckpt[c - 1] = True
    window[c - 1] = c - prev
    prev = c
  return is_ckpt, window


def _step_size_check(loss_steps, i, k, rho, loss_best, loss_best_last, reduced_last):
  """APGD's condition to halve the step size at the checkpoint after step i closing an interval of k steps.

  True where the loss increased in at most k·ρ of the last k steps, or where the step size was not halved at
  the previous checkpoint and the best loss has not improved since.  As in the reference, step j's loss is
  compared with step j−1's, and the first step with the last (still zero) row of the [n_iter, N] buffer.
  """
  rows = jnp.arange(loss_steps.shape[0])
  increased = loss_steps > jnp.roll(loss_steps, 1, axis=0)
  in_window = (rows <= i) & (rows > i - k)
  n_incr = jnp.sum(increased & in_window[:, None], axis=0)
  oscillating = n_incr.astype(loss_steps.dtype) <= jnp.asarray(k, loss_steps.dtype) * rho
  no_improvement = (~reduced_last) & (loss_best_last >= loss_best)
  return oscillating | no_improvement


def _apgd_loss_fn(loss):
  if loss == "ce":
    return lambda z, y, y_target: losses.cross_entropy(z, y, reduction="none")
  if loss == "dlr":
    return lambda z, y, y_target: dlr_loss(z, y)
  return dlr_loss_targeted


def _apgd_fill(n, *, eps, n_iter):
  """The entries of APGD's start state that do not depend on the data, as host arrays.  Passed into the
  compiled start, they are laid out like the batch (a constant made inside it would not be, under sharding)."""
  return dict(
    it=np.zeros((n,), np.int32),
    step=np.full((n,), 2.0 * eps, np.float32),
    loss_steps=np.zeros((n, n_iter), np.float32),
    reduced_last=np.ones((n,), bool),
  )


def _apgd_init(logits_fn, x, y, y_target, key, fill=None, *, eps, n_iter, loss):
  """APGD's state after the random start; every entry is batch-leading (``it``: the step count, per row)."""
  loss_indiv = _apgd_loss_fn(loss)
  if y_target is None:
    y_target = y

  def objective(xa):
    z = logits_fn(xa)
    li = loss_indiv(z, y, y_target)
    return jnp.sum(li), (li, z)

  n = x.shape[0]
  if fill is None:
    fill = {k: jnp.asarray(v) for k, v in _apgd_fill(n, eps=eps, n_iter=n_iter).items()}
  t = jax.random.uniform(key, x.shape, x.dtype, -1.0, 1.0)
  x_adv = jnp.clip(x + eps * t / (_bcast(_linf(t), x) + 1e-12), 0.0, 1.0)
  (_, (loss_cur, z)), grad = jax.value_and_grad(objective, has_aux=True)(x_adv)
  acc = jnp.argmax(z, axis=1) == y
  return dict(
    x=x,
    y=y,
    y_target=y_target,
    it=fill["it"],
    x_adv=x_adv,
    x_old=x_adv,
    grad=grad,
    x_best=x_adv,
    grad_best=grad,
    x_best_adv=x_adv,
    loss_best=loss_cur,
    acc=acc,
    step=fill["step"].astype(x.dtype),
    loss_steps=fill["loss_steps"].astype(x.dtype),
    loss_best_last=loss_cur,
    reduced_last=fill["reduced_last"],
  )


def _apgd_step(logits_fn, s, *, eps, n_iter, loss, rho):
  """One APGD iteration (step ``s['it']``) on the state of :func:`_apgd_init`."""
  loss_indiv = _apgd_loss_fn(loss)
  x, y = s["x"], s["y"]

  def objective(xa):
    z = logits_fn(xa)
    li = loss_indiv(z, y, s["y_target"])
    return jnp.sum(li), (li, z)

  is_ckpt, window = (jnp.asarray(a) for a in _checkpoint_tables(n_iter))
  i = s["it"][0]
  grad2 = s["x_adv"] - s["x_old"]
  x_old = s["x_adv"]
  a = jnp.where(i > 0, 0.75, 1.0).astype(x.dtype)
  x1 = attacks.project_linf(s["x_adv"] + _bcast(s["step"], x) * jnp.sign(s["grad"]), x, eps=eps)
  x1 = attacks.project_linf(s["x_adv"] + (x1 - s["x_adv"]) * a + grad2 * (1.0 - a), x, eps=eps)
  (_, (l, z)), grad = jax.value_and_grad(objective, has_aux=True)(x1)
  pred_ok = jnp.argmax(z, axis=1) == y
  acc = s["acc"] & pred_ok
  x_best_adv = jnp.where(_bcast(~pred_ok, x), x1, s["x_best_adv"])
  loss_steps = s["loss_steps"].at[:, i].set(l)
  improved = l > s["loss_best"]
  x_best = jnp.where(_bcast(improved, x), x1, s["x_best"])
  grad_best = jnp.where(_bcast(improved, x), grad, s["grad_best"])
  loss_best = jnp.where(improved, l, s["loss_best"])
  reduce = _step_size_check(loss_steps.T, i, window[i], rho, loss_best, s["loss_best_last"], s["reduced_last"])
  ck = is_ckpt[i]
  halve = ck & reduce
  return dict(
    x=x,
    y=y,
    y_target=s["y_target"],
    it=s["it"] + 1,
    x_adv=jnp.where(_bcast(halve, x), x_best, x1),
    x_old=x_old,
    grad=jnp.where(_bcast(halve, x), grad_best, grad),
    x_best=x_best,
    grad_best=grad_best,
    x_best_adv=x_best_adv,
    loss_best=loss_best,
    acc=acc,
    step=jnp.where(halve, s["step"] / 2.0, s["step"]),
    loss_steps=loss_steps,
    loss_best_last=jnp.where(ck, loss_best, s["loss_best_last"]),
    reduced_last=jnp.where(ck, reduce, s["reduced_last"]),
  )


def _apgd_single_run(logits_fn, x, y, y_target, key, *, eps, n_iter, loss, rho):
  """One APGD run on the whole batch, as one traceable function; returns the final state (``x_best_adv``:
  last misclassified iterate, ``acc``: never misclassified, ``x_best``/``loss_best``: highest-loss point,
  ``step``: step sizes).  The batch attacks run the same two functions with the loop on the host."""
  st = _apgd_init(logits_fn, x, y, y_target, key, eps=eps, n_iter=n_iter, loss=loss)
  step = functools.partial(_apgd_step, logits_fn, eps=eps, n_iter=n_iter, loss=loss, rho=rho)
  return jax.lax.fori_loop(0, n_iter, lambda _, s: step(s), st)


def _robust_and_order(logits_fn, x, y, mask):
  """Clean-correct real rows, and the classes of each row from the lowest logit to the highest."""
  z0 = logits_fn(x)
  return (jnp.argmax(z0, axis=1) == y) & mask, jnp.argsort(z0, axis=1).astype(jnp.int32)


def _column(order, column):
  """``order[i, column[i]]`` per row (inside a compiled part, so the result is laid out like the batch)."""
  return jnp.take_along_axis(order, column[:, None], axis=1)[:, 0]


def _rank_column(order, rank):
  """The column of ``order`` (classes by increasing logit) that holds the class ranked ``rank``, per row, as a
  host array: a compiled part places it like the other batch arguments."""
  return np.full((order.shape[0],), order.shape[1] - rank, np.int32)


def _merge_new(robust, adv, x_new, fooled):
  """Points fooled now (and robust until now) take ``x_new``; returns (still robust, adversarial inputs)."""
  new = fooled & robust
  return robust & ~new, jnp.where(_bcast(new, adv), x_new, adv)


def _apgd_merge(st, robust, adv):
  return _merge_new(robust, adv, st["x_best_adv"], ~st["acc"])


def _attack_still_robust(attack, runs, robust, adv):
  """Runs ``attack(run, robust, adv) -> (robust, adv)`` for each run (restart, target) in turn, each on the
  points of the batch still robust, and stops once none is left (the host's check between runs, as the
  reference stops early); returns the adversarial inputs."""
  for run in runs:
    if not bool(jnp.any(robust)):
      break
    robust, adv = attack(run, robust, adv)
  return adv


class _Apgd:
  """APGD with restarts (and APGD-T over target ranks) on a padded batch: each part compiled with ``jit``, the
  iterations, restarts and targets driven from the host.

  XLA:CPU runs a model's forward and backward several times slower inside a ``while`` loop than the same computation
  as a top-level program (docs/performance.md, "AutoAttack"), so each iteration is one call of the compiled
  step.  Calls are dispatched asynchronously; the host waits only to check, between restarts and targets,
  whether any point is left to attack (the early stop the reference has)."""

  def __init__(self, logits_fn, jit, *, eps, n_iter, loss, rho, n_restarts=1, target_rank=None, n_target_classes=None):
    self.n_iter, self.n_restarts, self.loss = n_iter, n_restarts, loss
    self.target_rank, self.n_target_classes = target_rank, n_target_classes
    kw = dict(eps=eps, n_iter=n_iter, loss=loss)

    def prepare(x, y, mask):
      return _robust_and_order(logits_fn, x, y, mask)

    self._fill = functools.partial(_apgd_fill, eps=eps, n_iter=n_iter)

    def init(x, y, y_target, key, fill):
      return _apgd_init(logits_fn, x, y, y_target, key, fill, **kw)

    def init_rank(x, y, order, column, key, fill):
      return _apgd_init(logits_fn, x, y, _column(order, column), key, fill, **kw)

    def init_untargeted(x, y, key, fill):
      return _apgd_init(logits_fn, x, y, None, key, fill, **kw)

    def step(state):
      return _apgd_step(logits_fn, state, rho=rho, **kw)

    self._prepare, self._init, self._step = jit(prepare), jit(init), jit(step)
    self._init_untargeted, self._init_rank, self._merge = jit(init_untargeted), jit(init_rank), jit(_apgd_merge)

  def _run(self, st):
    for _ in range(self.n_iter):
      st = self._step(st)
    return st

  def __call__(self, x, y, mask, key, target_labels=None):
    robust, order = self._prepare(x, y, mask)
    if self.n_target_classes is not None:  # APGD-T: each target rank in turn
      runs = [(2 + j // self.n_restarts, j) for j in range(self.n_target_classes * self.n_restarts)]
    else:
      runs = [(self.target_rank, r) for r in range(self.n_restarts)]

    def attack(run, robust, adv):
      rank, j = run
      k = jax.random.fold_in(key, j)
      fill = self._fill(x.shape[0])
      if self.loss != "dlr_targeted":
        st = self._init_untargeted(x, y, k, fill)
      elif rank is not None:
        st = self._init_rank(x, y, order, _rank_column(order, rank), k, fill)
      else:
        st = self._init(x, y, jnp.asarray(target_labels, jnp.int32), k, fill)
      return self._merge(self._run(st), robust, adv)

    return _attack_still_robust(attack, runs, robust, x)


def apgd(
  logits_fn: LogitsFn,
  x,
  y,
  key,
  *,
  eps: float,
  n_iter: int = 100,
  loss: str = "ce",
  target_class=None,
  n_restarts: int = 1,
  rho: float = 0.75,
) -> Array:
  """APGD (L∞) on ``loss`` ∈ {'ce', 'dlr', 'dlr_targeted'}; returns x_adv (x where no adversarial was found).

  For 'dlr_targeted', ``target_class`` is either an int k ≥ 2 (the class ranked k-th by the clean logits, as
  in the reference) or an int array [N] of target labels.
  """
  x = jnp.asarray(x, jnp.float32)
  y = jnp.asarray(y, jnp.int32)
  _check_inputs(x, y, eps)
  if loss not in ("ce", "dlr", "dlr_targeted"):
    raise ValueError(f"loss must be 'ce', 'dlr' or 'dlr_targeted', got {loss!r}")
  if n_iter < 1 or n_restarts < 1:
    raise ValueError(f"n_iter and n_restarts must be >= 1, got {n_iter} and {n_restarts}")
  n_classes = _num_classes(logits_fn, x)
  need = 4 if loss == "dlr_targeted" else 3 if loss == "dlr" else 2
  if n_classes < need:
    raise ValueError(f"loss {loss!r} needs at least {need} classes, the model has {n_classes}")
  if loss == "dlr_targeted":
    if target_class is None:
      raise ValueError("loss='dlr_targeted' needs target_class (a rank >= 2 or target labels [N])")
    if isinstance(target_class, (int, np.integer)):
      target_class = int(target_class)
      if not 2 <= target_class <= n_classes:
        raise ValueError(f"target_class rank must be in [2, {n_classes}], got {target_class}")
    else:
      target_class = jnp.asarray(target_class, jnp.int32)
      if target_class.shape != y.shape:
        raise ValueError(f"target labels must have shape {tuple(y.shape)}, got {tuple(target_class.shape)}")
  rank = target_class if isinstance(target_class, int) else None
  labels = None if target_class is None or rank is not None else target_class
  fn = batch_kernel(
    "apgd", logits_fn, eps=eps, n_iter=n_iter, loss=loss, n_restarts=n_restarts, rho=rho, target_rank=rank
  )
  return fn(x, y, jnp.ones(y.shape, bool), key, labels)


def apgd_targeted(
  logits_fn: LogitsFn,
  x,
  y,
  key,
  *,
  eps: float,
  n_iter: int = 100,
  n_target_classes: int = 9,
  n_restarts: int = 1,
  rho: float = 0.75,
) -> Array:
  """APGD-T: APGD on the targeted DLR loss against the top ``n_target_classes`` other classes in turn."""
  x = jnp.asarray(x, jnp.float32)
  y = jnp.asarray(y, jnp.int32)
  _check_inputs(x, y, eps)
  n_classes = _num_classes(logits_fn, x)
  _check_targets(n_classes, n_target_classes, need=4)
  fn = batch_kernel(
    "apgd-t", logits_fn, eps=eps, n_iter=n_iter, n_target_classes=n_target_classes, n_restarts=n_restarts, rho=rho
  )
  return fn(x, y, jnp.ones(y.shape, bool), key)


def _check_targets(n_classes: int, n_target_classes: int, need: int) -> None:
  if n_classes < need:
    raise ValueError(f"the targeted attack needs at least {need} classes, the model has {n_classes}")
  if not 1 <= n_target_classes <= n_classes - 1:
    raise ValueError(
      f"n_target_classes must be in [1, {n_classes - 1}] for {n_classes} classes, got {n_target_classes}"
    )


# ----------------------------------------------------------------------------------------------------------
# FAB-T


def _argsort_rows(v: Array) -> Array:
  """``jnp.argsort(v, axis=1)`` (stable) for float32 rows of fewer than 2**31 entries, as one integer sort.

  XLA:CPU sorts a (value, index) pair with a float comparator several times slower than one int64 array
  (docs/performance.md, "AutoAttack").  Each entry becomes ``order-preserving int32 bits << 32 | column``, so the
  sorted keys are ordered by value and then by column, exactly the stable argsort (with -0.0 taken as +0.0,
  as the float comparison does); the low 32 bits are the permutation.  The int64 keys exist only inside this
  function, under ``jax.enable_x64``.
  """
  if v.dtype != jnp.float32:
    return jnp.argsort(v, axis=1)
  v = jnp.where(v == 0, jnp.zeros_like(v), v)
  bits = jax.lax.bitcast_convert_type(v, jnp.int32)
  key32 = bits ^ ((bits >> 31) & jnp.int32(0x7FFFFFFF))  # monotone in the float value
  with jax.enable_x64(True):
    cols = jax.lax.broadcasted_iota(jnp.int64, v.shape, 1)
    packed = jnp.sort((key32.astype(jnp.int64) << 32) | cols, axis=1)
    return (packed & 0xFFFFFFFF).astype(jnp.int32)


def projection_linf(t: Array, w: Array, b: Array) -> Array:
  """Smallest-L∞ displacement d with w·(t + d) = b and t + d ∈ [0, 1] (rows of t, w: [M, D]; b: [M]).

  Where the hyperplane cannot be reached inside the box, d moves to the box corner closest to it.
  """
  m, dim = t.shape
  sign = jnp.where(jnp.sum(w * t, axis=1) - b >= 0, 1.0, -1.0).astype(t.dtype)
  w = w * sign[:, None]
  b = b * sign
  a = (w < 0).astype(t.dtype)
  nonzero = (w != 0).astype(t.dtype)
  d = (a - t) * nonzero
  p = a - t * (2.0 * a - 1.0)
  indp = _argsort_rows(p)
  b = b - jnp.sum(w * t, axis=1)
  b0 = jnp.sum(w * d, axis=1)
  indp2 = indp[:, ::-1]
  ws = jnp.take_along_axis(w, indp2, axis=1)
  bs2 = -ws * jnp.take_along_axis(d, indp2, axis=1)
  s = jnp.cumsum(jnp.abs(ws), axis=1)
  sb = jnp.cumsum(bs2, axis=1) + b0[:, None]
  p_min = jnp.take_along_axis(p, indp[:, :1], axis=1)[:, 0]
  b2 = sb[:, -1] - s[:, -1] * p_min
  c_l = b - b2 > 0
  c2 = (b - b0 > 0) & (b - b2 <= 0)

  lb = jnp.zeros((m,), t.dtype)
  ub = jnp.full((m,), dim - 1, t.dtype)
  for _ in range(math.ceil(math.log2(dim)) if dim > 1 else 0):
    mid = jnp.floor((lb + ub) / 2)
    mid_i = mid.astype(jnp.int32)[:, None]
    ind_cur = jnp.take_along_axis(indp, dim - 1 - mid_i, axis=1)
    b2_mid = (
      jnp.take_along_axis(sb, mid_i, axis=1)
      - jnp.take_along_axis(s, mid_i, axis=1) * jnp.take_along_axis(p, ind_cur, axis=1)
    )[:, 0]
    c = b - b2_mid > 0
    lb = jnp.where(c, mid, lb)
    ub = jnp.where(c, ub, mid)
  lb_i = lb.astype(jnp.int32)[:, None]

  def safe_div(num, den):
    return jnp.where(den != 0, num / jnp.where(den != 0, den, 1.0), 0.0)

  lmbd_l = jnp.maximum(safe_div(b - sb[:, -1], -s[:, -1]), 0.0)
  d_l = (2.0 * a - 1.0) * lmbd_l[:, None]
  s_lb = jnp.take_along_axis(s, lb_i, axis=1)[:, 0]
  sb_lb = jnp.take_along_axis(sb, lb_i, axis=1)[:, 0]
  lmbd_2 = jnp.maximum(safe_div(b - sb_lb, -s_lb), 0.0)[:, None]
  d_2 = jnp.minimum(lmbd_2, d) * a + jnp.maximum(-lmbd_2, d) * (1.0 - a)
  d = jnp.where(c_l[:, None], d_l, jnp.where(c2[:, None], d_2, d))
  return d * nonzero


def _fab_move(logits_fn, s, *, alpha_max, eta):
  """The first half of a targeted FAB iteration: the linearised step from the gradient of the logit difference
  at ``x1`` and the biased combination with the step from ``x``; returns the state with the new ``x1``."""
  x, y, y_target, x1 = s["x"], s["y"], s["y_target"], s["x1"]
  n = x.shape[0]
  x0 = x.reshape(n, -1)

  def diff_fn(xa):
    z = logits_fn(xa)
    zy = jnp.take_along_axis(z, y[:, None], axis=1)[:, 0]
    zt = jnp.take_along_axis(z, y_target[:, None], axis=1)[:, 0]
    diff = -(zy - zt)
    return jnp.sum(diff), diff

  dg, df = jax.grad(diff_fn, has_aux=True)(x1)
  w = dg.reshape(n, -1)
  b = -df + jnp.sum(w * x1.reshape(n, -1), axis=1)
  d3 = projection_linf(
    jnp.concatenate([x1.reshape(n, -1), x0], 0), jnp.concatenate([w, w], 0), jnp.concatenate([b, b], 0)
  )
  d1 = d3[:n].reshape(x.shape)
  d2 = d3[n:].reshape(x.shape)
  a0 = jnp.maximum(jnp.max(jnp.abs(d3), axis=1), 1e-8)
  a1, a2 = a0[:n], a0[n:]
  alpha = _bcast(jnp.clip(a1 / (a1 + a2), 0.0, alpha_max), x)
  x1 = jnp.clip((x1 + eta * d1) * (1.0 - alpha) + (x + d2 * eta) * alpha, 0.0, 1.0)
  return dict(s, x1=x1)


def _fab_check(logits_fn, s, *, beta):
  """The second half: keeps ``x1`` as the best point where it is misclassified and closer than the best so far,
  and pulls a misclassified ``x1`` back towards ``x`` by ``beta``."""
  x, x1 = s["x"], s["x1"]
  is_adv = _predict(logits_fn, x1) != s["y"]
  t = _linf(x1 - x)
  better = is_adv & (t < s["res"])
  adv = jnp.where(_bcast(better, x), x1, s["adv"])
  res = jnp.where(better, t, s["res"])
  x1 = jnp.where(_bcast(is_adv, x), x + (x1 - x) * beta, x1)
  return dict(s, x1=x1, adv=adv, res=res)


def _fab_step(logits_fn, s, *, alpha_max, eta, beta):
  """One targeted FAB iteration on the state ``{x, y, y_target, x1, adv, res}`` (all batch-leading).

  The batch attack compiles its two halves as separate programs: in one program, XLA:CPU shares the broadcasts
  of the network's per-channel parameters between the gradient's and the prediction's passes and materialises
  them: FAB-T took 1.58x as long in a whole AutoAttack run that way (docs/performance.md, "AutoAttack")."""
  return _fab_check(logits_fn, _fab_move(logits_fn, s, alpha_max=alpha_max, eta=eta), beta=beta)


def _fab_init(x, y, y_target, res=None):
  if res is None:
    res = jnp.full((x.shape[0],), _NOT_FOUND, x.dtype)
  return dict(x=x, y=y, y_target=y_target, x1=x, adv=x, res=res)


def _fab_single_run(logits_fn, x, y, y_target, *, n_iter, alpha_max, eta, beta):
  """One targeted FAB run (no random start), as one traceable function; returns (best adversarial point, its
  L∞ distance or 1e10).  The batch attack runs the same step with the loop on the host."""
  step = functools.partial(_fab_step, logits_fn, alpha_max=alpha_max, eta=eta, beta=beta)
  st = jax.lax.fori_loop(0, n_iter, lambda _, s: step(s), _fab_init(x, y, y_target))
  return st["adv"], st["res"]


def _fab_merge(logits_fn, s, robust, adv, *, eps):
  """Keeps a run's point where it was found, is misclassified and lies within ε."""
  x, y = s["x"], s["y"]
  x_r = jnp.where(_bcast(s["res"] < _NOT_FOUND, x), s["adv"], x)
  fooled = (_predict(logits_fn, x_r) != y) & (_linf(x_r - x) <= eps)
  return _merge_new(robust, adv, x_r, fooled)


class _FabTargeted:
  """FAB-T on a padded batch (deterministic: one run per target without random start, as in 'standard'),
  each iteration one call of the compiled step, targets driven from the host (see :class:`_Apgd`)."""

  def __init__(self, logits_fn, jit, *, eps, n_iter, n_target_classes, alpha_max, eta, beta):
    self.n_iter, self.n_target_classes = n_iter, n_target_classes

    def prepare(x, y, mask):
      return _robust_and_order(logits_fn, x, y, mask)

    def move(state):
      return _fab_move(logits_fn, state, alpha_max=alpha_max, eta=eta)

    def check(state):
      return _fab_check(logits_fn, state, beta=beta)

    def merge(state, robust, adv):
      return _fab_merge(logits_fn, state, robust, adv, eps=eps)

    def init(x, y, order, column, res):  # res: host array, laid out like the batch (see _apgd_fill)
      return _fab_init(x, y, _column(order, column), res)

    self._prepare, self._init, self._merge = jit(prepare), jit(init), jit(merge)
    self._move, self._check = jit(move), jit(check)

  def __call__(self, x, y, mask, key):
    del key
    robust, order = self._prepare(x, y, mask)

    def attack(j, robust, adv):
      st = self._init(x, y, order, _rank_column(order, 2 + j), np.full((x.shape[0],), _NOT_FOUND, np.float32))
      for _ in range(self.n_iter):
        st = self._check(self._move(st))
      return self._merge(st, robust, adv)

    return _attack_still_robust(attack, range(self.n_target_classes), robust, x)


def fab_targeted(
  logits_fn: LogitsFn,
  x,
  y,
  key,
  *,
  eps: float,
  n_iter: int = 100,
  n_target_classes: int = 9,
  alpha_max: float = 0.1,
  eta: float = 1.05,
  beta: float = 0.9,
) -> Array:
  """FAB-T (L∞): the minimal adversarial perturbation found for each target in turn, kept if within ε.

  ``key`` is accepted for a uniform interface; the standard version uses no random start, so it is unused.
  """
  x = jnp.asarray(x, jnp.float32)
  y = jnp.asarray(y, jnp.int32)
  _check_inputs(x, y, eps)
  _check_targets(_num_classes(logits_fn, x), n_target_classes, need=2)
  fn = batch_kernel(
    "fab-t",
    logits_fn,
    eps=eps,
    n_iter=n_iter,
    n_target_classes=n_target_classes,
    alpha_max=alpha_max,
    eta=eta,
    beta=beta,
  )
  return fn(x, y, jnp.ones(y.shape, bool), key)


# ----------------------------------------------------------------------------------------------------------
# Square


def square_p_schedule(it: int, p_init: float = 0.8) -> float:
  """Fraction of pixels changed at query ``it`` (the reference schedule, not rescaled)."""
  for bound, div in (
    (10, 1),
    (50, 2),
    (200, 4),
    (500, 8),
    (1000, 16),
    (2000, 32),
    (4000, 64),
    (6000, 128),
    (8000, 256),
  ):
    if it <= bound:
      return p_init / div
  return p_init / 512


def _square_sizes(n_queries: int, p_init: float, h: int, w: int) -> np.ndarray:
  sizes = [max(int(round(math.sqrt(square_p_schedule(i, p_init) * h * w))), 1) for i in range(n_queries)]
  return np.minimum(np.asarray(sizes, np.int32), min(h, w))


# One query per compiled call: XLA:CPU ran 5 queries in one program 1.6x slower than 5 calls (docs/performance.md).
_SQUARE_QUERIES_PER_CALL = 1
_SQUARE_CHECK_EVERY = 100  # calls between the host's checks whether any point is left to attack


def _square_init(logits_fn, x, y, mask, key, it, *, eps):
  n, h, w, c = x.shape
  robust0 = (_predict(logits_fn, x) == y) & mask
  stripes = jnp.sign(jax.random.uniform(key, (n, 1, w, c), x.dtype, -1.0, 1.0))
  x_best = jnp.clip(x + eps * stripes, 0.0, 1.0)
  return dict(x=x, y=y, robust0=robust0, x_best=x_best, margin_min=losses.cw_margin(logits_fn(x_best), y), it=it)


def _square_step(logits_fn, st, key, *, eps, n_queries, p_init, queries):
  """``queries`` Square queries from query ``st['it']`` on; queries past ``n_queries`` change nothing."""
  x, y, robust0 = st["x"], st["y"], st["robust0"]
  n, h, w, c = x.shape
  sizes = jnp.asarray(_square_sizes(n_queries, p_init, h, w))
  rows = jnp.arange(h)[:, None]
  cols = jnp.arange(w)[None, :]
  x_best, margin_min, it = st["x_best"], st["margin_min"], st["it"]
  for _ in range(queries):
    i = it[0]
    active = (margin_min > 0) & robust0 & (i < n_queries)
    s = sizes[jnp.minimum(i, n_queries - 1)]
    kh, kw, ks = jax.random.split(jax.random.fold_in(key, i), 3)
    vh = jnp.floor(jax.random.uniform(kh) * (h - s)).astype(jnp.int32)
    vw = jnp.floor(jax.random.uniform(kw) * (w - s)).astype(jnp.int32)
    sq_sign = jnp.sign(jax.random.uniform(ks, (c,), x.dtype, -1.0, 1.0))
    window = ((rows >= vh) & (rows < vh + s) & (cols >= vw) & (cols < vw + s)).astype(x.dtype)
    delta = 2.0 * eps * window[:, :, None] * sq_sign[None, None, :]
    x_new = attacks.project_linf(x_best + delta[None], x, eps=eps)
    margin = losses.cw_margin(logits_fn(x_new), y)
    improved = ((margin < margin_min) | (margin <= 0)) & active
    x_best = jnp.where(_bcast(improved, x), x_new, x_best)
    margin_min = jnp.where(improved, margin, margin_min)
    it = it + 1
  return dict(st, x_best=x_best, margin_min=margin_min, it=it)


def _square_finish(logits_fn, st):
  x, x_best = st["x"], st["x_best"]
  fooled = (_predict(logits_fn, x_best) != st["y"]) & st["robust0"]
  return jnp.where(_bcast(fooled, x), x_best, x)


class _Square:
  """Square attack (L∞, margin loss) on a padded NHWC batch: a few queries per compiled call, the query loop on
  the host, which stops once no point is left to attack (checked every few calls; the queries run after
  that change nothing), as the reference stops."""

  def __init__(self, logits_fn, jit, *, eps, n_queries, p_init):
    self.n_queries = n_queries
    self._init = jit(functools.partial(_square_init, logits_fn, eps=eps))

    def step(state, key):
      return _square_step(
        logits_fn, state, key, eps=eps, n_queries=n_queries, p_init=p_init, queries=_SQUARE_QUERIES_PER_CALL
      )

    self._step = jit(step)
    self._finish = jit(functools.partial(_square_finish, logits_fn))

  def __call__(self, x, y, mask, key):
    if x.ndim != 4:
      raise ValueError(f"square expects NHWC images, got shape {tuple(x.shape)}")
    k_init, k_loop = jax.random.split(key)
    st = self._init(x, y, mask, k_init, np.zeros((x.shape[0],), np.int32))  # host array: see _apgd_fill
    for call in range(-(-self.n_queries // _SQUARE_QUERIES_PER_CALL)):
      if call % _SQUARE_CHECK_EVERY == 0 and not bool(jnp.any((st["margin_min"] > 0) & st["robust0"])):
        break
      st = self._step(st, k_loop)
    return self._finish(st)


def square(logits_fn: LogitsFn, x, y, key, *, eps: float, n_queries: int = 5000, p_init: float = 0.8) -> Array:
  """Square attack (L∞, margin loss, one restart) on NHWC images; returns x where no adversarial was found."""
  x = jnp.asarray(x, jnp.float32)
  y = jnp.asarray(y, jnp.int32)
  _check_inputs(x, y, eps)
  if x.ndim != 4:
    raise ValueError(f"square expects NHWC images [N, H, W, C], got shape {tuple(x.shape)}")
  if n_queries < 1 or not 0 < p_init <= 1:
    raise ValueError(f"need n_queries >= 1 and 0 < p_init <= 1, got {n_queries} and {p_init}")
  fn = batch_kernel("square", logits_fn, eps=eps, n_queries=n_queries, p_init=p_init)
  return fn(x, y, jnp.ones(y.shape, bool), key)


# ----------------------------------------------------------------------------------------------------------
# Batch functions

_BATCH_FNS = {
  "apgd": lambda fn, jit, **p: _Apgd(fn, jit, **p),
  "apgd-t": lambda fn, jit, **p: _Apgd(fn, jit, loss="dlr_targeted", **p),
  "fab-t": _FabTargeted,
  "square": _Square,
}


def batch_kernel(kind: str, logits_fn: LogitsFn, *, eps: float, jit: Callable = jax.jit, **params) -> Callable:
  """The batch function ``f(x, y, mask, key) -> x_adv`` of one attack ('apgd' also takes target labels as a
  fifth argument).

  ``mask`` [N] marks the real rows of a padded batch; other rows are left as they are.  ``f`` is a host
  loop over the attack's parts (start, iteration, merge of a run's result), each compiled with ``jit``,
  which receives functions whose arguments are all batch-leading arrays or pytrees of them, except one
  named ``key`` (a PRNG key).  Kernels are cached on (kind, logits_fn, eps, params, jit), so calling an
  attack again with the same model does not recompile.
  """
  if kind not in _BATCH_FNS:
    raise ValueError(f"unknown attack kind {kind!r}; expected one of {sorted(_BATCH_FNS)}")
  return _cached_kernel(kind, logits_fn, float(eps), tuple(sorted(params.items())), jit)


@functools.lru_cache(maxsize=16)
def _cached_kernel(kind, logits_fn, eps, params, jit):
  return _BATCH_FNS[kind](logits_fn, jit, eps=eps, **dict(params))


@functools.lru_cache(maxsize=4)
def _predict_kernel(logits_fn, jit):
  return jit(functools.partial(_predict, logits_fn))


# ----------------------------------------------------------------------------------------------------------
# Driver


@dataclasses.dataclass
class AutoAttackResult:
  """Outcome of ``autoattack``.

  x_adv: adversarial inputs (the clean input wherever the point was not broken); robust: bool [N], correct
  after every attack; clean_correct: bool [N]; robust_after: number of robust points after each stage, in
  order, starting with 'clean'; flips: points each attack turned into errors; attacked: points each attack
  was run on; version / label: which attacks ran; params: every parameter used; broken_by: int [N], per
  point, 0 when misclassified clean, k when the k-th attack that ran (1-based, ``params['attacks']`` order)
  flipped it, -1 when still robust; seconds: wall time of each stage ('clean' and each attack that ran),
  compilation included.
  """

  x_adv: np.ndarray
  robust: np.ndarray
  clean_correct: np.ndarray
  robust_after: dict[str, int]
  flips: dict[str, int]
  attacked: dict[str, int]
  version: str
  label: str
  params: dict[str, Any]
  broken_by: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros((0,), np.int32))
  seconds: dict[str, float] = dataclasses.field(default_factory=dict)

  @property
  def clean_accuracy(self) -> float:
    return float(np.mean(self.clean_correct)) if self.clean_correct.size else 0.0

  @property
  def robust_accuracy(self) -> float:
    return float(np.mean(self.robust)) if self.robust.size else 0.0

  def summary(self) -> str:
    n = self.robust.size
    steps = ", ".join(f"{k}: {v}/{n}" for k, v in self.robust_after.items())
    return f"{self.label}: robust accuracy {self.robust_accuracy:.2%} ({steps})"


def standard_params(n_classes: int) -> dict[str, dict[str, Any]]:
  """The standard version's parameters of every attack (the reference's ``version='standard'`` for L∞): 9 target
  classes, or all but the true one with fewer than 10 classes."""
  n_targets = max(min(9, n_classes - 1), 1)
  return {
    "apgd-ce": dict(n_iter=100, n_restarts=1, rho=0.75),
    "apgd-t": dict(n_iter=100, n_target_classes=n_targets, n_restarts=1, rho=0.75),
    "fab-t": dict(n_iter=100, n_target_classes=n_targets, alpha_max=0.1, eta=1.05, beta=0.9),
    "square": dict(n_queries=5000, p_init=0.8),
  }


def autoattack(
  logits_fn: LogitsFn,
  x,
  y,
  *,
  eps: float,
  version: str = "standard",
  seed: int = 0,
  batch_size: int = 500,
  progress: bool = True,
  overrides: Mapping[str, Mapping[str, Any]] | None = None,
  jit: Callable = jax.jit,
  only: Sequence[str] | None = None,
  batch_multiple: int = 1,
) -> AutoAttackResult:
  """Runs AutoAttack (L∞) on (x, y) and returns the per-point outcome.

  version: 'standard' (APGD-CE → APGD-T → FAB-T → Square) or 'apgd' (APGD-CE → APGD-T only, labelled as a
  subset).  Each attack runs only on the points still robust, in batches of ``batch_size`` (the last one
  padded and masked, so each attack compiles once).  Randomness comes from ``jax.random.key(seed)``.
  ``overrides`` changes attack parameters, e.g. ``{'square': {'n_queries': 1000}}``; the label then says the
  parameters are not the standard ones.  ``jit`` wraps every batch function ``f(x, y, mask, key)`` (pass
  ``functools.partial(jax.jit, in_shardings=...)`` to shard the batch dimension).  With fewer than 10 classes
  the targeted attacks use every other class (n_target_classes = C − 1).  ``only`` runs a subset of the
  version's attacks (in the version's order, e.g. ``only=('square',)`` for the black-box attack alone); the
  label then names them.  ``batch_multiple``: the batch is a multiple of it (the number of devices it is
  sharded over), so fewer than ``batch_size`` points are padded up to one.
  """
  if version not in VERSION_LABELS:
    raise ValueError(f"version must be 'standard' or 'apgd', got {version!r}")
  batching.check_batch_size(batch_size, batch_multiple)
  x = np.asarray(x, np.float32)
  y = np.asarray(y, np.int32)
  _check_inputs(x, y, eps)
  n = x.shape[0]
  n_classes = _num_classes(logits_fn, jnp.zeros((1,) + x.shape[1:], jnp.float32))
  attacks = STANDARD_ATTACKS if version == "standard" else APGD_SUBSET_ATTACKS
  if only is not None:
    if isinstance(only, str) or not only or set(only) - set(attacks):
      raise ValueError(f"only must name attacks of version {version!r} {attacks}, got {only!r}")
    attacks = tuple(a for a in attacks if a in set(only))
  if n_classes < 4 and "apgd-t" in attacks:
    raise ValueError(f"AutoAttack's targeted DLR loss needs at least 4 classes, the model has {n_classes}")
  params = standard_params(n_classes)
  params = {k: params[k] for k in attacks}
  label = VERSION_LABELS[version]
  if only is not None:
    label = f"{label} [only: {', '.join(attacks)}]"
  for name, upd in (overrides or {}).items():
    if name not in params:
      raise ValueError(f"overrides names an attack not in version {version!r}: {name!r}")
    unknown = set(upd) - set(params[name])
    if unknown:
      raise ValueError(f"unknown parameters for {name}: {sorted(unknown)}")
    if any(params[name][k] != v for k, v in upd.items()) and "[non-standard parameters]" not in label:
      label = label + " [non-standard parameters]"
    params[name] = {**params[name], **upd}
  for name in ("apgd-t", "fab-t"):
    if name in params:
      _check_targets(n_classes, params[name]["n_target_classes"], need=4 if name == "apgd-t" else 2)

  predict = _predict_kernel(logits_fn, jit)
  bs = batching.fixed_batch_size(n, batch_size, batch_multiple)

  # A batch of m < bs points is padded to the next multiple of about bs/8 only: the attacks after the first
  # run on the points still robust, and padding them all up to bs wasted up to half of their work.  Each size
  # compiles once; the random draws of a real row do not depend on the padding (rows come first, and JAX's
  # counter-based draws give a prefix of a larger array the same values).
  granule = -(-max(bs // 8, 1) // batch_multiple) * batch_multiple

  def padded(idx):
    """The points ``idx`` as a batch ``(x, y)`` padded to a multiple of the granule, and its mask."""
    return batching.pad_rows((x[idx], y[idx]), min(bs, -(-len(idx) // granule) * granule))

  # Clean predictions.
  seconds = {}
  t_stage = time.perf_counter()
  clean_pred = np.empty((n,), np.int32)
  for start in range(0, n, bs):
    idx = np.arange(start, min(start + bs, n))
    (xb, _), _ = padded(idx)
    clean_pred[idx] = np.asarray(predict(jnp.asarray(xb)))[: len(idx)]
  clean_correct = clean_pred == y
  robust = clean_correct.copy()
  broken_by = np.where(clean_correct, -1, 0).astype(np.int32)
  x_adv = x.copy()
  robust_after = {"clean": int(robust.sum())}
  seconds["clean"] = time.perf_counter() - t_stage
  flips, attacked = {}, {}
  root = jax.random.key(seed)

  for a_idx, name in enumerate(attacks):
    t_stage = time.perf_counter()
    todo = np.nonzero(robust)[0]
    attacked[name] = int(todo.size)
    flips[name] = 0
    kind, extra = ("apgd", {"loss": "ce"}) if name == "apgd-ce" else (name, {})
    fn = batch_kernel(kind, logits_fn, eps=eps, jit=jit, **extra, **params[name])
    key_a = jax.random.fold_in(root, a_idx)
    bar = tqdm(total=int(todo.size), desc=name, unit="pt", disable=not progress, file=sys.stderr, dynamic_ncols=True)
    bar.set_postfix(robust=int(robust.sum()))
    for b_idx, start in enumerate(range(0, todo.size, bs)):
      idx = todo[start : start + bs]
      m = len(idx)
      (xb, yb), mask = padded(idx)
      adv_b = fn(jnp.asarray(xb), jnp.asarray(yb), jnp.asarray(mask), jax.random.fold_in(key_a, b_idx))
      pred_b = np.asarray(predict(adv_b))[:m]
      # Re-check every returned point: wrong label, inside the ε-ball (float tolerance) and the box.
      adv_np = np.asarray(adv_b)[:m]
      dist = np.max(np.abs(adv_np - x[idx]).reshape(m, -1), axis=1)
      in_box = np.all((adv_np >= 0.0) & (adv_np <= 1.0), axis=tuple(range(1, adv_np.ndim)))
      fooled = (pred_b != y[idx]) & (dist <= eps * (1 + 1e-6) + 2e-7) & in_box
      hit = idx[fooled]
      robust[hit] = False
      broken_by[hit] = a_idx + 1
      x_adv[hit] = adv_np[fooled]
      flips[name] += int(fooled.sum())
      bar.update(m)
      bar.set_postfix(robust=int(robust.sum()))
    bar.close()
    robust_after[name] = int(robust.sum())
    seconds[name] = time.perf_counter() - t_stage

  params_out = {
    "eps": float(eps),
    "seed": int(seed),
    "batch_size": int(bs),
    "attacks": list(attacks),
    "n_classes": n_classes,
    **params,
  }
  return AutoAttackResult(
    x_adv=x_adv,
    robust=robust,
    clean_correct=clean_correct,
    robust_after=robust_after,
    flips=flips,
    attacked=attacked,
    version=version,
    label=label,
    params=params_out,
    broken_by=broken_by,
    seconds=seconds,
  )
