"""The shared train step: every method runs, learns on a fixed batch, compiles once; gradients reach the
student and projectors only; BatchNorm policy of the attack is honoured."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mdrad_jax import config_lib, methods, models, parallel, train
from mdrad_jax import train_step as ts

SHAPE, C = (8, 8, 1), 4
TEACHERS = {
  "natural": 0,
  "pgd_at": 0,
  "trades": 0,
  "kd": 2,
  "ard": 1,
  "rslad": 1,
  "adaad": 1,
  "iad1": 1,
  "iad2": 2,
  "mtard": 2,
  "bmtard": 2,
  "sa_mdrad": 3,
}


def _setup(name, *, overrides=None, teacher_names=("tiny_cnn", "mlp", "tiny_cnn")):
  k = TEACHERS[name]
  tmods = tuple(
    models.get_model(n, num_classes=C, **({"widths": (8, 16)} if n == "tiny_cnn" else {"hidden": (32,)}))
    for n in teacher_names[:k]
  )
  tvars = tuple(models.init_model(m, jax.random.key(10 + i), SHAPE) for i, m in enumerate(tmods))
  cfg = config_lib.base_config()
  cfg.method = config_lib.method_config(name, **(overrides or {}))
  cfg.model.name = "tiny_cnn"
  cfg.num_epochs = 1
  cfg.optim.lr = 0.05
  cfg.attack.eps = 0.1
  cfg.attack.step_size = 0.03
  cfg.attack.num_steps = 2
  method = methods.get_method(name)
  model = models.get_model("tiny_cnn", num_classes=C, widths=(8, 16))
  state, step = train.build_train_step(
    cfg, model=model, method=method, image_shape=SHAPE, teacher_modules=tmods, teacher_vars=tvars, steps_per_epoch=10
  )[:2]
  mesh = parallel.create_mesh()
  return step, state, tvars, mesh


def _batch(n=16, seed=0):
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, C, n).astype(np.int32)
  # class-dependent images so the task is learnable
  images = rng.uniform(0, 0.3, size=(n, *SHAPE)).astype(np.float32)
  for i, y in enumerate(labels):
    images[i, 2 * y : 2 * y + 2, :, 0] += 0.6
  return {"image": images, "label": labels}


@pytest.mark.parametrize("name", sorted(TEACHERS))
def test_method_runs_learns_and_compiles_once(name):
  overrides = {"alpha": 0.5} if name == "adaad" else None  # exercise the clean branch too
  step, state, tvars, mesh = _setup(name, overrides=overrides)
  f = ts.jit_train_step(step, mesh)
  state, tvars = parallel.replicate(state, mesh), parallel.replicate(tvars, mesh)
  batch = parallel.shard_batch(_batch(), mesh)
  p0 = jax.tree.map(np.asarray, state.params)
  losses = []
  # SA-MDRAD's default (dynamic) rectifier moves its own target with the student's confidence, so its loss need
  # not fall as the student learns: its learning is read from CE(S(x'), y), logged whatever its weight
  key = "ce" if name == "sa_mdrad" else "loss"
  for _ in range(4):
    state, m = f(state, tvars, batch)
    losses.append(float(m[key]))
  assert np.all(np.isfinite(losses)), losses
  assert losses[-1] < losses[0], (name, losses)
  assert f._cache_size() == 1
  p1 = jax.tree.map(np.asarray, state.params)
  moved = jax.tree.map(lambda a, b: float(np.abs(a - b).max()), p0["model"], p1["model"])
  assert max(jax.tree.leaves(moved)) > 0
  if name == "sa_mdrad":  # projectors train with the student
    pm = jax.tree.map(lambda a, b: float(np.abs(a - b).max()), p0["projectors"], p1["projectors"])
    assert len(p1["projectors"]) == 3 and min(jax.tree.leaves(pm)) >= 0 and max(jax.tree.leaves(pm)) > 0
  # teachers are arguments, not state: nothing of them is in the optimised parameters
  assert set(p1) == {"model", "projectors"}


def test_gradients_reach_student_and_projectors_not_teachers():
  step, state, tvars, mesh = _setup("sa_mdrad", overrides={"teacher_view": "adv"})
  batch = _batch()

  def loss_of(teacher_vars, params):
    # the step's loss as a function of teacher variables and student params (one step, read its metric)
    _, m = step(state.replace(params=params), teacher_vars, batch)
    return m["loss"]

  g_teacher = jax.grad(loss_of, argnums=0)(tvars, state.params)
  assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree.leaves(g_teacher))
  g_student = jax.grad(loss_of, argnums=1)(tvars, state.params)
  assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(g_student["model"])) > 0
  assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(g_student["projectors"])) > 0


@pytest.mark.parametrize("bn_mode,changes", [("eval", False), ("train_no_update", False), ("train_update", True)])
def test_attack_bn_mode_controls_running_stats(bn_mode, changes):
  # With ε = 0 the attack returns x exactly, so the outer forward sees the same input whatever the number of
  # attack steps; only 'train_update' lets the attack's own forwards move the running statistics.
  cfg_steps = []
  for steps in (0, 2):
    step, state, tvars, mesh = _setup("pgd_at")
    m = methods.get_method("pgd_at")
    model = models.get_model("tiny_cnn", num_classes=C, widths=(8, 16))
    attack = ts.AttackConfig(eps=0.0, step_size=0.03, num_steps=steps, init="none", bn_mode=bn_mode)
    step = ts.make_train_step(model=model, method=m, hparams={}, attack=attack, steps_per_epoch=10)
    new_state, _ = jax.jit(step)(state, (), _batch())
    cfg_steps.append(np.asarray(new_state.batch_stats["model"]["bn1"]["mean"]))
  differs = not np.allclose(cfg_steps[0], cfg_steps[1])
  assert differs == changes


def test_wrong_teacher_count_is_a_clear_error():
  with pytest.raises(ValueError, match="needs exactly 2 teacher"):
    methods.get_method("mtard").check_teachers(1)
  with pytest.raises(ValueError, match="unknown method 'ardd'"):
    methods.get_method("ardd")


def test_dynamic_rectifier_plan_and_step():
  """With α = 1 the dynamic rectifier still needs S(x) (its fallback target): the plan runs it (not with the
  label fallback), and the compiled step reports the mean trust λ in (0, 1]."""
  hp = dict(
    config_lib.method_config("sa_mdrad", rectifier="dynamic", dynamic_target="student", alpha=1.0, feature_weight=0.0)
  )
  plan = methods.get_method("sa_mdrad").plan(hp, 2)
  assert plan.student_views == ("adv", "clean")
  assert methods.get_method("sa_mdrad").plan(dict(hp, dynamic_target="label"), 2).student_views == ("adv",)
  step, state, tvars, mesh = _setup(
    "sa_mdrad", overrides={"rectifier": "dynamic", "dynamic_target": "student", "alpha": 0.5}
  )
  _, m = jax.jit(step)(state, tvars, _batch())
  assert 0.0 < float(m["dynamic_trust"]) <= 1.0
  assert np.isfinite(float(m["loss"]))


def _stats_after_forwards(model, state, x, n):
  """BatchNorm running statistics after ``n`` successive train-mode forwards on ``x`` (PyTorch's order)."""
  stats = state.batch_stats["model"]
  for _ in range(n):
    _, upd = model.apply(
      {"params": state.params["model"], "batch_stats": stats}, x, train=True, mutable=["batch_stats"]
    )
    stats = upd["batch_stats"]
  return stats


@pytest.mark.parametrize("name,epoch,forwards", [("trades", 0, 3), ("iad2", 0, 1), ("iad2", 5, 2), ("pgd_at", 0, 2)])
def test_train_mode_forwards_move_batchnorm_as_the_official_loops(name, epoch, forwards):
  """TRADES runs S(x), S(x'), S(x) in train mode; IAD-II runs no clean forward before its switch epoch.
  With ε = 0 and no attack steps every view is x, so the statistics count the train-mode forwards."""
  _, state, tvars, _ = _setup(name, overrides={"begin_epoch": 2.0} if name == "iad2" else None)
  m = methods.get_method(name)
  model = models.get_model("tiny_cnn", num_classes=C, widths=(8, 16))
  tmods = tuple(
    models.get_model(n, num_classes=C, **({"widths": (8, 16)} if n == "tiny_cnn" else {"hidden": (32,)}))
    for n in ("tiny_cnn", "mlp")[: len(tvars)]
  )
  hp = dict(config_lib.method_config(name, **({"begin_epoch": 2.0} if name == "iad2" else {})))
  attack = ts.AttackConfig(eps=0.0, step_size=0.0, num_steps=0, init="none", bn_mode="eval")
  step = ts.make_train_step(model=model, method=m, hparams=hp, attack=attack, teacher_models=tmods, steps_per_epoch=1)
  batch = _batch()
  state = state.replace(step=jnp.asarray(epoch, state.step.dtype))
  new_state, _ = jax.jit(step)(state, tvars, batch)
  want = _stats_after_forwards(model, state, batch["image"], forwards)
  for got_leaf, want_leaf in zip(jax.tree.leaves(new_state.batch_stats["model"]), jax.tree.leaves(want)):
    np.testing.assert_allclose(np.asarray(got_leaf), np.asarray(want_leaf), rtol=1e-5, atol=1e-6)


def test_bmtard_temperature_rate_decays_with_the_learning_rate():
  from mdrad_jax import losses

  hp = dict(config_lib.method_config("bmtard"))
  m = methods.get_method("bmtard")
  st = losses.mtard_update_state(losses.mtard_init_state(), 1.0, 2.0, balanced=True)  # initialised
  metrics = {"kl_adv": 0.8, "kl_clean": 1.5, "teacher_neg_entropy_adv": -0.5, "teacher_neg_entropy_clean": -1.0}
  got = m.update_state(st, metrics, hp, 0.1)
  want = losses.mtard_update_state(
    st,
    0.8,
    1.5,
    lr_w=hp["lr_w"] * 0.1,
    beta=hp["beta"],
    balanced=True,
    entropy_adv=-0.5,
    entropy_clean=-1.0,
    lr_tau=hp["lr_tau"] * 0.1,
  )
  for a, b in zip(got, want):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6)
  assert float(got.tau_adv) != float(m.update_state(st, metrics, hp, 1.0).tau_adv)
