"""Learning-rate schedules and the coupled weight decay, against hand-worked values."""

import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from mdrad_jax import optim


def test_piecewise_reaches_0001_and_ard_faithful_stays_at_001():
  kw = dict(base_lr=0.1, steps_per_epoch=10, num_epochs=200, boundaries=(100, 150), factor=0.1)
  pw = optim.learning_rate_schedule(name="piecewise", **kw)
  ard = optim.learning_rate_schedule(name="ard_faithful", **kw)
  # epoch 99 -> step 999, epoch 100 -> step 1000, epoch 150 -> step 1500
  np.testing.assert_allclose(
    [pw(999), pw(1000), pw(1499), pw(1500), pw(1999)], [0.1, 0.01, 0.01, 0.001, 0.001], rtol=1e-6
  )
  np.testing.assert_allclose([ard(999), ard(1000), ard(1500), ard(1999)], [0.1, 0.01, 0.01, 0.01], rtol=1e-6)


def test_cosine_with_warmup_matches_formula():
  s = optim.learning_rate_schedule(name="cosine", base_lr=0.2, steps_per_epoch=5, num_epochs=10, warmup_epochs=2)
  np.testing.assert_allclose(s(5), 0.2 * 5 / 10, rtol=1e-6)  # linear warm-up over 10 steps
  t = 20  # 10 steps into the 40-step cosine part
  np.testing.assert_allclose(s(10 + t), 0.2 * 0.5 * (1 + np.cos(np.pi * t / 40)), rtol=1e-5)


def test_unknown_schedule_is_named_in_the_error():
  with pytest.raises(ValueError, match="optim.schedule"):
    optim.learning_rate_schedule(name="step", base_lr=0.1, steps_per_epoch=1, num_epochs=1)


def test_sgd_with_coupled_weight_decay_matches_pytorch_rule():
  # PyTorch SGD: g <- g + wd*w ; buf <- m*buf + g ; w <- w - lr*buf
  cfg = ml_collections.ConfigDict(
    dict(
      name="sgd",
      lr=0.1,
      momentum=0.9,
      nesterov=False,
      weight_decay=0.01,
      schedule="constant",
      boundaries=(),
      factor=0.1,
      warmup_epochs=0.0,
      grad_clip_norm=0.0,
    )
  )
  tx, _ = optim.create_optimizer(cfg, steps_per_epoch=1, num_epochs=1)
  w = jnp.array([1.0, -2.0])
  st = tx.init(w)
  w_ref, buf = np.array([1.0, -2.0], np.float64), np.zeros(2)
  for g in ([0.5, 0.1], [-0.2, 0.3], [0.0, 1.0]):
    upd, st = tx.update(jnp.array(g), st, w)
    w = optax.apply_updates(w, upd)
    gg = np.array(g) + 0.01 * w_ref
    buf = 0.9 * buf + gg
    w_ref = w_ref - 0.1 * buf
  np.testing.assert_allclose(np.asarray(w), w_ref, rtol=1e-6)
