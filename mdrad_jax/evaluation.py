"""Robustness evaluation of any classifier: clean, FGSM, PGD-20, CW∞ and AutoAttack accuracy (L∞).

The protocol (ε = 8/255 on images in [0, 1], model in evaluation mode):

* clean: top-1 accuracy on the unperturbed inputs;
* fgsm: one sign step of size ε on the cross-entropy, no random start;
* pgd20: 20 steps of size 2/255 on the cross-entropy from a uniform start in the ε-ball;
* cw: 30 steps of size 2/255 from a uniform start on the CW margin loss with confidence κ = 50
  (−max(z_y − max_{j≠y} z_j + κ, 0)), as in IAD's evaluation;
* autoattack: ``mdrad_jax.autoattack.autoattack`` — 'standard' (APGD-CE, APGD-T, FAB-T, Square) is reported
  under the key ``'autoattack'``; the cheaper 'apgd' version (APGD-CE + APGD-T) under
  ``'autoattack_apgd_subset'`` with its label, so it is never mistaken for the full attack.

The model is a ``logits_fn(x) -> logits [N, C]`` (pure, evaluation mode); :func:`logits_fn_from_model` and
:func:`logits_fn_from_apply` build one from a Flax module or an ``apply(variables, x)`` function.  Every attack
runs in fixed-size batches (the last one padded and masked) through one compiled function.
"""
from __future__ import annotations

import functools
import sys
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from mdrad_jax import attacks as attacks_lib
from mdrad_jax import autoattack as aa

LogitsFn = Callable[[jax.Array], jax.Array]

ATTACKS = ("clean", "fgsm", "pgd20", "cw", "autoattack")
PGD_ATTACKS = {
    # name: (objective, steps, random start)
    "fgsm": ("ce", 1, "none"),
    "pgd20": ("ce", 20, "uniform"),
    "cw": ("cw", 30, "uniform"),
}


def logits_fn_from_apply(apply_fn: Callable, variables: Any, **kwargs) -> LogitsFn:
  """``x -> apply_fn(variables, x, **kwargs)``, e.g. ``logits_fn_from_apply(model.apply, v, train=False)``."""
  return lambda x: apply_fn(variables, x, **kwargs)


def logits_fn_from_model(model, variables: Any) -> LogitsFn:
  """Logits of a Flax module in evaluation mode (running BatchNorm statistics, no dropout)."""
  return lambda x: model.apply(variables, x, train=False)


def _label(name: str, *, eps: float, step_size: float, kappa: float) -> str:
  if name == "clean":
    return "clean"
  if name == "fgsm":
    return f"FGSM (CE, step eps = {eps:.5g}, no random start)"
  objective, steps, _ = PGD_ATTACKS[name]
  loss = "CE" if objective == "ce" else f"CW margin, kappa = {kappa:g}"
  return f"PGD-{steps} ({loss}, step {step_size:.5g}, uniform start)"


@functools.lru_cache(maxsize=16)
def _batch_fn(name: str, logits_fn: LogitsFn, eps: float, step_size: float, kappa: float, unroll: bool,
              jit: Callable):
  """Compiled ``f(x, y, mask, key) -> correct [B]`` for one attack."""
  with_aux = lambda xa, aux: (logits_fn(xa), aux)

  def f(x, y, mask, key):
    if name == "clean":
      x_eval = x
    else:
      objective_kind, steps, init = PGD_ATTACKS[name]
      objective = (attacks_lib.ce_objective(with_aux, y) if objective_kind == "ce"
                   else attacks_lib.cw_objective(with_aux, y, kappa=kappa))
      if name == "fgsm":
        x_eval, _ = attacks_lib.fgsm(objective, x, key, eps=eps, init=init)
      else:
        x_eval, _ = attacks_lib.pgd_linf(objective, x, key, eps=eps, step_size=step_size, num_steps=steps,
                                         init=init, unroll=unroll)
    return (jnp.argmax(logits_fn(x_eval), axis=1) == y) & mask

  return jit(f)


def evaluate(logits_fn: LogitsFn, images, labels, *, attacks: Sequence[str] = ATTACKS, eps: float = 8 / 255,
             step_size: float = 2 / 255, cw_kappa: float = 50.0, seed: int = 0, batch_size: int = 500,
             aa_version: str = "standard", progress: bool = True, unroll: bool = False,
             jit: Callable = jax.jit, aa_overrides: Mapping[str, Mapping[str, Any]] | None = None,
             batch_multiple: int = 1, per_point: bool = False) -> dict[str, dict[str, Any]]:
  """Accuracy of ``logits_fn`` on (images, labels) under each attack in ``attacks``.

  Returns ``{name: {'accuracy', 'correct', 'n', 'label', ...}}``; the AutoAttack entry (key 'autoattack' for
  the standard version, 'autoattack_apgd_subset' for ``aa_version='apgd'``) also holds ``version``,
  ``robust_after``, ``flips``, ``attacked`` and ``params``; the other entries hold their ``params``.
  Randomness: ``jax.random.PRNGKey(seed)``, one stream per attack (fixed by its name, so an attack gives the
  same numbers whichever other attacks run with it) and batch, so a call is reproducible.  ``unroll`` unrolls the PGD loops at trace time (faster steps on CPU, longer
  compilation); ``jit`` wraps every batch function ``f(x, y, mask, key)``, e.g. with shardings, and
  ``batch_multiple`` makes every batch a multiple of it (the number of devices the batch is sharded over).
  ``aa_overrides`` changes AutoAttack's parameters (see ``autoattack.autoattack``; the label then says so).
  ``per_point=True`` adds ``'per_point'``: bool [N], correct after the attack (and for AutoAttack
  ``'broken_by'``, see ``AutoAttackResult``).
  """
  unknown = [a for a in attacks if a not in ATTACKS]
  if unknown:
    raise ValueError(f"unknown attacks {unknown}; valid: {ATTACKS}")
  if aa_version not in aa.VERSION_LABELS:
    raise ValueError(f"aa_version must be 'standard' or 'apgd', got {aa_version!r}")
  if not isinstance(batch_size, int) or batch_size < 1:
    raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
  if not isinstance(batch_multiple, int) or batch_multiple < 1 or batch_size % batch_multiple:
    raise ValueError(f"batch_size ({batch_size}) must be a multiple of batch_multiple ({batch_multiple!r})")
  if not (eps > 0 and step_size > 0):
    raise ValueError(f"eps and step_size must be positive, got {eps} and {step_size}")
  images = np.asarray(images, np.float32)
  labels = np.asarray(labels, np.int32)
  if images.ndim < 2 or labels.shape != (images.shape[0],):
    raise ValueError(f"images [N, ...] and labels [N] do not match: {images.shape} and {labels.shape}")
  n = images.shape[0]
  bs = min(batch_size, -(-n // batch_multiple) * batch_multiple) if n else batch_multiple
  root = jax.random.PRNGKey(seed)
  out: dict[str, dict[str, Any]] = {}

  for name in attacks:
    if name == "autoattack":
      res = aa.autoattack(logits_fn, images, labels, eps=eps, version=aa_version, seed=seed, batch_size=bs,
                          progress=progress, jit=jit, overrides=aa_overrides, batch_multiple=batch_multiple)
      key = "autoattack" if aa_version == "standard" else "autoattack_apgd_subset"
      out[key] = {"accuracy": res.robust_accuracy, "correct": int(res.robust.sum()), "n": n, "label": res.label,
                  "version": res.version, "robust_after": dict(res.robust_after), "flips": dict(res.flips),
                  "attacked": dict(res.attacked), "params": res.params}
      if per_point:
        out[key]["per_point"] = res.robust.copy()
        out[key]["broken_by"] = res.broken_by.copy()
      continue
    fn = _batch_fn(name, logits_fn, float(eps), float(step_size), float(cw_kappa), bool(unroll), jit)
    key_a = jax.random.fold_in(root, ATTACKS.index(name))
    ok_all = np.zeros((n,), bool)
    bar = tqdm(total=n, desc=name, unit="pt", disable=not progress, file=sys.stderr, dynamic_ncols=True)
    for b_idx, start in enumerate(range(0, n, bs)):
      idx = np.arange(start, min(start + bs, n))
      mask = np.arange(bs) < idx.size
      idx = np.concatenate([idx, np.full(bs - idx.size, idx[0])]) if idx.size < bs else idx
      ok = fn(jnp.asarray(images[idx]), jnp.asarray(labels[idx]), jnp.asarray(mask),
              jax.random.fold_in(key_a, b_idx))
      done = int(mask.sum())
      ok_all[start:start + done] = np.asarray(ok)[:done]
      bar.update(done)
      bar.set_postfix(acc=f"{ok_all[:start + done].mean():.4f}", left=n - start - done)
    bar.close()
    correct = int(ok_all.sum())
    out[name] = {"accuracy": correct / n if n else 0.0, "correct": correct, "n": n,
                 "label": _label(name, eps=eps, step_size=step_size, kappa=cw_kappa),
                 "params": _params(name, eps=eps, step_size=step_size, kappa=cw_kappa)}
    if per_point:
      out[name]["per_point"] = ok_all
  return out


def _params(name: str, *, eps: float, step_size: float, kappa: float) -> dict[str, Any]:
  if name == "clean":
    return {}
  objective, steps, init = PGD_ATTACKS[name]
  p = {"eps": float(eps), "loss": objective, "steps": steps, "init": init,
       "step_size": float(eps) if name == "fgsm" else float(step_size)}
  if objective == "cw":
    p["kappa"] = float(kappa)
  return p


def format_results(results: dict[str, dict[str, Any]]) -> str:
  """One line per attack: ``name  accuracy%  (label)``."""
  return "\n".join(f"{k:<24s} {100 * v['accuracy']:6.2f}%  ({v['label']})" for k, v in results.items())
