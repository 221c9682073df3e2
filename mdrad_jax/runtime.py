"""Job dispatch and process-level set-up for ``main.py``."""
from __future__ import annotations

import os

# Errors caused by the user's input (bad config value, missing file...): main.py prints them on one line
# and exits non-zero instead of showing a traceback.
USER_ERRORS = (ValueError, OSError, KeyError)

JOBS = ("train", "evaluate", "quickstart")


def configure_xla() -> None:
  """XLA flags the library sets by default, before JAX initialises; a user's own XLA_FLAGS win."""
  from mdrad_jax import xla_flags
  xla_flags.apply_defaults()


def run(config, workdir: str):
  if config.job == "train":
    from mdrad_jax import train
    return train.train_and_evaluate(config, workdir)
  if config.job == "evaluate":
    from mdrad_jax import evaluation_job
    return evaluation_job.run(config, workdir)
  if config.job == "quickstart":
    from mdrad_jax import quickstart
    return quickstart.run(config, workdir)
  raise ValueError(f"config.job must be one of {JOBS}, got {config.job!r}")
