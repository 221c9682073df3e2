"""Progress bars and log lines (both only on process 0); a run's metrics are written by :mod:`mdrad_jax.metric_writers`."""

from __future__ import annotations

import os
import sys

import jax
from tqdm.auto import tqdm


def is_main_process() -> bool:
  return jax.process_index() == 0


def progress_enabled() -> bool:
  return is_main_process() and os.environ.get("MDRAD_PROGRESS", "1") != "0"


def progress_bar(total: int, *, initial: int = 0, desc: str = "", unit: str = "step"):
  """A tqdm bar on process 0 (set ``MDRAD_PROGRESS=0`` to silence it); a no-op bar elsewhere."""
  return tqdm(
    total=total,
    initial=initial,
    desc=desc,
    unit=unit,
    disable=not progress_enabled(),
    dynamic_ncols=True,
    mininterval=1.0 if sys.stderr.isatty() else 10.0,
    file=sys.stderr,
  )


def log(msg: str) -> None:
  if is_main_process():
    tqdm.write(msg, file=sys.stderr)
