"""Evaluation protocol on a linear model whose robust accuracy at ε is known in closed form.

Classes 0/1 have weights ±w and the other classes are constant and far below, so the smallest L∞ perturbation
that flips point i is |w·x_i| / ‖w‖₁ (the box does not bind), and every gradient-sign attack from any start
in the ε-ball moves straight to the optimal corner.  The accuracy under FGSM, PGD-20, CW∞ and AutoAttack is
therefore the fraction of correctly classified points whose minimal perturbation exceeds ε.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mdrad_jax import evaluation

EPS = 8 / 255
SHAPE = (4, 4, 2)
DIM = int(np.prod(SHAPE))
RADII = EPS * np.array([0.2, 0.5, 0.8, 0.9, 1.1, 1.3, 2.0, 3.0, 0.5, 2.0])


@pytest.fixture(scope="module")
def problem():
  rng = np.random.default_rng(0)
  w = rng.uniform(0.5, 1.5, DIM) * rng.choice([-1.0, 1.0], DIM)
  w -= w.mean()
  wmat = np.zeros((4, DIM))
  wmat[0], wmat[1] = w, -w
  bias = np.array([0.0, 0.0, -50.0, -51.0])
  n = len(RADII)
  v = rng.uniform(-0.1, 0.1, (n, DIM))
  v -= np.outer(v @ w / (w @ w), w)
  sides = np.where(np.arange(n) % 2 == 0, 1.0, -1.0)
  x = (0.5 + v + np.outer(sides * RADII * np.abs(w).sum(), w / (w @ w))).reshape((n,) + SHAPE)
  y = np.where(sides > 0, 0, 1).astype(np.int32)
  y[-2:] = 1 - y[-2:]  # the last two points are misclassified from the start
  wj, bj = jnp.asarray(wmat, jnp.float32), jnp.asarray(bias, jnp.float32)
  fn = lambda xb: xb.reshape(xb.shape[0], -1) @ wj.T + bj
  # closed form, float64
  z = x.reshape(n, -1) @ wmat.T + bias
  np.testing.assert_allclose(np.abs(z[:, 0] - z[:, 1]) / (2 * np.abs(w).sum()), RADII, rtol=1e-6)
  assert x.min() - EPS > 0 and x.max() + EPS < 1
  return fn, x.astype(np.float32), y


def test_accuracies_match_the_closed_form(problem):
  fn, x, y = problem
  res = evaluation.evaluate(
    fn, x, y, attacks=("clean", "fgsm", "pgd20", "cw", "autoattack"), batch_size=4, aa_version="apgd", progress=False
  )
  clean = np.arange(len(y)) < len(y) - 2
  robust = clean & (RADII > EPS)
  assert res["clean"]["accuracy"] == pytest.approx(clean.mean())
  for name in ("fgsm", "pgd20", "cw", "autoattack_apgd_subset"):
    assert res[name]["correct"] == robust.sum(), name
    assert res[name]["n"] == len(y)
  assert "autoattack" not in res
  aa_entry = res["autoattack_apgd_subset"]
  assert aa_entry["label"].startswith("AutoAttack (APGD-CE + APGD-T subset)") and aa_entry["version"] == "apgd"
  assert aa_entry["robust_after"]["clean"] == clean.sum()
  assert "PGD-20" in res["pgd20"]["label"] and "kappa = 50" in res["cw"]["label"]
  assert "no random start" in res["fgsm"]["label"]


def test_standard_autoattack_is_reported_under_its_own_key(problem):
  fn, x, y = problem
  res = evaluation.evaluate(fn, x[:0], y[:0], attacks=("autoattack",), progress=False)
  assert list(res) == ["autoattack"]
  assert res["autoattack"]["label"] == "AutoAttack (standard: APGD-CE, APGD-T, FAB-T, Square)"


def test_logits_fn_from_model_uses_eval_mode():
  class Net(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
      h = nn.Dense(4)(x.reshape(x.shape[0], -1))
      return nn.Dropout(0.9, deterministic=not train)(h)

  net = Net()
  x = jnp.ones((2,) + SHAPE)
  variables = net.init(jax.random.key(0), x)
  fn = evaluation.logits_fn_from_model(net, variables)
  np.testing.assert_allclose(fn(x), net.apply(variables, x, train=False))
  fn2 = evaluation.logits_fn_from_apply(net.apply, variables, train=False)
  np.testing.assert_allclose(fn2(x), fn(x))


def test_bad_arguments_raise(problem):
  fn, x, y = problem
  with pytest.raises(ValueError, match="unknown attacks"):
    evaluation.evaluate(fn, x, y, attacks=("pgd10",), progress=False)
  with pytest.raises(ValueError, match="aa_version"):
    evaluation.evaluate(fn, x, y, aa_version="plus", progress=False)
  with pytest.raises(ValueError, match="do not match"):
    evaluation.evaluate(fn, x, y[:3], attacks=("clean",), progress=False)
