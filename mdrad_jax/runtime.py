"""Job dispatch and process-level set-up for ``main.py``."""

from __future__ import annotations

import os

from mdrad_jax.errors import UserError

JOBS = ("train", "evaluate", "quickstart", "study", "import_teacher")


def configure_xla() -> None:
  """XLA flags the library sets by default, before JAX initialises; a user's own XLA_FLAGS win."""
  from mdrad_jax import xla_flags

  xla_flags.apply_defaults()


CACHE_ENV = "MDRAD_COMPILATION_CACHE"


def compilation_cache_dir() -> str:
  """Where compiled programs are kept between runs: ``$MDRAD_COMPILATION_CACHE`` ('' or unset =
  ``~/.cache/mdrad_jax/xla``; '0' or 'off' = no persistent cache)."""
  value = os.environ.get(CACHE_ENV, "").strip()
  if value.lower() in ("0", "off", "false", "none"):
    return ""
  return os.path.expanduser(value or os.path.join("~", ".cache", "mdrad_jax", "xla"))


def configure_compilation_cache() -> str:
  """Turns on JAX's persistent compilation cache (every job and study cell that compiles the same program
  again, e.g. another seed of the same configuration, reads it from disk).  Returns the directory, '' = off.
  A cache directory that cannot be created turns the cache off with a warning rather than failing the run."""
  import jax

  path = compilation_cache_dir()
  if not path:
    return ""
  try:
    os.makedirs(path, exist_ok=True)
  except OSError as e:
    print(f"warning: compilation cache off: cannot create {path}: {e.strerror}", flush=True)
    return ""
  jax.config.update("jax_compilation_cache_dir", path)
  # cache everything that took a measurable time to compile; small programs are cheaper to rebuild
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  return path


def release_free_heap() -> bool:
  """Hands the C heap's free memory back to the kernel (glibc ``malloc_trim(0)``; False where there is none).

  XLA's compiler frees most of what it allocates, but glibc keeps the freed pages: after compiling a ResNet-18
  train step the process held 335-495 MiB that nothing used, and the steps' own buffers came on top of it
  (docs/performance.md, "Memory").  The train loop calls this once, after its step has compiled."""
  import ctypes

  try:
    return bool(ctypes.CDLL("libc.so.6").malloc_trim(0))
  except (OSError, AttributeError):
    return False


def cpu_model(cpuinfo: str = "/proc/cpuinfo") -> str:
  """The CPU's model name (``/proc/cpuinfo``; ``platform.processor()`` where there is none)."""
  import platform

  try:
    with open(cpuinfo) as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def host_description() -> dict:
  """The machine a result was made on, recorded with it: XLA compiles different floating-point code for
  different CPUs, so a run is bit-reproducible only on the same kind of machine (docs/results.md)."""
  import jax

  cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
  return {
    "cpu": cpu_model(),
    "cores": cores,
    "platform": jax.default_backend(),
    "devices": jax.device_count(),
    "jax": jax.__version__,
  }


def run(config, workdir: str):
  """Runs ``config.job`` on ``workdir``: the config is validated first (nothing is written for a bad one), then
  the job runs holding the workdir's lock (one writer per workdir; process 0 holds it)."""
  from mdrad_jax import parallel
  from mdrad_jax import validation
  from mdrad_jax import workdir as workdir_lib

  if not workdir:
    raise UserError("--workdir is empty: give the directory the job writes to")
  validation.validate(config, jobs=JOBS)
  parallel.initialize_distributed(config.distributed)
  import jax

  with workdir_lib.lock(workdir, enabled=jax.process_index() == 0):
    return run_job(config, workdir)


def run_job(config, workdir: str):
  """Dispatches to the job's ``run(config, workdir)`` (no validation, no lock: see ``run``)."""
  if config.job == "train":
    from mdrad_jax import train

    return train.train_and_evaluate(config, workdir)
  if config.job == "evaluate":
    from mdrad_jax import evaluation_job

    return evaluation_job.run(config, workdir)
  if config.job == "quickstart":
    from mdrad_jax import quickstart

    return quickstart.run(config, workdir)
  if config.job == "study":
    from mdrad_jax import study

    return study.run(config, workdir)
  if config.job == "import_teacher":
    from mdrad_jax.importers import job as import_job

    return import_job.run(config, workdir)
  raise UserError(f"config.job = {config.job!r}: expected one of {JOBS}")
