"""Up-front validation of a job's config: every field checked once, before anything is written.

``validate(config)`` is called by ``runtime.run`` for every job before the workdir is touched.  A bad value
raises :class:`mdrad_jax.errors.UserError` with one line naming the field, the value and what is allowed,
e.g. ``config.attack.eps = 0.0: expected a finite number in (0, 1]``.  Checks that need the data (batch size
against the split, a teacher's dataset and classes) or the devices (batch divisibility) are made by the job
itself, still before it writes anything.

The checks are per block and read only the fields a config has, so a job with a config of its own (built on
``config_lib.base_config`` or not) is checked on the blocks it shares, plus its own block when
``JOB_CHECKS`` has one.
"""

from __future__ import annotations

import math
import numbers
import os
import warnings
from typing import Any, Callable

from mdrad_jax.errors import MissingFileError, UserError

_MISSING = object()


def _get(config, path: str, default=_MISSING):
  node = config
  for part in path.split("."):
    try:
      node = node[part]
    except (KeyError, AttributeError, TypeError):
      return default
  return node


def _is_int(v) -> bool:
  return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_number(v) -> bool:
  return isinstance(v, numbers.Real) and not isinstance(v, bool)


def fail(path: str, value, expected: str):
  raise UserError(f"config.{path} = {value!r}: expected {expected}")


def integer(
  config, path: str, *, lo: int | None = None, hi: int | None = None, allow: tuple = (), expected: str | None = None
) -> None:
  """``config.<path>`` (when present) is an int in [lo, hi] or one of ``allow``."""
  v = _get(config, path)
  if v is _MISSING or v in allow and _is_int(v):
    return
  ok = _is_int(v) and (lo is None or v >= lo) and (hi is None or v <= hi)
  if not ok:
    if expected is None:
      rng = (
        (f"an integer >= {lo}" if hi is None else f"an integer in [{lo}, {hi}]")
        if lo is not None
        else f"an integer <= {hi}"
      )
      expected = rng + (f" (or {' or '.join(map(str, allow))})" if allow else "")
    fail(path, v, expected)


def number(
  config,
  path: str,
  *,
  lo: float | None = None,
  hi: float | None = None,
  lo_open: bool = False,
  allow: tuple = (),
  expected: str | None = None,
) -> None:
  """``config.<path>`` (when present) is a finite number in the interval, or exactly one of ``allow``."""
  v = _get(config, path)
  if v is _MISSING:
    return
  if _is_number(v) and v in allow:
    return
  ok = _is_number(v) and math.isfinite(v)
  if ok and lo is not None:
    ok = v > lo if lo_open else v >= lo
  if ok and hi is not None:
    ok = v <= hi
  if not ok:
    if expected is None:
      left = "(" if lo_open else "["
      if lo is not None and hi is not None:
        expected = f"a finite number in {left}{lo:g}, {hi:g}]"
      elif lo is not None:
        expected = f"a finite number {'>' if lo_open else '>='} {lo:g}"
      else:
        expected = "a finite number"
      if allow:
        expected += f" (or {' or '.join(f'{a:g}' for a in allow)})"
    fail(path, v, expected)


def missing_path(path: str, value) -> None:
  raise MissingFileError(
    f"config.{path} = {value!r}: expected an existing training workdir or checkpoint directory (no such path)"
  )


def choice(config, path: str, choices) -> None:
  v = _get(config, path)
  if v is _MISSING:
    return
  if v not in tuple(choices):
    fail(path, v, f"one of {tuple(choices)}")


def _eps(config, path: str, *, allow: tuple = ()) -> None:
  """An L∞ radius of images in [0, 1]: in (0, 1]."""
  number(config, path, lo=0.0, hi=1.0, lo_open=True, allow=allow)


# ---------------------------------------------------------------------------------------------
# Blocks.
# ---------------------------------------------------------------------------------------------
def check_common(config) -> None:
  """Fields of ``config_lib.base_config`` that every job reads or passes on."""
  from mdrad_jax import data as data_lib
  from mdrad_jax import parallel
  from mdrad_jax import precision

  integer(config, "seed", lo=0, hi=2**32 - 1)
  name = _get(config, "data.name")
  if name is not _MISSING and name != "" or _get(config, "job") != "evaluate":
    choice(config, "data.name", sorted(data_lib.DATASETS))
  choice(config, "data.augment", data_lib.AUGMENTATIONS)
  integer(config, "data.crop_padding", lo=0)
  integer(config, "data.worker_count", lo=0)
  _eps(config, "attack.eps")
  number(config, "attack.step_size", lo=0.0, lo_open=True)
  integer(config, "attack.num_steps", lo=0)
  choice(config, "attack.init", ("", "uniform", "normal", "none"))
  choice(config, "attack.bn_mode", ("", "eval", "train_no_update", "train_update"))
  v = _get(config, "attack.clip_start")
  if v is not _MISSING and str(v).lower() not in ("", "true", "false"):
    fail("attack.clip_start", v, "'', 'true' or 'false'")
  for path, allow_empty in (("model.dtype", False), ("teacher_dtype", False), ("attack.dtype", True)):
    v = _get(config, path)
    if v is _MISSING or (allow_empty and v == ""):
      continue
    if v not in precision.COMPUTE_DTYPES:
      fail(path, v, f"one of {precision.COMPUTE_DTYPES}" + (" or ''" if allow_empty else ""))
  choice(config, "teacher_sharding", parallel.TEACHER_SHARDINGS)
  choice(config, "distributed.enabled", parallel.DISTRIBUTED_MODES)


def check_model(config, path: str = "model") -> None:
  """``config.<path>.name`` is a registered model that accepts ``<path>.kwargs``."""
  from mdrad_jax import models as models_lib

  name = _get(config, f"{path}.name")
  if name is _MISSING:
    return
  if name not in models_lib.MODELS:
    fail(f"{path}.name", name, f"a registered model: {', '.join(sorted(models_lib.MODELS))}")
  kwargs = _get(config, f"{path}.kwargs", {}) or {}
  kwargs = dict(kwargs.to_dict() if hasattr(kwargs, "to_dict") else kwargs)
  try:  # building a Flax module only records its fields: no arrays, no devices
    models_lib.get_model(name, num_classes=10, **kwargs)
  except (ValueError, TypeError) as e:
    raise UserError(f"config.{path}.kwargs = {kwargs!r}: {' '.join(str(e).split())}") from None


def check_training(config) -> None:
  """The fields of a training run (``job='train'``): loop, optimiser, method, teachers, eval, checkpoints."""
  from mdrad_jax import methods as methods_lib
  from mdrad_jax import optim

  check_model(config)
  number(config, "num_epochs", lo=0.0, lo_open=True)
  integer(config, "batch_size", lo=1)
  integer(config, "eval_batch_size", lo=1)
  integer(config, "log_every_steps", lo=1)
  integer(
    config, "num_train_examples", lo=1, allow=(-1, 0), expected="a positive integer, or -1 (the whole training split)"
  )
  choice(config, "optim.name", ("sgd", "adam"))
  number(config, "optim.lr", lo=0.0, lo_open=True)
  number(config, "optim.momentum", lo=0.0, hi=1.0)
  number(config, "optim.weight_decay", lo=0.0)
  choice(config, "optim.schedule", optim.SCHEDULES)
  number(config, "optim.factor", lo=0.0, lo_open=True)
  number(config, "optim.warmup_epochs", lo=0.0)
  number(config, "optim.grad_clip_norm", lo=0.0)
  bounds = _get(config, "optim.boundaries", ())
  if not all(_is_number(b) and math.isfinite(b) and b >= 0 for b in bounds):
    fail("optim.boundaries", tuple(bounds), "non-negative epochs")
  integer(config, "eval.every_epochs", lo=0)
  integer(config, "eval.num_examples", lo=1, allow=(-1,), expected="a positive integer, or -1 (the whole split)")
  integer(config, "eval.pgd_steps", lo=0)
  number(config, "eval.pgd_step_size", lo=0.0, lo_open=True)
  integer(config, "checkpoint.keep", lo=1)
  integer(config, "checkpoint.every_epochs", lo=1)
  choice(config, "checkpoint.best_mode", ("max", "min"))

  name = _get(config, "method.name")
  if name is not _MISSING:
    if name not in methods_lib.METHODS:
      fail("method.name", name, f"one of {sorted(methods_lib.METHODS)}")
    method = methods_lib.METHODS[name]
    teachers = tuple(_get(config, "teachers", ()))
    try:
      method.check_teachers(len(teachers))
    except ValueError as e:
      raise UserError(f"config.teachers: {e}") from None
    unknown = sorted(set(_get(config, "method").keys()) - set(method.defaults) - {"name"})
    if unknown:
      fail("method", unknown, f"hyper-parameters of {name!r}: {sorted(method.defaults)}")
    if "teacher_view" in method.defaults:
      choice(config, "method.teacher_view", methods_lib.TEACHER_VIEWS)
    for k, t in enumerate(teachers):
      if not isinstance(t, str) or not t:
        fail(f"teachers[{k}]", t, "the path of a teacher's training workdir")
      if not os.path.exists(os.path.expanduser(t)):
        missing_path(f"teachers[{k}]", t)


def check_evaluate(config) -> None:
  """The ``evaluate`` block of an evaluation job: ``config_lib.evaluate_config(job=True)``'s fields, all present."""
  from mdrad_jax import config_lib
  from mdrad_jax import evaluation

  missing = [f for f in config_lib.EVALUATE_JOB_FIELDS if _get(config, f"evaluate.{f}") is _MISSING]
  if missing:
    raise UserError(
      f"config.evaluate has no field {', '.join(missing)}: an evaluation job's config is built by "
      f"configs/evaluate.py (config_lib.evaluate_config(job=True))"
    )
  _eps(config, "evaluate.eps", allow=(-1,))
  number(config, "evaluate.step_size", lo=0.0, lo_open=True, allow=(-1,))
  integer(config, "evaluate.batch_size", lo=1)
  integer(config, "evaluate.num_examples", lo=1, allow=(-1,), expected="a positive integer, or -1 (the whole split)")
  integer(config, "evaluate.seed", lo=0, hi=2**32 - 1)
  choice(config, "evaluate.which", ("best", "latest"))
  choice(config, "evaluate.aa_version", ("standard", "apgd"))
  attacks = tuple(_get(config, "evaluate.attacks", ("clean",)))
  bad = [a for a in attacks if a not in evaluation.ATTACKS]
  if bad or not attacks:
    fail("evaluate.attacks", attacks, f"one or more of {evaluation.ATTACKS}")
  choice(config, "evaluate.sweep_attack", evaluation.ATTACKS[1:])
  for path in ("evaluate.eps_sweep", "evaluate.eps_sweep_multiples"):
    values = tuple(_get(config, path, ()))
    hi = 1.0 if path.endswith("eps_sweep") else None
    if not all(_is_number(v) and math.isfinite(v) and v >= 0 and (hi is None or v <= hi) for v in values):
      fail(path, values, "numbers in [0, 1]" if hi else "non-negative finite numbers")
  integer(config, "evaluate.masking_square_examples", lo=0)
  integer(config, "evaluate.masking_square_queries", lo=1)
  number(config, "evaluate.masking_tolerance", lo=0.0, hi=1.0)
  number(config, "evaluate.masking_aa_gap", lo=0.0, hi=1.0)
  number(config, "evaluate.masking_significance", lo=0.0, hi=1.0, lo_open=True)
  path = _get(config, "evaluate.checkpoint", "")
  if path and not os.path.exists(os.path.expanduser(path)):
    missing_path("evaluate.checkpoint", path)


def check_quickstart(config) -> None:
  from mdrad_jax import methods as methods_lib
  from mdrad_jax import models as models_lib

  for path in ("quickstart.teachers",):
    names = tuple(_get(config, path, ()))
    bad = [n for n in names if n not in models_lib.MODELS]
    if bad or not names:
      fail(path, names, f"one or more registered models: {', '.join(sorted(models_lib.MODELS))}")
  choice(config, "quickstart.student", sorted(models_lib.MODELS))
  methods = tuple(_get(config, "quickstart.student_methods", ()))
  if not methods or any(m not in methods_lib.METHODS for m in methods):
    fail("quickstart.student_methods", methods, f"one or more of {sorted(methods_lib.METHODS)}")
  for path in (
    "quickstart.teacher_epochs",
    "quickstart.student_epochs",
    "quickstart.batch_size",
    "quickstart.eval_batch_size",
    "quickstart.log_every_steps",
  ):
    integer(config, path, lo=1)
  integer(config, "quickstart.eval_every_epochs", lo=0)
  for path in ("quickstart.teacher_lr", "quickstart.student_lr"):
    number(config, path, lo=0.0, lo_open=True)


# Per-job checks on top of ``check_common``; a job without an entry gets the common checks only.
JOB_CHECKS: dict[str, tuple[Callable[[Any], None], ...]] = {
  "train": (check_training,),
  "evaluate": (check_evaluate,),
  "quickstart": (check_quickstart,),
}


def upgrade_renamed_values(config) -> None:
  """Replaces, in ``config`` itself, a value an earlier release spelled differently
  (``workdir.RENAMED_VALUES``, e.g. ``method.teacher_view='nat'``) with today's, with a ``FutureWarning``."""
  from mdrad_jax import workdir as workdir_lib

  for field, renamed in workdir_lib.RENAMED_VALUES.items():
    value = _get(config, field)
    if isinstance(value, str) and value in renamed:
      warnings.warn(
        f"config.{field}={value!r} is the old spelling of {renamed[value]!r}; it is read as {renamed[value]!r}",
        FutureWarning,
        stacklevel=3,
      )
      *parents, leaf = field.split(".")
      node = config
      for part in parents:
        node = node[part]
      node[leaf] = renamed[value]


def validate(config, jobs=None) -> None:
  """Checks ``config`` for its job (after :func:`upgrade_renamed_values`); raises ``UserError`` naming the first
  bad field."""
  upgrade_renamed_values(config)
  job = _get(config, "job", "train")
  if jobs is not None and job not in jobs:
    fail("job", job, f"one of {tuple(jobs)}")
  check_common(config)
  for check in JOB_CHECKS.get(job, ()):
    check(config)
