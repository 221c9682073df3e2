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

The table of these attacks is :data:`PROTOCOL`, one :class:`Attack` entry each.  The model is a
``logits_fn(x) -> logits [N, C]`` (pure, evaluation mode); :func:`logits_fn_from_model` and
:func:`logits_fn_from_apply` build one from a Flax module or an ``apply(variables, x)`` function.  Every attack
runs in fixed-size batches (the last one padded and masked by ``batching.pad_rows``) through one compiled
function built on the batch evaluator :func:`batch_correct`.  The in-training evaluation (an eval step from
``train_step.make_eval_step``, built on the same evaluator, run over a loader by :func:`evaluate_model`) lives
here too.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from mdrad_jax import attacks as attacks_lib
from mdrad_jax import autoattack as aa
from mdrad_jax import batching
from mdrad_jax import parallel

LogitsFn = Callable[[jax.Array], jax.Array]


@dataclasses.dataclass(frozen=True)
class Attack:
  """One attack of the protocol: its key in the results, its name in reports, and how it runs.

  A gradient-sign attack has a ``loss`` ('ce': cross-entropy; 'cw': the CW margin with confidence κ),
  ``steps`` steps from the ``init`` start ('none' or one of ``attacks.INITS``), each of the evaluation's step
  size, or of ε with ``step_is_eps`` (FGSM).  ``loss=None`` is the clean pass, or AutoAttack (``name``
  'autoattack'), which has its own parameters.  Its label and parameters in the results follow from these.
  """

  name: str
  title: str
  loss: str | None = None
  steps: int = 0
  init: str = "none"
  step_is_eps: bool = False

  def label(self, *, eps: float, step_size: float, kappa: float) -> str:
    if self.loss is None:
      return self.name
    loss = "CE" if self.loss == "ce" else f"CW margin, kappa = {kappa:g}"
    start = "no random start" if self.init == "none" else f"{self.init} start"
    if self.step_is_eps:
      return f"FGSM ({loss}, step eps = {eps:.5g}, {start})"
    return f"PGD-{self.steps} ({loss}, step {step_size:.5g}, {start})"

  def params(self, *, eps: float, step_size: float, kappa: float) -> dict[str, Any]:
    if self.loss is None:
      return {}
    p = {
      "eps": float(eps),
      "loss": self.loss,
      "steps": self.steps,
      "init": self.init,
      "step_size": float(eps) if self.step_is_eps else float(step_size),
    }
    if self.loss == "cw":
      p["kappa"] = float(kappa)
    return p


# The protocol, one entry per attack.  The order is that of the reports and fixes each attack's random stream
# (``fold_in(seed, index)``): a new attack goes at the end.
PROTOCOL = (
  Attack("clean", "clean"),
  Attack("fgsm", "FGSM", loss="ce", steps=1, init="none", step_is_eps=True),
  Attack("pgd20", "PGD-20", loss="ce", steps=20, init="uniform"),
  Attack("cw", "CW∞ (PGD-30, κ = 50)", loss="cw", steps=30, init="uniform"),
  Attack("autoattack", "AutoAttack (standard)"),
)
ATTACKS = tuple(a.name for a in PROTOCOL)
BY_NAME = {a.name: a for a in PROTOCOL}
# The result key of each AutoAttack version: the cheaper subset is never reported as the full attack.
AUTOATTACK_KEYS = {"standard": "autoattack", "apgd": "autoattack_apgd_subset"}
# Report names of every result key: the attacks, the AutoAttack subset and AutoAttack's stages.
TITLES = {
  **{a.name: a.title for a in PROTOCOL},
  "autoattack_apgd_subset": "AutoAttack (APGD-CE + APGD-T subset)",
  **aa.TITLES,
}
# name: (objective, steps, random start) of the gradient-sign attacks (kept for compatibility; see PROTOCOL).
PGD_ATTACKS = {a.name: (a.loss, a.steps, a.init) for a in PROTOCOL if a.loss is not None}


def logits_fn_from_apply(apply_fn: Callable, variables: Any, **kwargs) -> LogitsFn:
  """``x -> apply_fn(variables, x, **kwargs)``, e.g. ``logits_fn_from_apply(model.apply, v, train=False)``."""
  return lambda x: apply_fn(variables, x, **kwargs)


def logits_fn_from_model(model, variables: Any) -> LogitsFn:
  """Logits of a Flax module in evaluation mode (running BatchNorm statistics, no dropout)."""
  return lambda x: model.apply(variables, x, train=False)


def attacked_inputs(
  attack: Attack,
  logits_fn: LogitsFn,
  x,
  y,
  key,
  *,
  eps: float,
  step_size: float,
  kappa: float = 50.0,
  unroll: bool = False,
):
  """The inputs ``attack`` (a gradient-sign attack) makes of the batch ``(x, y)``, model in evaluation mode."""
  with_aux = lambda xa, aux: (logits_fn(xa), aux)  # noqa: E731
  objective = (
    attacks_lib.ce_objective(with_aux, y) if attack.loss == "ce" else attacks_lib.cw_objective(with_aux, y, kappa=kappa)
  )
  if attack.step_is_eps:
    x_adv, _ = attacks_lib.fgsm(objective, x, key, eps=eps, init=attack.init)
  else:
    x_adv, _ = attacks_lib.pgd_linf(
      objective, x, key, eps=eps, step_size=step_size, num_steps=attack.steps, init=attack.init, unroll=unroll
    )
  return x_adv


def batch_correct(
  attack: Attack,
  logits_fn: LogitsFn,
  x,
  y,
  mask,
  key,
  *,
  eps: float = 0.0,
  step_size: float = 0.0,
  kappa: float = 50.0,
  unroll: bool = False,
):
  """The batch evaluator: bool [B], the real rows (``mask``) that ``logits_fn`` classifies correctly after
  ``attack`` (the clean pass when ``attack.loss`` is None).  Pure: the evaluation job and the in-training
  evaluation both compile it."""
  x_eval = (
    x
    if attack.loss is None
    else attacked_inputs(attack, logits_fn, x, y, key, eps=eps, step_size=step_size, kappa=kappa, unroll=unroll)
  )
  return (jnp.argmax(logits_fn(x_eval), axis=1) == y) & mask


@functools.lru_cache(maxsize=16)
def _batch_fn(
  attack: Attack, logits_fn: LogitsFn, eps: float, step_size: float, kappa: float, unroll: bool, jit: Callable
):
  """Compiled ``f(x, y, mask, key) -> correct [B]`` for one attack."""

  def f(x, y, mask, key):
    return batch_correct(attack, logits_fn, x, y, mask, key, eps=eps, step_size=step_size, kappa=kappa, unroll=unroll)

  return jit(f)


def evaluate(
  logits_fn: LogitsFn,
  images,
  labels,
  *,
  attacks: Sequence[str] = ATTACKS,
  eps: float = 8 / 255,
  step_size: float = 2 / 255,
  cw_kappa: float = 50.0,
  seed: int = 0,
  batch_size: int = 500,
  aa_version: str = "standard",
  progress: bool = True,
  unroll: bool = True,
  jit: Callable = jax.jit,
  aa_overrides: Mapping[str, Mapping[str, Any]] | None = None,
  batch_multiple: int = 1,
  per_point: bool = False,
) -> dict[str, dict[str, Any]]:
  """Accuracy of ``logits_fn`` on (images, labels) under each attack in ``attacks``.

  Returns ``{name: {'accuracy', 'correct', 'n', 'label', ...}}``; the AutoAttack entry (key 'autoattack' for
  the standard version, 'autoattack_apgd_subset' for ``aa_version='apgd'``) also holds ``version``,
  ``robust_after``, ``flips``, ``attacked`` and ``params``; the other entries hold their ``params``.
  Randomness: ``jax.random.key(seed)``, one stream per attack (fixed by its name, so an attack gives the
  same numbers whichever other attacks run with it) and batch, so a call is reproducible.  ``unroll`` (the
  default) unrolls the PGD loops at trace time: on XLA:CPU a rolled loop of model passes ran PGD-20 2.3x slower
  (docs/performance.md); ``False`` compiles one loop body.  ``jit`` wraps every batch function
  ``f(x, y, mask, key)``, e.g. with shardings, and
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
  batching.check_batch_size(batch_size, batch_multiple)
  if not (eps > 0 and step_size > 0):
    raise ValueError(f"eps and step_size must be positive, got {eps} and {step_size}")
  images = np.asarray(images, np.float32)
  labels = np.asarray(labels, np.int32)
  if images.ndim < 2 or labels.shape != (images.shape[0],):
    raise ValueError(f"images [N, ...] and labels [N] do not match: {images.shape} and {labels.shape}")
  n = images.shape[0]
  bs = batching.fixed_batch_size(n, batch_size, batch_multiple)
  root = jax.random.key(seed)
  out: dict[str, dict[str, Any]] = {}

  for name in attacks:
    if name == "autoattack":
      res = aa.autoattack(
        logits_fn,
        images,
        labels,
        eps=eps,
        version=aa_version,
        seed=seed,
        batch_size=bs,
        progress=progress,
        jit=jit,
        overrides=aa_overrides,
        batch_multiple=batch_multiple,
      )
      key = AUTOATTACK_KEYS[aa_version]
      out[key] = {
        "accuracy": res.robust_accuracy,
        "correct": int(res.robust.sum()),
        "n": n,
        "label": res.label,
        "version": res.version,
        "robust_after": dict(res.robust_after),
        "flips": dict(res.flips),
        "attacked": dict(res.attacked),
        "params": res.params,
      }
      if per_point:
        out[key]["per_point"] = res.robust.copy()
        out[key]["broken_by"] = res.broken_by.copy()
      continue
    attack = BY_NAME[name]
    fn = _batch_fn(attack, logits_fn, float(eps), float(step_size), float(cw_kappa), bool(unroll), jit)
    key_a = jax.random.fold_in(root, ATTACKS.index(name))
    ok_all = np.zeros((n,), bool)
    bar = tqdm(total=n, desc=name, unit="pt", disable=not progress, file=sys.stderr, dynamic_ncols=True)
    for b_idx, start in enumerate(range(0, n, bs)):
      (xb, yb), mask = batching.pad_rows((images[start : start + bs], labels[start : start + bs]), bs)
      ok = fn(jnp.asarray(xb), jnp.asarray(yb), jnp.asarray(mask), jax.random.fold_in(key_a, b_idx))
      done = int(mask.sum())
      ok_all[start : start + done] = np.asarray(ok)[:done]
      bar.update(done)
      bar.set_postfix(acc=f"{ok_all[: start + done].mean():.4f}", left=n - start - done)
    bar.close()
    correct = int(ok_all.sum())
    out[name] = {
      "accuracy": correct / n if n else 0.0,
      "correct": correct,
      "n": n,
      "label": attack.label(eps=eps, step_size=step_size, kappa=cw_kappa),
      "params": attack.params(eps=eps, step_size=step_size, kappa=cw_kappa),
    }
    if per_point:
      out[name]["per_point"] = ok_all
  return out


# ---------------------------------------------------------------------------------------------
# The in-training evaluation: an eval step (``train_step.make_eval_step``, built on batch_correct) over a loader.
# ---------------------------------------------------------------------------------------------
def evaluate_model(eval_step, variables, loader, mesh, *, batch_size: int, key, num_batches: int | None = None) -> dict:
  """Accuracy (and PGD accuracy when the step has an attack) over an eval loader; pads the last batch.

  With several processes each reads its own shard, whose sizes may differ by one example; ``num_batches``
  (the most batches any process has) makes every process run the same number of steps, the missing ones
  fully masked, so that none waits forever on a collective the others never start.
  """
  totals: dict[str, float] = {}
  local = batch_size // jax.process_count()
  template = None
  batches = iter(loader)
  i = 0
  while True:
    batch = next(batches, None)
    if batch is None:
      if num_batches is None or i >= num_batches or template is None:
        break
      batch = {k: v[:0] for k, v in template.items()}  # nothing left here: an all-padding batch
    elif template is None:
      template = batch
    batch = pad_batch(batch, local)
    out = eval_step(variables, parallel.shard_batch(batch, mesh), jax.random.fold_in(key, i))
    i += 1
    for k, v in parallel.to_host(out).items():
      totals[k] = totals.get(k, 0.0) + float(v)
  n = max(totals.get("count", 0.0), 1.0)
  res = {"accuracy": totals.get("correct", 0.0) / n, "num_examples": int(totals.get("count", 0))}
  if "robust" in totals:
    res["pgd_accuracy"] = totals["robust"] / n
    res["clean_pgd_mean"] = (res["accuracy"] + res["pgd_accuracy"]) / 2
  return res


def pad_batch(batch: dict, size: int) -> dict:
  """``batch`` (a dict of arrays) padded with zero rows to ``size`` (``batching.pad_rows``), plus its
  ``'mask'``."""
  padded, mask = batching.pad_rows(batch, size)
  return {**padded, "mask": mask}
