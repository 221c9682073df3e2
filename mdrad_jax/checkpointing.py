"""Orbax checkpoints of the full train state and the data-iterator position.

Layout: ``WORKDIR/checkpoints/<step>/{state,data}``.  The last ``keep`` checkpoints are kept, plus the best one
by ``best_metric`` when a metric is given.  Orbax writes each checkpoint to a temporary directory and renames
it when complete, so an interrupted save never replaces a good checkpoint; a state with non-finite parameters is
refused before anything is written.

A checkpoint that does not restore (a truncated or overwritten array file, a deleted or malformed metadata file,
a data-iterator position that does not match its step) is set aside by :meth:`Checkpointer.restore_newest`
into ``WORKDIR/checkpoints_broken/<step>`` (never deleted) and the next older one is restored instead; when none
restores the run stops with one line naming the step directory and the error.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import sys
import time
from typing import Any

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as ocm

from mdrad_jax.errors import MissingFileError, UserError
from mdrad_jax.train_state import TrainState

CHECKPOINT_DIR = "checkpoints"
BROKEN_DIR = "checkpoints_broken"
# What reading a damaged checkpoint raises (tensorstore and orbax: ValueError; missing files: OSError; JSON:
# ValueError; a pytree that lacks a key: KeyError).  Anything else is a bug and propagates.
_UNREADABLE = (ValueError, OSError, KeyError, IndexError, UserError)


def _unreadable(e: BaseException) -> bool:
  """A restore error that means a damaged checkpoint: the types above, or the bare ``Exception`` orbax
  raises around a tensorstore read error."""
  return isinstance(e, _UNREADABLE) or type(e) is Exception


class NonFiniteStateError(RuntimeError):
  pass


def _state_tree(state: TrainState) -> dict:
  return {
    "step": state.step,
    "params": state.params,
    "batch_stats": state.batch_stats,
    "opt_state": state.opt_state,
    "method_state": state.method_state,
    "rng": state.rng,
  }


def _all_finite(tree) -> bool:
  leaves = [x for x in jax.tree.leaves(tree) if hasattr(x, "dtype") and np.issubdtype(np.dtype(x.dtype), np.floating)]
  return bool(_leaves_finite(leaves)) if leaves else True


@jax.jit
def _leaves_finite(leaves):
  # one compiled check for the whole tree (not one small program per parameter shape)
  return jax.numpy.all(jax.numpy.stack([jax.numpy.all(jax.numpy.isfinite(x)) for x in leaves]))


class Checkpointer:
  """Saves and restores a run's ``TrainState`` (and its grain iterator) in ``workdir/checkpoints``."""

  def __init__(
    self,
    workdir: str,
    *,
    keep: int = 2,
    best_metric: str | None = None,
    best_mode: str = "max",
    async_save: bool = False,
  ):
    self.directory = os.path.abspath(os.path.join(workdir, CHECKPOINT_DIR))
    self.best_metric = best_metric or None
    if best_mode not in ("max", "min"):
      raise UserError(f"checkpoint.best_mode must be 'max' or 'min', got {best_mode!r}")
    policies = [ocm.LatestN(n=keep)]
    best_fn = None
    if self.best_metric:
      metric = self.best_metric
      best_fn = lambda m: float(m[metric])  # noqa: E731
      policies.append(
        ocm.BestN(get_metric_fn=best_fn, reverse=(best_mode == "min"), n=1, keep_checkpoints_without_metrics=False)
      )
    options = ocp.CheckpointManagerOptions(
      preservation_policy=ocm.AnyPreservationPolicy(policies),
      best_fn=best_fn,
      best_mode=best_mode,
      enable_async_checkpointing=async_save,
      create=True,
    )
    self._best_fn = best_fn
    self._best_mode = best_mode
    try:
      self.manager = ocp.CheckpointManager(self.directory, options=options)
    except ValueError:  # orbax reads every step's metrics file here
      _check_json_files(self.directory)
      raise

  # -- queries ---------------------------------------------------------------------------------
  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def best_step(self) -> int | None:
    """Step of the best checkpoint by ``best_metric`` (the latest one when no metric is set)."""
    if not self._best_fn:
      return self.latest_step()
    return self.manager.best_step()

  # -- save / restore --------------------------------------------------------------------------
  def save(self, state: TrainState, *, data_iterator=None, metrics: dict | None = None, force: bool = False) -> bool:
    if not _all_finite(state.params):
      raise NonFiniteStateError(
        f"refusing to checkpoint step {int(state.step)}: parameters contain NaN/Inf "
        f"(existing checkpoints in {self.directory} are kept)"
      )
    items = {"state": ocp.args.StandardSave(_state_tree(state))}
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
    clean_metrics = None
    if metrics is not None:
      clean_metrics = {k: float(v) for k, v in metrics.items() if np.ndim(v) == 0}
    try:
      with _quiet_orbax(logging.CRITICAL), _no_closed_loop_noise():
        saved = self.manager.save(int(state.step), args=ocp.args.Composite(**items), metrics=clean_metrics, force=force)
        if saved:
          self.manager.wait_until_finished()
    except (OSError, ValueError) as e:
      if _disk_full(e):
        raise UserError(
          f"cannot write the checkpoint of step {int(state.step)} in {self.directory}: no space "
          f"left on the device (earlier checkpoints are kept)"
        ) from None
      raise
    return saved

  def restore_newest(self, state: TrainState, *, data_iterator=None) -> TrainState | None:
    """Restores the newest checkpoint that restores; None when there is no checkpoint.

    A newer checkpoint that fails to restore is moved to ``WORKDIR/checkpoints_broken/`` (one line says so)
    once an older one restored; when none restores, nothing is moved and a ``UserError`` names the newest.
    """
    steps = sorted(self.all_steps(), reverse=True)
    failures = []
    for step in steps:
      try:
        restored = self.restore(state, step=step, data_iterator=data_iterator)
      except Exception as e:  # noqa: BLE001 -- sorted by _unreadable; anything else propagates
        if not _unreadable(e):
          raise
        failures.append((step, e))
        continue
      if failures:
        self._set_aside([s for s, _ in failures])
        from mdrad_jax.progress import log

        bad = ", ".join(f"step {s} ({_describe(e)})" for s, e in failures)
        log(
          f"checkpoint {bad} does not restore: resumed from step {step} instead; the broken one(s) moved "
          f"to {os.path.join(os.path.dirname(self.directory), BROKEN_DIR)}"
        )
      return restored
    if failures:
      step, e = failures[0]
      older = f" (nor do the {len(failures) - 1} older one(s))" if len(failures) > 1 else ""
      raise UserError(
        f"checkpoint {os.path.join(self.directory, str(step))} does not restore{older}: "
        f"{_describe(e)}; move it aside to start again"
      ) from e
    return None

  def _set_aside(self, steps) -> None:
    if jax.process_index() == 0:
      aside = os.path.join(os.path.dirname(self.directory), BROKEN_DIR)
      os.makedirs(aside, exist_ok=True)
      for step in steps:
        target = os.path.join(aside, str(step))
        if os.path.exists(target):
          target += f".{time.strftime('%Y%m%d-%H%M%S')}"
        os.rename(os.path.join(self.directory, str(step)), target)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils

      multihost_utils.sync_global_devices("mdrad_jax checkpoints set aside")
    self.manager.reload()

  def restore(self, state: TrainState, *, step: int | None = None, data_iterator=None) -> TrainState:
    """Restores into the structure (and shardings) of ``state``; also moves ``data_iterator``.

    The arrays are read into ``state``'s shardings, so a checkpoint written on any number of devices or
    processes restores onto this run's mesh.  The data position is saved per process; when the checkpoint
    was written by a different number of processes (whose shards of the data differ) ``data_iterator`` is
    moved to the same batch count (``state.step`` batches, i.e. the same epoch and position in it) of its
    own order instead.
    """
    step = self.latest_step() if step is None else step
    if step is None:
      raise MissingFileError(f"no checkpoint in {self.directory}")
    target = jax.tree.map(ocp.utils.to_shape_dtype_struct, _state_tree(state))
    items = {"state": ocp.args.StandardRestore(target)}
    reposition = False
    if data_iterator is not None and self._has_item(step, "data"):
      if self._data_saved_for_this_process(step):
        items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
      else:
        reposition = True
    restored = self.manager.restore(step, args=ocp.args.Composite(**items))
    tree = restored["state"]
    if int(np.asarray(tree["step"])) != int(step):
      raise UserError(
        f"{os.path.join(self.directory, str(step))}: holds the state of step {int(np.asarray(tree['step']))}"
      )
    if reposition:
      _move_iterator(data_iterator, int(step))
    elif "data" in items:
      position = _iterator_position(data_iterator)
      if position is not None and position != int(step):
        raise UserError(
          f"{self._data_file(step)}: data-iterator position next_index={position} does not match "
          f"the checkpoint's step {step} (one batch per step)"
        )
    return state.replace(**tree)

  def _data_file(self, step: int) -> str:
    name = f"process_{jax.process_index()}-of-{jax.process_count()}.json"
    return os.path.join(self.directory, str(step), "data", name)

  def _data_saved_for_this_process(self, step: int) -> bool:
    path = self._data_file(step)
    if not os.path.isfile(path):
      return False
    from mdrad_jax.workdir import read_json

    read_json(path, "data-iterator state")  # malformed: one line naming the file
    return True

  def _has_item(self, step: int, name: str) -> bool:
    return os.path.isdir(os.path.join(self.directory, str(step), name))

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()


def _check_json_files(directory: str) -> None:
  """Raises ``UserError`` naming the first JSON file of a checkpoint directory that does not parse."""
  from mdrad_jax.workdir import read_json

  for step in sorted(os.listdir(directory)) if os.path.isdir(directory) else ():
    for rel in ("metrics/metrics", "_CHECKPOINT_METADATA"):
      path = os.path.join(directory, step, rel)
      if os.path.isfile(path):
        read_json(path, "checkpoint file")


def _describe(e: BaseException) -> str:
  text = " ".join(str(e).split()) or type(e).__name__
  return text if len(text) <= 240 else text[:237] + "..."


def _iterator_position(data_iterator) -> int | None:
  """Batches a (single-process, index-based) grain iterator has yielded; None for other iterators."""
  get_state = getattr(data_iterator, "get_state", None)
  current = get_state() if get_state is not None else None
  if isinstance(current, dict) and set(current) == {"next_index"}:
    return int(current["next_index"])
  return None


def _move_iterator(data_iterator, num_batches: int) -> None:
  """Puts a fresh grain iterator of the training loader after its first ``num_batches`` batches."""
  get_state = getattr(data_iterator, "get_state", None)
  current = get_state() if get_state is not None else None
  if not isinstance(current, dict) or set(current) != {"next_index"}:
    raise UserError(
      "this checkpoint was written by a different number of processes and the data "
      "iterator cannot be repositioned here (use data.worker_count=0 to resume it)"
    )
  data_iterator.set_state({"next_index": int(num_batches)})
  if hasattr(data_iterator, "start_prefetch"):
    data_iterator.start_prefetch()
  from mdrad_jax.progress import log

  log(
    f"checkpoint written by a different number of processes: data resumes after batch {num_batches} of "
    f"this run's own order"
  )


def _disk_full(e: BaseException) -> bool:
  """Whether a failed write ran out of space (an OSError, or tensorstore's RESOURCE_EXHAUSTED ValueError)."""
  while e is not None:
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
      return True
    if "RESOURCE_EXHAUSTED" in str(e) or "No space left on device" in str(e):
      return True
    e = e.__cause__ or e.__context__
  return False


@contextlib.contextmanager
def _no_closed_loop_noise():
  """A save that fails part-way leaves tensorstore callbacks that find orbax's event loop closed; each prints a
  traceback ('Event loop is closed') through ``sys.excepthook``.  The save's own exception says what went
  wrong, so these are dropped while it runs; any other exception is printed as usual."""
  previous = sys.excepthook

  def hook(kind, value, tb):
    if isinstance(value, RuntimeError) and str(value) == "Event loop is closed":
      return
    previous(kind, value, tb)

  sys.excepthook = hook
  try:
    yield
  finally:
    sys.excepthook = previous


@contextlib.contextmanager
def _quiet_orbax(level: int = logging.ERROR):
  """Silences orbax's warning that a step's item directory has no step-level metadata file: reading one
  item of a manager's step directory with a ``StandardCheckpointer`` is expected to find none.  During a
  save (``level=CRITICAL``) it also drops the error that each of orbax's writer threads logs when the save
  fails: the save raises that error once."""
  logger = logging.getLogger("absl")
  previous = logger.level
  logger.setLevel(level)
  try:
    yield
  finally:
    logger.setLevel(previous)


def _local_target(ckptr, step_dir: str):
  """Shapes and dtypes of a saved state, whole on this process's first device (whatever the device or
  process count of the run that wrote it)."""
  meta = ckptr.metadata(os.path.join(step_dir, "state"))
  meta = getattr(meta, "item_metadata", meta)
  sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  return jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=sharding), meta)


def restore_model_variables(step_dir: str) -> dict:
  """The network's variables ``{'params', 'batch_stats'}`` (without projectors, optimizer or method state) of
  one checkpoint step directory ``checkpoints/<step>``, as host-local arrays whatever the device or process
  count of the run that wrote it.  ``mdrad_jax.runs`` finds the step directory of a run's best or latest
  checkpoint."""
  with _quiet_orbax(), ocp.StandardCheckpointer() as ckptr:
    try:
      tree = ckptr.restore(os.path.join(step_dir, "state"), _local_target(ckptr, step_dir))
    except Exception as e:  # noqa: BLE001
      if not _unreadable(e):
        raise
      raise UserError(f"checkpoint {step_dir} does not restore: {_describe(e)}") from e
  variables: dict[str, Any] = {"params": tree["params"]["model"]}
  bs = tree.get("batch_stats", {}).get("model")
  if bs:
    variables["batch_stats"] = bs
  return variables
