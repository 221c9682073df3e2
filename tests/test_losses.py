"""Losses against independent float64 NumPy computations written from the formulas, plus properties."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mdrad_jax import losses as L

N, C, K = 6, 5, 3
RTOL, ATOL = 2e-5, 2e-6


# ---------------------------------------------------------------------------------------------
# float64 NumPy references.
# ---------------------------------------------------------------------------------------------
def np_log_softmax(z, tau=1.0):
  z = np.asarray(z, np.float64) / tau
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def np_softmax(z, tau=1.0):
  return np.exp(np_log_softmax(z, tau))


def np_kl_rows(p, log_q, rslad=False):
  p = np.asarray(p, np.float64)
  if rslad:
    return np.sum(-p * log_q + p * np.log(p + 1e-5), -1)
  plogp = np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0)
  return np.sum(plogp - p * log_q, -1)


def np_reduce(rows, c, reduction):
  return {
    "none": rows,
    "sum": rows.sum(),
    "batchmean": rows.sum() / len(rows),
    "elem_mean": rows.sum() / (len(rows) * c),
  }[reduction]


def np_ce_rows(z, y):
  return -np_log_softmax(z)[np.arange(len(y)), y]


def np_swap(z, y):
  z = np.array(z, np.float64)
  flat = z.reshape(-1, z.shape[-1])
  yy = np.broadcast_to(y, z.shape[:-1]).reshape(-1)
  for r in range(flat.shape[0]):
    j = int(np.argmax(flat[r]))
    if j != yy[r]:
      flat[r, j], flat[r, yy[r]] = flat[r, yy[r]], flat[r, j]
  return flat.reshape(z.shape)


def np_adr(p, y, lam):
  p = np.asarray(p, np.float64)
  yy = np.broadcast_to(y, p.shape[:-1])
  onehot = np.eye(p.shape[-1])[yy]
  p_y = (p * onehot).sum(-1, keepdims=True)
  lam_i = np.clip(lam - (p.max(-1, keepdims=True) - p_y), 0, 1)
  return lam_i * p + (1 - lam_i) * onehot


def np_rectify(kind, z, y, tau, lam):
  if kind in ("swap", "dynamic"):  # 'dynamic' = swap on the teacher side; the student mixing comes after fusion
    return np_softmax(np_swap(z, y), tau)
  p = np_softmax(z, tau)
  return np_adr(p, y, lam) if kind == "adr" else p


def np_fusion(kind, z, y):
  k, n, _ = z.shape
  if kind == "uniform":
    return np.full((k, n), 1 / k)
  p = np_softmax(z)
  p_y = p[:, np.arange(n), y]
  if kind == "ptrue":
    return p_y / p_y.sum(0, keepdims=True)
  if k == 1:
    return np.ones((1, n))
  if kind == "camkd":
    ce = -np.log(p_y)
    e = np.exp(ce - ce.max(0, keepdims=True))
    return (1 - e / e.sum(0, keepdims=True)) / (k - 1)
  h = -(p * np.log(p)).sum(-1)
  return (1 - h / h.sum(0, keepdims=True)) / (k - 1)


def np_feature_mse(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return ((a - b) ** 2).reshape(len(a), -1).mean(-1)


@pytest.fixture
def data():
  rng = np.random.default_rng(0)
  f = lambda *s: (3 * rng.standard_normal(s)).astype(np.float32)  # noqa: E731
  return dict(
    s_adv=f(N, C),
    s_clean=f(N, C),
    t_clean=f(K, N, C),
    t_adv=f(K, N, C),
    y=rng.integers(0, C, N).astype(np.int32),
    proj=[
      rng.standard_normal((N, 2, 2, 3)).astype(np.float32),
      rng.standard_normal((N, 1, 1, 4)).astype(np.float32),
      rng.standard_normal((N, 2, 2, 3)).astype(np.float32),
    ],
    feat=[
      rng.standard_normal((N, 2, 2, 3)).astype(np.float32),
      rng.standard_normal((N, 1, 1, 4)).astype(np.float32),
      rng.standard_normal((N, 2, 2, 3)).astype(np.float32),
    ],
  )


def close(a, b, rtol=RTOL, atol=ATOL):
  np.testing.assert_allclose(np.asarray(a, np.float64), b, rtol=rtol, atol=atol)


# ---------------------------------------------------------------------------------------------
# Building blocks.
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("reduction", L.REDUCTIONS)
@pytest.mark.parametrize("rslad", [False, True])
def test_kl_matches_numpy(data, reduction, rslad):
  t, s = data["t_clean"][0], data["s_adv"]
  p, log_q = np_softmax(t, 2.0), np_log_softmax(s, 3.0)
  want = np_reduce(np_kl_rows(p, log_q, rslad), C, reduction)
  close(L.kl_from_logits(t, s, temperature=2.0, student_temperature=3.0, reduction=reduction, rslad_eps=rslad), want)
  close(L.kl_div(p.astype(np.float32), log_q.astype(np.float32), reduction=reduction, rslad_eps=rslad), want)
  # The same temperature on both sides by default.
  want_same = np_reduce(np_kl_rows(np_softmax(t, 2.0), np_log_softmax(s, 2.0), rslad), C, reduction)
  close(L.kl_from_logits(t, s, temperature=2.0, reduction=reduction, rslad_eps=rslad), want_same)


def test_kl_div_zero_target_entries():
  p = np.array([[1.0, 0.0, 0.0]], np.float32)
  log_q = np_log_softmax(np.array([[0.3, -1.0, 2.0]]))
  got = L.kl_div(p, log_q.astype(np.float32), reduction="sum")
  close(got, -log_q[0, 0])
  assert np.isfinite(float(got))


@pytest.mark.parametrize("reduction", L.CE_REDUCTIONS)
def test_cross_entropy(data, reduction):
  rows = np_ce_rows(data["s_adv"], data["y"])
  want = {"none": rows, "sum": rows.sum(), "mean": rows.mean()}[reduction]
  close(L.cross_entropy(data["s_adv"], data["y"], reduction=reduction), want)


def test_bad_names_and_shapes(data):
  with pytest.raises(ValueError, match="batchmean"):
    L.kl_from_logits(data["s_adv"], data["s_clean"], reduction="mean")
  with pytest.raises(ValueError, match="same shape"):
    L.kl_from_logits(data["t_clean"], data["s_clean"])
  with pytest.raises(ValueError, match="swap"):
    L.rectify("flip", data["t_clean"], data["y"])
  with pytest.raises(ValueError, match="camkd"):
    L.fusion_weights("avg", data["t_clean"], data["y"])
  with pytest.raises(ValueError, match="labels"):
    L.cross_entropy(data["s_adv"], data["y"][:3])
  with pytest.raises(ValueError, match="single-teacher"):
    L.rslad_loss(
      student_adv_logits=data["s_adv"], student_clean_logits=data["s_clean"], teacher_clean_logits=data["t_clean"]
    )
  with pytest.raises(ValueError, match="same shape"):
    L.feature_mse(data["proj"][0], data["feat"][1])
  with pytest.raises(ValueError, match="feature_weight"):
    L.sa_mdrad_loss(
      student_adv_logits=data["s_adv"],
      student_clean_logits=data["s_clean"],
      teacher_clean_logits=data["t_clean"],
      labels=data["y"],
    )
  with pytest.raises(ValueError, match="balanced"):
    L.bmtard_loss(balanced=False)


# ---------------------------------------------------------------------------------------------
# Rectifiers.
# ---------------------------------------------------------------------------------------------
def test_rectify_swap_properties(data):
  z, y = data["t_clean"], data["y"]
  out = np.asarray(L.rectify_swap(jnp.asarray(z), y))
  yy = np.broadcast_to(y, z.shape[:-1])
  assert (np.argmax(out, -1) == yy).all()
  np.testing.assert_array_equal(np.sort(out, -1), np.sort(z, -1))  # values only permuted
  for k in range(K):
    for i in range(N):
      m = int(np.argmax(z[k, i]))
      if m == y[i]:
        np.testing.assert_array_equal(out[k, i], z[k, i])  # already right: untouched
      else:
        moved = np.nonzero(out[k, i] != z[k, i])[0]
        assert set(moved) == {m, int(y[i])}
        assert out[k, i, y[i]] == z[k, i, m] and out[k, i, m] == z[k, i, y[i]]
  np.testing.assert_array_equal(out, np_swap(z, y).astype(np.float32))
  # The fixture has both right and wrong teacher predictions, so both branches ran.
  right = np.argmax(z, -1) == yy
  assert right.any() and (~right).any()


def test_rectify_swap_noop_when_correct(data):
  z = data["s_adv"]
  y = np.argmax(z, -1).astype(np.int32)
  np.testing.assert_array_equal(np.asarray(L.rectify_swap(jnp.asarray(z), y)), z)


def test_rectify_adr_and_dispatch(data):
  z, y = data["t_clean"], data["y"]
  p = np_softmax(z, 2.0)
  close(L.rectify_adr(p.astype(np.float32), y, 0.7), np_adr(p, y, 0.7))
  for kind in L.RECTIFIERS:
    got = L.rectify(kind, z, y, temperature=2.0, adr_lambda=0.7)
    close(got, np_rectify(kind, z, y, 2.0, 0.7))
    close(np.asarray(got).sum(-1), np.ones((K, N)))
  np.testing.assert_array_equal(np.asarray(L.rectify_none(z, y)), z)


# ---------------------------------------------------------------------------------------------
# Fusion.
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", L.FUSIONS)
def test_fusion_weights(data, kind):
  z, y = data["t_clean"], data["y"]
  w = np.asarray(L.fusion_weights(kind, z, y))
  close(w, np_fusion(kind, z, y))
  assert w.shape == (K, N) and (w >= 0).all()
  close(w.sum(0), np.ones(N))
  w1 = np.asarray(L.fusion_weights(kind, z[:1], y))
  close(w1, np.ones((1, N)))


@pytest.mark.parametrize("kind", ["camkd", "ptrue"])
def test_fusion_wrong_teacher_gets_less(kind):
  y = np.array([0, 1, 2, 3], np.int32)
  right = np.full((4, 5), -1.0, np.float32)
  right[np.arange(4), y] = 3.0
  wrong = np.full((4, 5), -1.0, np.float32)
  wrong[np.arange(4), (y + 1) % 5] = 3.0
  w = np.asarray(L.fusion_weights(kind, np.stack([wrong, right, right]), y))
  assert (w[0] < w[1]).all() and (w[0] < w[2]).all()


def test_fusion_entropy_prefers_confident():
  y = np.zeros(2, np.int32)
  sharp = np.array([[5.0, 0, 0], [0, 5.0, 0]], np.float32)
  flat = np.array([[0.1, 0, 0], [0, 0.1, 0]], np.float32)
  w = np.asarray(L.fusion_weights("entropy", np.stack([flat, sharp]), y))
  assert (w[1] > w[0]).all()


def test_fusion_is_constant(data):
  z, y = jnp.asarray(data["t_clean"]), data["y"]
  for kind in L.FUSIONS:
    g = jax.grad(lambda zz: jnp.sum(L.fusion_weights(kind, zz, y) * jnp.arange(N)))(z)
    assert not np.any(np.asarray(g))


def test_fused_soft_target(data):
  z, y = data["t_clean"], data["y"]
  p_hat, w = L.fused_soft_target(z, y, rectifier="swap", fusion="camkd", temperature=4.0)
  want = (np_fusion("camkd", z, y)[..., None] * np_rectify("swap", z, y, 4.0, 0.9)).sum(0)
  close(p_hat, want)
  close(np.asarray(p_hat).sum(-1), np.ones(N))


# ---------------------------------------------------------------------------------------------
# Features.
# ---------------------------------------------------------------------------------------------
def test_feature_losses(data):
  a, b = data["proj"], data["feat"]
  close(L.feature_mse(a[0], b[0]), np_feature_mse(a[0], b[0]))
  w = np_fusion("camkd", data["t_clean"], data["y"])
  want = sum((w[k] * np_feature_mse(a[k], b[k])).mean() for k in range(K))
  close(L.weighted_feature_loss(a, b, w.astype(np.float32)), want)
  close(L.weighted_feature_loss(a, b), sum(np_feature_mse(a[k], b[k]).mean() for k in range(K)))
  stacked_a, stacked_b = np.stack([a[0], a[2]]), np.stack([b[0], b[2]])
  close(
    L.weighted_feature_loss(stacked_a, stacked_b), np_feature_mse(a[0], b[0]).mean() + np_feature_mse(a[2], b[2]).mean()
  )


# ---------------------------------------------------------------------------------------------
# Method losses against NumPy.
# ---------------------------------------------------------------------------------------------
def np_sa_mdrad(
  d, *, rectifier, fusion, tau, alpha, lam_f, lam_ce, adr_lambda, reduction, view, dyn_target="student", dyn_beta=1.0
):
  y = d["y"]
  w = np_fusion(fusion, d["t_clean"], y)
  p_clean = (w[..., None] * np_rectify(rectifier, d["t_clean"], y, tau, adr_lambda)).sum(0)
  if view == "adv":
    w_a = np_fusion(fusion, d["t_adv"], y)
    p_adv = (w_a[..., None] * np_rectify(rectifier, d["t_adv"], y, tau, adr_lambda)).sum(0)
  else:
    p_adv = p_clean
  if rectifier == "dynamic":
    lam_i = np.clip(1 - np_softmax(d["s_adv"])[np.arange(len(y)), y], 0, 1) ** dyn_beta
    q = np_softmax(d["s_clean"], tau) if dyn_target == "student" else np.eye(C)[y]
    p_adv = lam_i[:, None] * p_adv + (1 - lam_i[:, None]) * q
    p_clean = lam_i[:, None] * p_clean + (1 - lam_i[:, None]) * q
  kl_adv = tau**2 * np_reduce(np_kl_rows(p_adv, np_log_softmax(d["s_adv"], tau)), C, reduction)
  kl_clean = tau**2 * np_reduce(np_kl_rows(p_clean, np_log_softmax(d["s_clean"], tau)), C, reduction)
  feat = sum((w[k] * np_feature_mse(d["proj"][k], d["feat"][k])).mean() for k in range(K))
  ce = np_ce_rows(d["s_adv"], y).mean()
  return alpha * kl_adv + (1 - alpha) * kl_clean + lam_f * feat + lam_ce * ce, kl_adv, kl_clean, feat


@pytest.mark.parametrize(
  "rectifier,fusion,view,reduction",
  [
    ("swap", "camkd", "clean", "batchmean"),
    ("adr", "ptrue", "adv", "elem_mean"),
    ("none", "entropy", "clean", "batchmean"),
    ("swap", "uniform", "adv", "sum"),
  ],
)
def test_sa_mdrad_loss(data, rectifier, fusion, view, reduction):
  d = data
  kw = dict(
    rectifier=rectifier, fusion=fusion, tau=3.0, alpha=0.7, lam_f=2.0, lam_ce=0.5, adr_lambda=0.6, reduction=reduction
  )
  loss, m = L.sa_mdrad_loss(
    student_adv_logits=d["s_adv"],
    student_clean_logits=d["s_clean"],
    teacher_clean_logits=d["t_clean"],
    teacher_adv_logits=d["t_adv"] if view == "adv" else None,
    labels=d["y"],
    projected_features=d["proj"],
    teacher_features=d["feat"],
    rectifier=rectifier,
    fusion=fusion,
    temperature=3.0,
    alpha=0.7,
    feature_weight=2.0,
    ce_weight=0.5,
    adr_lambda=0.6,
    reduction=reduction,
  )
  want, kl_adv, kl_clean, feat = np_sa_mdrad(d, view=view, **kw)
  close(loss, want)
  close(m["kl_adv"], kl_adv)
  close(m["kl_clean"], kl_clean)
  close(m["feature"], feat)
  assert all(np.asarray(v).shape == () for v in m.values())


@pytest.mark.parametrize(
  "target,beta,view", [("student", 1.0, "clean"), ("label", 2.5, "adv"), ("student", 0.5, "adv")]
)
def test_sa_mdrad_dynamic_rectifier(data, target, beta, view):
  d = data
  loss, m = L.sa_mdrad_loss(
    student_adv_logits=d["s_adv"],
    student_clean_logits=d["s_clean"],
    teacher_clean_logits=d["t_clean"],
    teacher_adv_logits=d["t_adv"] if view == "adv" else None,
    labels=d["y"],
    projected_features=d["proj"],
    teacher_features=d["feat"],
    rectifier="dynamic",
    fusion="camkd",
    temperature=3.0,
    alpha=0.7,
    feature_weight=2.0,
    ce_weight=0.5,
    dynamic_target=target,
    dynamic_beta=beta,
  )
  want, kl_adv, kl_clean, _ = np_sa_mdrad(
    d,
    rectifier="dynamic",
    fusion="camkd",
    tau=3.0,
    alpha=0.7,
    lam_f=2.0,
    lam_ce=0.5,
    adr_lambda=0.9,
    reduction="batchmean",
    view=view,
    dyn_target=target,
    dyn_beta=beta,
  )
  close(loss, want)
  close(m["kl_adv"], kl_adv)
  close(m["kl_clean"], kl_clean)
  lam = np.clip(1 - np_softmax(d["s_adv"])[np.arange(N), d["y"]], 0, 1) ** beta
  close(m["dynamic_trust"], lam.mean())


def test_dynamic_trust_limits():
  """λ → 1 where the student is wrong with certainty, → 0 where it is right with certainty."""
  s = jnp.array([[20.0, 0.0, 0.0], [0.0, 20.0, 0.0]])
  y = jnp.array([0, 0])
  lam = np.asarray(L.dynamic_trust(s, y))
  assert lam[0] < 1e-6 and lam[1] > 1 - 1e-6
  p_hat = jnp.full((2, 3), 1 / 3)
  out, _ = L.rectify_dynamic(p_hat, s, y, target="label")
  close(out[0], [1.0, 0.0, 0.0], atol=1e-6)  # robust sample: the label
  close(out[1], np.full(3, 1 / 3), atol=1e-6)  # failed sample: the teachers' target
  with pytest.raises(ValueError, match="student_clean_logits"):
    L.rectify_dynamic(p_hat, s, y, target="student")


def test_sa_mdrad_defaults_and_alpha_one(data):
  d = data
  loss, m = L.sa_mdrad_loss(
    student_adv_logits=d["s_adv"], teacher_clean_logits=d["t_clean"], labels=d["y"], alpha=1.0, feature_weight=0.0
  )
  want, kl_adv, _, _ = np_sa_mdrad(
    d,
    rectifier="dynamic",
    fusion="camkd",
    tau=4.0,
    alpha=1.0,
    lam_f=0.0,
    lam_ce=0.0,
    adr_lambda=0.9,
    reduction="batchmean",
    view="clean",
    dyn_target="label",
    dyn_beta=1.0,
  )
  close(loss, want)
  with pytest.raises(ValueError, match="student_clean_logits"):
    L.sa_mdrad_loss(student_adv_logits=d["s_adv"], teacher_clean_logits=d["t_clean"], labels=d["y"], feature_weight=0.0)


@pytest.mark.parametrize("reduction", ["batchmean", "elem_mean"])
def test_kd_loss(data, reduction):
  d = data
  loss, _ = L.kd_loss(
    student_logits=d["s_clean"],
    teacher_logits=d["t_clean"][0],
    labels=d["y"],
    temperature=4.0,
    alpha=0.9,
    reduction=reduction,
  )
  kl = 16 * np_reduce(np_kl_rows(np_softmax(d["t_clean"][0], 4), np_log_softmax(d["s_clean"], 4)), C, reduction)
  close(loss, 0.9 * kl + 0.1 * np_ce_rows(d["s_clean"], d["y"]).mean())
  loss_k, _ = L.kd_loss(student_logits=d["s_clean"], teacher_logits=d["t_clean"], labels=d["y"], alpha=1.0)
  kls = [
    16 * np_reduce(np_kl_rows(np_softmax(d["t_clean"][k], 4), np_log_softmax(d["s_clean"], 4)), C, "batchmean")
    for k in range(K)
  ]
  close(loss_k, np.mean(kls))


def test_pgd_at_and_trades(data):
  d = data
  close(L.pgd_at_loss(student_adv_logits=d["s_adv"], labels=d["y"])[0], np_ce_rows(d["s_adv"], d["y"]).mean())
  loss, m = L.trades_loss(student_clean_logits=d["s_clean"], student_adv_logits=d["s_adv"], labels=d["y"], beta=6.0)
  kl = np_kl_rows(np_softmax(d["s_clean"]), np_log_softmax(d["s_adv"])).mean()
  close(loss, np_ce_rows(d["s_clean"], d["y"]).mean() + 6 * kl)
  close(m["kl_robust"], kl)


@pytest.mark.parametrize("alpha", [1.0, 0.6])
def test_ard_loss(data, alpha):
  d = data
  loss, _ = L.ard_loss(
    student_adv_logits=d["s_adv"],
    student_clean_logits=d["s_clean"],
    teacher_clean_logits=d["t_clean"][:1],
    labels=d["y"],
    temperature=30.0,
    alpha=alpha,
  )
  kl = 900 * np_reduce(np_kl_rows(np_softmax(d["t_clean"][0], 30), np_log_softmax(d["s_adv"], 30)), C, "elem_mean")
  close(loss, alpha * kl + (1 - alpha) * np_ce_rows(d["s_clean"], d["y"]).mean())


@pytest.mark.parametrize("kl_scale", [1.0, 10.0])
def test_rslad_loss(data, kl_scale):
  d = data
  loss, _ = L.rslad_loss(
    student_adv_logits=d["s_adv"],
    student_clean_logits=d["s_clean"],
    teacher_clean_logits=d["t_clean"][0],
    kl_scale=kl_scale,
  )
  p = np_softmax(d["t_clean"][0])
  kl_a = np.mean(-np_log_softmax(d["s_adv"]) * p + np.log(p + 1e-5) * p)
  kl_n = np.mean(-np_log_softmax(d["s_clean"]) * p + np.log(p + 1e-5) * p)
  close(loss, kl_scale * (5 / 6 * kl_a + 1 / 6 * kl_n))


@pytest.mark.parametrize("reduction", ["elem_mean", "batchmean"])
def test_adaad_loss(data, reduction):
  d = data
  loss, _ = L.adaad_loss(
    student_adv_logits=d["s_adv"],
    teacher_adv_logits=d["t_adv"][0],
    student_clean_logits=d["s_clean"],
    teacher_clean_logits=d["t_clean"][0],
    alpha=0.7,
    reduction=reduction,
  )
  kl_a = np_reduce(np_kl_rows(np_softmax(d["t_adv"][0]), np_log_softmax(d["s_adv"])), C, reduction)
  kl_n = np_reduce(np_kl_rows(np_softmax(d["t_clean"][0]), np_log_softmax(d["s_clean"])), C, reduction)
  close(loss, 0.7 * kl_a + 0.3 * kl_n)
  loss1, _ = L.adaad_loss(student_adv_logits=d["s_adv"], teacher_adv_logits=d["t_adv"][0], reduction=reduction)
  close(loss1, kl_a)


@pytest.mark.parametrize("on", [0.0, 1.0])
def test_iad1_loss(data, on):
  d = data
  tau, alpha, beta = 2.0, 0.8, 0.1
  loss, m = L.iad1_loss(
    student_adv_logits=d["s_adv"],
    student_clean_logits=d["s_clean"],
    teacher_clean_logits=d["t_clean"][0],
    teacher_adv_logits=d["t_adv"][0],
    labels=d["y"],
    introspection_on=jnp.asarray(on > 0),
    temperature=tau,
    alpha=alpha,
    beta=beta,
  )
  y = d["y"]
  a = np_softmax(d["t_adv"][0])[np.arange(N), y] ** beta
  kl_t = tau**2 * np_kl_rows(np_softmax(d["t_clean"][0], tau), np_log_softmax(d["s_adv"], tau)).mean()
  kl_s = ((1 - a) * np_kl_rows(np_softmax(d["s_clean"]), np_log_softmax(d["s_adv"]))).mean()
  want = alpha * kl_t + on * alpha * kl_s + (1 - alpha) * np_ce_rows(d["s_clean"], y).mean()
  close(loss, want)
  close(m["kl_self"], kl_s)
  close(m["trust"], a.mean())


@pytest.mark.parametrize("on", [0.0, 1.0])
def test_iad2_loss(data, on):
  d = data
  tau, a1, a2, beta = 2.0, 0.5, 0.25, 0.1
  loss, _ = L.iad2_loss(
    student_adv_logits=d["s_adv"],
    student_clean_logits=d["s_clean"],
    teacher_at_adv_logits=d["t_adv"][0],
    teacher_st_adv_logits=d["t_adv"][1],
    labels=d["y"],
    introspection_on=jnp.float32(on),
    temperature=tau,
    alpha1=a1,
    alpha2=a2,
    beta=beta,
  )
  y = d["y"]
  a = np_softmax(d["t_adv"][0])[np.arange(N), y] ** beta
  a_eff = a if on else np.ones(N)
  kl_at = np_kl_rows(np_softmax(d["t_adv"][0], tau), np_log_softmax(d["s_adv"], tau))
  kl_st = np_kl_rows(np_softmax(d["t_adv"][1], tau), np_log_softmax(d["s_adv"], tau))
  kl_self = np_kl_rows(np_softmax(d["s_clean"]), np_log_softmax(d["s_adv"]))
  want = (
    (1 - a1 - a2) * np_ce_rows(d["s_adv"], y).mean()
    + a1 * tau**2 * ((a_eff * kl_at).mean() + on * ((1 - a) * kl_self).mean())
    + a2 * tau**2 * kl_st.mean()
  )
  close(loss, want)


# ---------------------------------------------------------------------------------------------
# MTARD / B-MTARD state.
# ---------------------------------------------------------------------------------------------
def hand_mtard(losses, *, lr_w, bert, balanced, entropies=None, lr_tau=0.001):
  """Plain-Python transcription of the update loop (weights dict, L0 on the first iteration)."""
  w = {"adv": 0.5, "clean": 0.5}
  temp = {"adv": 1.0, "clean": 1.0}
  l0 = None
  out = []
  for t, (la, ln) in enumerate(losses):
    if entropies is not None and balanced:
      ha, hn = entropies[t]
      new_ta = min(max(temp["adv"] - lr_tau * np.sign(ha / hn - 1), 1.0), 10.0)
      new_tn = min(max(temp["clean"] - lr_tau * np.sign(hn / ha - 1), 1.0), 10.0)
      temp = {"adv": new_ta, "clean": new_tn}
    if l0 is None:
      l0 = (la, ln)
    ra, rn = (la / l0[0]) ** bert, (ln / l0[1]) ** bert
    if not balanced:
      w["clean"] = w["clean"] - lr_w * (w["clean"] - rn / (ra + rn))
      w["adv"] = 1 - w["clean"]
    else:
      avg = (ra + rn) / 2
      ra, rn = ra / avg, rn / avg
      w["clean"] = max(w["clean"] - lr_w * (w["clean"] - rn / (ra + rn)), 0.0)
      w["adv"] = max(w["adv"] - lr_w * (w["adv"] - ra / (ra + rn)), 0.0)
      s = w["adv"] + w["clean"]
      w = {"adv": w["adv"] / s, "clean": w["clean"] / s}
    out.append((w["adv"], w["clean"], temp["adv"], temp["clean"]))
  return out


@pytest.mark.parametrize("balanced,bert", [(False, 1.0), (False, 2.0), (True, 1.0)])
def test_mtard_update_state_against_hand(balanced, bert):
  losses = [(2.0, 1.0), (1.0, 0.9), (0.5, 0.95)]
  ents = [(-0.5, -0.3), (-0.2, -0.4), (-0.3, -0.3)]
  want = hand_mtard(losses, lr_w=0.3, bert=bert, balanced=balanced, entropies=ents, lr_tau=0.5)
  state = L.mtard_init_state()
  assert not bool(state.initialized)
  update = jax.jit(
    lambda s, la, ln, ha, hn: L.mtard_update_state(
      s, la, ln, lr_w=0.3, beta=bert, balanced=balanced, entropy_adv=ha, entropy_clean=hn, lr_tau=0.5
    )
  )
  for (la, ln), (ha, hn), (wa, wn, ta, tn) in zip(losses, ents, want):
    state = update(state, la, ln, ha, hn)
    close(state.w_adv, wa)
    close(state.w_nat, wn)
    close(state.tau_adv, ta)
    close(state.tau_nat, tn)
    close(state.init_loss_adv, losses[0][0])
    close(state.init_loss_nat, losses[0][1])
  assert bool(state.initialized)
  # The weights moved: first step target = 1/2, then the clean share grows as L_adv falls faster.
  assert float(state.w_nat) > 0.5


@pytest.mark.parametrize("balanced", [False, True])
def test_mtard_loss(data, balanced):
  d = data
  state = L.mtard_init_state()
  if balanced:
    state = state._replace(tau_adv=jnp.float32(2.0), tau_nat=jnp.float32(1.5))
  kw = dict(
    student_adv_logits=d["s_adv"],
    student_clean_logits=d["s_clean"],
    teacher_adv_logits=d["t_adv"][0],
    teacher_clean_logits=d["t_clean"][1],
    lr_w=0.025,
    beta=1.0,
    balanced=balanced,
    kl_scale=10.0,
  )
  loss, m = L.mtard_loss(state=state, **kw)
  ta, tn = float(state.tau_adv), float(state.tau_nat)
  pa, pn = np_softmax(d["t_adv"][0], ta), np_softmax(d["t_clean"][1], tn)
  kl_a = 10 * np.mean(-np_log_softmax(d["s_adv"]) * pa + np.log(pa + 1e-5) * pa)
  kl_n = 10 * np.mean(-np_log_softmax(d["s_clean"]) * pn + np.log(pn + 1e-5) * pn)
  close(m["kl_adv"], kl_a)
  close(m["kl_clean"], kl_n)
  close(m["teacher_neg_entropy_adv"], np.mean(pa * np.log(pa + 1e-5)))
  # First call: L0 = L, r = 1 each, so the updated weights stay 1/2.
  close(loss, 0.5 * kl_a + 0.5 * kl_n)
  # Second call from a state whose L0 was recorded at different losses: weights updated before use.
  state2 = L.mtard_update_state(state, 2 * kl_a, kl_n, lr_w=0.025, balanced=balanced)
  loss2, m2 = L.mtard_loss(state=state2, **kw)
  ((wa, wn, _, _),) = hand_mtard([(2 * kl_a, kl_n), (kl_a, kl_n)], lr_w=0.025, bert=1.0, balanced=balanced)[1:]
  close(m2["w_adv"], wa)
  close(loss2, wa * kl_a + wn * kl_n)
  # Persisting from the metrics reproduces the weights used.
  persisted = L.mtard_update_state(
    state2,
    m2["kl_adv"],
    m2["kl_clean"],
    lr_w=0.025,
    balanced=balanced,
    entropy_adv=m2["teacher_neg_entropy_adv"],
    entropy_clean=m2["teacher_neg_entropy_clean"],
  )
  close(persisted.w_adv, float(m2["w_adv"]), rtol=0, atol=0)
  loss_old, _ = L.mtard_loss(state=state2, use_updated_weights=False, **kw)
  close(loss_old, float(state2.w_adv) * kl_a + float(state2.w_nat) * kl_n)
  b, _ = L.bmtard_loss(state=state, **{k: v for k, v in kw.items() if k != "balanced"})
  assert np.isfinite(float(b))


# ---------------------------------------------------------------------------------------------
# Gradients reach the student, never the teachers; traced switches.
# ---------------------------------------------------------------------------------------------
def _method_calls(d):
  state = L.mtard_init_state()
  return {
    "sa_mdrad": (
      L.sa_mdrad_loss,
      dict(
        student_adv_logits=d["s_adv"],
        student_clean_logits=d["s_clean"],
        teacher_clean_logits=d["t_clean"],
        teacher_adv_logits=d["t_adv"],
        projected_features=d["proj"],
        teacher_features=d["feat"],
        labels=d["y"],
        ce_weight=0.3,
      ),
    ),
    "kd": (L.kd_loss, dict(student_logits=d["s_clean"], teacher_logits=d["t_clean"], labels=d["y"])),
    "pgd_at": (L.pgd_at_loss, dict(student_adv_logits=d["s_adv"], labels=d["y"])),
    "trades": (L.trades_loss, dict(student_clean_logits=d["s_clean"], student_adv_logits=d["s_adv"], labels=d["y"])),
    "ard": (
      L.ard_loss,
      dict(
        student_adv_logits=d["s_adv"],
        student_clean_logits=d["s_clean"],
        teacher_clean_logits=d["t_clean"][0],
        labels=d["y"],
        alpha=0.5,
      ),
    ),
    "rslad": (
      L.rslad_loss,
      dict(student_adv_logits=d["s_adv"], student_clean_logits=d["s_clean"], teacher_clean_logits=d["t_clean"][0]),
    ),
    "adaad": (
      L.adaad_loss,
      dict(
        student_adv_logits=d["s_adv"],
        teacher_adv_logits=d["t_adv"][0],
        student_clean_logits=d["s_clean"],
        teacher_clean_logits=d["t_clean"][0],
        alpha=0.5,
      ),
    ),
    "iad1": (
      L.iad1_loss,
      dict(
        student_adv_logits=d["s_adv"],
        student_clean_logits=d["s_clean"],
        teacher_clean_logits=d["t_clean"][0],
        teacher_adv_logits=d["t_adv"][0],
        labels=d["y"],
        introspection_on=jnp.bool_(True),
        alpha=0.5,
      ),
    ),
    "iad2": (
      L.iad2_loss,
      dict(
        student_adv_logits=d["s_adv"],
        student_clean_logits=d["s_clean"],
        teacher_at_adv_logits=d["t_adv"][0],
        teacher_st_adv_logits=d["t_adv"][1],
        labels=d["y"],
        introspection_on=jnp.bool_(True),
      ),
    ),
    "mtard": (
      L.mtard_loss,
      dict(
        student_adv_logits=d["s_adv"],
        student_clean_logits=d["s_clean"],
        teacher_adv_logits=d["t_adv"][0],
        teacher_clean_logits=d["t_clean"][0],
        state=state,
        balanced=True,
      ),
    ),
  }


STUDENT_KEYS = ("student_adv_logits", "student_clean_logits", "student_logits", "projected_features")


@pytest.mark.parametrize(
  "name", ["sa_mdrad", "kd", "pgd_at", "trades", "ard", "rslad", "adaad", "iad1", "iad2", "mtard"]
)
def test_gradients_reach_student_not_teacher(data, name):
  fn, kw = _method_calls(data)[name]
  arrays = {
    k: v
    for k, v in kw.items()
    if k not in ("labels", "state", "introspection_on") and not isinstance(v, (bool, float, int, str))
  }
  rest = {k: v for k, v in kw.items() if k not in arrays}

  def total(arrs):
    return fn(**arrs, **rest)[0]

  grads = jax.jit(jax.grad(total))(jax.tree.map(jnp.asarray, arrays))  # one compile: cheaper than eager
  for key, g in grads.items():
    norm = sum(float(jnp.sum(jnp.abs(x))) for x in jax.tree.leaves(g))
    if key in STUDENT_KEYS:
      assert norm > 0, f"{name}: no gradient reaches {key}"
    else:
      assert norm == 0, f"{name}: gradient leaks into {key}"


def test_iad1_self_target_flag(data):
  d = data
  kw = dict(
    student_adv_logits=d["s_adv"],
    teacher_clean_logits=d["t_clean"][0],
    teacher_adv_logits=d["t_adv"][0],
    labels=d["y"],
    introspection_on=jnp.float32(1.0),
    alpha=1.0,
  )
  g_free = jax.grad(lambda s: L.iad1_loss(student_clean_logits=s, **kw)[0])(jnp.asarray(d["s_clean"]))
  g_det = jax.grad(lambda s: L.iad1_loss(student_clean_logits=s, detach_self_target=True, **kw)[0])(
    jnp.asarray(d["s_clean"])
  )
  assert float(jnp.abs(g_free).sum()) > 0  # α = 1: only the undetached self target reaches S(x)
  assert float(jnp.abs(g_det).sum()) == 0


def test_losses_jit_with_traced_switches(data):
  d = data

  @jax.jit
  def f(on, alpha, state):
    a, _ = L.iad1_loss(
      student_adv_logits=d["s_adv"],
      student_clean_logits=d["s_clean"],
      teacher_clean_logits=d["t_clean"][0],
      teacher_adv_logits=d["t_adv"][0],
      labels=d["y"],
      introspection_on=on,
    )
    b, _ = L.sa_mdrad_loss(
      student_adv_logits=d["s_adv"],
      student_clean_logits=d["s_clean"],
      teacher_clean_logits=d["t_clean"],
      labels=d["y"],
      alpha=alpha,
      feature_weight=0.0,
    )
    c, _ = L.mtard_loss(
      student_adv_logits=d["s_adv"],
      student_clean_logits=d["s_clean"],
      teacher_adv_logits=d["t_adv"][0],
      teacher_clean_logits=d["t_clean"][0],
      state=state,
    )
    return a, b, c

  off = f(jnp.bool_(False), jnp.float32(0.5), L.mtard_init_state())
  on = f(jnp.bool_(True), jnp.float32(0.5), L.mtard_init_state())
  assert float(on[0]) > float(off[0])
  assert all(np.isfinite(float(v)) for v in off + on)


OLD_NAMES = {new: old for old, new in L.RENAMED_KEYWORDS.items()}


@pytest.mark.parametrize("name", ["sa_mdrad", "trades", "ard", "rslad", "adaad", "iad1", "iad2", "mtard"])
def test_old_keyword_names_still_work_with_a_deprecation_warning(data, name):
  fn, kw = _method_calls(data)[name]
  old_kw = {OLD_NAMES.get(k, k): v for k, v in kw.items()}
  assert old_kw.keys() != kw.keys()
  want, want_m = fn(**kw)
  with pytest.warns(DeprecationWarning, match=r"_nat_logits' is deprecated, use '\w+_clean_logits'"):
    got, got_m = fn(**old_kw)
  close(got, want, rtol=0, atol=0)
  assert got_m.keys() == want_m.keys()
  old, new = next((o, n) for n, o in OLD_NAMES.items() if n in kw)
  with pytest.raises(TypeError, match=f"both '{old}' and its new name '{new}'"):
    fn(**kw, **{old: kw[new]})


def test_mtard_update_state_old_keyword_names():
  s = L.mtard_init_state()
  kw = dict(balanced=True, entropy_adv=-0.5, lr_tau=0.5)
  want = L.mtard_update_state(L.mtard_update_state(s, 1.0, loss_clean=2.0, entropy_clean=-0.3, **kw), 0.5, 2.5)
  with pytest.warns(DeprecationWarning, match="'(loss|entropy)_nat' is deprecated"):
    got = L.mtard_update_state(L.mtard_update_state(s, 1.0, loss_nat=2.0, entropy_nat=-0.3, **kw), 0.5, 2.5)
  for a, b in zip(got, want):
    close(a, b, rtol=0, atol=0)
  assert float(got.tau_nat) != 1.0  # the entropies (one under its old name) were used


def test_every_method_loss_with_a_renamed_keyword_accepts_the_old_one():
  import inspect

  checked = 0
  for name, fn in vars(L).items():
    if callable(fn) and (name.endswith("_loss") or name == "mtard_update_state"):
      if set(inspect.signature(fn).parameters) & set(OLD_NAMES):
        assert hasattr(fn, "__wrapped__"), f"{name} takes a renamed keyword but not its old name"
        checked += 1
  assert checked == 9


def test_mtard_state_keeps_its_checkpoint_keys():
  # checkpoints store the state under these names: renaming one would stop older MTARD checkpoints restoring
  assert L.MTARDState._fields == (
    "w_adv",
    "w_nat",
    "tau_adv",
    "tau_nat",
    "init_loss_adv",
    "init_loss_nat",
    "initialized",
  )
