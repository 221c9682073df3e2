"""Progress bars, log lines and the ``metrics.jsonl`` writer (all only on process 0)."""

from __future__ import annotations

import json
import os
import sys
import time

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


class MetricsWriter:
  """Appends one JSON object per call to a ``.jsonl`` file (process 0 only)."""

  def __init__(self, path: str):
    self.path = path
    self._f = open(path, "a") if is_main_process() else None

  def write(self, **record) -> None:
    if self._f is None:
      return
    record.setdefault("time", time.time())
    self._f.write(json.dumps(record, sort_keys=True, default=float) + "\n")
    self._f.flush()

  def close(self) -> None:
    if self._f is not None:
      self._f.close()
      self._f = None
