"""A trained run's workdir read back: which checkpoint, and the network in it.

A training run (``train.train_and_evaluate``, or the ``import_teacher`` job) leaves in its workdir

* ``config.json``: the run's config plus ``num_classes`` and ``image_shape`` (written and guarded by
  :mod:`mdrad_jax.workdir`: only once validated, never replaced by another run's);
* ``checkpoints/<step>/``: orbax checkpoints of the whole train state (:mod:`mdrad_jax.checkpointing`), the last
  ones and the best by ``checkpoint.best_metric``;
* ``metrics.jsonl``, TensorBoard event files with its scalars and steps/s (:mod:`mdrad_jax.metric_writers`) and
  :data:`COST_FILE`.

This module is the one place that reads such a workdir back, for the teachers of a distillation run, the
evaluation job, the quickstart, the study, export and the benchmarks:

* :func:`resolve_checkpoint`: the step directory of a run's best or latest checkpoint (or of the step directory
  given), its step and the run's config;
* :func:`load_trained`: the network rebuilt from ``config.json`` with its variables checked against it
  (:class:`TrainedModel`); :func:`load_teachers` loads a run's frozen teachers with it;
* :func:`load_model_variables`: the variables and config alone; :func:`has_checkpoint`.

A path is a training workdir (``config.json`` + ``checkpoints/``), its ``checkpoints/`` directory, or one step
directory ``checkpoints/<step>``.  Every problem is a one-line :class:`~mdrad_jax.errors.UserError` that starts
with ``what``, the config field or flag the path came from.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from mdrad_jax import checkpointing
from mdrad_jax import models as models_lib
from mdrad_jax import workdir as workdir_lib
from mdrad_jax.errors import MissingFileError, UserError

CONFIG_FILE = workdir_lib.CONFIG_FILE
CHECKPOINT_DIR = checkpointing.CHECKPOINT_DIR
COST_FILE = "cost.json"  # the train step's FLOPs and the run's total (written by the training loop)
WHICH = ("best", "latest")


class TrainedModel(NamedTuple):
  """A trained network read from a run's workdir."""

  module: nn.Module  # rebuilt from config.json's ``model`` block
  variables: dict  # {'params', 'batch_stats'} of the network alone (no projectors), host arrays
  run_config: dict  # the parsed config.json
  step: int  # the checkpoint's training step
  step_dir: str  # WORKDIR/checkpoints/<step>


def resolve_checkpoint(path: str, which: str = "best", *, what: str = "checkpoint") -> tuple[str, int, dict | None]:
  """``(step directory, step, run config or None)`` of a training workdir, its ``checkpoints/`` directory or one
  step directory; ``which`` is 'best' (the run's best metric; the latest without one) or 'latest'.  The run
  config is the ``config.json`` next to ``checkpoints/`` (None when there is none)."""
  if which not in WHICH:
    raise UserError(f"{what}: which must be 'best' or 'latest', got {which!r}")
  path = os.path.abspath(os.path.expanduser(path))
  if not os.path.exists(path):
    raise MissingFileError(f"{what} {path} does not exist")
  if os.path.isfile(os.path.join(path, CONFIG_FILE)):
    root, step_dir = os.path.join(path, CHECKPOINT_DIR), None
  elif os.path.basename(path) == CHECKPOINT_DIR:
    root, step_dir = path, None
  elif os.path.isdir(os.path.join(path, "state")):
    root, step_dir = os.path.dirname(path), path
  else:
    raise MissingFileError(
      f"{what} {path} is neither a training workdir (config.json + checkpoints/), a "
      f"checkpoints/ directory nor a checkpoint step directory (state/)"
    )
  run_config = workdir_lib.read_run_config(os.path.dirname(root))
  if step_dir is None:
    if not os.path.isdir(root):
      raise MissingFileError(f"{what} {path}: no checkpoints/ directory in {os.path.dirname(root)}")
    ck = (run_config or {}).get("checkpoint", {})
    ckpt = checkpointing.Checkpointer(
      os.path.dirname(root), best_metric=ck.get("best_metric") or None, best_mode=ck.get("best_mode", "max")
    )
    try:
      step = ckpt.best_step() if which == "best" else ckpt.latest_step()
    finally:
      ckpt.close()
    if step is None:
      raise MissingFileError(f"{what} {path}: no {which} checkpoint under {root}")
    step_dir = os.path.join(root, str(step))
  base = os.path.basename(os.path.normpath(step_dir))
  if not base.isdigit():
    raise MissingFileError(
      f"{what} {path}: {step_dir} is not a checkpoint step directory (expected checkpoints/<step>)"
    )
  return step_dir, int(base), run_config


def load_model_variables(path: str, *, which: str = "best", what: str = "checkpoint") -> tuple[dict, dict | None]:
  """``(variables, run config or None)`` of the checkpoint :func:`resolve_checkpoint` finds: ``{'params',
  'batch_stats'}`` of the network alone, and the parsed ``config.json`` of the run when there is one."""
  step_dir, _, run_config = resolve_checkpoint(path, which, what=what)
  return checkpointing.restore_model_variables(step_dir), run_config


def load_trained(
  path: str,
  which: str = "best",
  *,
  num_classes: int | None = None,
  image_shape=None,
  dtype: str | None = None,
  what: str = "checkpoint",
) -> TrainedModel:
  """The trained network of a run: module, variables, run config and step of its ``which`` checkpoint.

  The module is ``models.build_model`` of config.json's ``model`` block for ``num_classes`` (default: the
  run's), computing in ``dtype`` when given (default: the run's ``model.dtype``).  The variables must fit the
  module for ``image_shape`` inputs (default: the run's; no check when neither is known).
  """
  step_dir, step, run_config = resolve_checkpoint(path, which, what=what)
  if not run_config or "model" not in run_config:
    raise MissingFileError(
      f"{what} {path}: no config.json with the model next to {step_dir}; cannot tell which network to build"
    )
  mcfg = ml_collections.ConfigDict(run_config["model"])
  if dtype is not None:
    mcfg.dtype = dtype
  if num_classes is None:
    num_classes = run_config.get("num_classes")
    if num_classes is None:
      raise UserError(f"{what} {path}: config.json records no num_classes; give the dataset's")
  module = models_lib.build_model(mcfg, int(num_classes))
  variables = checkpointing.restore_model_variables(step_dir)
  if image_shape is None and run_config.get("image_shape") is not None:
    image_shape = tuple(run_config["image_shape"])
  if image_shape is not None:
    expected = jax.eval_shape(lambda: module.init(jax.random.key(0), jnp.zeros((1, *image_shape), jnp.float32)))
    if jax.tree.map(jnp.shape, variables["params"]) != jax.tree.map(jnp.shape, expected["params"]):
      raise UserError(
        f"{what} {path}: the parameters of step {step} do not fit model {mcfg.name!r} for {tuple(image_shape)} images"
      )
  return TrainedModel(module, variables, run_config, step, step_dir)


def load_teachers(paths, *, num_classes: int, image_shape, dtype: str = "float32", dataset: str | None = None):
  """Loads frozen teachers (the best checkpoint of each run) from training workdirs or checkpoint paths.

  Returns ``(modules, variables)``: the Flax modules (rebuilt from each run's ``config.json``, computing in
  ``dtype`` unless it is float32, when each keeps its run's) and their variables, which the train step
  receives as arguments.  A teacher trained on another dataset (when ``dataset`` is given), another number of
  classes or another input shape is refused.
  """
  modules, variables = [], []
  for path in paths:
    step_dir, _, run_cfg = resolve_checkpoint(path, what="teacher/checkpoint")
    if run_cfg is None or "model" not in run_cfg:
      raise UserError(f"teacher {path}: no config.json next to the checkpoint, cannot tell its model")
    t_data = (run_cfg.get("data") or {}).get("name")
    if dataset is not None and t_data is not None and t_data != dataset:
      raise UserError(f"teacher {path} was trained on {t_data!r}, this run trains on {dataset!r}")
    t_classes = run_cfg.get("num_classes")
    if t_classes is not None and t_classes != num_classes:
      raise UserError(f"teacher {path} has {t_classes} classes, the dataset has {num_classes}")
    t_shape = run_cfg.get("image_shape")
    if t_shape is not None and tuple(t_shape) != tuple(image_shape):
      raise UserError(f"teacher {path} was trained on {tuple(t_shape)} images, this dataset has {tuple(image_shape)}")
    trained = load_trained(
      step_dir,
      num_classes=num_classes,
      image_shape=image_shape,
      dtype=None if dtype == "float32" else dtype,
      what="teacher",
    )
    modules.append(trained.module)
    variables.append(jax.tree.map(jnp.asarray, trained.variables))
  return tuple(modules), tuple(variables)


def has_checkpoint(workdir: str) -> bool:
  """Whether ``workdir/checkpoints`` holds at least one step directory."""
  root = os.path.join(workdir, CHECKPOINT_DIR)
  return os.path.isdir(root) and any(n.isdigit() for n in os.listdir(root))
