"""The real loop on the embedded digits data: config.json/metrics written, resume after an interruption
reproduces the uninterrupted run exactly, and main.py reports bad input on one line."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from mdrad_jax import checkpointing, parallel, runs, train

import tiny_runs  # tests/ is on sys.path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(data_dir):
  c = tiny_runs.digits_pgd_at(data_dir)
  c.optim.schedule = "cosine"
  return c


class _Interrupt(Exception):
  pass


def test_resume_after_interruption_matches_uninterrupted_run(tmp_path, monkeypatch):
  cfg = _config(tmp_path / "data")
  full = train.train_and_evaluate(cfg, str(tmp_path / "full"))
  # uninterrupted run wrote its config and metrics
  with open(tmp_path / "full" / "config.json") as f:
    assert json.load(f)["method"]["name"] == "pgd_at"
  lines = [json.loads(l) for l in open(tmp_path / "full" / "metrics.jsonl")]
  assert any("train/loss" in l for l in lines) and any("test/accuracy" in l for l in lines)

  # interrupted run: stop during the second epoch (after the epoch-1 checkpoint), then resume
  real = parallel.shard_batch
  calls = {"n": 0}

  def flaky(batch, mesh):
    if batch["image"].shape[0] == cfg.batch_size:  # training batches only
      calls["n"] += 1
      if calls["n"] == 6:  # 4 steps per epoch: this is step 6, in epoch 2
        raise _Interrupt()
    return real(batch, mesh)

  monkeypatch.setattr(parallel, "shard_batch", flaky)
  with pytest.raises(_Interrupt):
    train.train_and_evaluate(cfg, str(tmp_path / "resumed"))
  monkeypatch.setattr(parallel, "shard_batch", real)
  assert checkpointing.Checkpointer(str(tmp_path / "resumed")).latest_step() == 4
  resumed = train.train_and_evaluate(cfg, str(tmp_path / "resumed"))

  a, _ = runs.load_model_variables(str(tmp_path / "full"), which="latest")
  b, _ = runs.load_model_variables(str(tmp_path / "resumed"), which="latest")
  jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6, atol=1e-7), a, b)
  assert resumed["test/accuracy"] == pytest.approx(full["test/accuracy"])
  # a finished run restarted on its workdir does no more training
  again = train.train_and_evaluate(cfg, str(tmp_path / "resumed"))
  assert again["test/accuracy"] == pytest.approx(full["test/accuracy"])


def test_built_experiment_steps_like_train_and_evaluate(tmp_path):
  """The build seam: the experiment's own step and loader, driven by hand, give the parameters of
  ``train_and_evaluate``; built on the finished run's workdir it restores the last state, and its evaluator
  gives the run's final metrics."""
  cfg = _config(tmp_path / "data")
  cfg.num_epochs = 1
  full = train.train_and_evaluate(cfg, str(tmp_path / "full"))

  exp = train.build_experiment(cfg, str(tmp_path / "manual"))
  try:
    assert int(exp.state.step) == 0 and exp.total_steps == exp.steps_per_epoch == 4
    state = exp.state
    for _ in range(exp.total_steps):
      state, metrics = exp.train_step(state, exp.teacher_vars, parallel.shard_batch(next(exp.train_iter), exp.mesh))
      assert np.isfinite(float(metrics["loss"]))
  finally:
    exp.close()
  want, _ = runs.load_model_variables(str(tmp_path / "full"), which="latest")
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), state.model_variables(), want)

  done = train.build_experiment(cfg, str(tmp_path / "full"))
  try:
    assert int(done.state.step) == done.total_steps
    assert done.evaluate(done.state) == full
  finally:
    done.close()


def _main(*args, cwd=ROOT):
  env = dict(os.environ, MDRAD_PROGRESS="0")
  return subprocess.run(
    [sys.executable, "main.py", *args], cwd=cwd, capture_output=True, text=True, env=env, timeout=300
  )


@pytest.mark.parametrize(
  "args,expect",
  [
    (["--config=configs/teacher.py", "--config.batch_sise=3"], "batch_size"),
    (["--config=configs/teacher.py:modl=x"], "unknown config argument 'modl'"),
    (["--config=configs/teacher.py:model=resnet_18,dataset=digits"], "config.model.name = 'resnet_18'"),
    (["--config=configs/missing.py"], "configs/missing.py"),
  ],
)
def test_main_reports_bad_input_on_one_line(tmp_path, args, expect):
  r = _main(*args, f"--workdir={tmp_path / 'w'}")
  assert r.returncode == 2, r.stderr[-2000:]
  err_lines = [l for l in r.stderr.strip().splitlines() if l.startswith("error:")]
  assert len(err_lines) == 1 and expect in err_lines[0], r.stderr[-2000:]
  assert "Traceback" not in r.stderr
