"""L∞ PGD properties and the attack objectives against float64 NumPy references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mdrad_jax import attacks as A

N, H, W, CH, C = 4, 3, 3, 2, 5
D = H * W * CH
EPS, STEP = 8 / 255, 2 / 255


@pytest.fixture
def setup():
  rng = np.random.default_rng(0)
  x = rng.uniform(0, 1, (N, H, W, CH)).astype(np.float32)
  # Pixels on and near the borders of [0, 1].
  x[0, 0, :, 0] = 0.0
  x[1, 0, :, 1] = 1.0
  x[2, 1, :, 0] = 0.01
  x[3, 2, :, 1] = 0.995
  w = rng.standard_normal((D, C)).astype(np.float32)
  b = rng.standard_normal(C).astype(np.float32)
  y = rng.integers(0, C, N).astype(np.int32)
  return dict(x=jnp.asarray(x), w=jnp.asarray(w), b=jnp.asarray(b), y=jnp.asarray(y), rng=rng)


def linear(w, b):
  """A plain-function 'model': logits = flatten(x) @ w + b; passes aux through."""
  return lambda x, aux: (x.reshape(x.shape[0], -1) @ w + b, aux)


def np_log_softmax(z):
  z = np.asarray(z, np.float64)
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def np_logits(x, w, b):
  return np.asarray(x, np.float64).reshape(len(x), -1) @ np.asarray(w, np.float64) + np.asarray(b, np.float64)


def np_kl_rows(log_p, log_q):
  return (np.exp(log_p) * (log_p - log_q)).sum(-1)


def in_ball_and_box(x_adv, x, eps, tol=1e-6):
  x_adv, x = np.asarray(x_adv), np.asarray(x)
  return np.abs(x_adv - x).max() <= eps + tol and x_adv.min() >= 0.0 and x_adv.max() <= 1.0


# ---------------------------------------------------------------------------------------------
# PGD properties.
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("init", A.INITS)
@pytest.mark.parametrize("eps", [EPS, 0.3])
def test_stays_in_ball_and_box(setup, init, eps):
  obj = A.ce_objective(linear(setup["w"], setup["b"]), setup["y"])
  x_adv, _ = A.pgd_linf(obj, setup["x"], jax.random.key(1), eps=eps, step_size=eps / 2, num_steps=5, init=init)
  assert in_ball_and_box(x_adv, setup["x"], eps)
  # The big step moved pixels that sit on the borders onto (not past) the box.
  if eps == 0.3:
    assert np.isclose(np.asarray(x_adv), 0.0).any() and np.isclose(np.asarray(x_adv), 1.0).any()


def test_start_is_projected(setup):
  x = setup["x"]
  x0 = A.random_start(x, jax.random.key(0), init="uniform", eps=EPS)
  assert in_ball_and_box(x0, x, EPS)
  x0n = A.random_start(x, jax.random.key(0), init="normal", eps=EPS, normal_std=0.05)
  assert in_ball_and_box(x0n, x, EPS)


def test_raises_objective(setup):
  obj = A.ce_objective(linear(setup["w"], setup["b"]), setup["y"])
  x = setup["x"]
  x_adv, _ = A.pgd_linf(obj, x, None, eps=EPS, step_size=STEP, num_steps=10, init="none")
  before, _ = obj(x, None)
  after, _ = obj(x_adv, None)
  assert float(jnp.sum(after)) > float(jnp.sum(before)) + 1e-3
  assert (np.asarray(after) >= np.asarray(before) - 1e-6).all()


def test_zero_steps_returns_start(setup):
  obj = A.ce_objective(linear(setup["w"], setup["b"]), setup["y"])
  x, key = setup["x"], jax.random.key(3)
  x_adv, _ = A.pgd_linf(obj, x, key, eps=EPS, step_size=STEP, num_steps=0, init="uniform")
  np.testing.assert_array_equal(np.asarray(x_adv), np.asarray(A.random_start(x, key, init="uniform", eps=EPS)))
  assert not np.array_equal(np.asarray(x_adv), np.asarray(x))
  x_none, _ = A.pgd_linf(obj, x, None, eps=EPS, step_size=STEP, num_steps=0, init="none")
  np.testing.assert_array_equal(np.asarray(x_none), np.asarray(x))


def test_start_distributions():
  x = jnp.full((500, 2, 2, 3), 0.5, jnp.float32)
  d_n = np.asarray(A.random_start(x, jax.random.key(0), init="normal", eps=0.1, normal_std=0.01)) - 0.5
  assert abs(d_n.std() - 0.01) < 0.0005 and abs(d_n.mean()) < 0.0005
  d_u = np.asarray(A.random_start(x, jax.random.key(0), init="uniform", eps=0.1)) - 0.5
  assert np.abs(d_u).max() <= 0.1 + 1e-7
  assert abs(np.abs(d_u).mean() - 0.05) < 0.002  # E|U(−ε, ε)| = ε/2
  d_0 = np.asarray(A.random_start(x, None, init="none", eps=0.1)) - 0.5
  assert not d_0.any()


def test_one_step_matches_numpy(setup):
  """FGSM from x: x' = clip(x + ε·sign(∇_x Σ CE), box), the CE gradient of a linear model by hand."""
  x, w, b, y = (np.asarray(setup[k]) for k in ("x", "w", "b", "y"))
  z = np_logits(x, w, b)
  grad = (np.exp(np_log_softmax(z)) - np.eye(C)[y]) @ np.asarray(w, np.float64).T  # [N, D]
  want = np.clip(x + EPS * np.sign(grad).reshape(x.shape), 0, 1)
  obj = A.ce_objective(linear(setup["w"], setup["b"]), setup["y"])
  got, _ = A.fgsm(obj, setup["x"], eps=EPS)
  np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=1e-6)


def test_deterministic_and_key_dependent(setup):
  obj = A.ce_objective(linear(setup["w"], setup["b"]), setup["y"])
  run = lambda k: np.asarray(
    A.pgd_linf(
      obj,
      setup["x"],
      jax.random.key(k),
      eps=EPS,
      step_size=STEP,  # noqa: E731
      num_steps=2,
      init="uniform",
    )[0]
  )
  np.testing.assert_array_equal(run(7), run(7))
  assert not np.array_equal(run(7), run(8))


def test_unroll_matches_rolled_and_threads_aux(setup):
  w, b, y = setup["w"], setup["b"], setup["y"]

  def counting(x, count):  # aux = number of forward passes so far
    return linear(w, b)(x, None)[0], count + 1

  obj = A.ce_objective(counting, y)
  kw = dict(eps=EPS, step_size=STEP, num_steps=4, init="normal")
  key = jax.random.key(5)
  xa_u, n_u = A.pgd_linf(obj, setup["x"], key, aux=jnp.int32(0), unroll=True, **kw)
  xa_r, n_r = jax.jit(lambda x: A.pgd_linf(obj, x, key, aux=jnp.int32(0), unroll=False, **kw))(setup["x"])
  np.testing.assert_allclose(np.asarray(xa_u), np.asarray(xa_r), rtol=0, atol=1e-7)
  assert int(n_u) == 4 and int(n_r) == 4
  _, n_none = A.pgd_linf(A.ce_objective(linear(w, b), y), setup["x"], key, **kw)
  assert n_none is None


def test_result_carries_no_gradient(setup):
  y, x = setup["y"], setup["x"]

  def f(w, xx):
    obj = A.ce_objective(linear(w, setup["b"]), y)
    x_adv, _ = A.pgd_linf(obj, xx, None, eps=EPS, step_size=STEP, num_steps=2, init="none")
    return jnp.sum(x_adv**2)

  g_w, g_x = jax.grad(f, argnums=(0, 1))(setup["w"], x)
  assert not np.asarray(g_w).any() and not np.asarray(g_x).any()
  assert float(f(setup["w"], x)) > 0


def test_bad_arguments(setup):
  obj = A.ce_objective(linear(setup["w"], setup["b"]), setup["y"])
  with pytest.raises(ValueError, match="uniform"):
    A.pgd_linf(obj, setup["x"], jax.random.key(0), eps=EPS, step_size=STEP, num_steps=1, init="gauss")
  with pytest.raises(ValueError, match="key"):
    A.pgd_linf(obj, setup["x"], None, eps=EPS, step_size=STEP, num_steps=1, init="uniform")
  with pytest.raises(ValueError, match="num_steps"):
    A.pgd_linf(obj, setup["x"], None, eps=EPS, step_size=STEP, num_steps=-1, init="none")


# ---------------------------------------------------------------------------------------------
# Objectives against float64 NumPy.
# ---------------------------------------------------------------------------------------------
def test_ce_and_cw_objectives(setup):
  x, w, b, y = setup["x"], setup["w"], setup["b"], np.asarray(setup["y"])
  z = np_logits(x, w, b)
  ce, aux = A.ce_objective(linear(w, b), setup["y"])(x, "aux")
  assert aux == "aux"
  np.testing.assert_allclose(np.asarray(ce), -np_log_softmax(z)[np.arange(N), y], rtol=1e-5)
  for kappa in (0.0, 50.0):
    cw, _ = A.cw_objective(linear(w, b), setup["y"], kappa=kappa)(x, None)
    real = z[np.arange(N), y]
    other = np.where(np.eye(C)[y] > 0, -np.inf, z).max(-1)
    np.testing.assert_allclose(np.asarray(cw), -np.maximum(real - other + kappa, 0), rtol=1e-5, atol=1e-5)


def test_kl_and_trades_objectives(setup):
  x, w, b = setup["x"], setup["w"], setup["b"]
  z = np_logits(x, w, b)
  rng = setup["rng"]
  t = rng.standard_normal((N, C))
  p = np.exp(np_log_softmax(t))
  p[0] = np.eye(C)[1]  # a one-hot target row (0·log 0 = 0)
  kl, _ = A.kl_objective(linear(w, b), jnp.asarray(p, jnp.float32), temperature=2.0)(x, None)
  log_q = np_log_softmax(z / 2.0)
  want = (np.where(p > 0, p * np.log(np.where(p > 0, p, 1)), 0) - p * log_q).sum(-1)
  np.testing.assert_allclose(np.asarray(kl), want, rtol=1e-5, atol=1e-6)
  clean = jnp.asarray(t, jnp.float32)
  tr, _ = A.trades_objective(linear(w, b), clean)(x, None)
  np.testing.assert_allclose(np.asarray(tr), np_kl_rows(np_log_softmax(t), np_log_softmax(z)), rtol=1e-5, atol=1e-6)


def test_adaad_objective(setup):
  x, w, b = setup["x"], setup["w"], setup["b"]
  rng = setup["rng"]
  tw = [jnp.asarray(rng.standard_normal((D, C)), jnp.float32) for _ in range(2)]
  t_fns = [lambda xx, m=m: xx.reshape(N, -1) @ m for m in tw]
  weights = np.array([[0.2, 0.5, 1.0, 0.0], [0.8, 0.5, 0.0, 1.0]], np.float32)
  z_s = np_logits(x, w, b)
  kls = np.stack([np_kl_rows(np_log_softmax(np_logits(x, m, np.zeros(C))), np_log_softmax(z_s)) for m in tw])

  got, _ = A.adaad_objective(linear(w, b), t_fns, weights=weights)(x, None)
  np.testing.assert_allclose(np.asarray(got), (weights * kls).sum(0), rtol=1e-5, atol=1e-6)
  got_u, _ = A.adaad_objective(linear(w, b), t_fns)(x, None)  # uniform 1/K
  np.testing.assert_allclose(np.asarray(got_u), kls.mean(0), rtol=1e-5, atol=1e-6)
  stacked = lambda xx: jnp.stack([f(xx) for f in t_fns])  # noqa: E731
  got_s, _ = A.adaad_objective(linear(w, b), stacked, weights=weights)(x, None)
  np.testing.assert_allclose(np.asarray(got_s), np.asarray(got), rtol=1e-6)
  got_1, _ = A.adaad_objective(linear(w, b), t_fns[0])(x, None)  # one teacher: plain KL
  np.testing.assert_allclose(np.asarray(got_1), kls[0], rtol=1e-5, atol=1e-6)

  # The gradient w.r.t. x' flows through the teacher as well as the student.
  def total(xx, detach):
    fn = (lambda v: jax.lax.stop_gradient(t_fns[0](v))) if detach else t_fns[0]
    return jnp.sum(A.adaad_objective(linear(w, b), fn)(xx, None)[0])

  grad = jax.jit(jax.grad(total), static_argnums=1)
  g_full, g_student_only = grad(x, False), grad(x, True)
  assert float(jnp.abs(g_full - g_student_only).max()) > 1e-4

  with pytest.raises(ValueError, match="weights"):
    A.adaad_objective(linear(w, b), t_fns, weights=weights[:, :2])(x, None)


def test_unclipped_start_takes_first_gradient_outside_the_box_then_projects():
  # x at the lower border: a uniform start leaves [0, 1] for about half the pixels; with clip_start=False the
  # objective sees that raw start first (as the official ARD/IAD/RSLAD loops), and the result is still valid.
  x = jnp.zeros((4, 3))

  def objective(xa, aux):  # aux records the smallest pixel value the objective was evaluated at
    return jnp.sum(xa, axis=-1), jnp.minimum(aux, jnp.min(xa))

  key = jax.random.key(0)
  kw = dict(eps=0.1, step_size=0.01, num_steps=1, aux=jnp.array(jnp.inf))
  raw, seen_raw = A.pgd_linf(objective, x, key, clip_start=False, **kw)
  clipped, seen_clipped = A.pgd_linf(objective, x, key, clip_start=True, **kw)
  assert float(seen_raw) < 0.0 and float(seen_clipped) >= 0.0
  for out in (raw, clipped):
    assert float(out.min()) >= 0.0 and float(out.max()) <= 0.1 + 1e-7
