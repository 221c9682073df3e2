"""Training methods: each one is an inner-attack objective plus an outer loss, both pure.

A ``Method`` tells the shared train step (``mdrad_jax.train_step``) what to compute for it and supplies pure
functions:

* ``plan(hparams, num_teachers) -> Plan``: which teacher views (clean ``x`` / adversarial ``x'``, per
  teacher), which student train-mode forwards, whether features are needed.  Decided at trace time, so
  nothing unused is computed (e.g. ARD with α = 1 runs no clean student forward);
* ``make_objective(...)``: the per-sample objective ``objective(x_adv, aux) -> (loss [N], aux)`` PGD
  maximises (``None``: no attack);
* ``loss(outputs, method_state, hparams) -> (scalar, metrics)``: the outer loss on ``StepOutputs``, a thin
  adapter to the public ``mdrad_jax.losses.<method>_loss`` function;
* ``init_state`` / ``update_state``: adaptive quantities kept as arrays in the train state (MTARD).

``hparams`` is the config's ``method`` block as a dict; ``defaults`` lists every field a method reads, and
``configs`` expose them all for command-line overrides.  Attack random start and BatchNorm mode defaults
follow each method's official code (spec §0.3, §0.4); ``config.attack.init`` / ``bn_mode`` override them.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any, Callable

import jax
import jax.numpy as jnp

from mdrad_jax import attacks
from mdrad_jax import losses


@dataclasses.dataclass(frozen=True)
class Plan:
  student_views: tuple[str, ...]  # train-mode student forwards, in order ('adv' | 'clean')
  teacher_views: tuple[tuple[str, ...], ...]  # per teacher: subset of ('clean', 'adv')
  student_features: bool = False  # projected student features on the adversarial batch
  teacher_features: bool = False  # teacher feature maps on the clean batch
  # the clean train-mode forward moves BatchNorm statistics only from this epoch on (None = always): a method
  # whose official loop runs no clean forward before a switch epoch (IAD-II), and whose loss does not use it then
  clean_stats_from_epoch: float | None = None


def _no_state(hparams):
  return {}


def _keep_state(state, metrics, hparams, lr_scale):
  return state


def _fixed_plan(student_views, teacher_views=()):
  def plan(hp, k):
    return Plan(student_views=student_views, teacher_views=tuple(tuple(teacher_views) for _ in range(k)))

  return plan


@dataclasses.dataclass(frozen=True)
class Method:
  name: str
  loss: Callable[..., tuple[jax.Array, dict]]
  plan: Callable[[dict, int], Plan]
  defaults: dict = dataclasses.field(default_factory=dict)
  make_objective: Callable[..., Callable] | None = None
  attack_init: str = "uniform"
  attack_bn: str = "eval"
  attack_clip_start: bool = True  # False: first gradient at the raw random start, as the official loop
  min_teachers: int = 0
  max_teachers: int | None = 0
  teacher_roles: tuple[str, ...] = ()  # documentation of what each teacher slot is, when roles differ
  init_state: Callable[[dict], Any] = _no_state
  update_state: Callable[[Any, dict, dict, Any], Any] = _keep_state

  def check_teachers(self, k: int) -> None:
    lo, hi = self.min_teachers, self.max_teachers
    if k < lo or (hi is not None and k > hi):
      want = f"exactly {hi}" if hi == lo else f"at least {lo}" if hi is None else f"{lo} to {hi}"
      roles = f" ({', '.join(self.teacher_roles)})" if self.teacher_roles else ""
      raise ValueError(f"method {self.name!r} needs {want} teacher(s){roles} in config.teachers, got {k}")


METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
  METHODS[method.name] = method
  return method


def get_method(name: str) -> Method:
  if name not in METHODS:
    raise ValueError(f"unknown method {name!r}; known: {sorted(METHODS)}")
  return METHODS[name]


def stack(teachers: tuple | None) -> jax.Array:
  """Stacks the per-teacher logits of one view into [K, N, C] (all teachers must have that view)."""
  if not teachers or any(t is None for t in teachers):
    raise ValueError("a teacher view this loss needs was not computed (check the method's plan)")
  return jnp.stack(teachers)


# ---------------------------------------------------------------------------------------------
# Inner objectives.
# ---------------------------------------------------------------------------------------------
def ce_inner(*, student_logits, labels, **_):
  """Maximise CE(S(x'), y)."""
  return attacks.ce_objective(student_logits, labels)


def teacher_kl_inner(*, student_logits, teacher_clean, **_):
  """RSLAD: maximise KL(softmax(T(x)) ‖ softmax(S(x'))) (sum over the batch)."""
  return attacks.kl_objective(student_logits, jax.nn.softmax(stack(teacher_clean)[0], axis=-1))


def adaad_inner(*, student_logits, teacher_logits, **_):
  """AdaAD: maximise KL(softmax(T(x')) ‖ softmax(S(x'))), gradient through teacher and student."""
  return attacks.adaad_objective(student_logits, teacher_logits)


def trades_inner(*, student_logits, x, **_):
  """TRADES: maximise KL(softmax(S(x)) ‖ softmax(S(x'))), S(x) in the attack's BN mode, constant."""
  clean_logits, _ = student_logits(x, None)
  return attacks.trades_objective(student_logits, jax.lax.stop_gradient(clean_logits))


def sa_mdrad_inner(*, student_logits, teacher_logits, teacher_clean, labels, hparams, **_):
  """SA-MDRAD inner objective (INFERRED): 'ce' (default), 'fused_kl' (RSLAD-style on the fused rectified
  target p̂ at temperature τ) or 'adaad' (Σ_k w_k KL(T_k(x') ‖ S(x')) with the fusion weights of T_k(x))."""
  kind = hparams["inner"]
  if kind == "ce":
    return attacks.ce_objective(student_logits, labels)
  t = stack(teacher_clean)
  if kind == "fused_kl":
    p_hat, _ = losses.fused_soft_target(
      t,
      labels,
      rectifier=hparams["rectifier"],
      fusion=hparams["fusion"],
      temperature=hparams["temperature"],
      adr_lambda=hparams["adr_lambda"],
    )
    return attacks.kl_objective(student_logits, p_hat, temperature=hparams["temperature"])
  if kind == "adaad":
    w = losses.fusion_weights(hparams["fusion"], t, labels)
    return attacks.adaad_objective(student_logits, teacher_logits, weights=w)
  raise ValueError(f"method.inner must be 'ce', 'fused_kl' or 'adaad', got {kind!r}")


# ---------------------------------------------------------------------------------------------
# The methods.
# ---------------------------------------------------------------------------------------------
def _natural_loss(out, state, hp):
  ce = losses.cross_entropy(out.student_clean, out.labels)
  return ce, {"ce": ce}


# Standard training: CE on clean inputs (used to train the teachers).
register(Method(name="natural", loss=_natural_loss, plan=_fixed_plan(("clean",))))


# PGD-AT (Madry et al., as AdaAD's Plain_Madry): CE on PGD-10 examples.
register(
  Method(
    name="pgd_at",
    loss=lambda out, st, hp: losses.pgd_at_loss(student_adv_logits=out.student_adv, labels=out.labels),
    # AdaAD's Plain_Madry: start x + 0.001·N clipped to the box; S(x') then S(x) in train mode (the clean
    # forward only moves BatchNorm statistics; the loss is CE on S(x') alone).
    plan=_fixed_plan(("adv", "clean")),
    make_objective=ce_inner,
    attack_init="normal",
    attack_bn="eval",
  )
)


# TRADES: CE(S(x)) + β KL(S(x) ‖ S(x')), inner max of the KL.
register(
  Method(
    name="trades",
    loss=lambda out, st, hp: losses.trades_loss(
      student_clean_logits=out.student_clean,
      student_adv_logits=out.student_adv,
      labels=out.labels,
      beta=hp["beta"],
      reduction=hp["reduction"],
    ),
    # the official loop's forwards in train mode: S(x) for the CE, then S(x') and S(x) again inside the KL
    # (the two clean outputs are equal; the three forwards move the BatchNorm statistics three times)
    plan=_fixed_plan(("clean", "adv", "clean")),
    defaults=dict(beta=6.0, reduction="batchmean"),
    make_objective=trades_inner,
    attack_init="normal",
    attack_bn="eval",
    attack_clip_start=False,
  )
)


def _kd_loss(out, st, hp):
  return losses.kd_loss(
    student_logits=out.student_clean,
    teacher_logits=stack(out.teacher_clean),
    labels=out.labels,
    temperature=hp["temperature"],
    alpha=hp["alpha"],
    reduction=hp["reduction"],
  )


# Clean Hinton KD (KL averaged over the teachers), no attack.
register(
  Method(
    name="kd",
    loss=_kd_loss,
    plan=_fixed_plan(("clean",), ("clean",)),
    defaults=dict(temperature=4.0, alpha=0.9, reduction="batchmean"),
    min_teachers=1,
    max_teachers=None,
  )
)


def _ard_plan(hp, k):
  # the official loop always runs S(x) in train mode after S(x') (with α = 1 it only moves BN statistics)
  return Plan(student_views=("adv", "clean"), teacher_views=(("clean",),) * k)


def _ard_loss(out, st, hp):
  return losses.ard_loss(
    student_adv_logits=out.student_adv,
    teacher_clean_logits=stack(out.teacher_clean)[0],
    student_clean_logits=out.student_clean,
    labels=out.labels,
    temperature=hp["temperature"],
    alpha=hp["alpha"],
    reduction=hp["reduction"],
  )


# ARD (Goldblum et al.): α τ² KL(T(x)/τ ‖ S(x')/τ) + (1−α) CE(S(x), y).
register(
  Method(
    name="ard",
    loss=_ard_loss,
    plan=_ard_plan,
    defaults=dict(temperature=30.0, alpha=1.0, reduction="elem_mean"),
    make_objective=ce_inner,
    attack_init="uniform",
    attack_bn="train_update",
    attack_clip_start=False,
    min_teachers=1,
    max_teachers=1,
  )
)


def _rslad_loss(out, st, hp):
  return losses.rslad_loss(
    student_adv_logits=out.student_adv,
    student_clean_logits=out.student_clean,
    teacher_clean_logits=stack(out.teacher_clean)[0],
    alpha=hp["alpha"],
    reduction=hp["reduction"],
    kl_scale=hp["kl_scale"],
  )


# RSLAD (Zi et al.): robust soft labels of T(x) on S(x') and S(x); kl_scale=10 on CIFAR-100.
register(
  Method(
    name="rslad",
    loss=_rslad_loss,
    plan=_fixed_plan(("adv", "clean"), ("clean",)),
    defaults=dict(alpha=5.0 / 6.0, reduction="elem_mean", kl_scale=1.0),
    make_objective=teacher_kl_inner,
    attack_init="normal",
    attack_bn="eval",
    attack_clip_start=False,
    min_teachers=1,
    max_teachers=1,
  )
)


def _adaad_plan(hp, k):
  # the official loop runs S(x) then S(x') in train mode whatever α (with α = 1, S(x) only moves BN stats)
  teacher = ("adv",) if hp["alpha"] == 1.0 else ("clean", "adv")
  return Plan(student_views=("clean", "adv"), teacher_views=(teacher,) * k)


def _adaad_loss(out, st, hp):
  t_clean = stack(out.teacher_clean)[0] if hp["alpha"] != 1.0 else None
  return losses.adaad_loss(
    student_adv_logits=out.student_adv,
    teacher_adv_logits=stack(out.teacher_adv)[0],
    student_clean_logits=out.student_clean,
    teacher_clean_logits=t_clean,
    alpha=hp["alpha"],
    reduction=hp["reduction"],
  )


# AdaAD (Huang et al.): inner max of KL(T(x') ‖ S(x')) through both networks; reduction 'elem_mean' on CIFAR-10,
# 'batchmean' on CIFAR-100.
register(
  Method(
    name="adaad",
    loss=_adaad_loss,
    plan=_adaad_plan,
    defaults=dict(alpha=1.0, reduction="elem_mean"),
    make_objective=adaad_inner,
    attack_init="normal",
    attack_bn="eval",
    attack_clip_start=False,
    min_teachers=1,
    max_teachers=1,
  )
)


def _iad1_loss(out, st, hp):
  return losses.iad1_loss(
    student_adv_logits=out.student_adv,
    student_clean_logits=out.student_clean,
    teacher_clean_logits=stack(out.teacher_clean)[0],
    teacher_adv_logits=stack(out.teacher_adv)[0],
    labels=out.labels,
    introspection_on=out.epoch >= hp["begin_epoch"],
    temperature=hp["temperature"],
    alpha=hp["alpha"],
    beta=hp["beta"],
    detach_self_target=hp["detach_self_target"],
    reduction=hp["reduction"],
  )


# IAD-I (Zhu et al.): ARD plus introspective self-distillation weighted by 1 − P_T(y|x')^β.
register(
  Method(
    name="iad1",
    loss=_iad1_loss,
    plan=_fixed_plan(("adv", "clean"), ("clean", "adv")),
    defaults=dict(
      temperature=1.0, alpha=1.0, beta=0.1, begin_epoch=60.0, detach_self_target=False, reduction="batchmean"
    ),
    make_objective=ce_inner,
    attack_init="uniform",
    attack_bn="train_update",
    attack_clip_start=False,
    min_teachers=1,
    max_teachers=1,
  )
)


def _iad2_loss(out, st, hp):
  t_adv = stack(out.teacher_adv)
  return losses.iad2_loss(
    student_adv_logits=out.student_adv,
    student_clean_logits=out.student_clean,
    teacher_at_adv_logits=t_adv[0],
    teacher_st_adv_logits=t_adv[1],
    labels=out.labels,
    introspection_on=out.epoch >= hp["begin_epoch"],
    temperature=hp["temperature"],
    alpha1=hp["alpha1"],
    alpha2=hp["alpha2"],
    beta=hp["beta"],
    detach_self_target=hp["detach_self_target"],
    reduction=hp["reduction"],
  )


def _iad2_plan(hp, k):
  # before begin_epoch the official loop runs no clean forward (the self term, its only use, is off)
  return Plan(
    student_views=("adv", "clean"), teacher_views=(("adv",),) * k, clean_stats_from_epoch=float(hp["begin_epoch"])
  )


# IAD-II (Zhu et al.): AKD2 with an AT and a standard teacher, introspective weighting.
register(
  Method(
    name="iad2",
    loss=_iad2_loss,
    plan=_iad2_plan,
    defaults=dict(
      temperature=1.0,
      alpha1=0.5,
      alpha2=0.25,
      beta=0.1,
      begin_epoch=40.0,
      detach_self_target=False,
      reduction="batchmean",
    ),
    make_objective=ce_inner,
    attack_init="uniform",
    attack_bn="train_update",
    attack_clip_start=False,
    min_teachers=2,
    max_teachers=2,
    teacher_roles=("adversarially trained teacher", "standard teacher"),
  )
)


def _mtard_plan(hp, k):
  return Plan(student_views=("adv", "clean"), teacher_views=(("adv",), ("clean",)))


def _mtard_init(hp):
  return losses.mtard_init_state()


def _mtard_kwargs(hp, lr_scale):
  # lr_w and (B-MTARD) lr_tau decay ×0.1 with the learning rate, as the official scripts do (215/260/285)
  return dict(lr_w=hp["lr_w"] * lr_scale, beta=hp["beta"], balanced=hp["balanced"], lr_tau=hp["lr_tau"] * lr_scale)


def _mtard_loss(out, st, hp):
  return losses.mtard_loss(
    student_adv_logits=out.student_adv,
    student_clean_logits=out.student_clean,
    teacher_adv_logits=out.teacher_adv[0],
    teacher_clean_logits=out.teacher_clean[1],
    state=st,
    reduction=hp["reduction"],
    kl_scale=hp["kl_scale"],
    **_mtard_kwargs(hp, out.lr_scale),
  )


def _mtard_update(st, m, hp, lr_scale):
  return losses.mtard_update_state(
    st,
    m["kl_adv"],
    m["kl_clean"],
    entropy_adv=m["teacher_neg_entropy_adv"],
    entropy_clean=m["teacher_neg_entropy_clean"],
    **_mtard_kwargs(hp, lr_scale),
  )


# MTARD and B-MTARD (Zhao et al.): adaptive weights between a robust teacher on x' and a clean teacher on x;
# kl_scale=10 on CIFAR-100.
_MTARD_DEFAULTS = dict(lr_w=0.025, beta=1.0, lr_tau=0.001, reduction="elem_mean", kl_scale=1.0)
for _name, _balanced in (("mtard", False), ("bmtard", True)):
  register(
    Method(
      name=_name,
      loss=_mtard_loss,
      plan=_mtard_plan,
      defaults=dict(_MTARD_DEFAULTS, balanced=_balanced),
      make_objective=ce_inner,
      attack_init="normal",
      attack_bn="eval",
      attack_clip_start=False,
      min_teachers=2,
      max_teachers=2,
      teacher_roles=("adversarially trained teacher (on x')", "clean teacher (on x)"),
      init_state=_mtard_init,
      update_state=_mtard_update,
    )
  )


# SA-MDRAD's teacher view: the teachers queried on the clean batch only, or on the adversarial one too.
TEACHER_VIEWS = ("clean", "adv")


def _sa_mdrad_plan(hp, k):
  uses_features = hp["feature_weight"] != 0.0
  views = ("clean", "adv") if hp["teacher_view"] == "adv" else ("clean",)
  needs_clean = hp["alpha"] != 1.0 or (hp["rectifier"] == "dynamic" and hp["dynamic_target"] == "student")
  s_views = ("adv", "clean") if needs_clean else ("adv",)
  if hp["teacher_view"] not in TEACHER_VIEWS:
    raise ValueError(f"method.teacher_view must be one of {TEACHER_VIEWS}, got {hp['teacher_view']!r}")
  return Plan(
    student_views=s_views, teacher_views=(views,) * k, student_features=uses_features, teacher_features=uses_features
  )


def _sa_mdrad_loss(out, st, hp):
  t_adv = stack(out.teacher_adv) if hp["teacher_view"] == "adv" else None
  return losses.sa_mdrad_loss(
    student_adv_logits=out.student_adv,
    teacher_clean_logits=stack(out.teacher_clean),
    labels=out.labels,
    student_clean_logits=out.student_clean,
    teacher_adv_logits=t_adv,
    projected_features=out.projected,
    teacher_features=out.teacher_clean_features,
    rectifier=hp["rectifier"],
    fusion=hp["fusion"],
    temperature=hp["temperature"],
    alpha=hp["alpha"],
    feature_weight=hp["feature_weight"],
    ce_weight=hp["ce_weight"],
    adr_lambda=hp["adr_lambda"],
    reduction=hp["reduction"],
    dynamic_target=hp["dynamic_target"],
    dynamic_beta=hp["dynamic_beta"],
  )


def _keyword_defaults(fn: Callable) -> dict[str, Any]:
  """The keyword arguments of ``fn`` that have a default other than None (its hyper-parameters, not its
  optional inputs), so that a method's config defaults are those of its public loss function."""
  return {
    k: p.default
    for k, p in inspect.signature(fn).parameters.items()
    if p.default is not inspect.Parameter.empty and p.default is not None
  }


# SA-MDRAD (reconstruction, INFERRED): K standard teachers, per-sample rectification and fusion, logit and feature
# distillation.
register(
  Method(
    name="sa_mdrad",
    loss=_sa_mdrad_loss,
    plan=_sa_mdrad_plan,
    # the loss's own keyword defaults (the study's choice, docs/methods.md §6.3) plus the two fields it does not take
    defaults=dict(teacher_view="clean", inner="ce", **_keyword_defaults(losses.sa_mdrad_loss)),
    make_objective=sa_mdrad_inner,
    attack_init="uniform",
    attack_bn="eval",
    min_teachers=1,
    max_teachers=None,
  )
)
