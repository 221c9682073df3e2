"""Device mesh, multi-host start-up and batch sharding.

One mesh over every device of every process with a single ``'data'`` axis; the global batch is split along it
and the train state is replicated.  Each process feeds only its own slice of the batch and
``jax.make_array_from_process_local_data`` assembles the global array, so the same code runs on one CPU, on a
multi-GPU host and on a TPU pod slice.
"""
from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"


def initialize_distributed(dist_config=None) -> None:
  """Joins the processes of a multi-host run through ``jax.distributed.initialize``.

  ``dist_config`` fields: ``enabled`` ('auto' | True | False), ``coordinator_address``, ``num_processes``,
  ``process_id``, ``local_device_ids``.  With explicit values they are passed on; with ``enabled='auto'`` the
  call is made only where JAX can detect a cluster by itself (TPU pod, SLURM with several tasks, or
  ``JAX_COORDINATOR_ADDRESS`` set), so a plain single-process run is untouched.
  """
  if dist_config is None:
    return
  enabled = dist_config.get("enabled", "auto")
  if enabled is False or enabled == "false":
    return
  explicit = dist_config.get("coordinator_address")
  if enabled == "auto" and not explicit and not _cluster_detected():
    return
  if jax.distributed.is_initialized():
    return
  kwargs: dict[str, Any] = {}
  if explicit:
    kwargs["coordinator_address"] = explicit
  if dist_config.get("num_processes") is not None:
    kwargs["num_processes"] = int(dist_config.num_processes)
  if dist_config.get("process_id") is not None:
    kwargs["process_id"] = int(dist_config.process_id)
  if dist_config.get("local_device_ids") is not None:
    kwargs["local_device_ids"] = list(dist_config.local_device_ids)
  jax.distributed.initialize(**kwargs)


def _cluster_detected() -> bool:
  env = os.environ
  if env.get("JAX_COORDINATOR_ADDRESS"):
    return True
  if int(env.get("SLURM_NTASKS", "1")) > 1 and "SLURM_JOB_ID" in env:
    return True
  if env.get("TPU_WORKER_HOSTNAMES", "localhost") not in ("", "localhost") and "," in env.get(
      "TPU_WORKER_HOSTNAMES", ""):
    return True
  return False


def create_mesh(devices=None) -> Mesh:
  """A one-axis mesh (``'data'``) over all devices of all processes."""
  devices = jax.devices() if devices is None else devices
  return Mesh(np.asarray(devices), (DATA_AXIS,))


def data_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def check_batch_size(global_batch: int, mesh: Mesh, what: str = "batch_size") -> None:
  n = mesh.devices.size
  if global_batch % n:
    raise ValueError(
        f"{what}={global_batch} must be divisible by the number of devices ({n})")
  if global_batch % jax.process_count():
    raise ValueError(
        f"{what}={global_batch} must be divisible by the number of processes ({jax.process_count()})")


def shard_batch(batch: dict, mesh: Mesh) -> dict:
  """Turns each process's local numpy slice into one global array sharded along ``'data'``."""
  sharding = data_sharding(mesh)
  return {
      k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
      for k, v in batch.items()
  }


def replicate(tree, mesh: Mesh):
  """Places a host pytree on every device (same value on every process)."""
  return jax.device_put(tree, replicated(mesh))


def to_host(tree):
  """Fetches a (replicated or fully addressable) pytree of arrays to numpy on this process."""
  def get(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      x = jax.experimental.multihost_utils.process_allgather(x, tiled=True)
    return np.asarray(x)
  return jax.tree.map(get, tree)
