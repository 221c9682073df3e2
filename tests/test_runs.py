"""A trained run's workdir read back (mdrad_jax.runs): best and latest checkpoint, the network rebuilt from
config.json with its step and config, and one-line errors for a workdir or checkpoint that is not there."""

import json
import os

import jax
import numpy as np
import optax
import pytest

from mdrad_jax import config_lib, models, runs
from mdrad_jax import workdir as workdir_lib
from mdrad_jax.checkpointing import Checkpointer
from mdrad_jax.errors import UserError
from mdrad_jax.train_state import TrainState

SHAPE, C = (8, 8, 1), 4


def _run(workdir, accuracies=(0.5, 0.9, 0.6)):
  """A run without training: tiny_cnn checkpoints of steps 1, 2, ... (parameters scaled by the step) with
  the given test accuracies, and its config.json.  Returns {step: params}."""
  cfg = config_lib.base_config()
  cfg.model.name = "tiny_cnn"
  cfg.model.kwargs.widths = (4, 8)
  cfg.checkpoint.best_metric = "test/accuracy"
  model = models.build_model(cfg.model, C)
  variables = models.init_model(model, jax.random.key(0), SHAPE)
  os.makedirs(workdir)
  workdir_lib.write_config(cfg, workdir, {"num_classes": C, "image_shape": list(SHAPE)})
  ck = Checkpointer(workdir, keep=1, best_metric="test/accuracy")
  saved = {}
  for step, acc in enumerate(accuracies, start=1):
    params = jax.tree.map(lambda p, s=step: p * s, variables["params"])
    state = TrainState.create(
      params={"model": params, "projectors": {}},
      batch_stats={"model": variables["batch_stats"], "projectors": {}},
      tx=optax.identity(),
      rng=jax.random.key_data(jax.random.key(0)),
    )
    ck.save(state.replace(step=step), metrics={"test/accuracy": acc})
    saved[step] = jax.tree.map(np.asarray, params)
  ck.close()
  return saved


def _same(a, b):
  jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, a), b)


def test_load_trained_best_and_latest(tmp_path):
  w = str(tmp_path / "run")
  saved = _run(w)
  with open(os.path.join(w, "config.json")) as f:
    config_json = json.load(f)

  best = runs.load_trained(w)
  assert best.step == 2 and best.step_dir == os.path.join(w, "checkpoints", "2")
  assert best.run_config == config_json and best.run_config["num_classes"] == C
  _same(best.variables["params"], saved[2])
  assert "batch_stats" in best.variables and "projectors" not in best.variables["params"]
  assert isinstance(best.module, models.MODELS["tiny_cnn"]) and best.module.num_classes == C
  logits = best.module.apply(best.variables, np.zeros((2, *SHAPE), np.float32), train=False)
  assert logits.shape == (2, C)

  latest = runs.load_trained(w, "latest")
  assert latest.step == 3 and latest.run_config == config_json
  _same(latest.variables["params"], saved[3])
  # its checkpoints/ directory and one step directory name the same checkpoints
  assert runs.load_trained(os.path.join(w, "checkpoints"), "latest").step == 3
  one = runs.load_trained(os.path.join(w, "checkpoints", "2"), "latest")
  assert one.step == 2 and one.run_config == config_json
  assert runs.resolve_checkpoint(w) == (best.step_dir, 2, config_json)
  variables, cfg = runs.load_model_variables(w, which="latest")
  _same(variables["params"], saved[3])
  assert cfg == config_json


def _one_line_error(fn, *args, **kwargs) -> str:
  with pytest.raises(UserError) as err:
    fn(*args, **kwargs)
  msg = str(err.value)
  assert "\n" not in msg
  return msg


def test_load_trained_errors_are_one_line(tmp_path):
  missing = str(tmp_path / "no_such_run")
  msg = _one_line_error(runs.load_trained, missing, what="teacher")
  assert msg.startswith("teacher ") and missing in msg and "does not exist" in msg
  with pytest.raises(FileNotFoundError):
    runs.load_trained(missing)

  os.makedirs(tmp_path / "empty")
  assert "neither a training workdir" in _one_line_error(runs.load_trained, str(tmp_path / "empty"))

  w = str(tmp_path / "run")
  _run(w, accuracies=(0.5,))
  assert "which must be 'best' or 'latest'" in _one_line_error(runs.load_trained, w, "worst")
  # the variables must fit the network config.json names, for the images given
  assert "do not fit model 'tiny_cnn'" in _one_line_error(runs.load_trained, w, image_shape=(16, 16, 3))

  # a workdir whose config.json has no checkpoints next to it, or an empty checkpoints/ directory
  no_ckpt = tmp_path / "no_ckpt"
  os.makedirs(no_ckpt)
  (no_ckpt / "config.json").write_text((tmp_path / "run" / "config.json").read_text())
  assert "no checkpoints/ directory" in _one_line_error(runs.load_trained, str(no_ckpt))
  assert not os.path.exists(no_ckpt / "checkpoints")  # looking created nothing
  os.makedirs(no_ckpt / "checkpoints")
  assert "no best checkpoint" in _one_line_error(runs.load_trained, str(no_ckpt))
  assert not runs.has_checkpoint(str(no_ckpt)) and runs.has_checkpoint(w)

  # a step directory whose run has no config.json: its variables load, its network cannot be built
  os.remove(tmp_path / "run" / "config.json")
  step_dir = os.path.join(w, "checkpoints", "1")
  variables, cfg = runs.load_model_variables(step_dir)
  assert cfg is None and "params" in variables
  assert "no config.json with the model" in _one_line_error(runs.load_trained, step_dir)


def test_a_config_json_of_an_earlier_release_reads_in_todays_spelling(tmp_path):
  w = str(tmp_path / "run")
  _run(w, accuracies=(0.5,))
  path = os.path.join(w, "config.json")
  with open(path) as f:
    old = json.load(f)
  old["method"] = dict(config_lib.method_config("sa_mdrad").to_dict(), teacher_view="nat")  # as written before
  with open(path, "w") as f:
    json.dump(old, f)
  today = dict(old, method=dict(old["method"], teacher_view="clean"))
  assert workdir_lib.upgrade_config(old) == today and old["method"]["teacher_view"] == "nat"  # a copy
  assert workdir_lib.upgrade_config(None) is None and workdir_lib.upgrade_config({"method": "x"}) == {"method": "x"}
  # every reader of a saved config sees today's spelling (teachers and evaluations load through load_trained)
  assert workdir_lib.read_run_config(w) == today
  assert runs.load_trained(w).run_config["method"]["teacher_view"] == "clean"
  with open(path) as f:
    assert json.load(f) == old  # read, not rewritten
  # resuming with today's config is the same run; another view is not
  assert workdir_lib.check_same_run(today, w)["method"]["teacher_view"] == "clean"
  assert workdir_lib.check_same_run(old, w) is not None
  msg = _one_line_error(workdir_lib.check_same_run, dict(today, method=dict(today["method"], teacher_view="adv")), w)
  assert "method.teacher_view ('clean' -> 'adv')" in msg
