"""Preparation of every dataset into tfds ArrayRecord files, without TensorFlow.

Each dataset has a ``tfds.core.GeneratorBasedBuilder`` that reads the official source files (``sources.py``)
and yields PIL images, original JPEG/PNG bytes or numpy tensors: tfds 4.9 encodes these and writes ArrayRecord
shards plus ``dataset_info.json``/``features.json`` without importing TensorFlow (only encoding numpy *image*
arrays would need it). tfds writes into ``<version>.incomplete*`` and renames it at the end, so an interrupted
preparation never leaves a directory that looks complete.

Layout (the one ``tfds.builder_from_directory`` / ``tfds.data_source`` read)::

  <data_dir>/cifar10/3.0.2/            same name, version and features as tfds' own cifar10
  <data_dir>/cifar100/3.0.2/           same as tfds' cifar100 (label = fine label, plus coarse_label)
  <data_dir>/fashion_mnist/3.0.1/      same as tfds' fashion_mnist
  <data_dir>/tiny_imagenet/1.0.0/      splits train / validation
  <data_dir>/digits/1.0.0/             splits train / test (see sources.digits_split)
  <data_dir>/image_folder/<folder>_<hash of its path>/1.0.0/

A copy prepared by tfds' own builders in ArrayRecord format (``<data_dir>/cifar10/3.0.2/`` ...) is used as is.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import time
from collections.abc import Callable

import numpy as np
import PIL.Image
import tensorflow_datasets as tfds
from tensorflow_datasets.core import utils as tfds_utils

from mdrad_jax.data import sources
from mdrad_jax.errors import UserError

DATA_DIR_ENV = "MDRAD_DATA_DIR"
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
_VERSION_RE = re.compile(r"^\d+\.\d+\.\d+$")


def default_data_dir() -> str:
  return os.environ.get(DATA_DIR_ENV) or os.path.join(os.path.expanduser("~"), "tensorflow_datasets")


def manual_dir(data_dir: str) -> str:
  """Where the official archives are looked for by default (tfds' convention for manual downloads)."""
  return os.path.join(data_dir, "downloads", "manual")


# ---------------------------------------------------------------------------------------------
# Builders.
# ---------------------------------------------------------------------------------------------
class _SourceBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """A builder reading from ``source_dir`` (an argument, not a download)."""

  # Nothing is downloaded, so there is no checksums file next to the code. (tfds' lookup of that file
  # needs the optional ``importlib_resources`` package for builders defined inside a package.)
  @tfds_utils.classproperty
  @classmethod
  def code_path(cls):
    return None

  def __init__(self, *, source_dir: str | None, **kwargs):
    self._source_dir = source_dir
    self._setup()
    super().__init__(**kwargs)

  def _setup(self):
    """Reads what ``_info`` needs from the sources (runs before tfds builds the info)."""


def _info(builder, features: dict, description: str, homepage: str) -> tfds.core.DatasetInfo:
  return tfds.core.DatasetInfo(
    builder=builder,
    description=description,
    homepage=homepage,
    features=tfds.features.FeaturesDict(features),
    supervised_keys=("image", "label"),
  )


class _CifarBuilder(_SourceBuilder, skip_registration=True):
  VARIANT: sources.CifarVariant

  def _setup(self):
    self._data = sources.read_cifar(self.VARIANT, self._source_dir)

  def _info(self):
    features = {
      "id": tfds.features.Text(),
      "image": tfds.features.Image(shape=(32, 32, 3), encoding_format="png"),
      "label": tfds.features.ClassLabel(names=self._data.class_names),
    }
    if self._data.coarse_class_names is not None:
      features["coarse_label"] = tfds.features.ClassLabel(names=self._data.coarse_class_names)
    return _info(
      self,
      features,
      f"{self.VARIANT.dataset} from the official python tarball.",
      "https://www.cs.toronto.edu/~kriz/cifar.html",
    )

  def _split_generators(self, dl_manager):
    return {split: self._generate_examples(split) for split in self._data.images}

  def _generate_examples(self, split):
    d = self._data
    for i, (img, lab) in enumerate(zip(d.images[split], d.labels[split])):
      key = f"{split}_{i:05d}"
      ex = {"id": key, "image": PIL.Image.fromarray(img), "label": int(lab)}
      if d.coarse_labels is not None:
        ex["coarse_label"] = int(d.coarse_labels[split][i])
      yield key, ex


class Cifar10(_CifarBuilder, skip_registration=True):
  name = "cifar10"
  VERSION = tfds.core.Version("3.0.2")
  VARIANT = sources.CIFAR10


class Cifar100(_CifarBuilder, skip_registration=True):
  name = "cifar100"
  VERSION = tfds.core.Version("3.0.2")
  VARIANT = sources.CIFAR100


class FashionMnist(_SourceBuilder, skip_registration=True):
  name = "fashion_mnist"
  VERSION = tfds.core.Version("3.0.1")

  def _setup(self):
    self._arrays = {split: sources.read_fashion_mnist(self._source_dir, split) for split in ("train", "test")}

  def _info(self):
    return _info(
      self,
      {
        "image": tfds.features.Image(shape=(28, 28, 1), encoding_format="png"),
        "label": tfds.features.ClassLabel(names=sources.FASHION_MNIST_CLASSES),
      },
      "Fashion-MNIST from the official idx files.",
      "https://github.com/zalandoresearch/fashion-mnist",
    )

  def _split_generators(self, dl_manager):
    return {split: self._generate_examples(split) for split in self._arrays}

  def _generate_examples(self, split):
    images, labels = self._arrays[split]
    for i, (img, lab) in enumerate(zip(images, labels)):
      yield f"{split}_{i:05d}", {"image": PIL.Image.fromarray(img, mode="L"), "label": int(lab)}


class TinyImagenet(_SourceBuilder, skip_registration=True):
  """Tiny-ImageNet (200 classes, 64x64): train and the labelled val split (named 'validation')."""

  name = "tiny_imagenet"
  VERSION = tfds.core.Version("1.0.0")

  def _setup(self):
    self._reader = sources.TinyImageNetReader(self._source_dir)

  def _info(self):
    # Original JPEG bytes are stored as is; converted (e.g. grayscale) images are stored as PNG. Decoding
    # detects the format from the bytes.
    return _info(
      self,
      {
        "id": tfds.features.Text(),
        "image": tfds.features.Image(shape=(64, 64, 3), encoding_format="png"),
        "label": tfds.features.ClassLabel(names=self._reader.wnids),
      },
      "Tiny-ImageNet from the official zip; val is the test split.",
      "https://cs231n.stanford.edu/",
    )

  def _split_generators(self, dl_manager):
    return {split: self._generate_examples(split) for split in ("train", "validation")}

  def _generate_examples(self, split):
    for rel, image, label in self._reader.examples(split):
      yield rel, {"id": rel, "image": image, "label": label}


class Digits(_SourceBuilder, skip_registration=True):
  """scikit-learn's 8x8 digits, float32 in [0, 1] (values / 16), fixed stratified split."""

  name = "digits"
  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return _info(
      self,
      {
        "id": tfds.features.Text(),
        "image": tfds.features.Tensor(shape=(8, 8, 1), dtype=np.float32),
        "label": tfds.features.ClassLabel(names=[str(i) for i in range(10)]),
      },
      "sklearn.datasets.load_digits; every 5th example of each class is in 'test'.",
      "https://scikit-learn.org/stable/datasets/toy_dataset.html",
    )

  def _split_generators(self, dl_manager):
    images, labels = sources.read_digits()
    split = sources.digits_split(labels)
    return {name: self._generate_examples(images, labels, idx) for name, idx in split.items()}

  def _generate_examples(self, images, labels, idx):
    for i in idx:
      key = f"digits_{int(i):04d}"
      yield key, {"id": key, "image": images[i], "label": int(labels[i])}


class ImageFolder(_SourceBuilder, skip_registration=True):
  """``root/<split>/<class>/<image>`` (a folder or an archive); one builder config per source path."""

  name = "image_folder"
  VERSION = tfds.core.Version("1.0.0")

  def _setup(self):
    self._index = sources.index_image_folder(self._source_dir)

  def _info(self):
    return _info(
      self,
      {
        "id": tfds.features.Text(),
        "image": tfds.features.Image(shape=self._index.image_shape, encoding_format="png"),
        "label": tfds.features.ClassLabel(names=self._index.class_names),
      },
      f"Image folder {self._index.path}.",
      "",
    )

  def _split_generators(self, dl_manager):
    return {split: self._generate_examples(split) for split in sorted(self._index.files)}

  def _generate_examples(self, split):
    for rel, image, label in sources.image_folder_examples(self._index, split):
      yield rel, {"id": rel, "image": image, "label": label}


# ---------------------------------------------------------------------------------------------
# Registry.
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class DatasetSpec:
  builder: type[_SourceBuilder]
  train_split: str
  test_split: str
  default_source: Callable[[str], str | None]  # data_dir -> default source_dir
  source_hint: str


DATASETS: dict[str, DatasetSpec] = {
  "cifar10": DatasetSpec(Cifar10, "train", "test", manual_dir, f"cifar-10-python.tar.gz from {sources.CIFAR10_URL}"),
  "cifar100": DatasetSpec(
    Cifar100, "train", "test", manual_dir, f"cifar-100-python.tar.gz from {sources.CIFAR100_URL}"
  ),
  "tiny_imagenet": DatasetSpec(
    TinyImagenet, "train", "validation", manual_dir, f"tiny-imagenet-200.zip from {sources.TINY_IMAGENET_URL}"
  ),
  "fashion_mnist": DatasetSpec(
    FashionMnist,
    "train",
    "test",
    lambda _: FASHION_MNIST_DIR,
    f"the idx .gz files (Debian dataset-fashion-mnist or {sources.FASHION_MNIST_URL})",
  ),
  "digits": DatasetSpec(Digits, "train", "test", lambda _: None, "nothing (embedded in scikit-learn)"),
  "image_folder": DatasetSpec(
    ImageFolder, "train", "test", lambda _: None, "a folder or .tar/.tar.gz/.zip archive of <split>/<class>/<image>"
  ),
}


def get_spec(name: str) -> DatasetSpec:
  if name not in DATASETS:
    raise UserError(f"data.name: unknown dataset {name!r}; expected one of {sorted(DATASETS)}")
  return DATASETS[name]


def resolve_dirs(name: str, data_dir: str | None, source_dir: str | None) -> tuple[str, str | None]:
  """``(data_dir, source_dir)`` with the defaults filled in (absolute paths)."""
  spec = get_spec(name)
  data_dir = os.path.abspath(os.path.expanduser(data_dir or default_data_dir()))
  source_dir = source_dir or spec.default_source(data_dir)
  if name == "image_folder" and not source_dir:
    raise UserError(
      "image_folder: source_dir is required (a folder or .tar/.tar.gz/.zip archive with <split>/<class>/<image> files)"
    )
  if source_dir:
    source_dir = os.path.abspath(os.path.expanduser(source_dir))
  return data_dir, source_dir


def image_folder_config_name(source_dir: str) -> str:
  """``<folder name>_<10 hex digits of the path's sha256>``: one prepared copy per source path."""
  path = os.path.abspath(os.path.expanduser(source_dir)).rstrip(os.sep)
  base = os.path.basename(path)
  for ext in (".tar.gz", ".tgz", ".tar", ".zip"):
    if base.endswith(ext):
      base = base[: -len(ext)]
  base = re.sub(r"[^a-z0-9_]+", "_", base.lower()).strip("_") or "folder"
  return f"{base}_{hashlib.sha256(path.encode()).hexdigest()[:10]}"


def dataset_root(name: str, data_dir: str, source_dir: str | None) -> str:
  """The folder holding the version directories of ``name``."""
  if name == "image_folder":
    return os.path.join(data_dir, "image_folder", image_folder_config_name(source_dir))
  return os.path.join(data_dir, name)


def _version_key(v: str) -> tuple[int, ...]:
  return tuple(int(x) for x in v.split("."))


def find_prepared(name: str, data_dir: str, source_dir: str | None) -> str | None:
  """The prepared directory of ``name`` (this package's version first, else the newest other version)."""
  root = dataset_root(name, data_dir, source_dir)
  if not os.path.isdir(root):
    return None
  ours = str(get_spec(name).builder.VERSION)
  versions = sorted((v for v in os.listdir(root) if _VERSION_RE.match(v)), key=_version_key, reverse=True)
  versions.sort(key=lambda v: v != ours)  # stable: ours first, then newest first
  for v in versions:
    path = os.path.join(root, v)
    if os.path.isfile(os.path.join(path, "dataset_info.json")):
      _check_array_record(path)
      check_prepared(path)
      if name == "image_folder":
        _check_fresh(path, source_dir)
      return path
  return None


# The feature classes this package's builders write (and tfds' own builders of the same datasets).  tfds
# imports the module of every ``pythonClassName`` in features.json, so a spec naming anything else is refused
# before tfds reads it.
ALLOWED_FEATURES = frozenset(
  f"{c.__module__}.{c.__name__}"
  for c in (
    tfds.features.FeaturesDict,
    tfds.features.Image,
    tfds.features.ClassLabel,
    tfds.features.Text,
    tfds.features.Tensor,
  )
)
FINGERPRINT_FILE = "source_fingerprint.json"
_checked: dict[str, tuple] = {}


def _class_names(node, where: str):
  if isinstance(node, dict):
    for k, v in node.items():
      if k == "pythonClassName" and v not in ALLOWED_FEATURES:
        raise UserError(
          f"{where}: feature class {v!r} is not one this package writes "
          f"({', '.join(sorted(c.rsplit('.', 1)[1] for c in ALLOWED_FEATURES))}); refusing to "
          f"load it (tfds would import its module)"
        )
      _class_names(v, where)
  elif isinstance(node, list):
    for v in node:
      _class_names(v, where)


def check_prepared(path: str) -> None:
  """Checks a prepared directory before tfds opens it: ``dataset_info.json`` and ``features.json`` are valid
  JSON, the feature spec names only known feature classes with an ``image`` and a ``label``, and every
  ArrayRecord shard listed is there, complete and holds the records listed.  Each error names the file."""
  from array_record.python.array_record_module import ArrayRecordReader
  from mdrad_jax.workdir import read_json

  files = sorted(os.listdir(path))
  stamp = tuple((f, os.stat(os.path.join(path, f)).st_size, os.stat(os.path.join(path, f)).st_mtime_ns) for f in files)
  if _checked.get(path) == stamp:
    return
  info_path = os.path.join(path, "dataset_info.json")
  info = read_json(info_path, "dataset info")
  feat_path = os.path.join(path, "features.json")
  if not os.path.isfile(feat_path):
    raise UserError(f"{feat_path}: missing (a prepared dataset has its feature spec there); prepare again")
  spec = read_json(feat_path, "feature spec")
  _class_names(spec, feat_path)
  features = spec.get("featuresDict", {}).get("features", {}) if isinstance(spec, dict) else {}
  if not isinstance(features, dict) or "image" not in features or "label" not in features:
    raise UserError(
      f"{feat_path}: expected features 'image' and 'label', found "
      f"{sorted(features) if isinstance(features, dict) else features!r}"
    )
  if not isinstance(info, dict) or not isinstance(info.get("splits"), list):
    raise UserError(f"{info_path}: no list of splits")
  for split in info["splits"]:
    template = split.get("filepathTemplate", "{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}")
    lengths = [int(n) for n in split.get("shardLengths", [])]
    for i, expected in enumerate(lengths):
      fname = template.format(
        DATASET=info.get("name"),
        SPLIT=split.get("name"),
        FILEFORMAT="array_record",
        SHARD_X_OF_Y=f"{i:05d}-of-{len(lengths):05d}",
      )
      shard = os.path.join(path, fname)
      if not os.path.isfile(shard):
        raise UserError(f"{shard}: missing (listed in {info_path}); prepare the dataset again")
      try:
        reader = ArrayRecordReader(shard)
      except RuntimeError as e:  # what array_record raises for a file it cannot parse
        raise UserError(
          f"{shard}: truncated or corrupt ArrayRecord file ({' '.join(str(e).split())[:160]}); "
          f"prepare the dataset again"
        ) from None
      try:
        if not reader.ok() or reader.num_records() != expected:
          got = f"{reader.num_records()} records" if reader.ok() else "an unreadable index"
          raise UserError(
            f"{shard}: truncated or corrupt ArrayRecord file ({got}, {info_path} lists "
            f"{expected} records); prepare the dataset again"
          )
      finally:
        try:
          reader.close()
        except RuntimeError:  # closing a reader of a broken file reports the damage again
          pass
  _checked[path] = stamp


def _check_fresh(path: str, source_dir: str) -> None:
  """An image-folder copy is refused once its source changed after preparation (files added, removed or
  modified)."""
  from mdrad_jax.workdir import read_json

  stamp_path = os.path.join(path, FINGERPRINT_FILE)
  if not os.path.isfile(stamp_path):
    return  # prepared before fingerprints were recorded
  recorded = read_json(stamp_path, "source fingerprint")
  if not isinstance(recorded, dict) or recorded.get("fingerprint") != sources.source_fingerprint(source_dir):
    raise UserError(
      f"image_folder: the prepared copy {path} is stale: {source_dir} changed after it was "
      f"prepared; delete {os.path.dirname(path)} to prepare it again"
    )


def _record_fingerprint(path: str, source_dir: str, fingerprint: str) -> None:
  import json

  tmp = os.path.join(path, FINGERPRINT_FILE + ".tmp")
  with open(tmp, "w") as f:
    json.dump({"source": source_dir, "fingerprint": fingerprint}, f)
  os.replace(tmp, os.path.join(path, FINGERPRINT_FILE))


def _check_array_record(path: str):
  files = os.listdir(path)
  if not any(".array_record" in f for f in files):
    formats = sorted({fmt for f in files for fmt in ("tfrecord", "riegeli", "parquet") if f".{fmt}" in f})
    raise UserError(
      f"{path}: prepared dataset has no ArrayRecord files (found {formats or 'none'}); the loader reads "
      "ArrayRecord only. Move that copy away, or point data_dir elsewhere, and prepare again."
    )


def prepare(name: str, *, data_dir: str | None = None, source_dir: str | None = None, verbose: bool = True) -> str:
  """Returns the prepared directory of ``name``, preparing it from the source files when absent."""
  data_dir, source_dir = resolve_dirs(name, data_dir, source_dir)
  found = find_prepared(name, data_dir, source_dir)
  if found:
    return found
  spec = get_spec(name)
  kwargs = dict(data_dir=data_dir, source_dir=source_dir, file_format="array_record")
  if name == "image_folder":
    kwargs["config"] = tfds.core.BuilderConfig(
      name=image_folder_config_name(source_dir), description=f"image folder {source_dir}"
    )
  if verbose:
    print(
      f"[mdrad_jax.data] preparing {name} (one-time) from {source_dir or spec.source_hint} "
      f"into {dataset_root(name, data_dir, source_dir)} ...",
      flush=True,
    )
  start = time.time()
  fingerprint = sources.source_fingerprint(source_dir) if name == "image_folder" else None
  builder = spec.builder(**kwargs)
  config = tfds.download.DownloadConfig(try_download_gcs=False)
  if not verbose:
    tfds.disable_progress_bar()
  try:
    builder.download_and_prepare(download_config=config)
  except Exception:
    # Another process may have finished the same preparation first (its rename wins); use its result.
    found = find_prepared(name, data_dir, source_dir)
    if found:
      return found
    raise
  path = os.fspath(builder.data_dir)
  if fingerprint is not None:
    _record_fingerprint(path, source_dir, fingerprint)
  if verbose:
    sizes = ", ".join(f"{k}={v.num_examples}" for k, v in sorted(builder.info.splits.items()))
    print(f"[mdrad_jax.data] prepared {name}: {sizes} in {time.time() - start:.1f}s -> {path}", flush=True)
  return path
