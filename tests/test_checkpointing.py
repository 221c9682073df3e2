"""Checkpoints: latest + best kept, exact restore, non-finite states refused, teacher loading."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mdrad_jax.checkpointing import Checkpointer, NonFiniteStateError
from mdrad_jax.runs import load_model_variables
from mdrad_jax.train_state import TrainState


def _state():
  params = {"model": {"w": jnp.ones((3,))}, "projectors": {"0": {"p": jnp.zeros((2,))}}}
  stats = {"model": {"mean": jnp.zeros((3,))}, "projectors": {}}
  return TrainState.create(
    params=params, batch_stats=stats, tx=optax.sgd(0.1, momentum=0.9), rng=jax.random.key_data(jax.random.key(0))
  )


def _grad(i):
  return {"model": {"w": jnp.full((3,), float(i))}, "projectors": {"0": {"p": jnp.ones((2,))}}}


def test_keeps_latest_and_best_and_restores_exactly(tmp_path):
  ck = Checkpointer(str(tmp_path), keep=2, best_metric="acc")
  st = _state()
  saved = {}
  for i, acc in enumerate([0.5, 0.9, 0.6, 0.7, 0.65]):
    st = st.apply_gradients(_grad(i))
    ck.save(st, metrics={"acc": acc})
    saved[int(st.step)] = np.asarray(st.params["model"]["w"])
  ck.wait()
  assert ck.all_steps() == [2, 4, 5]  # best (0.9 at step 2) + the last two
  assert ck.best_step() == 2 and ck.latest_step() == 5
  restored = ck.restore(_state())
  assert int(restored.step) == 5
  np.testing.assert_array_equal(np.asarray(restored.params["model"]["w"]), saved[5])
  # optimizer momentum is restored too: one more identical update gives identical params
  a = restored.apply_gradients(_grad(7))
  b = st.apply_gradients(_grad(7))
  np.testing.assert_allclose(np.asarray(a.params["model"]["w"]), np.asarray(b.params["model"]["w"]))
  ck.close()
  with open(tmp_path / "config.json", "w") as f:
    json.dump({"checkpoint": {"best_metric": "acc", "best_mode": "max"}}, f)
  variables, cfg = load_model_variables(str(tmp_path))
  np.testing.assert_array_equal(np.asarray(variables["params"]["w"]), saved[2])
  assert "projectors" not in variables["params"]
  latest, _ = load_model_variables(str(tmp_path), which="latest")
  np.testing.assert_array_equal(np.asarray(latest["params"]["w"]), saved[5])
  step_dir, _ = load_model_variables(str(tmp_path / "checkpoints" / "4"))
  np.testing.assert_array_equal(np.asarray(step_dir["params"]["w"]), saved[4])


def test_non_finite_state_is_refused_and_good_checkpoint_kept(tmp_path):
  ck = Checkpointer(str(tmp_path), keep=1)
  st = _state().apply_gradients(_grad(1))
  ck.save(st)
  ck.wait()
  bad = st.replace(step=st.step + 1, params={**st.params, "model": {"w": jnp.array([jnp.nan, 1.0, 1.0])}})
  with pytest.raises(NonFiniteStateError, match="NaN"):
    ck.save(bad)
  assert ck.all_steps() == [1]
  ck.close()


def test_missing_path_error_names_the_path(tmp_path):
  with pytest.raises(FileNotFoundError, match="does-not-exist"):
    load_model_variables(str(tmp_path / "does-not-exist"))
  os.makedirs(tmp_path / "empty")
  with pytest.raises(FileNotFoundError, match="neither a training workdir"):
    load_model_variables(str(tmp_path / "empty"))
