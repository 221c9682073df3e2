"""Input pipeline: tfds ArrayRecord data sources, batched, shuffled and augmented on the host by grain.

``create_loader`` returns a grain dataset (``grain.IterDataset``): iterate it directly, or take
``it = iter(loader)``, a ``grain.DatasetIterator`` that a training loop saves and restores with
``grain.checkpoint.CheckpointSave`` / ``CheckpointRestore`` inside an orbax ``CheckpointManager``
(``ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it))``), so a run resumes with exactly the batches
that would have come next, mid-epoch included.

The pipeline shuffles and batches record *indices* (``grain.MapDataset.range(n).shuffle().repeat().batch()``)
and then reads each batch with one ``__getitems__`` call on the tfds data source. Reading records one at a
time (as ``grain.DataLoader`` does) pays ArrayRecord's per-call overhead on every example, several times slower
per batch on the CIFAR-10 JPEG copy.

Batches are ``dict(image=float32 [b, H, W, C] in [0, 1], label=int32 [b])`` where ``b`` is the per-process
batch. uint8 pixels become ``pixel / 255`` (float32 division); digits are stored as float32 already.
"""

from __future__ import annotations

import dataclasses
import os

import grain
import numpy as np
from absl import flags
import tensorflow_datasets as tfds

from mdrad_jax.data import builders
from mdrad_jax.errors import UserError

AUGMENTATIONS = ("none", "crop", "flip", "crop_flip")


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  name: str
  num_classes: int
  image_shape: tuple[int, int, int]  # (H, W, C)
  split_sizes: dict[str, int]  # e.g. {'train': 50000, 'test': 10000}
  train_split: str
  test_split: str
  class_names: tuple[str, ...] = ()
  data_path: str = ""  # the prepared ArrayRecord directory


def data_kwargs(config) -> dict:
  """Where a job's ``config.data`` says the dataset lies: the ``data_dir`` and ``source_dir`` keywords of
  :func:`dataset_info`, :func:`create_loader` and :func:`load_arrays` ('' = the default, None)."""
  d = config.data
  return dict(data_dir=d.data_dir or None, source_dir=d.source_dir or None)


# ---------------------------------------------------------------------------------------------
# Prepared datasets.
# ---------------------------------------------------------------------------------------------
def _open(name: str, data_dir, source_dir):
  """``(path, tfds read-only builder)`` of the prepared dataset, preparing it first if needed."""
  path = builders.prepare(name, data_dir=data_dir, source_dir=source_dir)
  builder = tfds.builder_from_directory(path)
  features = builder.info.features
  if "image" not in features or "label" not in features:
    raise UserError(f"{path}: expected features 'image' and 'label', found {sorted(features.keys())}")
  shape = tuple(features["image"].shape)
  if len(shape) != 3 or any(d is None for d in shape):
    raise UserError(f"{path}: feature 'image' must have a fixed (H, W, C) shape, got {shape}")
  if not hasattr(features["label"], "num_classes"):
    raise UserError(f"{path}: feature 'label' must be a ClassLabel, got {type(features['label']).__name__}")
  return path, builder


def _splits(name: str, builder) -> tuple[str, str]:
  splits = set(builder.info.splits.keys())
  if name != "image_folder":
    spec = builders.get_spec(name)
    return spec.train_split, spec.test_split
  if "train" not in splits:
    raise UserError(f"image_folder: expected a 'train' split folder, found {sorted(splits)}")
  for test in ("test", "val", "validation"):
    if test in splits:
      return "train", test
  raise UserError(
    f"image_folder: expected a 'test' (or 'val'/'validation') split folder next to 'train', found {sorted(splits)}"
  )


def dataset_info(name: str, *, data_dir=None, source_dir=None) -> DatasetInfo:
  """Shape, classes and split sizes of a dataset (prepared first if needed)."""
  path, builder = _open(name, data_dir, source_dir)
  features = builder.info.features
  train_split, test_split = _splits(name, builder)
  return DatasetInfo(
    name=name,
    num_classes=int(features["label"].num_classes),
    image_shape=tuple(int(d) for d in features["image"].shape),
    split_sizes={k: int(v.num_examples) for k, v in builder.info.splits.items()},
    train_split=train_split,
    test_split=test_split,
    class_names=tuple(features["label"].names),
    data_path=os.fspath(path),
  )


def _split_spec(name: str, builder, split: str, num_examples: int | None) -> str:
  available = sorted(builder.info.splits.keys())
  if split not in available:
    raise UserError(f"{name}: unknown split {split!r}; available splits: {available}")
  if num_examples is None:
    return split
  if not isinstance(num_examples, (int, np.integer)) or num_examples <= 0:
    raise UserError(f"num_examples must be a positive integer or None, got {num_examples!r}")
  return f"{split}[:{int(num_examples)}]"


# ---------------------------------------------------------------------------------------------
# Batching and augmentation (host-side numpy, on whole batches).
# ---------------------------------------------------------------------------------------------
def crop_flip(images: np.ndarray, offset_y, offset_x, flip, padding: int) -> np.ndarray:
  """Zero-pads each image of ``images`` [B, H, W, C] by ``padding`` on every side, takes the H x W window
  whose top-left corner is (offset_y[i], offset_x[i]) in the padded image (offsets in [0, 2 * padding]) and
  mirrors it left-right where ``flip[i]``. Offsets of ``padding`` and no flip return the image unchanged."""
  b, h, w, c = images.shape
  offset_y, offset_x = np.asarray(offset_y).reshape(b), np.asarray(offset_x).reshape(b)
  flip = np.asarray(flip, dtype=bool).reshape(b)
  for name, off in (("offset_y", offset_y), ("offset_x", offset_x)):
    if b and (off.min() < 0 or off.max() > 2 * padding):
      raise UserError(f"crop_flip: {name} must lie in [0, {2 * padding}], got [{off.min()}, {off.max()}]")
  padded = np.zeros((b, h + 2 * padding, w + 2 * padding, c), images.dtype)
  padded[:, padding : padding + h, padding : padding + w] = images
  out = np.empty_like(images)
  for i in range(b):
    window = padded[i, offset_y[i] : offset_y[i] + h, offset_x[i] : offset_x[i] + w]
    out[i] = window[:, ::-1] if flip[i] else window
  return out


class RandomCropFlip(grain.transforms.RandomMap):
  """torchvision's RandomCrop(size, padding) and/or RandomHorizontalFlip() for every image of a batch.

  Applied to whole batches (grain gives each batch its own seeded generator; the draws are independent per
  image): a per-image random transform in grain costs far more than the crop itself.
  """

  def __init__(self, padding: int, crop: bool = True, flip: bool = True):
    self.padding = int(padding) if crop else 0
    self.crop = bool(crop)
    self.flip = bool(flip)

  def draw(self, batch_size: int, rng: np.random.Generator):
    """``(offset_y, offset_x, flip)`` for a batch: offsets uniform in [0, 2p], flip with probability 1/2."""
    p = self.padding
    if self.crop:
      oy = rng.integers(0, 2 * p + 1, size=batch_size)
      ox = rng.integers(0, 2 * p + 1, size=batch_size)
    else:
      oy = ox = np.full((batch_size,), p)
    flip = rng.integers(0, 2, size=batch_size).astype(bool) if self.flip else np.zeros((batch_size,), bool)
    return oy, ox, flip

  def random_map(self, batch, rng: np.random.Generator):
    images = batch["image"]
    oy, ox, flip = self.draw(images.shape[0], rng)
    return {**batch, "image": crop_flip(images, oy, ox, flip, self.padding)}


class ReadBatch(grain.transforms.Map):
  """A batch of record indices -> the stacked images and labels, read with one batched data-source call."""

  def __init__(self, source):
    self.source = source

  def map(self, indices):
    return stack_image_label(self.source.__getitems__([int(i) for i in indices]))


def stack_image_label(examples) -> dict:
  """Stacks the image and label of tfds examples (other features are dropped)."""
  return {
    "image": np.stack([ex["image"] for ex in examples]),
    "label": np.asarray([ex["label"] for ex in examples], dtype=np.int32),
  }


class ToFloat(grain.transforms.Map):
  """uint8 pixels -> float32 ``pixel / 255`` in [0, 1]; float32 pixels pass through; labels int32."""

  def map(self, batch):
    image = batch["image"]
    if image.dtype == np.uint8:
      image = image.astype(np.float32) / np.float32(255.0)
    else:
      image = image.astype(np.float32, copy=False)
    return {"image": image, "label": batch["label"].astype(np.int32, copy=False)}


# ---------------------------------------------------------------------------------------------
# Loaders.
# ---------------------------------------------------------------------------------------------
def _process(process_index, process_count) -> tuple[int, int]:
  if process_index is None or process_count is None:
    import jax

    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if process_count < 1 or not 0 <= process_index < process_count:
    raise UserError(f"process_index must lie in [0, process_count={process_count}), got {process_index}")
  return int(process_index), int(process_count)


def create_loader(
  name: str,
  split: str,
  *,
  batch_size: int,
  train: bool,
  seed: int,
  data_dir=None,
  source_dir=None,
  augment: str = "crop_flip",
  crop_padding: int = 4,
  num_epochs: int | None = None,
  num_examples: int | None = None,
  drop_remainder: bool = True,
  shuffle: bool | None = None,
  process_index: int | None = None,
  process_count: int | None = None,
  worker_count: int = 0,
  read_threads: int | None = None,
) -> grain.IterDataset:
  """Batches of one split of a prepared dataset (prepared first if needed), as a grain ``IterDataset``.

  Args:
    batch_size: the GLOBAL batch; each process yields ``batch_size // process_count`` examples per batch.
    train: training mode: shuffle by default, augment with ``augment``, repeat forever unless ``num_epochs``.
      Evaluation mode (``train=False``): no shuffle by default, no augmentation, one epoch by default.
    seed: seeds the per-epoch shuffle and the per-example augmentation (32-bit non-negative int).
    augment: 'none' | 'crop' | 'flip' | 'crop_flip' (zero-padded random crop and/or horizontal flip).
    crop_padding: zero padding on each side before the random crop.
    num_epochs: epochs to iterate; None = forever when training, 1 when evaluating.
    num_examples: use only the first N examples of the split (in stored order; tfds stores a fixed
      pseudo-random permutation, so this is a class-mixed subset).
    drop_remainder: drop the last partial batch (keep it with False, e.g. for evaluation).
    shuffle: override the default (``train``).
    process_index, process_count: this process's shard of the split (default: jax.process_index() and
      jax.process_count()). Shards are contiguous parts of the split (``tfds.split_for_jax_process``):
      equal in size when training (at most process_count - 1 examples are dropped), and covering the whole
      split when evaluating (sizes then differ by at most one).
    worker_count: grain worker processes, each reading and augmenting whole batches (0 = in the calling
      process). The batches and their order do not depend on it.
    read_threads: threads reading, decoding and augmenting whole batches ahead of use in each process
      (0 = on demand; None = min(4, CPU count // 2), at least 1); up to 2 * read_threads batches are buffered.

  The iterator's state (``iter(loader)``, saved by ``grain.checkpoint.CheckpointSave``) restores only into a
  loader created with the same arguments.
  """
  if augment not in AUGMENTATIONS:
    raise UserError(f"data.augment must be one of {AUGMENTATIONS}, got {augment!r}")
  if not isinstance(crop_padding, (int, np.integer)) or crop_padding < 0:
    raise UserError(f"data.crop_padding must be a non-negative integer, got {crop_padding!r}")
  if not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2**32:
    raise UserError(f"seed must be an integer in [0, 2**32), got {seed!r}")
  if num_epochs is not None and num_epochs < 1:
    raise UserError(f"num_epochs must be >= 1 or None, got {num_epochs!r}")
  process_index, process_count = _process(process_index, process_count)
  if batch_size < 1 or batch_size % process_count:
    raise UserError(f"batch_size must be a positive multiple of process_count={process_count}, got {batch_size}")
  local_batch = batch_size // process_count

  path, builder = _open(name, data_dir, source_dir)
  spec = _split_spec(name, builder, split, num_examples)
  shard = tfds.split_for_jax_process(
    spec, process_index=process_index, process_count=process_count, drop_remainder=train
  )
  source = builder.as_data_source(split=shard)
  if len(source) == 0:
    raise UserError(f"{name}: split {spec!r} has no example for process {process_index} of {process_count}")

  shuffle = train if shuffle is None else bool(shuffle)
  if num_epochs is None and not train:
    num_epochs = 1
  ds = grain.MapDataset.range(len(source))
  if shuffle:
    ds = ds.shuffle(seed=int(seed))  # a new permutation every epoch
  ds = ds.repeat(num_epochs).batch(local_batch, drop_remainder=drop_remainder)
  ds = ds.map(ReadBatch(source))
  if train and augment != "none":
    ds = ds.random_map(
      RandomCropFlip(crop_padding, crop=augment in ("crop", "crop_flip"), flip=augment in ("flip", "crop_flip")),
      seed=int(seed),
    )
  ds = ds.map(ToFloat())
  if read_threads is None:
    read_threads = max(1, min(4, (os.cpu_count() or 2) // 2))
  loader = ds.to_iter_dataset(
    grain.ReadOptions(num_threads=int(read_threads), prefetch_buffer_size=2 * int(read_threads))
  )
  if worker_count:
    if not flags.FLAGS.is_parsed():
      # grain's worker processes read grain's absl flags; outside an absl app they keep their defaults.
      flags.FLAGS.mark_as_parsed()
    loader = loader.mp_prefetch(grain.MultiprocessingOptions(num_workers=int(worker_count)))
  return loader


def load_arrays(
  name: str, split: str, *, data_dir=None, source_dir=None, num_examples: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
  """The whole split (or its first ``num_examples``) in memory: (float32 [N, H, W, C] in [0, 1], int32 [N])."""
  path, builder = _open(name, data_dir, source_dir)
  source = builder.as_data_source(split=_split_spec(name, builder, split, num_examples))
  n = len(source)
  shape = tuple(builder.info.features["image"].shape)
  images = np.empty((n, *shape), np.float32)
  labels = np.empty((n,), np.int32)
  chunk = 1024
  for start in range(0, n, chunk):
    items = source.__getitems__(list(range(start, min(n, start + chunk))))
    batch = ToFloat().map(stack_image_label(items))
    images[start : start + len(items)] = batch["image"]
    labels[start : start + len(items)] = batch["label"]
  return images, labels
