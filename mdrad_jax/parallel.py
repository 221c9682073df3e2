"""Device mesh, multi-host start-up and batch sharding.

One mesh over every device of every process with a single ``'data'`` axis; the global batch is split along it
and the train state is replicated.  Each process feeds only its own slice of the batch and
``jax.make_array_from_process_local_data`` assembles the global array, so the same code runs on one CPU, on a
multi-GPU host and on a TPU pod slice.  Frozen teacher variables are replicated too, or, with
``teacher_sharding='fsdp'``, split over the same axis (each large array along one dimension) and gathered by
XLA where the step uses them.  See docs/scaling.md.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from mdrad_jax.errors import UserError

DATA_AXIS = "data"


DISTRIBUTED_MODES = ("auto", "true", "false")
_JOIN_FIELDS = ("coordinator_address", "num_processes", "process_id")
# What jax.distributed.initialize raises (JAX 0.10) before it changes anything: no cluster was detected and no
# coordinator was given; some of the three values are missing; JAX's backend has already started.
_NO_CLUSTER = "coordinator_address should be defined"
_MISSING = (_NO_CLUSTER, "Number of processes must be defined", "process id of the current process must be defined")
_TOO_LATE = "must be called before any JAX calls"


def initialize_distributed(dist_config=None) -> bool:
  """Joins the processes of a multi-process run through ``jax.distributed.initialize``.

  Must run before anything touches a JAX device.  ``dist_config`` (``config.distributed``) fields:

  * ``enabled``: 'auto' (default) | 'true' | 'false'.  With 'auto' JAX's own cluster detection decides:
    ``jax.distributed.initialize`` is called with the explicit values below, and when JAX finds neither a
    cluster (SLURM, Open MPI, Cloud TPU, Kubernetes with the ``kubernetes`` package) nor explicit values it
    changes nothing and the process runs alone.  A one-task SLURM job (``SLURM_NTASKS=1``) or a one-rank
    ``mpirun`` runs alone too, with all its devices (JAX would keep only the device of its local task id).
    So does a process whose JAX backend has already started (it can no longer join anything).  'true' always
    calls it and JAX's errors stop the run; 'false' never calls it.
  * ``coordinator_address`` ('host:port' of process 0), ``num_processes``, ``process_id``: give all three
    on a cluster JAX cannot detect (several processes started by hand or by a generic launcher); on
    SLURM, Open MPI and Cloud TPU leave them unset and JAX reads them from the environment.
    ``JAX_COORDINATOR_ADDRESS`` in the environment counts as ``coordinator_address``.
  * ``local_device_ids``: '' (JAX's default) or comma-separated local accelerator ids this process uses,
    e.g. '0,1,2,3'.  Under SLURM/Open MPI JAX defaults to ONE device per process (the local task id).
  * ``cluster_detection_method``: '' or a JAX cluster name to force ('slurm', 'ompi', 'gcetpu', 'gketpu',
    'mpi4py', 'deactivate').

  Returns True when this process is part of a multi-process run (now or already), False otherwise.
  """
  if dist_config is None:
    return False
  enabled = str(dist_config.enabled).strip().lower()
  if enabled not in DISTRIBUTED_MODES:
    raise UserError(f"config.distributed.enabled must be one of {DISTRIBUTED_MODES}, got {dist_config.enabled!r}")
  if enabled == "false":
    return False
  if jax.distributed.is_initialized():
    return True
  address = dist_config.coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS") or None
  num = dist_config.num_processes
  pid = dist_config.process_id
  method = dist_config.cluster_detection_method or None
  local_ids = parse_device_ids(dist_config.local_device_ids)
  given = [name for name, v in zip(_JOIN_FIELDS, (address, num, pid)) if v not in (None, "")]
  if num is not None and int(num) < 1:
    raise UserError(f"config.distributed.num_processes must be >= 1, got {num}")
  if pid is not None and num is not None and not 0 <= int(pid) < int(num):
    raise UserError(f"config.distributed.process_id must lie in [0, {int(num)}), got {pid}")
  if address is not None and ":" not in str(address):
    raise UserError(f"config.distributed.coordinator_address must be 'host:port', got {address!r}")
  detect_only = enabled == "auto" and not given and method is None
  if detect_only and _one_task_job():
    return False
  kwargs: dict[str, Any] = {}
  if address is not None:
    kwargs["coordinator_address"] = str(address)
  if num is not None:
    kwargs["num_processes"] = int(num)
  if pid is not None:
    kwargs["process_id"] = int(pid)
  if local_ids is not None:
    kwargs["local_device_ids"] = local_ids
  if method is not None:
    kwargs["cluster_detection_method"] = str(method)
  timeout = dist_config.initialization_timeout
  if timeout:
    kwargs["initialization_timeout"] = int(timeout)
  try:
    jax.distributed.initialize(**kwargs)
  except ValueError as e:
    if detect_only and _NO_CLUSTER in str(e):
      return False  # no cluster, nothing given: a plain one-process run
    if given and len(given) < 3 and method is None and any(m in str(e) for m in _MISSING):
      missing = [name for name in _JOIN_FIELDS if name not in given]
      raise UserError(
        f"config.distributed: {', '.join(given)} given without {', '.join(missing)}; outside "
        f"SLURM/Open MPI/Cloud TPU give coordinator_address, num_processes and process_id together"
      ) from None
    raise
  except RuntimeError as e:
    if detect_only and _TOO_LATE in str(e):
      return False  # JAX already runs this process alone
    raise
  return True


def _one_task_job() -> bool:
  """A one-rank ``mpirun`` or a one-task SLURM job (Open MPI first, as JAX checks it first)."""
  env = os.environ
  if "OMPI_MCA_orte_hnp_uri" in env:
    return env.get("OMPI_COMM_WORLD_SIZE") == "1"
  return env.get("SLURM_NTASKS") == "1"


def parse_device_ids(value) -> list[int] | None:
  """'' / None -> None; '0,1' / (0, 1) / 3 -> a list of ints."""
  if value is None or value == "" or value == ():
    return None
  if isinstance(value, (int, np.integer)):
    return [int(value)]
  if isinstance(value, str):
    parts = [p.strip() for p in value.split(",") if p.strip()]
  else:
    parts = list(value)
  try:
    return [int(p) for p in parts]
  except (TypeError, ValueError):
    raise UserError(f"config.distributed.local_device_ids must be comma-separated integers, got {value!r}") from None


def create_mesh(devices=None) -> Mesh:
  """A one-axis mesh (``'data'``) over all devices of all processes, each process's devices contiguous (in
  ``jax.devices()`` order within a process), so that the global batch is the processes' batches in
  process order."""
  devices = jax.devices() if devices is None else devices
  devices = sorted(devices, key=lambda d: d.process_index)
  return Mesh(np.asarray(devices), (DATA_AXIS,))


def data_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def check_batch_size(global_batch: int, mesh: Mesh, what: str = "batch_size") -> None:
  n = mesh.devices.size
  if global_batch % n:
    raise UserError(f"{what}={global_batch} must be divisible by the number of devices ({n})")
  if global_batch % jax.process_count():
    raise UserError(f"{what}={global_batch} must be divisible by the number of processes ({jax.process_count()})")


def shard_batch(batch: dict, mesh: Mesh) -> dict:
  """Turns each process's local numpy slice into one global array sharded along ``'data'``."""
  sharding = data_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in batch.items()}


def put_global(tree, shardings):
  """Places a host pytree (the same values on every process) on the mesh with ``shardings`` (one sharding
  or a matching pytree).  Each process fills only its own devices, so this works across processes."""
  if not isinstance(shardings, jax.sharding.Sharding):
    return jax.tree.map(lambda x, s: _put_one(x, s), tree, shardings)
  return jax.tree.map(lambda x: _put_one(x, shardings), tree)


def _put_one(x, sharding):
  if isinstance(x, jax.Array) and x.sharding == sharding:
    return x
  host = np.asarray(x)
  return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])


def replicate(tree, mesh: Mesh):
  """Places a host pytree on every device (same value on every process)."""
  return put_global(tree, replicated(mesh))


# ---------------------------------------------------------------------------------------------
# Frozen teachers: replicated, or sharded over the data axis (FSDP-style, gathered inside the step).
# ---------------------------------------------------------------------------------------------
TEACHER_SHARDINGS = ("replicated", "fsdp")
# Leaves with fewer elements stay replicated under 'fsdp': they cost nothing in memory and each sharded leaf
# costs an all-gather per use.
FSDP_MIN_SIZE = 1024


def fsdp_spec(shape, num_shards: int, *, min_size: int = FSDP_MIN_SIZE) -> P:
  """``P()`` or a spec sharding the largest axis of ``shape`` that ``num_shards`` divides (the last such axis
  on ties) over ``'data'``; replicated when no axis divides or the array has fewer than ``min_size``
  elements."""
  shape = tuple(int(d) for d in shape)
  if num_shards <= 1 or not shape or int(np.prod(shape)) < min_size:
    return P()
  best = None
  for axis, d in enumerate(shape):
    if d % num_shards == 0 and (best is None or d >= shape[best]):
      best = axis
  if best is None:
    return P()
  return P(*([None] * best + [DATA_AXIS]))


def teacher_shardings(tree, mesh: Mesh, mode: str = "replicated", *, min_size: int = FSDP_MIN_SIZE):
  """A pytree of ``NamedSharding`` matching ``tree`` (teacher variables, arrays or shape structs)."""
  if mode not in TEACHER_SHARDINGS:
    raise UserError(f"config.teacher_sharding must be one of {TEACHER_SHARDINGS}, got {mode!r}")
  n = mesh.shape[DATA_AXIS]
  if mode == "replicated":
    return jax.tree.map(lambda _: replicated(mesh), tree)
  return jax.tree.map(lambda x: NamedSharding(mesh, fsdp_spec(np.shape(x), n, min_size=min_size)), tree)


def to_host(tree):
  """Fetches a pytree of replicated (or fully addressable) arrays to numpy on this process."""

  def get(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      if x.is_fully_replicated:
        return np.asarray(x.addressable_data(0))
      from jax.experimental import multihost_utils

      x = multihost_utils.process_allgather(x, tiled=True)
    return np.asarray(x)

  return jax.tree.map(get, tree)
