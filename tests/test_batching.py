"""The one pad-and-mask helper of every evaluator, and the batch-size rule."""

import numpy as np
import pytest

from mdrad_jax import batching, evaluation


def test_pad_rows_pads_with_zero_rows_and_masks_them():
  x = np.arange(12, dtype=np.float32).reshape(3, 2, 2)
  y = np.array([4, 5, 6], np.int32)
  (xp, yp), mask = batching.pad_rows((x, y), 5)
  assert xp.shape == (5, 2, 2) and yp.dtype == np.int32 and mask.tolist() == [True] * 3 + [False] * 2
  np.testing.assert_array_equal(xp[:3], x)
  assert not xp[3:].any() and not yp[3:].any()
  same, mask = batching.pad_rows({"image": x, "label": y}, 3)
  assert same["image"] is x and mask.all()
  empty, mask = batching.pad_rows({"image": x[:0], "label": y[:0]}, 2)  # an all-padding batch
  assert list(empty) == ["image", "label"] and empty["image"].shape == (2, 2, 2) and not mask.any()
  with pytest.raises(ValueError, match="larger than the batch size"):
    batching.pad_rows((x, y), 2)
  with pytest.raises(ValueError, match="different numbers of rows"):
    batching.pad_rows((x, y[:2]), 4)


def test_pad_batch_adds_the_mask():
  b = evaluation.pad_batch({"image": np.ones((2, 3), np.float32), "label": np.ones((2,), np.int32)}, 4)
  assert list(b) == ["image", "label", "mask"] and b["mask"].tolist() == [True, True, False, False]
  assert b["image"][2:].sum() == 0


def test_batch_size_rule():
  assert batching.fixed_batch_size(1000, 256) == 256
  assert batching.fixed_batch_size(10, 256, 4) == 12  # one batch, rounded up to the devices
  assert batching.fixed_batch_size(0, 256, 4) == 4
  batching.check_batch_size(8, 4)
  with pytest.raises(ValueError, match="multiple of batch_multiple"):
    batching.check_batch_size(6, 4)
  with pytest.raises(ValueError, match="positive int"):
    batching.check_batch_size(0, 1)
