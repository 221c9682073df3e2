"""AutoAttack on linear classifiers, where the smallest L∞ perturbation that flips a point is known in closed form.

For f(x) = W x + b and a point with label y = argmax f(x), the smallest L∞ perturbation (ignoring the box) that
changes the prediction is min_{j≠y} (z_y − z_j) / ‖w_y − w_j‖₁.  Points are kept well inside [0, 1] so that the
box does not bind at that radius.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mdrad_jax import autoattack as aa

H, W_, C_IN = 4, 4, 2
DIM = H * W_ * C_IN


def linear_fn(w, b):
  w = jnp.asarray(w, jnp.float32)
  b = jnp.asarray(b, jnp.float32)
  return lambda x: x.reshape(x.shape[0], -1) @ w.T + b


def min_flip(w, b, x, y):
  """Closed-form smallest L∞ perturbation that changes the prediction of the linear model (float64)."""
  w = np.asarray(w, np.float64)
  z = x.reshape(len(x), -1).astype(np.float64) @ w.T + b
  out = np.empty(len(x))
  for i in range(len(x)):
    others = [j for j in range(w.shape[0]) if j != y[i]]
    out[i] = min((z[i, y[i]] - z[i, j]) / np.abs(w[y[i]] - w[j]).sum() for j in others)
  return out


def two_class_like_problem(radii, n_classes=4, seed=0):
  """Classes 0/1 have weights ±w; the others are constant and far below, so the problem is binary.

  Point i sits at L∞ distance radii[i] from the decision boundary z_0 = z_1, with a random offset along it.
  The last image row and column carry no weight: the reference Square attack draws square positions in
  [0, H − s) and so never moves them after its initial stripes (unless s = H).
  """
  rng = np.random.default_rng(seed)
  edge = np.zeros((H, W_, C_IN), bool)
  edge[-1], edge[:, -1] = True, True
  w = rng.uniform(0.5, 1.5, DIM) * rng.choice([-1.0, 1.0], DIM)
  w[edge.ravel()] = 0.0
  w[~edge.ravel()] -= w[~edge.ravel()].mean()
  wmat = np.zeros((n_classes, DIM))
  wmat[0], wmat[1] = w, -w
  bias = np.zeros(n_classes)
  bias[2:] = -50.0 - np.arange(n_classes - 2)
  n = len(radii)
  v = rng.uniform(-0.1, 0.1, (n, DIM))
  v -= np.outer(v @ w / (w @ w), w)  # along the boundary
  sides = np.where(np.arange(n) % 2 == 0, 1.0, -1.0)
  alpha = sides * np.asarray(radii) * np.abs(w).sum()
  x = 0.5 + v + np.outer(alpha, w / (w @ w))
  x = x.reshape(n, H, W_, C_IN).astype(np.float32)
  y = np.where(sides > 0, 0, 1).astype(np.int32)
  return wmat, bias, x, y


def multiclass_problem(n=24, n_classes=5, seed=1):
  rng = np.random.default_rng(seed)
  wmat = rng.normal(size=(n_classes, DIM))
  bias = rng.normal(size=n_classes)
  x = rng.uniform(0.35, 0.65, (n, H, W_, C_IN)).astype(np.float32)
  y = np.argmax(x.reshape(n, -1) @ wmat.T + bias, axis=1).astype(np.int32)
  return wmat, bias, x, y


RADII = np.array([0.01, 0.025, 0.04, 0.05, 0.06, 0.066, 0.094, 0.1, 0.12, 0.15])
EPS = 0.08
INSIDE = RADII <= 0.9 * EPS
OUTSIDE = RADII >= 1.1 * EPS


def fooled(fn, x_adv, y):
  return np.asarray(jnp.argmax(fn(jnp.asarray(x_adv)), axis=1)) != y


def assert_in_ball_and_box(x_adv, x, eps):
  x_adv = np.asarray(x_adv)
  assert x_adv.min() >= 0.0 and x_adv.max() <= 1.0
  assert np.abs(x_adv - x).max() <= eps + 1e-6


@pytest.fixture(scope="module")
def binary_like():
  wmat, bias, x, y = two_class_like_problem(RADII)
  np.testing.assert_allclose(min_flip(wmat, bias, x, y), RADII, rtol=1e-4)
  assert x.min() - EPS > 0 and x.max() + EPS < 1  # the box does not bind
  return linear_fn(wmat, bias), x, y


# --------------------------------------------------------------------------------------------------------
# Losses and schedule


def test_dlr_losses_match_float64_reference():
  rng = np.random.default_rng(3)
  z = rng.normal(size=(64, 10)) * 3
  y = rng.integers(0, 10, 64)
  y[:8] = np.argmax(z[:8], axis=1)  # correctly classified rows too
  t = (y + 1 + rng.integers(0, 9, 64)) % 10
  zs = np.sort(z, axis=1)
  zy = z[np.arange(64), y]
  top_other = np.array([np.max(np.delete(z[i], y[i])) for i in range(64)])
  ref = -(zy - top_other) / (zs[:, -1] - zs[:, -3] + 1e-12)
  ref_t = -(zy - z[np.arange(64), t]) / (zs[:, -1] - 0.5 * (zs[:, -3] + zs[:, -4]) + 1e-12)
  zj = jnp.asarray(z, jnp.float32)
  np.testing.assert_allclose(aa.dlr_loss(zj, jnp.asarray(y)), ref, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(aa.dlr_loss_targeted(zj, jnp.asarray(y), jnp.asarray(t)), ref_t, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("n_iter", [100, 1000])
def test_apgd_checkpoints_follow_the_reference_formula(n_iter):
  p = [0.0, 0.22]
  while True:
    nxt = p[-1] + max(p[-1] - p[-2] - 0.03, 0.06)
    if nxt > 1:
      break
    p.append(nxt)
  expected = [int(round(q * n_iter)) for q in p[1:]]
  assert aa.apgd_checkpoints(n_iter) == expected
  if n_iter == 100:
    assert expected == [22, 41, 57, 70, 80, 87, 93, 99]


def test_step_size_condition_on_crafted_loss_histories():
  n_iter, rho = 10, 0.75
  # columns: 3 increases of 4 (= k·ρ: halve), 4 of 4 (keep), 2 of 4 (halve), 4 of 4 but no improvement
  # since a checkpoint that did not halve (halve), 4 of 4 after a checkpoint that halved (keep)
  hist = np.array(
    [
      [0, 0, 0, 0, 0],
      [0, 0, 0, 0, 0],
      [0, 0, 0, 0, 0],
      [1, 1, 1, 1, 1],
      [2, 2, 0, 2, 2],
      [1, 3, 1, 3, 3],
      [2, 4, 0, 4, 4],
    ],
    np.float32,
  )
  steps = np.zeros((n_iter, 5), np.float32)
  steps[:7] = hist
  loss_best = np.array([5, 5, 5, 4, 4], np.float32)
  loss_best_last = np.array([0, 0, 0, 4, 4], np.float32)
  reduced_last = np.array([True, True, True, False, True])
  out = aa._step_size_check(
    jnp.asarray(steps), 6, 4, rho, jnp.asarray(loss_best), jnp.asarray(loss_best_last), jnp.asarray(reduced_last)
  )
  np.testing.assert_array_equal(np.asarray(out), [True, False, True, True, False])
  # first checkpoint (window starts at step 0): step 0 is compared with the last, still-zero row
  first = np.zeros((n_iter, 2), np.float32)
  first[:2] = [[0.5, -0.5], [0.6, -0.4]]
  out = aa._step_size_check(
    jnp.asarray(first), 1, 2, 0.75, jnp.asarray([1.0, 1.0]), jnp.asarray([0.0, 0.0]), jnp.asarray([True, True])
  )
  np.testing.assert_array_equal(np.asarray(out), [False, True])  # 2 of 2 increases vs 1 of 2


def _reference_apgd_ce_mlp(params, x, y, t, eps, n_iter, rho=0.75):
  """The reference APGD-CE loop, step by step in NumPy float64, for a tanh MLP (analytic gradient)."""
  w1, b1, w2, b2 = params
  n = len(x)
  x = x.reshape(n, -1).astype(np.float64)
  onehot = np.eye(w2.shape[0])[y]

  def loss_grad(xa):
    h = np.tanh(xa @ w1.T + b1)
    z = h @ w2.T + b2
    z = z - z.max(1, keepdims=True)
    prob = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    g = (((prob - onehot) @ w2) * (1 - h**2)) @ w1
    return -np.log(prob[np.arange(n), y]), g, z.argmax(1) == y

  proj = lambda v: np.clip(np.clip(v, x - eps, x + eps), 0.0, 1.0)
  t = t.reshape(n, -1).astype(np.float64)
  x_adv = np.clip(x + eps * t / (np.abs(t).max(1, keepdims=True) + 1e-12), 0.0, 1.0)
  loss, grad, acc = loss_grad(x_adv)
  x_best, grad_best, loss_best = x_adv.copy(), grad.copy(), loss.copy()
  step = 2.0 * eps * np.ones((n, 1))
  x_old = x_adv.copy()
  k, counter3 = max(int(0.22 * n_iter), 1), 0
  n_iter_min, size_decr = max(int(0.06 * n_iter), 1), max(int(0.03 * n_iter), 1)
  loss_steps = np.zeros((n_iter, n))
  loss_best_last, reduced_last = loss_best.copy(), np.ones(n, bool)
  for i in range(n_iter):
    grad2 = x_adv - x_old
    x_old = x_adv.copy()
    a = 0.75 if i > 0 else 1.0
    x1 = proj(x_adv + step * np.sign(grad))
    x_adv = proj(x_adv + (x1 - x_adv) * a + grad2 * (1 - a))
    loss, grad, pred = loss_grad(x_adv)
    acc = acc & pred
    loss_steps[i] = loss
    better = loss > loss_best
    x_best[better], grad_best[better], loss_best[better] = x_adv[better], grad[better], loss[better]
    counter3 += 1
    if counter3 == k:
      n_incr = sum((loss_steps[i - c] > loss_steps[i - c - 1]).astype(float) for c in range(k))
      osc = (n_incr <= k * rho) | (~reduced_last & (loss_best_last >= loss_best))
      reduced_last, loss_best_last = osc.copy(), loss_best.copy()
      step[osc] /= 2.0
      x_adv[osc], grad[osc] = x_best[osc], grad_best[osc]
      k = max(k - size_decr, n_iter_min)
      counter3 = 0
  return x_best, loss_best, step[:, 0], acc


def test_apgd_run_matches_the_reference_loop_step_by_step():
  rng = np.random.default_rng(4)
  params = (rng.normal(size=(16, DIM)) * 2.0, rng.normal(size=16), rng.normal(size=(10, 16)), rng.normal(size=10))
  pj = [jnp.asarray(p, jnp.float32) for p in params]
  fn = lambda xa: jnp.tanh(xa.reshape(xa.shape[0], -1) @ pj[0].T + pj[1]) @ pj[2].T + pj[3]
  x = rng.uniform(0.2, 0.8, (12, H, W_, C_IN)).astype(np.float32)
  y = np.asarray(jnp.argmax(fn(jnp.asarray(x)), 1)).astype(np.int32)
  key = jax.random.key(3)
  eps, n_iter = 0.05, 100
  t = np.asarray(jax.random.uniform(key, x.shape, jnp.float32, -1.0, 1.0))
  ref_x_best, ref_loss, ref_step, ref_acc = _reference_apgd_ce_mlp(params, x, y, t, eps, n_iter)
  st = jax.jit(lambda xx, yy: aa._apgd_single_run(fn, xx, yy, None, key, eps=eps, n_iter=n_iter, loss="ce", rho=0.75))(
    x, y
  )
  assert len(set(np.round(ref_step / eps, 6))) > 1  # the schedule halved some step sizes and not others
  np.testing.assert_allclose(np.asarray(st["step"]), ref_step, rtol=1e-6)
  np.testing.assert_allclose(np.asarray(st["loss_best"]), ref_loss, rtol=1e-4)
  # float32 against float64: coordinates still moving inside the ball drift by ~1e-4
  np.testing.assert_allclose(np.asarray(st["x_best"]).reshape(len(x), -1), ref_x_best, atol=1e-3)
  np.testing.assert_array_equal(np.asarray(st["acc"]), ref_acc)


def test_projection_linf_is_the_closed_form_minimum():
  rng = np.random.default_rng(5)
  m, d = 6, 20
  w = rng.normal(size=(m, d))
  t = rng.uniform(0.3, 0.7, (m, d))
  # hyperplanes at L∞ distance r from t (inside the box): w·(t + δ) = b with ‖δ‖∞ = r minimal
  r = rng.uniform(0.01, 0.2, m)
  b = np.sum(w * t, 1) + np.where(rng.random(m) < 0.5, 1, -1) * r * np.abs(w).sum(1)
  proj = jax.jit(aa.projection_linf)
  delta = np.asarray(proj(jnp.asarray(t, jnp.float32), jnp.asarray(w, jnp.float32), jnp.asarray(b, jnp.float32)))
  np.testing.assert_allclose(np.sum(w * (t + delta), 1), b, atol=1e-4)
  np.testing.assert_allclose(np.abs(delta).max(1), r, rtol=1e-4)
  # a hyperplane the box cannot reach: the point goes to the nearest corner
  t1, w1 = np.full((1, 4), 0.5), np.ones((1, 4))
  d1 = np.asarray(proj(jnp.asarray(t1, jnp.float32), jnp.asarray(w1, jnp.float32), jnp.asarray([10.0], jnp.float32)))
  np.testing.assert_allclose(t1 + d1, np.ones((1, 4)), atol=1e-6)


# --------------------------------------------------------------------------------------------------------
# Each attack: succeeds within ε, never outside, stays in the ball and the box, reproducible


def _check_inside_outside(fn, x, y, x_adv):
  f = fooled(fn, x_adv, y)
  assert f[INSIDE].all(), f
  assert not f[OUTSIDE].any(), f
  assert_in_ball_and_box(x_adv, x, EPS)
  # points not broken are returned unchanged
  np.testing.assert_array_equal(np.asarray(x_adv)[~f], x[~f])


@pytest.mark.parametrize("loss", ["ce", "dlr"])
def test_apgd_flips_exactly_the_points_within_eps(binary_like, loss):
  fn, x, y = binary_like
  x_adv = aa.apgd(fn, x, y, jax.random.key(0), eps=EPS, n_iter=10, loss=loss)
  _check_inside_outside(fn, x, y, x_adv)


def test_apgd_targeted_flips_exactly_the_points_within_eps(binary_like):
  fn, x, y = binary_like
  x_adv = aa.apgd_targeted(fn, x, y, jax.random.key(0), eps=EPS, n_iter=10, n_target_classes=3)
  _check_inside_outside(fn, x, y, x_adv)


def test_fab_targeted_flips_exactly_the_points_within_eps(binary_like):
  fn, x, y = binary_like
  x_adv = aa.fab_targeted(fn, x, y, jax.random.key(0), eps=EPS, n_iter=20, n_target_classes=3)
  _check_inside_outside(fn, x, y, x_adv)


def test_square_flips_exactly_the_points_within_eps(binary_like):
  fn, x, y = binary_like
  x_adv = aa.square(fn, x, y, jax.random.key(0), eps=EPS, n_queries=300)
  _check_inside_outside(fn, x, y, x_adv)


def test_fab_finds_nearly_the_minimal_perturbation_multiclass():
  wmat, bias, x, y = multiclass_problem()
  fn = linear_fn(wmat, bias)
  r = min_flip(wmat, bias, x, y)
  assert r.max() < 0.3  # the box does not bind at the minimal perturbation
  x_adv = np.asarray(
    aa.fab_targeted(fn, x, y, jax.random.key(0), eps=1.0, n_iter=30, n_target_classes=wmat.shape[0] - 1)
  )
  assert fooled(fn, x_adv, y).all()
  found = np.abs(x_adv - x).reshape(len(x), -1).max(1)
  assert (found >= r * (1 - 1e-4)).all()  # cannot beat the minimum
  assert (found <= r * 1.02).all(), found / r


def test_apgd_targeted_multiclass_finds_the_points_within_eps():
  wmat, bias, x, y = multiclass_problem()
  fn = linear_fn(wmat, bias)
  r = min_flip(wmat, bias, x, y)
  eps = float(np.median(r))
  x_adv = aa.apgd_targeted(fn, x, y, jax.random.key(1), eps=eps, n_iter=20, n_target_classes=4)
  f = fooled(fn, x_adv, y)
  assert f[r <= 0.9 * eps].all() and not f[r > eps].any()
  assert_in_ball_and_box(x_adv, x, eps)


def test_attacks_respect_the_box_with_points_on_its_faces(binary_like):
  fn, x0, _ = binary_like
  rng = np.random.default_rng(7)
  x = rng.choice([0.0, 1.0, 0.02, 0.98], size=x0.shape).astype(np.float32)
  y = np.asarray(jnp.argmax(fn(jnp.asarray(x)), 1)).astype(np.int32)
  key = jax.random.key(2)
  # same parameters as the tests above, so the compiled kernels are reused
  outs = (
    aa.apgd(fn, x, y, key, eps=EPS, n_iter=10, loss="ce"),
    aa.apgd_targeted(fn, x, y, key, eps=EPS, n_iter=10, n_target_classes=3),
    aa.fab_targeted(fn, x, y, key, eps=EPS, n_iter=20, n_target_classes=3),
    aa.square(fn, x, y, key, eps=EPS, n_queries=300),
  )
  assert any(fooled(fn, o, y).any() for o in outs)
  for x_adv in outs:
    assert_in_ball_and_box(x_adv, x, EPS)


def test_same_seed_same_result_and_seed_matters(binary_like):
  fn, x, y = binary_like
  k0, k1 = jax.random.key(0), jax.random.key(1)
  a = aa.apgd(fn, x, y, k0, eps=EPS, n_iter=10, loss="ce")
  np.testing.assert_array_equal(a, aa.apgd(fn, x, y, k0, eps=EPS, n_iter=10, loss="ce"))
  s = aa.square(fn, x, y, k0, eps=EPS, n_queries=300)
  np.testing.assert_array_equal(s, aa.square(fn, x, y, k0, eps=EPS, n_queries=300))
  assert not np.array_equal(s, aa.square(fn, x, y, k1, eps=EPS, n_queries=300))


def test_bad_inputs_raise_clear_errors(binary_like):
  fn, x, y = binary_like
  key = jax.random.key(0)
  with pytest.raises(ValueError, match="eps"):
    aa.apgd(fn, x, y, key, eps=-1.0)
  with pytest.raises(ValueError, match="loss"):
    aa.apgd(fn, x, y, key, eps=EPS, loss="hinge")
  with pytest.raises(ValueError, match="n_target_classes"):
    aa.apgd_targeted(fn, x, y, key, eps=EPS, n_target_classes=9)
  with pytest.raises(ValueError, match="shape"):
    aa.square(fn, x, y[:3], key, eps=EPS)
  with pytest.raises(ValueError, match="version"):
    aa.autoattack(fn, x, y, eps=EPS, version="plus")


# --------------------------------------------------------------------------------------------------------
# Driver


SMALL = {"apgd-ce": {"n_iter": 10}, "apgd-t": {"n_iter": 10}, "fab-t": {"n_iter": 10}, "square": {"n_queries": 100}}


def test_autoattack_standard_chain(binary_like):
  fn, x, y = binary_like
  y = y.copy()
  y[1] = 1 - y[1]  # one point misclassified from the start
  inside = INSIDE.copy()
  inside[1] = False
  res = aa.autoattack(fn, x, y, eps=EPS, seed=0, batch_size=4, progress=False, overrides=SMALL)
  assert list(res.robust_after) == ["clean", "apgd-ce", "apgd-t", "fab-t", "square"]
  counts = list(res.robust_after.values())
  assert all(a >= b for a, b in zip(counts, counts[1:]))
  # each attack ran on exactly the points robust after the previous one
  names = list(res.robust_after)
  for prev, name in zip(names, names[1:]):
    assert res.attacked[name] == res.robust_after[prev]
    assert res.flips[name] == res.robust_after[prev] - res.robust_after[name]
  assert res.robust_after["clean"] == len(x) - 1 and not res.clean_correct[1]
  np.testing.assert_array_equal(res.robust, res.clean_correct & ~(RADII <= EPS))
  assert res.robust[OUTSIDE].all() and not res.robust[inside].any()
  np.testing.assert_array_equal(res.x_adv[res.robust], x[res.robust])
  np.testing.assert_array_equal(res.x_adv[1], x[1])
  assert fooled(fn, res.x_adv, y)[~res.robust].all()
  assert_in_ball_and_box(res.x_adv, x, EPS)
  assert res.robust_accuracy == res.robust.mean()
  assert "non-standard" in res.label and res.params["square"]["n_queries"] == 100
  res2 = aa.autoattack(fn, x, y, eps=EPS, seed=0, batch_size=4, progress=False, overrides=SMALL)
  np.testing.assert_array_equal(res.x_adv, res2.x_adv)


def test_autoattack_apgd_subset_is_labelled(binary_like):
  fn, x, y = binary_like
  res = aa.autoattack(
    fn,
    x,
    y,
    eps=EPS,
    version="apgd",
    batch_size=16,
    progress=False,
    overrides={"apgd-ce": {"n_iter": 10}, "apgd-t": {"n_iter": 10}},
  )
  assert res.label.startswith("AutoAttack (APGD-CE + APGD-T subset)")
  assert list(res.robust_after) == ["clean", "apgd-ce", "apgd-t"]
  assert "fab-t" not in res.params and "square" not in res.params
  np.testing.assert_array_equal(res.robust, ~(RADII <= EPS))


def test_autoattack_default_parameters_are_the_standard_ones(binary_like):
  fn, x, y = binary_like
  res = aa.autoattack(fn, x[:0], y[:0], eps=EPS, progress=False)
  assert res.label == "AutoAttack (standard: APGD-CE, APGD-T, FAB-T, Square)"
  p = res.params
  assert p["apgd-ce"] == {"n_iter": 100, "n_restarts": 1, "rho": 0.75}
  assert p["apgd-t"]["n_iter"] == 100 and p["apgd-t"]["n_restarts"] == 1
  assert p["fab-t"] == {"n_iter": 100, "n_target_classes": 3, "alpha_max": 0.1, "eta": 1.05, "beta": 0.9}
  assert p["square"] == {"n_queries": 5000, "p_init": 0.8}


# --------------------------------------------------------------------------------------------------------
# Pieces the speed depends on


def test_argsort_rows_is_the_stable_argsort():
  rng = np.random.default_rng(11)
  v = rng.choice([0.0, -0.0, 0.25, 1.0, -3.5, np.inf, -np.inf, 1e-30, -1e-30], size=(6, 200))
  v[3] = rng.normal(size=200)
  v[4] = np.round(rng.uniform(0, 1, 200), 2)  # many ties
  v = v.astype(np.float32)
  got = np.asarray(jax.jit(aa._argsort_rows)(jnp.asarray(v)))
  assert got.dtype == np.int32
  np.testing.assert_array_equal(got, np.argsort(v, axis=1, kind="stable"))


@pytest.mark.parametrize("kind", ["apgd", "apgd-t", "fab-t", "square"])
def test_padding_rows_do_not_change_the_real_rows(binary_like, kind):
  """The driver pads a batch to a size that depends on how many points are left: the real rows' results must
  not depend on it (random draws included)."""
  fn, x, y = binary_like
  params = {
    "apgd": dict(loss="ce", n_iter=10, n_restarts=1, rho=0.75, target_rank=None),
    "apgd-t": dict(n_iter=10, n_target_classes=3, n_restarts=1, rho=0.75),
    "fab-t": dict(n_iter=20, n_target_classes=3, alpha_max=0.1, eta=1.05, beta=0.9),
    "square": dict(n_queries=300, p_init=0.8),
  }[kind]
  f = aa.batch_kernel(kind, fn, eps=EPS, **params)
  key = jax.random.key(5)
  m = 7
  alone = np.asarray(f(jnp.asarray(x[:m]), jnp.asarray(y[:m]), jnp.ones(m, bool), key))
  xp = np.concatenate([x[:m], x[:3]])
  yp = np.concatenate([y[:m], y[:3]])
  padded = np.asarray(f(jnp.asarray(xp), jnp.asarray(yp), jnp.asarray(np.arange(m + 3) < m), key))
  np.testing.assert_array_equal(fooled(fn, padded[:m], y[:m]), fooled(fn, alone, y[:m]))
  assert fooled(fn, alone, y[:m]).any()
  np.testing.assert_allclose(padded[:m], alone, atol=1e-6)
  np.testing.assert_array_equal(padded[m:], xp[m:])  # masked rows come back unchanged
