"""Training loop shared by standard (teacher) training, adversarial training and adversarial distillation.

``train_and_evaluate(config, workdir)`` builds the data pipeline, the student, the frozen teachers, the
optimizer and the train state, resumes from ``workdir/checkpoints`` when a checkpoint is there, and runs the
single jitted step of ``mdrad_jax.train_step`` with the batch sharded over a one-axis data mesh.  It writes
``config.json``, appends metrics to ``metrics.jsonl`` and shows a progress bar with loss, accuracy and
throughput.
"""
from __future__ import annotations

import json
import math
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mdrad_jax import checkpointing
from mdrad_jax import data as data_lib
from mdrad_jax import methods as methods_lib
from mdrad_jax import models as models_lib
from mdrad_jax import optim
from mdrad_jax import parallel
from mdrad_jax import precision
from mdrad_jax import train_step as step_lib
from mdrad_jax import validation
from mdrad_jax import workdir as workdir_lib
from mdrad_jax.errors import Interrupted, UserError
# The in-training evaluation (pad_batch: kept here for compatibility).
from mdrad_jax.evaluation import evaluate_model, pad_batch  # noqa: F401
from mdrad_jax.preemption import StopOnSignal
from mdrad_jax.progress import MetricsWriter, progress_bar, log
from mdrad_jax.train_state import TrainState, split_variables


class NonFiniteLossError(UserError):
  """The training loss became NaN/Inf: the run stops without checkpointing that state (one line from main.py)."""


# ---------------------------------------------------------------------------------------------
# Building blocks.
# ---------------------------------------------------------------------------------------------
def data_kwargs(config) -> dict:
  d = config.data
  return dict(data_dir=d.data_dir or None, source_dir=d.source_dir or None)


def build_model(model_config, num_classes: int):
  kwargs = dict(model_config.get("kwargs", {}) or {})
  if model_config.get("dtype", "float32") != "float32":
    kwargs["dtype"] = jnp.dtype(model_config.dtype)
  return models_lib.get_model(model_config.name, num_classes=num_classes, **kwargs)


def load_teachers(paths, *, num_classes: int, image_shape, dtype: str = "float32", dataset: str | None = None):
  """Loads frozen teachers from training workdirs or checkpoint paths.

  Returns ``(modules, variables)``: the Flax modules (rebuilt from each run's ``config.json``) and their
  variables, which the train step receives as arguments.  A teacher trained on another dataset (when
  ``dataset`` is given), another number of classes or another input shape is refused.
  """
  modules, variables = [], []
  for path in paths:
    v, run_cfg = checkpointing.load_model_variables(path)
    if run_cfg is None or "model" not in run_cfg:
      raise UserError(f"teacher {path}: no config.json next to the checkpoint, cannot tell its model")
    mcfg = ml_collections.ConfigDict(run_cfg["model"])
    if dtype != "float32":
      mcfg.dtype = dtype
    t_data = (run_cfg.get("data") or {}).get("name")
    if dataset is not None and t_data is not None and t_data != dataset:
      raise UserError(f"teacher {path} was trained on {t_data!r}, this run trains on {dataset!r}")
    t_classes = run_cfg.get("num_classes")
    if t_classes is not None and t_classes != num_classes:
      raise UserError(f"teacher {path} has {t_classes} classes, the dataset has {num_classes}")
    t_shape = run_cfg.get("image_shape")
    if t_shape is not None and tuple(t_shape) != tuple(image_shape):
      raise UserError(f"teacher {path} was trained on {tuple(t_shape)} images, this dataset has "
                      f"{tuple(image_shape)}")
    module = build_model(mcfg, num_classes)
    # check the stored variables fit the module
    expected = jax.eval_shape(lambda: module.init(jax.random.key(0), jnp.zeros((1, *image_shape))))
    got = jax.tree.map(lambda a: (tuple(a.shape)), v["params"])
    want = jax.tree.map(lambda a: (tuple(a.shape)), expected["params"])
    if got != want:
      raise UserError(f"teacher {path}: parameters do not match model {mcfg.name!r} "
                       f"for input {tuple(image_shape)}")
    modules.append(module)
    variables.append(jax.tree.map(jnp.asarray, v))
  return tuple(modules), tuple(variables)


def resolve_attack(config, method: methods_lib.Method) -> step_lib.AttackConfig:
  a = config.attack
  return step_lib.AttackConfig(
      eps=float(a.eps), step_size=float(a.step_size), num_steps=int(a.num_steps),
      init=a.init or method.attack_init, bn_mode=a.bn_mode or method.attack_bn,
      unroll=bool(a.unroll), dtype=a.get("dtype", "") or "",
      clip_start=_clip_start(a.get("clip_start", ""), method))


def _clip_start(value, method) -> bool:
  if value in ("", None):
    return method.attack_clip_start
  if str(value).lower() not in ("true", "false"):
    raise UserError(f"attack.clip_start must be '', 'true' or 'false', got {value!r}")
  return str(value).lower() == "true"


def write_config(config, workdir: str, extra: dict | None = None) -> None:
  """``workdir/config.json`` on process 0 (see ``workdir.write_config``); call it only once the config is
  validated, ``workdir.check_same_run`` accepted it and the checkpoint (if any) restored."""
  if jax.process_index() != 0:
    return
  workdir_lib.write_config(config, workdir, extra)


def create_state(config, *, model, image_shape, teacher_modules, teacher_vars, method, steps_per_epoch):
  """Initial ``TrainState``: student (and projectors) initialised from ``config.seed``."""
  rng = jax.random.key(config.seed)
  init_rng, proj_rng, state_rng = jax.random.split(rng, 3)
  dummy = jnp.zeros((2, *image_shape), jnp.float32)
  variables = models_lib.init_model(model, init_rng, image_shape)
  params_m, stats_m = split_variables(variables)
  params = {"model": params_m, "projectors": {}}
  stats = {"model": stats_m, "projectors": {}}
  projectors = ()
  plan = method.plan(dict(config.method), len(teacher_modules))
  if plan.student_features:
    _, s_feats = jax.eval_shape(lambda: model.apply(variables, dummy, train=False, return_features=True))
    projectors = []
    for k, (tm, tv) in enumerate(zip(teacher_modules, teacher_vars)):
      _, t_feats = jax.eval_shape(lambda tm=tm, tv=tv: tm.apply(tv, dummy, train=False,
                                                               return_features=True))
      tshape = t_feats["last"].shape
      proj = models_lib.FeatureProjector(out_channels=tshape[-1], out_hw=tuple(tshape[1:3]))
      pv = models_lib.init_model(proj, jax.random.fold_in(proj_rng, k), s_feats["last"].shape)
      params["projectors"][str(k)] = pv["params"]
      stats["projectors"][str(k)] = pv.get("batch_stats", {})
      projectors.append(proj)
    projectors = tuple(projectors)
  tx, schedule = optim.create_optimizer(config.optim, steps_per_epoch=steps_per_epoch,
                                        num_epochs=config.num_epochs)
  state = TrainState.create(params=params, batch_stats=stats, tx=tx,
                            rng=jax.random.key_data(state_rng),
                            # host copies: distinct device buffers per leaf (the step donates them)
                            method_state=jax.tree.map(np.array, method.init_state(dict(config.method))))
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


COST_FILE = "cost.json"


def write_cost(workdir: str, *, flops_per_step: float | None, total_steps: int, batch_size: int) -> None:
  """``cost.json``: the train step's FLOPs (XLA cost analysis, all devices together) and the run's total."""
  if jax.process_index() != 0:
    return
  d = {"train_step_flops": flops_per_step, "total_steps": int(total_steps), "batch_size": int(batch_size),
       "train_flops": None if flops_per_step is None else flops_per_step * total_steps,
       "source": "XLA cost analysis of the lowered train step; evaluation not included"}
  path = os.path.join(workdir, COST_FILE)
  with open(path + ".tmp", "w") as f:
    json.dump(d, f, indent=2)
  os.replace(path + ".tmp", path)


# ---------------------------------------------------------------------------------------------
# The loop.
# ---------------------------------------------------------------------------------------------
def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains as ``config`` says, resuming from ``workdir``; returns the final evaluation metrics.

  Nothing is written to ``workdir`` before the config, the dataset and the teachers are checked and the
  checkpoint (if any) is restored; ``config.json`` of a run already in ``workdir`` is never replaced by one
  that trains something else (``workdir.check_same_run``).  SIGINT/SIGTERM stop the run after the current
  step with a checkpoint of it (``errors.Interrupted``).
  """
  validation.validate(config)  # also when called directly (quickstart and study stages), not only from main.py
  parallel.initialize_distributed(config.get("distributed"))
  mesh = parallel.create_mesh()
  parallel.check_batch_size(config.batch_size, mesh)
  parallel.check_batch_size(config.eval_batch_size, mesh, "eval_batch_size")
  precision.check_config(config)
  teacher_sharding = config.get("teacher_sharding", "replicated")
  if teacher_sharding not in parallel.TEACHER_SHARDINGS:
    raise UserError(f"config.teacher_sharding must be one of {parallel.TEACHER_SHARDINGS}, "
                    f"got {teacher_sharding!r}")

  info = data_lib.dataset_info(config.data.name, **data_kwargs(config))
  method = methods_lib.get_method(config.method.name)
  method.check_teachers(len(config.teachers))
  model = build_model(config.model, info.num_classes)
  teacher_modules, teacher_vars = load_teachers(
      config.teachers, num_classes=info.num_classes, image_shape=info.image_shape,
      dtype=config.get("teacher_dtype", "float32"), dataset=config.data.name)

  train_size = info.split_sizes[info.train_split]
  if config.get("num_train_examples", -1) and config.num_train_examples > 0:
    train_size = min(train_size, config.num_train_examples)
  steps_per_epoch = train_size // config.batch_size
  if steps_per_epoch == 0:
    raise UserError(f"config.batch_size = {config.batch_size} is larger than the training split "
                    f"({train_size} examples of {config.data.name}/{info.train_split})")
  total_steps = int(math.ceil(config.num_epochs * steps_per_epoch))
  test_size = info.split_sizes[info.test_split]
  ev = config.eval
  eval_size = min(test_size, ev.num_examples) if ev.num_examples > 0 else test_size
  run_facts = {"num_classes": info.num_classes, "image_shape": list(info.image_shape)}
  workdir_lib.check_same_run(config, workdir, run_facts)

  state, projectors, schedule = create_state(
      config, model=model, image_shape=info.image_shape, teacher_modules=teacher_modules,
      teacher_vars=teacher_vars, method=method, steps_per_epoch=steps_per_epoch)
  precision.check_master_weights(state)
  # On the mesh before restoring: the checkpoint is read straight into this run's shardings, whatever the
  # device and process count of the run that wrote it.
  state = parallel.replicate(state, mesh)

  train_loader = data_lib.create_loader(
      config.data.name, info.train_split, batch_size=config.batch_size, train=True,
      seed=config.seed, augment=config.data.augment, crop_padding=config.data.crop_padding,
      num_examples=(train_size if train_size < info.split_sizes[info.train_split] else None),
      worker_count=config.data.worker_count, **data_kwargs(config))
  train_iter = iter(train_loader)

  ckpt = checkpointing.Checkpointer(workdir, keep=config.checkpoint.keep,
                                    best_metric=config.checkpoint.best_metric or None,
                                    best_mode=config.checkpoint.best_mode)
  try:
    restored = ckpt.restore_newest(state, data_iterator=train_iter)
  except BaseException:
    ckpt.close()
    raise
  if restored is not None:
    state = restored
    log(f"resumed from {ckpt.directory} at step {int(state.step)}")
  write_config(config, workdir, run_facts)

  t_shardings = parallel.teacher_shardings(teacher_vars, mesh, teacher_sharding)
  teacher_vars = parallel.put_global(teacher_vars, t_shardings)
  attack = resolve_attack(config, method)
  step_fn = step_lib.make_train_step(
      model=model, method=method, hparams=dict(config.method), attack=attack,
      teacher_models=teacher_modules, projectors=projectors, steps_per_epoch=steps_per_epoch,
      lr_schedule=schedule, base_lr=float(config.optim.lr))
  p_train_step = step_lib.jit_train_step(step_fn, mesh, teacher_sharding=t_shardings)

  eval_pgd = None
  if ev.pgd_steps > 0:
    eval_pgd = step_lib.AttackConfig(eps=float(config.attack.eps), step_size=float(ev.pgd_step_size),
                                     num_steps=int(ev.pgd_steps), init="uniform")
  p_eval_step = step_lib.jit_eval_step(step_lib.make_eval_step(model, pgd=eval_pgd), mesh)

  def run_eval(st) -> dict:
    loader = data_lib.create_loader(
        config.data.name, info.test_split, batch_size=config.eval_batch_size, train=False,
        seed=0, drop_remainder=False,
        num_examples=(eval_size if eval_size < test_size else None), **data_kwargs(config))
    per_process = -(-eval_size // jax.process_count())
    res = evaluate_model(p_eval_step, st.model_variables(), loader, mesh,
                         batch_size=config.eval_batch_size, key=jax.random.key(config.seed + 1),
                         num_batches=-(-per_process // (config.eval_batch_size // jax.process_count())))
    return {f"test/{k}": v for k, v in res.items()}

  start_step = int(parallel.to_host(state.step))
  metrics_path = os.path.join(workdir, "metrics.jsonl")
  if jax.process_index() == 0:
    dropped = drop_replayed_metrics(metrics_path, start_step)
    if dropped:
      log(f"metrics.jsonl: dropped {dropped} line(s) after step {start_step}, written before the run stopped "
          f"and trained again from the checkpoint")
  writer = MetricsWriter(metrics_path)
  last_eval: dict = {}
  if start_step >= total_steps:
    log(f"training already complete ({start_step}/{total_steps} steps)")
  bar = progress_bar(total=total_steps, initial=start_step, desc=f"{config.method.name}")
  t_window, n_window = time.perf_counter(), 0
  acc_metrics: list = []
  step = start_step
  stop = StopOnSignal(multiprocess=jax.process_count() > 1)
  try:
    with stop:
      while step < total_steps:
        batch = parallel.shard_batch(next(train_iter), mesh)
        if step == start_step and not os.path.isfile(os.path.join(workdir, COST_FILE)):
          write_cost(workdir, flops_per_step=step_flops(p_train_step, state, teacher_vars, batch),
                     total_steps=total_steps, batch_size=config.batch_size)
        state, metrics = p_train_step(state, teacher_vars, batch)
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
                f"good checkpoint is kept in {ckpt.directory}); a lower optim.lr usually helps")
          dt = time.perf_counter() - t_window
          mean["images_per_sec"] = n_window * config.batch_size / max(dt, 1e-9)
          mean["lr"] = float(schedule(step - 1))
          writer.write(step=step, epoch=step / steps_per_epoch,
                       **{f"train/{k}": v for k, v in mean.items()})
          bar.set_postfix(loss=f"{mean['loss']:.4f}", acc=f"{mean['accuracy']:.3f}",
                          img_s=f"{mean['images_per_sec']:.1f}")
          acc_metrics, t_window, n_window = [], time.perf_counter(), 0
        saved = False
        if end_of_epoch:
          epoch = step // steps_per_epoch if step % steps_per_epoch == 0 else step / steps_per_epoch
          do_eval = (step == total_steps or
                     (ev.every_epochs > 0 and (step // steps_per_epoch) % ev.every_epochs == 0))
          if do_eval:
            last_eval = run_eval(state)
            writer.write(step=step, epoch=epoch, **last_eval)
            bar.write(f"epoch {epoch}: " + ", ".join(
                f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in last_eval.items()))
          if (step // steps_per_epoch) % config.checkpoint.every_epochs == 0 or step == total_steps:
            ckpt.save(state, data_iterator=train_iter, metrics=last_eval if do_eval else None)
            saved = True
        if stop.should_stop(step, ckpt.manager):
          if not saved:
            ckpt.save(state, data_iterator=train_iter, force=True)
          ckpt.wait()
          raise Interrupted(f"{stop.signal_name} at step {step} of {total_steps}: checkpoint of step {step} "
                            f"saved in {ckpt.directory}; run the same command again to resume", stop.signum)
  finally:
    bar.close()
    ckpt.close()
    writer.close()
  if not last_eval:
    last_eval = run_eval(state)
  return last_eval


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
