"""Subprocess side of tests/test_scaling.py (JAX must see its devices / processes before it starts).

``python tests/scaling_worker.py devices OUT.json``
    With 8 simulated CPU devices: K train steps of SA-MDRAD (3 teachers) and AdaAD on the 8-device mesh and
    on a 1-device mesh (same global batches), and SA-MDRAD with the teachers sharded ('fsdp') over the 8
    devices; writes the largest differences and the teachers' shardings as JSON.

``python tests/scaling_worker.py train CONFIG.json WORKDIR OUT.json [--process=I/N --port=P] [--batches_of=N]``
    ``train.train_and_evaluate`` with the overrides in CONFIG.json (nested dict over
    ``config_lib.base_config()``), joined to the other processes through ``jax.distributed`` on localhost:P
    when ``--process`` is given.  ``--batches_of=N`` (one process only) feeds the global batches an N-process
    run assembles from its shards, so that a one-process run sees the same data.  Writes the returned
    metrics and the files this process opened for writing outside ``WORKDIR/checkpoints``.
"""

from __future__ import annotations

import builtins
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402

jax.config.update("jax_disable_most_optimizations", True)

import numpy as np  # noqa: E402

SHAPE, C = (8, 8, 1), 4
STEPS = 3
GLOBAL_BATCH = 16


# ---------------------------------------------------------------------------------------------
# 8 simulated devices against 1.
# ---------------------------------------------------------------------------------------------
def _setup(name, num_teachers):
  from mdrad_jax import config_lib, methods, models, train

  names = ("tiny_cnn", "mlp", "tiny_cnn")[:num_teachers]
  tmods = tuple(
    models.get_model(n, num_classes=C, **({"widths": (8, 16)} if n == "tiny_cnn" else {"hidden": (32,)})) for n in names
  )
  tvars = tuple(models.init_model(m, jax.random.key(10 + i), SHAPE) for i, m in enumerate(tmods))
  cfg = config_lib.base_config()
  cfg.method = config_lib.method_config(name)
  cfg.num_epochs = 1
  cfg.optim.lr = 0.05
  cfg.attack.eps = 0.1
  cfg.attack.step_size = 0.03
  cfg.attack.num_steps = 1
  method = methods.get_method(name)
  model = models.get_model("tiny_cnn", num_classes=C, widths=(8, 16))
  state, step = train.build_train_step(
    cfg, model=model, method=method, image_shape=SHAPE, teacher_modules=tmods, teacher_vars=tvars, steps_per_epoch=10
  )[:2]
  return step, state, tvars


def _batches():
  rng = np.random.default_rng(0)
  out = []
  for _ in range(STEPS):
    labels = rng.integers(0, C, GLOBAL_BATCH).astype(np.int32)
    images = rng.uniform(0, 0.3, size=(GLOBAL_BATCH, *SHAPE)).astype(np.float32)
    for i, y in enumerate(labels):
      images[i, 2 * y : 2 * y + 2, :, 0] += 0.6
    out.append({"image": images, "label": labels})
  return out


def _run(step, state, tvars, mesh, teacher_mode="replicated"):
  from mdrad_jax import parallel
  from mdrad_jax import train_step as ts

  host_state = jax.tree.map(np.asarray, state)
  shardings = parallel.teacher_shardings(tvars, mesh, teacher_mode)
  f = ts.jit_train_step(step, mesh, teacher_sharding=shardings)
  st = parallel.replicate(host_state, mesh)
  tv = parallel.put_global(jax.tree.map(np.asarray, tvars), shardings)
  losses = []
  for b in _batches():
    st, m = f(st, tv, parallel.shard_batch(b, mesh))
    losses.append(float(m["loss"]))
  return losses, parallel.to_host({"params": st.params, "batch_stats": st.batch_stats, "opt_state": st.opt_state}), tv


def _max_diff(a, b):
  return max(
    float(np.max(np.abs(np.asarray(x) - np.asarray(y)), initial=0.0))
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))
  )


def _norm_rel_diff(a, b):
  """||a − b|| / ||b|| over every floating-point leaf together (L2)."""
  pairs = [
    (np.asarray(x, np.float64), np.asarray(y, np.float64))
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))
    if np.issubdtype(np.asarray(y).dtype, np.floating)
  ]
  num = sum(float(np.sum((x - y) ** 2)) for x, y in pairs)
  den = sum(float(np.sum(y**2)) for _, y in pairs)
  return (num / den) ** 0.5 if den else num**0.5


def _max_rel_diff(a, b):
  return max(
    float(np.max(np.abs(np.asarray(x) - np.asarray(y)) / (np.abs(np.asarray(y)) + 1e-3), initial=0.0))
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))
  )


def devices_main(out_path):
  from jax.sharding import Mesh
  from mdrad_jax import parallel

  devs = jax.devices()
  assert len(devs) == 8, devs
  mesh8, mesh1 = parallel.create_mesh(), Mesh(np.asarray(devs[:1]), (parallel.DATA_AXIS,))
  result = {"num_devices": len(devs)}
  for name, k in (("sa_mdrad", 3), ("adaad", 1)):
    step, state, tvars = _setup(name, k)
    l1, t1, _ = _run(step, state, tvars, mesh1)
    l8, t8, _ = _run(step, state, tvars, mesh8)
    r = {
      "losses_1": l1,
      "losses_8": l8,
      "loss_diff": max(abs(a - b) for a, b in zip(l1, l8)),
      "param_diff": _max_diff(t1["params"], t8["params"]),
      "param_rel_diff": _max_rel_diff(t1["params"], t8["params"]),
      "stats_diff": _max_diff(t1["batch_stats"], t8["batch_stats"]),
      "opt_diff": _max_diff(t1["opt_state"], t8["opt_state"]),
      "opt_norm_rel_diff": _norm_rel_diff(t1["opt_state"], t8["opt_state"]),
      "param_change": _max_diff(jax.tree.map(np.asarray, state.params), t1["params"]),
    }
    if name == "sa_mdrad":
      lf, tf, tv = _run(step, state, tvars, mesh8, teacher_mode="fsdp")
      r["fsdp_loss_diff"] = max(abs(a - b) for a, b in zip(l8, lf))
      r["fsdp_param_diff"] = _max_diff(t8["params"], tf["params"])
      r["fsdp_vs_1_param_diff"] = _max_diff(t1["params"], tf["params"])
      leaves = jax.tree_util.tree_leaves_with_path(tv)
      r["teacher_leaves"] = [
        {
          "path": jax.tree_util.keystr(p),
          "shape": list(x.shape),
          "spec": str(x.sharding.spec),
          "shard_shape": list(x.addressable_shards[0].data.shape),
          "distinct_shards": len({str(s.index) for s in x.addressable_shards}) if x.shape else 1,
        }
        for p, x in leaves
      ]
    result[name] = r
  with open(out_path, "w") as f:
    json.dump(result, f, indent=1)


# ---------------------------------------------------------------------------------------------
# The real loop, in one of several processes.
# ---------------------------------------------------------------------------------------------
def train_main(argv):
  import argparse
  from mdrad_jax import errors, parallel, train

  ap = argparse.ArgumentParser()
  ap.add_argument("config")
  ap.add_argument("workdir")
  ap.add_argument("out")
  ap.add_argument("--process", default="", help="PROCESS_ID/NUM_PROCESSES")
  ap.add_argument("--port", type=int, default=0)
  ap.add_argument(
    "--batches_of",
    type=int,
    default=0,
    help="feed the global batches that this many processes would assemble from their shards",
  )
  args = ap.parse_args(argv)
  with open(args.config) as f:
    cfg = config_from(json.load(f))
  workdir = os.path.abspath(args.workdir)
  if args.process:
    pid, num = (int(v) for v in args.process.split("/"))
    cfg.distributed.coordinator_address = f"localhost:{args.port}"
    cfg.distributed.num_processes = num
    cfg.distributed.process_id = pid
    cfg.distributed.initialization_timeout = 60
  if args.batches_of:
    parallel.shard_batch = batches_of(cfg, workdir, args.batches_of)
  # Record the files this process opens for writing in the workdir outside checkpoints/.
  ckpt_dir = os.path.join(workdir, "checkpoints")
  writes = []
  real_open = builtins.open

  def recording_open(file, mode="r", *a, **kw):
    path = os.path.abspath(os.fspath(file)) if isinstance(file, (str, os.PathLike)) else ""
    if any(c in mode for c in "wax+") and path.startswith(workdir + os.sep) and not path.startswith(ckpt_dir + os.sep):
      writes.append(os.path.relpath(path, workdir))
    return real_open(file, mode, *a, **kw)

  builtins.open = recording_open
  try:
    metrics = train.train_and_evaluate(cfg, workdir)
  except errors.Interrupted as e:  # stopped by a signal after checkpointing: report it like main.py
    with real_open(args.out, "w") as f:
      json.dump({"interrupted": str(e), "process_index": jax.process_index()}, f)
    print(f"interrupted: {e}", file=sys.stderr, flush=True)
    sys.exit(e.exit_code)
  finally:
    builtins.open = real_open
  info = {
    "metrics": {k: float(v) for k, v in metrics.items()},
    "writes": sorted(set(writes)),
    "process_index": jax.process_index(),
    "process_count": jax.process_count(),
    "num_devices": jax.device_count(),
    "local_devices": jax.local_device_count(),
  }
  with open(args.out, "w") as f:
    json.dump(info, f)
  if args.process:
    jax.distributed.shutdown()


def batches_of(cfg, workdir, num_shards):
  """A replacement for ``parallel.shard_batch`` in one process standing in for ``num_shards``: each training
  batch becomes the concatenation, in process order, of the next local batches of the ``num_shards``
  per-process loaders (the global batch of the multi-process run), continuing after the batches a checkpoint
  in ``workdir`` has already consumed."""
  from mdrad_jax import checkpointing, parallel
  from mdrad_jax import data as data_lib

  assert jax.process_count() == 1
  info = data_lib.dataset_info(cfg.data.name, **data_lib.data_kwargs(cfg))
  ckpt = checkpointing.Checkpointer(workdir)
  start = ckpt.latest_step() or 0
  ckpt.close()
  iters = []
  for i in range(num_shards):
    it = iter(
      data_lib.create_loader(
        cfg.data.name,
        info.train_split,
        batch_size=cfg.batch_size,
        train=True,
        seed=cfg.seed,
        augment=cfg.data.augment,
        crop_padding=cfg.data.crop_padding,
        num_examples=cfg.num_train_examples if cfg.num_train_examples > 0 else None,
        process_index=i,
        process_count=num_shards,
        read_threads=0,
        **data_lib.data_kwargs(cfg),
      )
    )
    for _ in range(start):
      next(it)
    iters.append(it)
  real = parallel.shard_batch

  def shard_batch(batch, mesh):
    if batch["image"].shape[0] == cfg.batch_size and "mask" not in batch:  # a training batch
      parts = [next(it) for it in iters]
      batch = {k: np.concatenate([p[k] for p in parts]) for k in batch}
    return real(batch, mesh)

  return shard_batch


def config_from(overrides: dict):
  from mdrad_jax import config_lib

  cfg = config_lib.base_config()
  cfg.update_from_flattened_dict(_flatten(overrides))
  return cfg


def _flatten(d, prefix=""):
  out = {}
  for k, v in d.items():
    key = f"{prefix}{k}"
    if isinstance(v, dict):
      out.update(_flatten(v, key + "."))
    else:
      out[key] = tuple(v) if isinstance(v, list) else v
  return out


if __name__ == "__main__":
  mode = sys.argv[1]
  if mode == "devices":
    devices_main(sys.argv[2])
  elif mode == "train":
    train_main(sys.argv[2:])
  else:
    raise SystemExit(f"unknown mode {mode!r}")
