"""Readers for the official distribution formats of every supported dataset.

Each reader turns the files exactly as their publishers distribute them into ``(key, image, label)`` examples
(plus class names), without TensorFlow:

* CIFAR-10 / CIFAR-100: the python tarballs (pickled dicts with ``b'data'`` uint8 ``[N, 3072]`` channel-major
  rows and ``b'labels'`` / ``b'fine_labels'``), or their extracted folders.
* Tiny-ImageNet: ``tiny-imagenet-200.zip`` (or its extracted folder); the labelled ``val`` split is the test set.
* Fashion-MNIST: the four idx ``.gz`` files.
* An image folder ``root/<split>/<class>/<image>`` given as a directory or a ``.tar[.gz]`` / ``.zip`` archive.
* scikit-learn's embedded 8x8 digits, with a fixed stratified split (see ``digits_split``).

Images come out as uint8 ``[H, W, C]`` arrays, or as the original encoded bytes of a JPEG/PNG file when those
bytes already decode to the expected size and mode (so that no pixel is ever re-compressed).
"""

from __future__ import annotations

import dataclasses
import gzip
import io
import os
import pickle
import tarfile
import zipfile
from collections.abc import Iterator
from typing import Any

import numpy as np
import PIL.Image

from mdrad_jax.errors import MissingFileError

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR100_URL = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"
TINY_IMAGENET_URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
FASHION_MNIST_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".ppm", ".pgm", ".tif", ".tiff", ".webp")
_GRAY_MODES = ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F")


class SourceError(MissingFileError):
  """A source file is missing or is not in the official format (a ``UserError`` and a ``FileNotFoundError``)."""


# ---------------------------------------------------------------------------------------------
# Archives: a tarball, a zip file or an extracted directory, read the same way.
# ---------------------------------------------------------------------------------------------
def _is_tar(path: str) -> bool:
  return path.endswith((".tar", ".tar.gz", ".tgz"))


def _tar_name(member: tarfile.TarInfo) -> str:
  return member.name[2:] if member.name.startswith("./") else member.name


def iter_archive(path: str) -> Iterator[tuple[str, bytes]]:
  """Yields ``(relative posix path, bytes)`` for every regular file of a tar/zip archive or a directory."""
  if os.path.isdir(path):
    for dirpath, dirnames, filenames in os.walk(path):
      dirnames.sort()
      for fname in sorted(filenames):
        full = os.path.join(dirpath, fname)
        rel = os.path.relpath(full, path).replace(os.sep, "/")
        with open(full, "rb") as f:
          yield rel, f.read()
  elif _is_tar(path):
    with tarfile.open(path, "r:*") as tar:
      for member in tar:
        if member.isfile():
          f = tar.extractfile(member)
          yield _tar_name(member), f.read()
  elif path.endswith(".zip"):
    with zipfile.ZipFile(path) as zf:
      for info in zf.infolist():
        if not info.is_dir():
          yield info.filename, zf.read(info)
  else:
    raise SourceError(f"{path}: expected a directory, a .tar/.tar.gz/.tgz or a .zip archive")


def list_archive(path: str) -> list[str]:
  """Relative paths of the regular files of a directory or archive (no file is decompressed for zip/dirs)."""
  if os.path.isdir(path):
    out = []
    for dirpath, dirnames, filenames in os.walk(path):
      dirnames.sort()
      for fname in sorted(filenames):
        out.append(os.path.relpath(os.path.join(dirpath, fname), path).replace(os.sep, "/"))
    return out
  if _is_tar(path):
    with tarfile.open(path, "r:*") as tar:
      return [_tar_name(m) for m in tar.getmembers() if m.isfile()]
  if path.endswith(".zip"):
    with zipfile.ZipFile(path) as zf:
      return [i.filename for i in zf.infolist() if not i.is_dir()]
  raise SourceError(f"{path}: expected a directory, a .tar/.tar.gz/.tgz or a .zip archive")


def _find_source(source_dir: str, *, dataset: str, archive: str, extracted: str, url: str) -> str:
  """The official archive (or its extracted folder) inside ``source_dir``; ``source_dir`` may be the archive."""
  source_dir = os.path.expanduser(source_dir)
  if os.path.isfile(source_dir) and os.path.basename(source_dir) == archive:
    return source_dir
  if os.path.basename(os.path.normpath(source_dir)) == extracted and os.path.isdir(source_dir):
    return source_dir
  for candidate in (os.path.join(source_dir, archive), os.path.join(source_dir, extracted)):
    if os.path.exists(candidate):
      return candidate
  raise SourceError(
    f"{dataset}: source file not found: expected {os.path.join(source_dir, archive)} (or the extracted folder "
    f"{os.path.join(source_dir, extracted)}/); download it from {url} and pass its folder as source_dir"
  )


# ---------------------------------------------------------------------------------------------
# CIFAR-10 / CIFAR-100 python pickles.
# ---------------------------------------------------------------------------------------------
class _NumpyOnlyUnpickler(pickle.Unpickler):
  """Unpickles the CIFAR batches, which hold only dicts, lists, bytes and numpy arrays; refuses anything else."""

  _ALLOWED = {
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),
  }

  def find_class(self, module: str, name: str) -> Any:
    if module.startswith("numpy.core"):
      module = "numpy._core" + module[len("numpy.core") :]
    if (module, name) not in self._ALLOWED:
      raise pickle.UnpicklingError(
        f"refusing to unpickle {module}.{name}: CIFAR batches contain only numpy arrays, lists and bytes"
      )
    return super().find_class(module, name)


def _load_pickle(data: bytes, where: str) -> dict:
  try:
    obj = _NumpyOnlyUnpickler(io.BytesIO(data), encoding="bytes").load()
  except Exception as e:  # noqa: BLE001 - any decoding failure is a format error of this file
    raise SourceError(f"{where}: not a CIFAR python pickle ({e})") from e
  if not isinstance(obj, dict):
    raise SourceError(f"{where}: expected a pickled dict, got {type(obj).__name__}")
  return obj


def _field(d: dict, key: str, where: str):
  for k in (key.encode(), key):
    if k in d:
      return d[k]
  raise SourceError(f"{where}: missing key b'{key}' (keys: {sorted(map(str, d))})")


def _names(values, where: str) -> list[str]:
  return [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in values]


@dataclasses.dataclass(frozen=True)
class CifarVariant:
  dataset: str
  archive: str
  extracted: str
  url: str
  splits: dict[str, tuple[str, ...]]  # split -> member basenames, in order
  meta: str
  label_key: str
  names_key: str
  num_classes: int
  coarse_label_key: str | None = None
  coarse_names_key: str | None = None


CIFAR10 = CifarVariant(
  dataset="cifar10",
  archive="cifar-10-python.tar.gz",
  extracted="cifar-10-batches-py",
  url=CIFAR10_URL,
  splits={"train": tuple(f"data_batch_{i}" for i in range(1, 6)), "test": ("test_batch",)},
  meta="batches.meta",
  label_key="labels",
  names_key="label_names",
  num_classes=10,
)
CIFAR100 = CifarVariant(
  dataset="cifar100",
  archive="cifar-100-python.tar.gz",
  extracted="cifar-100-python",
  url=CIFAR100_URL,
  splits={"train": ("train",), "test": ("test",)},
  meta="meta",
  label_key="fine_labels",
  names_key="fine_label_names",
  num_classes=100,
  coarse_label_key="coarse_labels",
  coarse_names_key="coarse_label_names",
)


@dataclasses.dataclass
class CifarData:
  class_names: list[str]
  coarse_class_names: list[str] | None
  images: dict[str, np.ndarray]  # split -> uint8 [N, 32, 32, 3]
  labels: dict[str, np.ndarray]  # split -> int64 [N]
  coarse_labels: dict[str, np.ndarray] | None


def find_cifar(variant: CifarVariant, source_dir: str) -> str:
  return _find_source(
    source_dir, dataset=variant.dataset, archive=variant.archive, extracted=variant.extracted, url=variant.url
  )


def read_cifar(variant: CifarVariant, source_dir: str) -> CifarData:
  """Reads every split of an official CIFAR python tarball (one sequential pass over the archive)."""
  path = find_cifar(variant, source_dir)
  wanted = {variant.meta, *(m for members in variant.splits.values() for m in members)}
  found: dict[str, bytes] = {}
  for rel, data in iter_archive(path):
    parts = rel.split("/")
    if parts[-1] in wanted and (len(parts) == 1 or parts[-2] == variant.extracted):
      found[parts[-1]] = data
  missing = sorted(wanted - set(found))
  if missing:
    raise SourceError(
      f"{variant.dataset}: {path} lacks {variant.extracted}/{missing[0]} (the official archive "
      f"from {variant.url} has {', '.join(sorted(wanted))})"
    )

  meta_where = f"{path}:{variant.extracted}/{variant.meta}"
  meta = _load_pickle(found[variant.meta], meta_where)
  class_names = _names(_field(meta, variant.names_key, meta_where), meta_where)
  if len(class_names) != variant.num_classes:
    raise SourceError(
      f"{meta_where}: expected {variant.num_classes} names under b'{variant.names_key}', got {len(class_names)}"
    )
  coarse_names = None
  if variant.coarse_names_key:
    coarse_names = _names(_field(meta, variant.coarse_names_key, meta_where), meta_where)

  images, labels, coarse = {}, {}, ({} if variant.coarse_label_key else None)
  for split, members in variant.splits.items():
    imgs, labs, clabs = [], [], []
    for member in members:
      where = f"{path}:{variant.extracted}/{member}"
      batch = _load_pickle(found[member], where)
      data = np.asarray(_field(batch, "data", where))
      if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise SourceError(f"{where}: b'data' must be uint8 [N, 3072], got {data.dtype} {list(data.shape)}")
      lab = np.asarray(_field(batch, variant.label_key, where), dtype=np.int64).reshape(-1)
      if lab.shape[0] != data.shape[0]:
        raise SourceError(f"{where}: {data.shape[0]} images but {lab.shape[0]} b'{variant.label_key}'")
      if lab.size and (lab.min() < 0 or lab.max() >= variant.num_classes):
        raise SourceError(f"{where}: labels must lie in [0, {variant.num_classes}), got [{lab.min()}, {lab.max()}]")
      imgs.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
      labs.append(lab)
      if variant.coarse_label_key:
        clab = np.asarray(_field(batch, variant.coarse_label_key, where), dtype=np.int64).reshape(-1)
        if clab.shape[0] != data.shape[0]:
          raise SourceError(f"{where}: {data.shape[0]} images but {clab.shape[0]} b'{variant.coarse_label_key}'")
        clabs.append(clab)
    images[split] = np.ascontiguousarray(np.concatenate(imgs))
    labels[split] = np.concatenate(labs)
    if coarse is not None:
      coarse[split] = np.concatenate(clabs)
  return CifarData(class_names, coarse_names, images, labels, coarse)


# ---------------------------------------------------------------------------------------------
# Fashion-MNIST idx files.
# ---------------------------------------------------------------------------------------------
FASHION_MNIST_FILES = {
  "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
  "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
FASHION_MNIST_CLASSES = [
  "T-shirt/top",
  "Trouser",
  "Pullover",
  "Dress",
  "Coat",
  "Sandal",
  "Shirt",
  "Sneaker",
  "Bag",
  "Ankle boot",
]


def parse_idx(data: bytes, where: str) -> np.ndarray:
  """Parses an (uncompressed) idx file of unsigned bytes: magic 0x00 0x00 0x08 ndim, big-endian uint32 dims."""
  if len(data) < 4 or data[0] != 0 or data[1] != 0:
    raise SourceError(f"{where}: not an idx file (bad magic number)")
  if data[2] != 0x08:
    raise SourceError(f"{where}: expected unsigned-byte idx data (type 0x08), got type 0x{data[2]:02x}")
  ndim = data[3]
  header = 4 + 4 * ndim
  if len(data) < header:
    raise SourceError(f"{where}: truncated idx header")
  dims = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
  expected = int(np.prod(dims, dtype=np.int64))
  if len(data) - header != expected:
    raise SourceError(f"{where}: idx dims {list(dims)} need {expected} bytes of data, found {len(data) - header}")
  return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)


def read_fashion_mnist(source_dir: str, split: str) -> tuple[np.ndarray, np.ndarray]:
  """``(images uint8 [N, 28, 28], labels int64 [N])`` of one split from the official idx ``.gz`` files."""
  source_dir = os.path.expanduser(source_dir)
  out = []
  for fname in FASHION_MNIST_FILES[split]:
    path = os.path.join(source_dir, fname)
    if not os.path.isfile(path):
      raise SourceError(
        f"fashion_mnist: source file not found: expected {path}; install Debian's dataset-fashion-mnist "
        f"(files in /usr/share/datasets/fashion-mnist) or download {fname} from {FASHION_MNIST_URL}"
      )
    with gzip.open(path, "rb") as f:
      try:
        data = f.read()
      except OSError as e:
        raise SourceError(f"{path}: not a gzip file ({e})") from e
    out.append(parse_idx(data, path))
  images, labels = out
  img_path, lab_path = (os.path.join(source_dir, f) for f in FASHION_MNIST_FILES[split])
  if images.ndim != 3 or labels.ndim != 1:
    raise SourceError(
      f"{img_path}: expected [N, H, W] images and [N] labels, got {list(images.shape)} and {list(labels.shape)}"
    )
  if images.shape[0] != labels.shape[0]:
    raise SourceError(f"{lab_path}: {labels.shape[0]} labels for {images.shape[0]} images in {img_path}")
  if images.shape[1:] != (28, 28):
    raise SourceError(f"{img_path}: expected 28x28 images, got {images.shape[1]}x{images.shape[2]}")
  if labels.size and labels.max() >= 10:
    raise SourceError(f"{lab_path}: labels must lie in [0, 10), got max {labels.max()}")
  return images, labels.astype(np.int64)


# ---------------------------------------------------------------------------------------------
# Encoded images (Tiny-ImageNet, image folders).
# ---------------------------------------------------------------------------------------------
def image_header(data: bytes | str, where: str) -> tuple[tuple[int, int], str]:
  """``((width, height), mode)`` read from the image header (no pixel decoding); ``data`` may be a path."""
  try:
    with PIL.Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as im:
      return im.size, im.mode
  except Exception as e:  # noqa: BLE001
    raise SourceError(f"{where}: not a readable image ({e})") from e


def image_payload(data: bytes, where: str, *, mode: str, size: tuple[int, int]):
  """The original bytes when they are a JPEG/PNG decoding to ``size`` and ``mode``; else a converted PIL image.

  The image is fully decoded here so a corrupt file fails at preparation, not in the middle of training.
  """
  try:
    with PIL.Image.open(io.BytesIO(data)) as im:
      im.load()
      fmt = im.format
      if im.size != size:
        raise SourceError(
          f"{where}: image is {im.size[0]}x{im.size[1]}, expected {size[0]}x{size[1]} (images are not resized)"
        )
      if fmt in ("JPEG", "PNG") and im.mode == mode:
        return data
      return im.convert(mode)
  except SourceError:
    raise
  except Exception as e:  # noqa: BLE001
    raise SourceError(f"{where}: not a readable image ({e})") from e


# ---------------------------------------------------------------------------------------------
# Tiny-ImageNet.
# ---------------------------------------------------------------------------------------------
TINY_IMAGENET_ROOT = "tiny-imagenet-200"


class TinyImageNetReader:
  """Reads ``tiny-imagenet-200.zip`` (or the extracted folder): train and labelled val images, wnid order."""

  def __init__(self, source_dir: str):
    self.path = _find_source(
      source_dir,
      dataset="tiny_imagenet",
      archive=f"{TINY_IMAGENET_ROOT}.zip",
      extracted=TINY_IMAGENET_ROOT,
      url=TINY_IMAGENET_URL,
    )
    self._zip = zipfile.ZipFile(self.path) if self.path.endswith(".zip") else None
    names = self._list()
    self._names = set(names)
    wnids_text = self._read("wnids.txt").decode("utf-8")
    self.wnids = [w.strip() for w in wnids_text.splitlines() if w.strip()]
    if len(set(self.wnids)) != len(self.wnids) or not self.wnids:
      raise SourceError(f"{self._where('wnids.txt')}: expected one distinct wnid per line")
    self._label = {w: i for i, w in enumerate(self.wnids)}
    self.train_files = sorted(
      n
      for n in names
      if n.startswith("train/") and n.endswith(".JPEG") and len(n.split("/")) == 4 and n.split("/")[2] == "images"
    )
    ann = self._read("val/val_annotations.txt").decode("utf-8")
    self.val_labels: dict[str, int] = {}
    for line_no, line in enumerate(ann.splitlines(), 1):
      if not line.strip():
        continue
      fields = line.split("\t")
      if len(fields) < 2 or fields[1] not in self._label:
        raise SourceError(
          f"{self._where('val/val_annotations.txt')}:{line_no}: expected "
          f"'<file>\\t<wnid listed in wnids.txt>...', got {line!r}"
        )
      self.val_labels[f"val/images/{fields[0]}"] = self._label[fields[1]]
    for rel in self.val_labels:
      if rel not in self._names:
        raise SourceError(f"tiny_imagenet: {self._where(rel)} listed in val_annotations.txt is missing")
    for rel in self.train_files:
      wnid = rel.split("/")[1]
      if wnid not in self._label:
        raise SourceError(f"tiny_imagenet: {self._where(rel)}: class folder {wnid!r} is not in wnids.txt")

  def _list(self) -> list[str]:
    if self._zip is not None:
      prefix = f"{TINY_IMAGENET_ROOT}/"
      names = [n[len(prefix) :] for n in self._zip.namelist() if n.startswith(prefix) and not n.endswith("/")]
    else:
      names = list_archive(self.path)
    return names

  def _where(self, rel: str) -> str:
    return f"{self.path}:{TINY_IMAGENET_ROOT}/{rel}" if self._zip is not None else os.path.join(self.path, rel)

  def _read(self, rel: str) -> bytes:
    if rel not in self._names:
      raise SourceError(
        f"tiny_imagenet: {self._where(rel)} is missing (the official archive {TINY_IMAGENET_URL} has it)"
      )
    if self._zip is not None:
      return self._zip.read(f"{TINY_IMAGENET_ROOT}/{rel}")
    with open(os.path.join(self.path, rel), "rb") as f:
      return f.read()

  def examples(self, split: str) -> Iterator[tuple[str, Any, int]]:
    if split == "train":
      items = [(rel, self._label[rel.split("/")[1]]) for rel in self.train_files]
    elif split == "validation":
      items = sorted(self.val_labels.items())
    else:
      raise ValueError(f"tiny_imagenet split must be 'train' or 'validation', got {split!r}")
    for rel, label in items:
      yield rel, image_payload(self._read(rel), self._where(rel), mode="RGB", size=(64, 64)), label


# ---------------------------------------------------------------------------------------------
# Image folders: root/<split>/<class>/<image>.
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass
class FolderIndex:
  path: str
  prefix: str  # leading folder inside an archive ('' if none)
  files: dict[str, list[tuple[str, str]]]  # split -> [(relative path, class name)]
  class_names: list[str]
  size: tuple[int, int]  # (width, height)
  mode: str  # 'RGB' or 'L'

  @property
  def image_shape(self) -> tuple[int, int, int]:
    return (self.size[1], self.size[0], 1 if self.mode == "L" else 3)


def _is_image(rel: str) -> bool:
  base = rel.rsplit("/", 1)[-1]
  return not base.startswith(".") and base.lower().endswith(IMAGE_EXTENSIONS)


def index_image_folder(path: str) -> FolderIndex:
  """Lists ``<split>/<class>/<image>`` files and checks that all images share one size.

  Inside an archive the layout may sit under one leading folder. The channel count is 1 when every image is
  grayscale, else 3 (grayscale images of a colour set are converted to RGB). Classes are the sorted union of
  the class folder names of all splits, so a label means the same class in every split.
  """
  path = os.path.abspath(os.path.expanduser(path))
  if not os.path.exists(path):
    raise SourceError(
      f"image_folder: source not found: {path} (expected a folder or a .tar/.tar.gz/.zip "
      "archive with <split>/<class>/<image> files)"
    )
  headers: dict[str, tuple[tuple[int, int], str]] = {}
  if os.path.isdir(path):
    rels = [r for r in list_archive(path) if _is_image(r)]
    for r in rels:
      headers[r] = image_header(os.path.join(path, r), os.path.join(path, r))
  else:
    rels = []
    for r, data in iter_archive(path):
      if _is_image(r):
        rels.append(r)
        headers[r] = image_header(data, f"{path}:{r}")
  if not rels:
    raise SourceError(f"image_folder: no image files ({', '.join(IMAGE_EXTENSIONS)}) found in {path}")
  depths = {len(r.split("/")) for r in rels}
  prefixes = {r.split("/")[0] for r in rels}
  if depths == {3}:
    prefix = ""
  elif depths == {4} and len(prefixes) == 1 and not os.path.isdir(path):
    prefix = prefixes.pop() + "/"
  else:
    bad = next(r for r in rels if len(r.split("/")) != 3)
    raise SourceError(f"image_folder: {path}: expected <split>/<class>/<image> files, found {bad!r}")
  files: dict[str, list[tuple[str, str]]] = {}
  for r in rels:
    split, cls, _ = r[len(prefix) :].split("/")
    files.setdefault(split, []).append((r, cls))
  for split in files:
    files[split].sort()
  first = rels[0]
  size = headers[first][0]
  for r in rels:
    if headers[r][0] != size:
      raise SourceError(
        f"image_folder: {path}:{r} is {headers[r][0][0]}x{headers[r][0][1]}, expected "
        f"{size[0]}x{size[1]} like {first} (images are not resized)"
      )
  mode = "L" if all(headers[r][1] in _GRAY_MODES for r in rels) else "RGB"
  class_names = sorted({cls for items in files.values() for _, cls in items})
  if "train" in files:
    untrained = sorted(set(class_names) - {cls for _, cls in files["train"]})
    if untrained:
      raise SourceError(
        f"image_folder: {path}: class(es) {untrained} have images in "
        f"{sorted(s for s in files if s != 'train')} but none in train/ (a class the model "
        f"never sees in training cannot be learnt)"
      )
  return FolderIndex(path, prefix, files, class_names, size, mode)


def source_fingerprint(path: str) -> str:
  """A digest of what a source is made of, without reading the files: for a folder every file's relative
  path, size and modification time; for an archive its size and modification time."""
  import hashlib

  path = os.path.abspath(os.path.expanduser(path))
  h = hashlib.sha256()
  if os.path.isdir(path):
    for dirpath, dirnames, filenames in os.walk(path):
      dirnames.sort()
      for fname in sorted(filenames):
        full = os.path.join(dirpath, fname)
        st = os.stat(full)
        h.update(f"{os.path.relpath(full, path)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
  elif os.path.exists(path):
    st = os.stat(path)
    h.update(f"{st.st_size}\0{st.st_mtime_ns}".encode())
  return h.hexdigest()


def image_folder_examples(index: FolderIndex, split: str) -> Iterator[tuple[str, Any, int]]:
  label_of = {c: i for i, c in enumerate(index.class_names)}
  wanted = dict(index.files[split])
  if os.path.isdir(index.path):
    for rel, cls in index.files[split]:
      where = os.path.join(index.path, rel)
      with open(where, "rb") as f:
        data = f.read()
      yield rel, image_payload(data, where, mode=index.mode, size=index.size), label_of[cls]
  else:
    for rel, data in iter_archive(index.path):
      cls = wanted.get(rel)
      if cls is not None:
        yield rel, image_payload(data, f"{index.path}:{rel}", mode=index.mode, size=index.size), label_of[cls]


# ---------------------------------------------------------------------------------------------
# scikit-learn digits.
# ---------------------------------------------------------------------------------------------
DIGITS_TEST_EVERY = 5


def digits_split(labels: np.ndarray) -> dict[str, np.ndarray]:
  """The fixed stratified split of the digits set: indices into ``load_digits()`` order.

  Within each class, the examples are taken in their original order and every 5th one (positions 4, 9,
  14, ... counted from 0 within the class) goes to 'test'; the rest go to 'train'. This keeps the class
  proportions, needs no random numbers and does not depend on any library version.
  """
  labels = np.asarray(labels)
  test = np.zeros(labels.shape[0], dtype=bool)
  for c in np.unique(labels):
    idx = np.flatnonzero(labels == c)
    test[idx[DIGITS_TEST_EVERY - 1 :: DIGITS_TEST_EVERY]] = True
  return {"train": np.flatnonzero(~test), "test": np.flatnonzero(test)}


def read_digits() -> tuple[np.ndarray, np.ndarray]:
  """``(images float32 [1797, 8, 8, 1] in [0, 1], labels int64 [1797])``: sklearn's values 0..16 divided by 16."""
  from sklearn.datasets import load_digits

  d = load_digits()
  images = (d.images.astype(np.float32) / np.float32(16.0))[..., None]
  return images, d.target.astype(np.int64)
