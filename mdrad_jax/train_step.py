"""The one compiled train step that every method plugs into.

A method (``mdrad_jax.methods.Method``) is an inner-attack objective plus an outer loss, both pure.  The step
built here does, inside a single ``jax.jit``:

1. frozen teachers on the clean batch, once (their variables are *arguments* of the step, outputs
   ``stop_gradient``ed);
2. the inner maximisation: L∞ PGD on the method's objective, with the student's BatchNorm in the method's
   attack mode ('eval': running statistics; 'train_no_update': batch statistics, running stats untouched;
   'train_update': batch statistics with the running stats updated by every attack forward, as ARD/IAD's
   PyTorch code does);
3. teachers on the adversarial batch, when the method needs them;
4. the outer loss: student forwards in train mode on the views the method needs (adversarial first, then
   clean, threading BatchNorm statistics as two successive PyTorch forwards would), feature projectors,
   the method's loss; gradients reach the student and projectors only;
5. the optimizer update, the method-state update (MTARD weights, temperatures...), metrics.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from mdrad_jax import attacks
from mdrad_jax import evaluation
from mdrad_jax.methods import Method
from mdrad_jax.train_state import TrainState

BN_MODES = ("eval", "train_no_update", "train_update")


class AttackConfig(NamedTuple):
  eps: float = 8 / 255
  step_size: float = 2 / 255
  num_steps: int = 10
  init: str = "uniform"
  bn_mode: str = "eval"
  unroll: bool = True
  clip_start: bool = True  # project the random start before the first gradient
  dtype: str = ""  # compute dtype of the student inside the attack ('' = the student's own)


class StepOutputs(NamedTuple):
  """What a method's outer loss sees.  Teacher entries are per teacher (``None`` where the method's plan
  did not ask for that view) and constant; student logits are float32."""

  labels: jax.Array
  student_adv: jax.Array | None = None  # S(x') logits, train mode
  student_clean: jax.Array | None = None  # S(x) logits, train mode
  projected: tuple | None = None  # P_k(f_S(x')) for each teacher k
  teacher_clean: tuple | None = None  # T_k(x) logits [N, C] per teacher
  teacher_adv: tuple | None = None  # T_k(x') logits [N, C] per teacher
  teacher_clean_features: tuple | None = None  # f_{T_k}(x) per teacher
  epoch: jax.Array | None = None  # current (fractional) epoch, for warm-up switches
  lr_scale: jax.Array | float = 1.0  # current lr / base lr (MTARD decays its own rates with it)


def _apply(model: nn.Module, params, batch_stats, x, *, train: bool, features: bool = False, update_stats: bool = True):
  """Runs ``model``; returns ``(out, new_batch_stats)`` where out is logits or (logits, features)."""
  variables = {"params": params}
  if batch_stats:
    variables["batch_stats"] = batch_stats
  kwargs = {"return_features": True} if features else {}
  if train and batch_stats:
    out, upd = model.apply(variables, x, train=True, mutable=["batch_stats"], **kwargs)
    return out, (upd["batch_stats"] if update_stats else batch_stats)
  return model.apply(variables, x, train=train, **kwargs), batch_stats


def teacher_forward(
  teacher_models: Sequence[nn.Module],
  teacher_vars: Sequence[dict],
  x,
  *,
  which: Sequence[bool] | None = None,
  features: bool = False,
):
  """Teachers in eval mode on ``x``: a tuple of logits [N, C] (``None`` for teachers not in ``which``) and,
  with ``features``, a tuple of their ``'last'`` feature maps.  Outputs are ``stop_gradient``ed."""
  logits, feats = [], []
  which = [True] * len(teacher_models) if which is None else which
  for model, variables, on in zip(teacher_models, teacher_vars, which):
    if not on:
      logits.append(None)
      feats.append(None)
      continue
    out = model.apply(variables, x, train=False, **({"return_features": True} if features else {}))
    if features:
      out, f = out
      feats.append(jax.lax.stop_gradient(f["last"]))
    logits.append(jax.lax.stop_gradient(out.astype(jnp.float32)))
  return tuple(logits), (tuple(feats) if features else None)


def make_train_step(
  *,
  model: nn.Module,
  method: Method,
  hparams: dict,
  attack: AttackConfig,
  teacher_models: Sequence[nn.Module] = (),
  projectors: Sequence[nn.Module] = (),
  steps_per_epoch: int = 1,
  lr_schedule=None,
  base_lr: float = 1.0,
):
  """Builds the pure step ``(state, teacher_vars, batch) -> (state, metrics)`` (not yet jitted)."""
  if attack.bn_mode not in BN_MODES:
    raise ValueError(f"attack.bn_mode must be one of {BN_MODES}, got {attack.bn_mode!r}")
  hparams = dict(hparams)
  teacher_models = tuple(teacher_models)
  attack_model = model
  if attack.dtype:
    from mdrad_jax import precision

    attack_model = precision.with_dtype(model, attack.dtype)
  plan = method.plan(hparams, len(teacher_models))
  t_clean_on = [("clean" in v) or plan.teacher_features for v in plan.teacher_views]
  t_adv_on = [("adv" in v) for v in plan.teacher_views]
  if plan.student_features and len(projectors) != len(teacher_models):
    raise ValueError(f"{len(teacher_models)} teachers but {len(projectors)} feature projectors")

  def step(state: TrainState, teacher_vars: tuple, batch: dict):
    x = batch["image"]
    y = batch["label"]
    key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    epoch = state.step.astype(jnp.float32) / steps_per_epoch
    lr_scale = (lr_schedule(state.step) / base_lr) if lr_schedule is not None else 1.0
    params, stats = state.params, state.batch_stats
    model_stats = stats.get("model", {})

    t_clean, t_feats = (None,) * len(teacher_models), None
    if any(t_clean_on):
      t_clean, t_feats = teacher_forward(
        teacher_models, teacher_vars, x, which=t_clean_on, features=plan.teacher_features
      )

    # -- inner maximisation ----------------------------------------------------------------
    x_adv = None
    if method.make_objective is not None:
      student_params = jax.lax.stop_gradient(params["model"])

      def student_logits(xa, aux):
        if attack.bn_mode == "eval":
          return _apply(attack_model, student_params, model_stats, xa, train=False)[0], aux
        if attack.bn_mode == "train_no_update":
          return _apply(attack_model, student_params, model_stats, xa, train=True, update_stats=False)[0], aux
        out, new_stats = _apply(attack_model, student_params, aux, xa, train=True)
        return out, new_stats

      def teacher_logits_fn(k):
        return lambda xa: teacher_models[k].apply(teacher_vars[k], xa, train=False).astype(jnp.float32)

      objective = method.make_objective(
        student_logits=student_logits,
        teacher_logits=[teacher_logits_fn(k) for k in range(len(teacher_models))],
        x=x,
        labels=y,
        teacher_clean=t_clean,
        hparams=hparams,
      )
      aux0 = model_stats if attack.bn_mode == "train_update" else None
      x_adv, aux = attacks.pgd_linf(
        objective,
        x,
        key,
        eps=attack.eps,
        step_size=attack.step_size,
        num_steps=attack.num_steps,
        init=attack.init,
        aux=aux0,
        unroll=attack.unroll,
        clip_start=attack.clip_start,
      )
      if attack.bn_mode == "train_update":
        model_stats = aux

    t_adv = (None,) * len(teacher_models)
    if any(t_adv_on):
      t_adv, _ = teacher_forward(teacher_models, teacher_vars, x_adv, which=t_adv_on)

    # -- outer loss ------------------------------------------------------------------------
    def loss_fn(p):
      cur = model_stats
      s_adv = s_clean = projected = None
      proj_stats = stats.get("projectors", {})
      for view in plan.student_views:
        xin = x_adv if view == "adv" else x
        want_feats = plan.student_features and view == "adv"
        prev = cur
        out, cur = _apply(model, p["model"], cur, xin, train=True, features=want_feats)
        if view == "clean" and plan.clean_stats_from_epoch is not None:
          on = epoch >= plan.clean_stats_from_epoch
          cur = jax.tree.map(lambda new, old: jnp.where(on, new, old), cur, prev)
        if want_feats:
          out, f = out
          outs, new_proj_stats = [], {}
          for k in range(len(teacher_models)):
            name = str(k)
            pv = {"params": p["projectors"][name]}
            if proj_stats.get(name):
              pv["batch_stats"] = proj_stats[name]
            o, upd = projectors[k].apply(pv, f["last"], train=True, mutable=["batch_stats"])
            outs.append(o)
            new_proj_stats[name] = upd.get("batch_stats", {})
          projected = tuple(outs)
          proj_stats = new_proj_stats
        if view == "adv":
          s_adv = out.astype(jnp.float32)
        else:
          s_clean = out.astype(jnp.float32)
      outputs = StepOutputs(
        labels=y,
        student_adv=s_adv,
        student_clean=s_clean,
        projected=projected,
        teacher_clean=t_clean,
        teacher_adv=t_adv,
        teacher_clean_features=t_feats,
        epoch=epoch,
        lr_scale=lr_scale,
      )
      loss, metrics = method.loss(outputs, state.method_state, hparams)
      new_stats = {"model": cur, "projectors": proj_stats}
      return loss, (metrics, new_stats, outputs)

    (loss, (metrics, new_stats, outputs)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    new_method_state = method.update_state(state.method_state, metrics, hparams, lr_scale)
    new_state = state.apply_gradients(grads, batch_stats=new_stats, method_state=new_method_state)

    metrics = dict(metrics)
    metrics["loss"] = loss
    main_logits = outputs.student_adv if outputs.student_adv is not None else outputs.student_clean
    metrics["accuracy"] = jnp.mean(jnp.argmax(main_logits, -1) == y)
    if outputs.student_clean is not None and outputs.student_adv is not None:
      metrics["clean_accuracy"] = jnp.mean(jnp.argmax(outputs.student_clean, -1) == y)
    metrics["grad_norm"] = jnp.sqrt(sum(jnp.sum(g.astype(jnp.float32) ** 2) for g in jax.tree.leaves(grads["model"])))
    return new_state, metrics

  return step


def make_eval_step(model: nn.Module, *, pgd: AttackConfig | None = None):
  """``(variables, batch, key) -> dict`` of per-batch counts: correct (clean) and, with ``pgd``, robust.

  ``batch`` may carry a boolean ``mask`` (padding of the last batch); counts ignore masked-out rows.  Both
  counts come from the evaluation job's batch evaluator (``evaluation.batch_correct``); the PGD attack is
  ``pgd.num_steps`` cross-entropy steps of ``pgd.step_size`` from the ``pgd.init`` start.
  """
  attack = None
  if pgd is not None and pgd.num_steps > 0:
    attack = evaluation.Attack("pgd", "PGD", loss="ce", steps=pgd.num_steps, init=pgd.init)

  def step(variables, batch, key):
    def logits_fn(xx):
      return model.apply(variables, xx, train=False).astype(jnp.float32)

    x, y = batch["image"], batch["label"]
    mask = batch.get("mask", jnp.ones(y.shape, bool))
    correct = evaluation.batch_correct(evaluation.BY_NAME["clean"], logits_fn, x, y, mask, None)
    out = {"correct": jnp.sum(correct), "count": jnp.sum(mask)}
    if attack is not None:
      robust = evaluation.batch_correct(
        attack, logits_fn, x, y, mask, key, eps=pgd.eps, step_size=pgd.step_size, unroll=pgd.unroll
      )
      out["robust"] = jnp.sum(robust)
    return out

  return step


def jit_train_step(step, mesh, *, donate: bool = True, teacher_sharding=None):
  """``jax.jit`` with the batch sharded over the mesh's data axis and state/teachers replicated."""
  from mdrad_jax import parallel

  rep = parallel.replicated(mesh)
  data = parallel.data_sharding(mesh)
  return jax.jit(
    step,
    in_shardings=(rep, teacher_sharding if teacher_sharding is not None else rep, data),
    out_shardings=(rep, rep),
    donate_argnums=(0,) if donate else (),
  )


def jit_eval_step(step, mesh):
  from mdrad_jax import parallel

  rep = parallel.replicated(mesh)
  return jax.jit(step, in_shardings=(rep, parallel.data_sharding(mesh), rep), out_shardings=rep)
