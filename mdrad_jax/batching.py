"""Fixed-size batches for compiled batch functions: the batch size for n points, and padding with a mask.

Every evaluator (the attacks of ``mdrad_jax.evaluation``, AutoAttack's driver, the in-training evaluation)
runs its compiled function on batches of one size, so that it compiles once: the last, short batch is padded
with zero rows and a boolean ``mask`` marks the real ones (:func:`pad_rows`).  Results on padding rows are
masked out, and the real rows do not depend on them (every model here runs in evaluation mode, row by row).
"""

from __future__ import annotations

from typing import Mapping

import numpy as np


def check_batch_size(batch_size, batch_multiple) -> None:
  """``batch_size`` must be a positive int and a multiple of ``batch_multiple`` (the devices a batch is split
  over)."""
  if not isinstance(batch_size, int) or batch_size < 1:
    raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
  if not isinstance(batch_multiple, int) or batch_multiple < 1 or batch_size % batch_multiple:
    raise ValueError(f"batch_size ({batch_size}) must be a multiple of batch_multiple ({batch_multiple!r})")


def fixed_batch_size(n: int, batch_size: int, batch_multiple: int = 1) -> int:
  """The batch size for ``n`` points: ``batch_size``, or fewer points rounded up to a multiple of
  ``batch_multiple`` when they all fit in one batch (``batch_multiple`` for none)."""
  return min(batch_size, -(-n // batch_multiple) * batch_multiple) if n else batch_multiple


def pad_rows(arrays, size: int):
  """Pads each array of ``arrays`` (a dict or a sequence of host arrays with the same number n <= ``size`` of
  leading rows) with zero rows up to ``size``.

  Returns ``(padded, mask)``: the padded arrays in the same container (the arrays themselves when n = size)
  and ``mask``, bool [size], True on the n real rows.
  """
  values = list(arrays.values()) if isinstance(arrays, Mapping) else list(arrays)
  n = values[0].shape[0]
  if any(v.shape[0] != n for v in values):
    raise ValueError(f"arrays to pad have different numbers of rows: {[v.shape[0] for v in values]}")
  if n > size:
    raise ValueError(f"batch of {n} examples is larger than the batch size {size}")
  mask = np.arange(size) < n
  if n == size:
    return arrays, mask

  def pad(v):
    return np.concatenate([v, np.zeros((size - n, *v.shape[1:]), v.dtype)])

  if isinstance(arrays, Mapping):
    return {k: pad(v) for k, v in arrays.items()}, mask
  return type(arrays)(pad(v) for v in arrays), mask
