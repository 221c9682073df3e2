"""Training loop shared by standard (teacher) training, adversarial training and adversarial distillation.

``train_and_evaluate(config, workdir)`` is :func:`build_experiment` then :func:`train_loop`.  The build makes
the data pipeline, the student, the frozen teachers (``runs.load_teachers``), the optimizer and the train
state, resumes from ``workdir/checkpoints`` when a checkpoint is there, and jits the single step of
``mdrad_jax.train_step`` (:func:`build_train_step`) with the batch sharded over a one-axis data mesh; it writes
``config.json`` once the checkpoint is restored.  The loop writes metrics to ``metrics.jsonl`` and TensorBoard
event files (``mdrad_jax.metric_writers``; steps/s and uptime from ``clu.periodic_actions.ReportProgress`` go to
TensorBoard alone), writes ``cost.json`` and the checkpoints, and shows a progress bar with loss, accuracy and
throughput.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mdrad_jax import checkpointing
from mdrad_jax import data as data_lib
from mdrad_jax import methods as methods_lib
from mdrad_jax import metric_writers
from mdrad_jax import models as models_lib
from mdrad_jax import optim
from mdrad_jax import parallel
from mdrad_jax import precision
from mdrad_jax import runs
from mdrad_jax import runtime
from mdrad_jax import train_step as step_lib
from mdrad_jax import validation
from mdrad_jax import workdir as workdir_lib
from mdrad_jax.errors import Interrupted, UserError

# The in-training evaluation (pad_batch: kept here for compatibility).
from mdrad_jax.evaluation import evaluate_model, pad_batch  # noqa: F401
from mdrad_jax.preemption import StopOnSignal
from mdrad_jax.metric_writers import periodic_actions  # clu's, once clu.metric_writers imports without TensorFlow
from mdrad_jax.progress import progress_bar, log
from mdrad_jax.train_state import TrainState, split_variables


class NonFiniteLossError(UserError):
  """The training loss became NaN/Inf: the run stops without checkpointing that state (one line from main.py)."""


# Kept for compatibility: these moved to the modules named.
data_kwargs = data_lib.data_kwargs
build_model = models_lib.build_model
load_teachers = runs.load_teachers
write_config = workdir_lib.write_config

COST_FILE = runs.COST_FILE


# ---------------------------------------------------------------------------------------------
# Building blocks.
# ---------------------------------------------------------------------------------------------
def resolve_attack(config, method: methods_lib.Method) -> step_lib.AttackConfig:
  a = config.attack
  return step_lib.AttackConfig(
    eps=float(a.eps),
    step_size=float(a.step_size),
    num_steps=int(a.num_steps),
    init=a.init or method.attack_init,
    bn_mode=a.bn_mode or method.attack_bn,
    unroll=bool(a.unroll),
    dtype=a.dtype or "",
    clip_start=_clip_start(a.clip_start, method),
  )


def _clip_start(value, method) -> bool:
  if value in ("", None):
    return method.attack_clip_start
  if str(value).lower() not in ("true", "false"):
    raise UserError(f"attack.clip_start must be '', 'true' or 'false', got {value!r}")
  return str(value).lower() == "true"


def create_state(
  config, *, model, image_shape, teacher_modules, teacher_vars, method, steps_per_epoch, init=models_lib.init_model
):
  """Initial ``TrainState`` (host arrays), the feature projectors and the learning-rate schedule: student (and
  projectors) initialised from ``config.seed`` by ``init(module, rng, input_shape)`` (``models.init_model``;
  the benchmark gives a faster one that draws from the same distributions)."""
  rng = jax.random.key(config.seed)
  init_rng, proj_rng, state_rng = jax.random.split(rng, 3)
  dummy = jnp.zeros((2, *image_shape), jnp.float32)
  variables = init(model, init_rng, image_shape)
  params_m, stats_m = split_variables(variables)
  params = {"model": params_m, "projectors": {}}
  stats = {"model": stats_m, "projectors": {}}
  projectors = ()
  plan = method.plan(dict(config.method), len(teacher_modules))
  if plan.student_features:
    _, s_feats = jax.eval_shape(lambda: model.apply(variables, dummy, train=False, return_features=True))
    projectors = []
    for k, (tm, tv) in enumerate(zip(teacher_modules, teacher_vars)):
      _, t_feats = jax.eval_shape(lambda tm=tm, tv=tv: tm.apply(tv, dummy, train=False, return_features=True))
      tshape = t_feats["last"].shape
      proj = models_lib.FeatureProjector(out_channels=tshape[-1], out_hw=tuple(tshape[1:3]))
      pv = init(proj, jax.random.fold_in(proj_rng, k), s_feats["last"].shape)
      params["projectors"][str(k)] = pv["params"]
      stats["projectors"][str(k)] = pv.get("batch_stats", {})
      projectors.append(proj)
    projectors = tuple(projectors)
  tx, schedule = optim.create_optimizer(config.optim, steps_per_epoch=steps_per_epoch, num_epochs=config.num_epochs)
  state = TrainState.create(
    params=params,
    batch_stats=stats,
    tx=tx,
    rng=jax.random.key_data(state_rng),
    # host copies: distinct device buffers per leaf (the step donates them)
    method_state=jax.tree.map(np.array, method.init_state(dict(config.method))),
  )
  return state, projectors, schedule


def step_flops(jitted_step, *args) -> float | None:
  """FLOPs of one call of ``jitted_step(*args)`` by XLA's cost analysis of the lowered program (None where
  the backend gives none).  Lowering reuses the trace of the call, so this costs no second compilation."""
  try:
    ca = jitted_step.lower(*args).cost_analysis()
  except Exception:  # cost analysis is best effort: some backends do not implement it
    return None
  if isinstance(ca, (list, tuple)):
    ca = ca[0] if ca else None
  if not ca or "flops" not in ca:
    return None
  return float(ca["flops"])


def write_cost(workdir: str, *, flops_per_step: float | None, total_steps: int, batch_size: int) -> None:
  """``cost.json``: the train step's FLOPs (XLA cost analysis, all devices together) and the run's total."""
  if jax.process_index() != 0:
    return
  d = {
    "train_step_flops": flops_per_step,
    "total_steps": int(total_steps),
    "batch_size": int(batch_size),
    "train_flops": None if flops_per_step is None else flops_per_step * total_steps,
    "source": "XLA cost analysis of the lowered train step; evaluation not included",
  }
  path = os.path.join(workdir, COST_FILE)
  with open(path + ".tmp", "w") as f:
    json.dump(d, f, indent=2)
  os.replace(path + ".tmp", path)


# ---------------------------------------------------------------------------------------------
# The experiment: everything the loop needs, built from the config.
# ---------------------------------------------------------------------------------------------
class TrainStep(NamedTuple):
  """The train step of a config and the state it starts from (:func:`build_train_step`)."""

  state: TrainState  # initial state, host arrays
  step: Callable  # step(state, teacher_vars, batch) -> (state, metrics), not jitted
  projectors: tuple  # the feature projectors the state holds parameters of (SA-MDRAD), else ()
  schedule: Callable  # learning rate of step i
  attack: step_lib.AttackConfig


def build_train_step(
  config,
  *,
  model,
  method,
  image_shape,
  teacher_modules=(),
  teacher_vars=(),
  steps_per_epoch: int,
  init=models_lib.init_model,
) -> TrainStep:
  """The initial state (:func:`create_state`) and the un-jitted train step of ``config`` for ``model`` and the
  given frozen teachers; jit it with ``train_step.jit_train_step``.  The training loop builds its step here,
  and so do the benchmark and the tests."""
  state, projectors, schedule = create_state(
    config,
    model=model,
    image_shape=image_shape,
    teacher_modules=teacher_modules,
    teacher_vars=teacher_vars,
    method=method,
    steps_per_epoch=steps_per_epoch,
    init=init,
  )
  attack = resolve_attack(config, method)
  step = step_lib.make_train_step(
    model=model,
    method=method,
    hparams=dict(config.method),
    attack=attack,
    teacher_models=teacher_modules,
    projectors=projectors,
    steps_per_epoch=steps_per_epoch,
    lr_schedule=schedule,
    base_lr=float(config.optim.lr),
  )
  return TrainStep(state, step, projectors, schedule, attack)


@dataclasses.dataclass
class Experiment:
  """A training run built from its config and workdir (:func:`build_experiment`), ready for :func:`train_loop`.

  ``state`` is on the mesh, restored from the newest checkpoint when there is one (``train_iter`` is then at
  the same position); ``train_step(state, teacher_vars, global_batch)`` is the jitted step (it donates
  ``state``), ``parallel.shard_batch(next(train_iter), mesh)`` its next batch.  :meth:`close` closes the
  checkpointer and the metrics writer.
  """

  config: ml_collections.ConfigDict
  workdir: str
  mesh: jax.sharding.Mesh
  info: data_lib.DatasetInfo
  method: methods_lib.Method
  model: Any
  steps_per_epoch: int
  total_steps: int
  eval_size: int  # test examples of each evaluation
  state: TrainState
  teacher_vars: tuple  # on the mesh, laid out as config.teacher_sharding says
  train_step: Callable
  eval_step: Callable  # jitted: (variables, batch, key) -> sums of correct (and robust) predictions
  schedule: Callable
  train_iter: Any
  checkpointer: checkpointing.Checkpointer
  writer: metric_writers.RunWriter  # metrics.jsonl and TensorBoard (process 0 only)

  def evaluate(self, state: TrainState) -> dict:
    """``test/...`` metrics of ``state``'s network on the first ``eval_size`` test examples (clean accuracy,
    and PGD accuracy when ``config.eval.pgd_steps`` > 0)."""
    config, info = self.config, self.info
    test_size = info.split_sizes[info.test_split]
    loader = data_lib.create_loader(
      config.data.name,
      info.test_split,
      batch_size=config.eval_batch_size,
      train=False,
      seed=0,
      drop_remainder=False,
      num_examples=(self.eval_size if self.eval_size < test_size else None),
      **data_lib.data_kwargs(config),
    )
    per_process = -(-self.eval_size // jax.process_count())
    res = evaluate_model(
      self.eval_step,
      state.model_variables(),
      loader,
      self.mesh,
      batch_size=config.eval_batch_size,
      key=jax.random.key(config.seed + 1),
      num_batches=-(-per_process // (config.eval_batch_size // jax.process_count())),
    )
    return {f"test/{k}": v for k, v in res.items()}

  def close(self) -> None:
    self.checkpointer.close()
    self.writer.close()


def build_experiment(config: ml_collections.ConfigDict, workdir: str) -> Experiment:
  """Checks ``config``, builds the student, teachers, state, jitted steps, loaders, checkpointer and metrics
  writer of the run in ``workdir``, and restores its newest checkpoint.

  Nothing is written to ``workdir`` before the config, the dataset and the teachers are checked and the
  checkpoint (if any) is restored; ``config.json`` of a run already in ``workdir`` is never replaced by one
  that trains something else (``workdir.check_same_run``).
  """
  validation.validate(config)  # also when called directly (quickstart and study stages), not only from main.py
  parallel.initialize_distributed(config.distributed)
  mesh = parallel.create_mesh()
  parallel.check_batch_size(config.batch_size, mesh)
  parallel.check_batch_size(config.eval_batch_size, mesh, "eval_batch_size")
  precision.check_config(config)
  teacher_sharding = config.teacher_sharding
  if teacher_sharding not in parallel.TEACHER_SHARDINGS:
    raise UserError(f"config.teacher_sharding must be one of {parallel.TEACHER_SHARDINGS}, got {teacher_sharding!r}")

  info = data_lib.dataset_info(config.data.name, **data_lib.data_kwargs(config))
  method = methods_lib.get_method(config.method.name)
  method.check_teachers(len(config.teachers))
  model = models_lib.build_model(config.model, info.num_classes)
  teacher_modules, teacher_vars = runs.load_teachers(
    config.teachers,
    num_classes=info.num_classes,
    image_shape=info.image_shape,
    dtype=config.teacher_dtype,
    dataset=config.data.name,
  )

  train_size = info.split_sizes[info.train_split]
  if config.num_train_examples > 0:
    train_size = min(train_size, config.num_train_examples)
  steps_per_epoch = train_size // config.batch_size
  if steps_per_epoch == 0:
    raise UserError(
      f"config.batch_size = {config.batch_size} is larger than the training split "
      f"({train_size} examples of {config.data.name}/{info.train_split})"
    )
  total_steps = int(math.ceil(config.num_epochs * steps_per_epoch))
  test_size = info.split_sizes[info.test_split]
  ev = config.eval
  eval_size = min(test_size, ev.num_examples) if ev.num_examples > 0 else test_size
  run_facts = {"num_classes": info.num_classes, "image_shape": list(info.image_shape)}
  workdir_lib.check_same_run(config, workdir, run_facts)

  parts = build_train_step(
    config,
    model=model,
    method=method,
    image_shape=info.image_shape,
    teacher_modules=teacher_modules,
    teacher_vars=teacher_vars,
    steps_per_epoch=steps_per_epoch,
  )
  precision.check_master_weights(parts.state)
  # On the mesh before restoring: the checkpoint is read straight into this run's shardings, whatever the
  # device and process count of the run that wrote it.
  state = parallel.replicate(parts.state, mesh)

  train_loader = data_lib.create_loader(
    config.data.name,
    info.train_split,
    batch_size=config.batch_size,
    train=True,
    seed=config.seed,
    augment=config.data.augment,
    crop_padding=config.data.crop_padding,
    num_examples=(train_size if train_size < info.split_sizes[info.train_split] else None),
    worker_count=config.data.worker_count,
    **data_lib.data_kwargs(config),
  )
  train_iter = iter(train_loader)

  ckpt = checkpointing.Checkpointer(
    workdir,
    keep=config.checkpoint.keep,
    best_metric=config.checkpoint.best_metric or None,
    best_mode=config.checkpoint.best_mode,
  )
  try:
    restored = ckpt.restore_newest(state, data_iterator=train_iter)
    if restored is not None:
      state = restored
      log(f"resumed from {ckpt.directory} at step {int(state.step)}")
    workdir_lib.write_config(config, workdir, run_facts)

    t_shardings = parallel.teacher_shardings(teacher_vars, mesh, teacher_sharding)
    teacher_vars = parallel.put_global(teacher_vars, t_shardings)
    p_train_step = step_lib.jit_train_step(parts.step, mesh, teacher_sharding=t_shardings)
    eval_pgd = None
    if ev.pgd_steps > 0:
      eval_pgd = step_lib.AttackConfig(
        eps=float(config.attack.eps), step_size=float(ev.pgd_step_size), num_steps=int(ev.pgd_steps), init="uniform"
      )
    p_eval_step = step_lib.jit_eval_step(step_lib.make_eval_step(model, pgd=eval_pgd), mesh)

    start_step = int(parallel.to_host(state.step))
    metrics_path = os.path.join(workdir, metric_writers.METRICS_FILE)
    if jax.process_index() == 0:
      dropped = drop_replayed_metrics(metrics_path, start_step)
      if dropped:
        log(
          f"metrics.jsonl: dropped {dropped} line(s) after step {start_step}, written before the run "
          f"stopped and trained again from the checkpoint"
        )
      dropped = metric_writers.drop_replayed_events(workdir, start_step)
      if dropped:
        log(f"TensorBoard event files: dropped {dropped} event(s) after step {start_step}, as in metrics.jsonl")
    writer = metric_writers.create_writer(workdir)
  except BaseException:
    ckpt.close()
    raise
  return Experiment(
    config=config,
    workdir=workdir,
    mesh=mesh,
    info=info,
    method=method,
    model=model,
    steps_per_epoch=steps_per_epoch,
    total_steps=total_steps,
    eval_size=eval_size,
    state=state,
    teacher_vars=teacher_vars,
    train_step=p_train_step,
    eval_step=p_eval_step,
    schedule=parts.schedule,
    train_iter=train_iter,
    checkpointer=ckpt,
    writer=writer,
  )


# ---------------------------------------------------------------------------------------------
# The loop.
# ---------------------------------------------------------------------------------------------
def train_loop(exp: Experiment) -> dict:
  """Trains ``exp`` from its state's step to ``exp.total_steps``; returns the final evaluation metrics.

  Logs the mean train metrics every ``config.log_every_steps`` steps and at each epoch's end, evaluates every
  ``config.eval.every_epochs`` epochs and at the end, checkpoints every ``config.checkpoint.every_epochs``
  epochs and at the end, and writes ``cost.json`` on the first step.  A non-finite loss stops the run
  (:class:`NonFiniteLossError`); SIGINT/SIGTERM stop it after the current step with a checkpoint of it
  (``errors.Interrupted``).  ``exp.state`` is the last state when it returns or raises; the caller closes
  ``exp``.
  """
  config, workdir, mesh, ckpt, writer = exp.config, exp.workdir, exp.mesh, exp.checkpointer, exp.writer
  steps_per_epoch, total_steps, train_iter = exp.steps_per_epoch, exp.total_steps, exp.train_iter
  ev = config.eval
  state = exp.state
  start_step = int(parallel.to_host(state.step))
  last_eval: dict = {}
  if start_step >= total_steps:
    log(f"training already complete ({start_step}/{total_steps} steps)")
  bar = progress_bar(total=total_steps, initial=start_step, desc=f"{config.method.name}")
  # steps/s and uptime to TensorBoard at the logged steps, where the loop has just waited for the device (the
  # metrics to the host), so no other sync is added; its ETA note goes to absl's INFO log
  report = periodic_actions.ReportProgress(
    num_train_steps=total_steps, writer=writer.tensorboard, every_steps=config.log_every_steps, every_secs=None
  )
  t_window, n_window = time.perf_counter(), 0
  acc_metrics: list = []
  step = start_step
  stop = StopOnSignal(multiprocess=jax.process_count() > 1)
  try:
    with stop:
      while step < total_steps:
        batch = parallel.shard_batch(next(train_iter), mesh)
        if step == start_step and not os.path.isfile(os.path.join(workdir, COST_FILE)):
          write_cost(
            workdir,
            flops_per_step=step_flops(exp.train_step, state, exp.teacher_vars, batch),
            total_steps=total_steps,
            batch_size=config.batch_size,
          )
        state, metrics = exp.train_step(state, exp.teacher_vars, batch)
        if step == start_step:  # the step has compiled: return the compiler's freed memory to the system
          runtime.release_free_heap()
        exp.state = state
        step += 1
        n_window += 1
        acc_metrics.append(metrics)
        bar.update(1)
        end_of_epoch = step % steps_per_epoch == 0 or step == total_steps
        if step % config.log_every_steps == 0 or end_of_epoch:
          host = [parallel.to_host(m) for m in acc_metrics]
          mean = {k: float(np.mean([h[k] for h in host])) for k in host[0]}
          if not np.isfinite(mean["loss"]):
            raise NonFiniteLossError(
              f"loss became {mean['loss']} at step {step}; stopped without saving this state (the last "
              f"good checkpoint is kept in {ckpt.directory}); a lower optim.lr usually helps"
            )
          dt = time.perf_counter() - t_window
          mean["images_per_sec"] = n_window * config.batch_size / max(dt, 1e-9)
          mean["lr"] = float(exp.schedule(step - 1))
          writer.write_scalars(step, {"epoch": step / steps_per_epoch, **{f"train/{k}": v for k, v in mean.items()}})
          bar.set_postfix(
            loss=f"{mean['loss']:.4f}", acc=f"{mean['accuracy']:.3f}", img_s=f"{mean['images_per_sec']:.1f}"
          )
          acc_metrics, t_window, n_window = [], time.perf_counter(), 0
        report(step)
        saved = False
        if end_of_epoch:
          epoch = step // steps_per_epoch if step % steps_per_epoch == 0 else step / steps_per_epoch
          do_eval = step == total_steps or (ev.every_epochs > 0 and (step // steps_per_epoch) % ev.every_epochs == 0)
          if do_eval:
            last_eval = exp.evaluate(state)
            writer.write_scalars(step, {"epoch": epoch, **last_eval})
            bar.write(
              f"epoch {epoch}: "
              + ", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in last_eval.items())
            )
          if (step // steps_per_epoch) % config.checkpoint.every_epochs == 0 or step == total_steps:
            ckpt.save(state, data_iterator=train_iter, metrics=last_eval if do_eval else None)
            saved = True
        if stop.should_stop(step, ckpt.manager):
          if not saved:
            ckpt.save(state, data_iterator=train_iter, force=True)
          ckpt.wait()
          raise Interrupted(
            f"{stop.signal_name} at step {step} of {total_steps}: checkpoint of step {step} "
            f"saved in {ckpt.directory}; run the same command again to resume",
            stop.signum,
          )
  finally:
    bar.close()
  if not last_eval:
    last_eval = exp.evaluate(state)
  return last_eval


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains as ``config`` says, resuming from ``workdir``; returns the final evaluation metrics.

  :func:`build_experiment` then :func:`train_loop`: nothing is written to ``workdir`` before the config, the
  dataset and the teachers are checked and the checkpoint (if any) is restored; SIGINT/SIGTERM stop the run
  after the current step with a checkpoint of it (``errors.Interrupted``).
  """
  exp = build_experiment(config, workdir)
  try:
    return train_loop(exp)
  finally:
    exp.close()


def drop_replayed_metrics(path: str, last_step: int) -> int:
  """Removes from ``metrics.jsonl`` the records after ``last_step`` (the step the run resumes from): a run
  that stopped between two checkpoints logged them, and trains those steps again.  Also drops a line cut
  short by a crash.  Returns how many lines were dropped (the file is rewritten only then)."""
  if not os.path.isfile(path):
    return 0
  keep, dropped = [], 0
  with open(path) as f:
    for line in f:
      try:
        record = json.loads(line)
        step = int(record.get("step", 0)) if isinstance(record, dict) else None
      except (ValueError, TypeError):
        step = None
      if step is None or step > last_step:
        dropped += 1
      else:
        keep.append(line if line.endswith("\n") else line + "\n")
  if dropped:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
      f.writelines(keep)
    os.replace(tmp, path)
  return dropped
