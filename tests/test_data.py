"""Data layer: preparation from each official format, the grain loaders, augmentation and resumption.

Small archives are written here in the official formats; images and labels must survive preparation and
loading exactly. The real CIFAR-10 JPEG copy and Fashion-MNIST files are read when present.
"""

from __future__ import annotations

import collections
import gzip
import importlib
import io
import os
import pickle
import shutil
import tarfile
import zipfile

import grain
import numpy as np
import orbax.checkpoint as ocp
import PIL.Image
import pytest
import tensorflow_datasets as tfds

from mdrad_jax import data
from mdrad_jax.data import builders, sources

prepare_cli = importlib.import_module("mdrad_jax.data.prepare")

CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
JPEG_COPY = "/work/shared/data/cifar10-jpeg.tar.gz"
FASHION_DIR = "/usr/share/datasets/fashion-mnist"


# ---------------------------------------------------------------------------------------------
# Writers of the official formats.
# ---------------------------------------------------------------------------------------------
def _add_bytes(tar: tarfile.TarFile, name: str, payload: bytes):
  info = tarfile.TarInfo(name)
  info.size = len(payload)
  tar.addfile(info, io.BytesIO(payload))


def _cifar_rows(rng, n):
  return rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)


def rows_to_images(rows: np.ndarray) -> np.ndarray:
  """Official layout, written out: row[ch * 1024 + r * 32 + c] is pixel (r, c) of channel ch."""
  out = np.empty((rows.shape[0], 32, 32, 3), np.uint8)
  for n in range(rows.shape[0]):
    for ch in range(3):
      for r in range(32):
        out[n, r, :, ch] = rows[n, ch * 1024 + r * 32 : ch * 1024 + r * 32 + 32]
  return out


def write_cifar10(path, rng, per_batch=4, n_test=6, skip_member=None):
  """cifar-10-python.tar.gz: cifar-10-batches-py/{batches.meta,data_batch_1..5,test_batch} (protocol-2 pickles)."""
  batches = {
    f"data_batch_{i}": (_cifar_rows(rng, per_batch), rng.integers(0, 10, per_batch).tolist()) for i in range(1, 6)
  }
  batches["test_batch"] = (_cifar_rows(rng, n_test), rng.integers(0, 10, n_test).tolist())
  with tarfile.open(path, "w:gz") as tar:
    _add_bytes(
      tar,
      "cifar-10-batches-py/batches.meta",
      pickle.dumps(
        {b"label_names": [n.encode() for n in CIFAR10_NAMES], b"num_cases_per_batch": per_batch, b"num_vis": 3072},
        protocol=2,
      ),
    )
    for name, (rows, labels) in batches.items():
      if name == skip_member:
        continue
      _add_bytes(
        tar,
        f"cifar-10-batches-py/{name}",
        pickle.dumps(
          {
            b"batch_label": name.encode(),
            b"labels": labels,
            b"data": rows,
            b"filenames": [f"{name}_{i}.png".encode() for i in range(len(labels))],
          },
          protocol=2,
        ),
      )
  train_rows = np.concatenate([batches[f"data_batch_{i}"][0] for i in range(1, 6)])
  train_labels = np.concatenate([batches[f"data_batch_{i}"][1] for i in range(1, 6)])
  return {"train": (train_rows, train_labels), "test": (batches["test_batch"][0], np.asarray(batches["test_batch"][1]))}


def write_cifar100(path, rng, n_train=10, n_test=5):
  fine_names = [f"fine{i:03d}" for i in range(100)]
  coarse_names = [f"coarse{i:02d}" for i in range(20)]
  out = {}
  with tarfile.open(path, "w:gz") as tar:
    _add_bytes(
      tar,
      "cifar-100-python/meta",
      pickle.dumps(
        {
          b"fine_label_names": [n.encode() for n in fine_names],
          b"coarse_label_names": [n.encode() for n in coarse_names],
        },
        protocol=2,
      ),
    )
    for split, n in (("train", n_train), ("test", n_test)):
      rows = _cifar_rows(rng, n)
      fine = rng.integers(0, 100, n).tolist()
      coarse = rng.integers(0, 20, n).tolist()
      _add_bytes(
        tar,
        f"cifar-100-python/{split}",
        pickle.dumps(
          {
            b"filenames": [b"x.png"] * n,
            b"batch_label": split.encode(),
            b"fine_labels": fine,
            b"coarse_labels": coarse,
            b"data": rows,
          },
          protocol=2,
        ),
      )
      out[split] = (rows, np.asarray(fine), np.asarray(coarse))
  return out, fine_names


def _encode(img: np.ndarray, fmt: str, **kw) -> bytes:
  buf = io.BytesIO()
  PIL.Image.fromarray(img).save(buf, format=fmt, **kw)
  return buf.getvalue()


def _decode(payload: bytes, mode: str) -> np.ndarray:
  with PIL.Image.open(io.BytesIO(payload)) as im:
    arr = np.asarray(im.convert(mode))
  return arr[..., None] if arr.ndim == 2 else arr


def write_tiny_imagenet(path, rng):
  """tiny-imagenet-200.zip with 3 classes whose wnids.txt order is not sorted, a grayscale JPEG among RGB ones,
  labelled val images and an unlabelled test folder (ignored)."""
  wnids = ["n03000000", "n01000000", "n02000000"]
  expected = {"train": [], "validation": []}
  root = "tiny-imagenet-200"
  with zipfile.ZipFile(path, "w") as zf:
    zf.writestr(f"{root}/wnids.txt", "\n".join(wnids) + "\n")
    zf.writestr(f"{root}/words.txt", "".join(f"{w}\tthing {w}\n" for w in wnids))
    for label, wnid in enumerate(wnids):
      boxes = []
      for k in range(2):
        gray = label == 1 and k == 0
        img = rng.integers(0, 256, size=(64, 64) if gray else (64, 64, 3), dtype=np.uint8)
        payload = _encode(img, "JPEG", quality=90)
        zf.writestr(f"{root}/train/{wnid}/images/{wnid}_{k}.JPEG", payload)
        boxes.append(f"{wnid}_{k}.JPEG\t0\t0\t63\t63")
        expected["train"].append((_decode(payload, "RGB"), label))
      zf.writestr(f"{root}/train/{wnid}/{wnid}_boxes.txt", "\n".join(boxes) + "\n")
    ann = []
    for k, label in enumerate([2, 0, 1, 2]):
      payload = _encode(rng.integers(0, 256, size=(64, 64, 3), dtype=np.uint8), "JPEG", quality=90)
      zf.writestr(f"{root}/val/images/val_{k}.JPEG", payload)
      ann.append(f"val_{k}.JPEG\t{wnids[label]}\t1\t2\t60\t61")
      expected["validation"].append((_decode(payload, "RGB"), label))
    zf.writestr(f"{root}/val/val_annotations.txt", "\n".join(ann) + "\n")
    zf.writestr(f"{root}/test/images/test_0.JPEG", _encode(np.zeros((64, 64, 3), np.uint8), "JPEG"))
  return wnids, expected


def idx_bytes(arr: np.ndarray) -> bytes:
  header = bytes([0, 0, 0x08, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
  return header + np.ascontiguousarray(arr, dtype=np.uint8).tobytes()


def write_fashion_mnist(folder, arrays: dict):
  os.makedirs(folder, exist_ok=True)
  for split, (images, labels) in arrays.items():
    img_name, lab_name = sources.FASHION_MNIST_FILES[split]
    with gzip.open(os.path.join(folder, img_name), "wb") as f:
      f.write(idx_bytes(images))
    with gzip.open(os.path.join(folder, lab_name), "wb") as f:
      f.write(idx_bytes(labels))


def write_png_folder(root, rng, *, gray=False, size=(6, 5)):
  """root/<split>/<class>/<n>.png; 'test' lacks the class 'bird' (labels come from the union of classes)."""
  expected = collections.defaultdict(list)
  classes = {"train": ["cat", "dog", "bird"], "test": ["dog", "cat"]}
  label_of = {c: i for i, c in enumerate(sorted(classes["train"]))}
  shape = (size[1], size[0]) if gray else (size[1], size[0], 3)
  for split, names in classes.items():
    for cls in names:
      os.makedirs(os.path.join(root, split, cls), exist_ok=True)
      for k in range(3):
        img = rng.integers(0, 256, size=shape, dtype=np.uint8)
        with open(os.path.join(root, split, cls, f"{k}.png"), "wb") as f:
          f.write(_encode(img, "PNG"))
        expected[split].append((img if not gray else img[..., None], label_of[cls]))
  return expected


# ---------------------------------------------------------------------------------------------
# Checks.
# ---------------------------------------------------------------------------------------------
def assert_same_examples(images, labels, expected):
  """``images`` float32 in [0, 1] hold exactly the uint8 ``expected`` images / 255 with their labels, once each."""
  exp = {}
  for img, lab in expected:
    exp[np.asarray(img, np.uint8).tobytes()] = (np.asarray(img, np.uint8), int(lab))
  assert len(exp) == len(expected), "test images must be distinct"
  assert images.shape[0] == len(expected)
  assert images.dtype == np.float32 and labels.dtype == np.int32
  seen = set()
  for img, lab in zip(images, labels):
    key = np.round(img * 255).astype(np.uint8).tobytes()
    assert key in exp and key not in seen
    seen.add(key)
    e_img, e_lab = exp[key]
    np.testing.assert_array_equal(img, e_img.astype(np.float32) / 255)
    assert int(lab) == e_lab


def take(iterator, n):
  return [next(iterator) for _ in range(n)]


def assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x["image"], y["image"])
    np.testing.assert_array_equal(x["label"], y["label"])


# ---------------------------------------------------------------------------------------------
# Fixtures: one prepared copy per module.
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cifar10(tmp_path_factory):
  src = tmp_path_factory.mktemp("cifar10_src")
  expected = write_cifar10(str(src / "cifar-10-python.tar.gz"), np.random.default_rng(0))
  data_dir = str(tmp_path_factory.mktemp("cifar10_data"))
  kw = dict(data_dir=data_dir, source_dir=str(src))
  data.dataset_info("cifar10", **kw)
  return kw, expected


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
  kw = dict(data_dir=str(tmp_path_factory.mktemp("digits_data")))
  data.dataset_info("digits", **kw)
  return kw


# ---------------------------------------------------------------------------------------------
# Preparation round trips.
# ---------------------------------------------------------------------------------------------
def test_cifar10_round_trip(cifar10):
  kw, expected = cifar10
  info = data.dataset_info("cifar10", **kw)
  assert (info.num_classes, info.image_shape) == (10, (32, 32, 3))
  assert info.split_sizes == {"train": 20, "test": 6}
  assert (info.train_split, info.test_split) == ("train", "test")
  assert list(info.class_names) == CIFAR10_NAMES
  for split, (rows, labels) in expected.items():
    images, got_labels = data.load_arrays("cifar10", split, **kw)
    assert_same_examples(images, got_labels, list(zip(rows_to_images(rows), labels)))
  # ids follow the official order across data_batch_1..5; tfds' own cifar10 reads the same directory.
  ds = tfds.data_source("cifar10", split="train", data_dir=kw["data_dir"])
  rows, labels = expected["train"]
  for ex in (ds[i] for i in range(len(ds))):
    n = int(ex["id"].decode().split("_")[1])
    np.testing.assert_array_equal(ex["image"], rows_to_images(rows[n : n + 1])[0])
    assert ex["label"] == labels[n]


def test_cifar100_round_trip(tmp_path):
  out, fine_names = write_cifar100(str(tmp_path / "cifar-100-python.tar.gz"), np.random.default_rng(1))
  kw = dict(data_dir=str(tmp_path / "data"), source_dir=str(tmp_path))
  info = data.dataset_info("cifar100", **kw)
  assert (info.num_classes, info.split_sizes) == (100, {"train": 10, "test": 5})
  assert list(info.class_names) == fine_names
  for split, (rows, fine, coarse) in out.items():
    images, labels = data.load_arrays("cifar100", split, **kw)
    assert_same_examples(images, labels, list(zip(rows_to_images(rows), fine)))
    ds = tfds.builder_from_directory(info.data_path).as_data_source(split)
    for ex in (ds[i] for i in range(len(ds))):
      n = int(ex["id"].decode().split("_")[1])
      assert (ex["label"], ex["coarse_label"]) == (fine[n], coarse[n])
  # The extracted folder works as a source too.
  with tarfile.open(tmp_path / "cifar-100-python.tar.gz") as tar:
    tar.extractall(tmp_path / "extracted", filter="data")
  kw_dir = dict(data_dir=str(tmp_path / "data2"), source_dir=str(tmp_path / "extracted"))
  images, labels = data.load_arrays("cifar100", "test", **kw_dir)
  rows, fine, _ = out["test"]
  assert_same_examples(images, labels, list(zip(rows_to_images(rows), fine)))


def test_tiny_imagenet_round_trip(tmp_path):
  wnids, expected = write_tiny_imagenet(str(tmp_path / "tiny-imagenet-200.zip"), np.random.default_rng(2))
  kw = dict(data_dir=str(tmp_path / "data"), source_dir=str(tmp_path))
  info = data.dataset_info("tiny_imagenet", **kw)
  assert (info.num_classes, info.image_shape) == (3, (64, 64, 3))
  assert list(info.class_names) == wnids  # wnids.txt order, not sorted
  assert (info.train_split, info.test_split) == ("train", "validation")
  assert info.split_sizes == {"train": 6, "validation": 4}
  for split, exp in expected.items():
    images, labels = data.load_arrays("tiny_imagenet", split, **kw)
    assert_same_examples(images, labels, exp)


def test_fashion_mnist_round_trip(tmp_path):
  rng = np.random.default_rng(3)
  arrays = {
    "train": (rng.integers(0, 256, (7, 28, 28), dtype=np.uint8), rng.integers(0, 10, 7).astype(np.uint8)),
    "test": (rng.integers(0, 256, (3, 28, 28), dtype=np.uint8), rng.integers(0, 10, 3).astype(np.uint8)),
  }
  write_fashion_mnist(tmp_path / "src", arrays)
  kw = dict(data_dir=str(tmp_path / "data"), source_dir=str(tmp_path / "src"))
  info = data.dataset_info("fashion_mnist", **kw)
  assert (info.num_classes, info.image_shape, info.split_sizes) == (10, (28, 28, 1), {"train": 7, "test": 3})
  for split, (imgs, labs) in arrays.items():
    images, labels = data.load_arrays("fashion_mnist", split, **kw)
    assert_same_examples(images, labels, list(zip(imgs[..., None], labs)))


@pytest.mark.skipif(
  not os.path.isfile(os.path.join(FASHION_DIR, "t10k-images-idx3-ubyte.gz")),
  reason="Fashion-MNIST files not installed (apt-get install dataset-fashion-mnist)",
)
def test_real_fashion_mnist(tmp_path):
  train_x, train_y = sources.read_fashion_mnist(FASHION_DIR, "train")
  test_x, test_y = sources.read_fashion_mnist(FASHION_DIR, "test")
  assert train_x.shape == (60000, 28, 28) and test_x.shape == (10000, 28, 28)
  assert np.bincount(train_y).tolist() == [6000] * 10 and np.bincount(test_y).tolist() == [1000] * 10
  # A prefix of the real files, rewritten in the same format, goes through preparation exactly.
  arrays = {"train": (train_x[:12], train_y[:12].astype(np.uint8)), "test": (test_x[:4], test_y[:4].astype(np.uint8))}
  write_fashion_mnist(tmp_path / "src", arrays)
  kw = dict(data_dir=str(tmp_path / "data"), source_dir=str(tmp_path / "src"))
  images, labels = data.load_arrays("fashion_mnist", "train", **kw)
  assert_same_examples(images, labels, list(zip(train_x[:12, ..., None], train_y[:12])))


def test_image_folder_png_dir_and_archive(tmp_path):
  expected = write_png_folder(str(tmp_path / "pets"), np.random.default_rng(4))
  kw = dict(data_dir=str(tmp_path / "data"), source_dir=str(tmp_path / "pets"))
  info = data.dataset_info("image_folder", **kw)
  assert (info.num_classes, info.image_shape) == (3, (5, 6, 3))
  assert list(info.class_names) == ["bird", "cat", "dog"]
  assert info.split_sizes == {"train": 9, "test": 6}
  for split, exp in expected.items():
    images, labels = data.load_arrays("image_folder", split, **kw)
    assert_same_examples(images, labels, exp)
  # The same folder as a .tar.gz with a leading folder is a different source with the same content.
  with tarfile.open(tmp_path / "pets.tar.gz", "w:gz") as tar:
    tar.add(tmp_path / "pets", arcname="pets")
  kw_tar = dict(data_dir=kw["data_dir"], source_dir=str(tmp_path / "pets.tar.gz"))
  info_tar = data.dataset_info("image_folder", **kw_tar)
  assert info_tar.data_path != info.data_path
  images, labels = data.load_arrays("image_folder", "test", **kw_tar)
  assert_same_examples(images, labels, expected["test"])


def test_image_folder_grayscale(tmp_path):
  expected = write_png_folder(str(tmp_path / "g"), np.random.default_rng(5), gray=True, size=(4, 4))
  kw = dict(data_dir=str(tmp_path / "data"), source_dir=str(tmp_path / "g"))
  assert data.dataset_info("image_folder", **kw).image_shape == (4, 4, 1)
  images, labels = data.load_arrays("image_folder", "train", **kw)
  assert_same_examples(images, labels, expected["train"])


@pytest.mark.skipif(not os.path.isfile(JPEG_COPY), reason="CIFAR-10 JPEG copy not present")
def test_cifar10_jpeg_copy_subset(tmp_path):
  # The archive lists test/ then train/, class by class: the first two classes keep the scan short.
  wanted = {
    (split, cls, f"{k:04d}.jpg") for split in ("train", "test") for cls in ("airplane", "automobile") for k in range(4)
  }
  root = tmp_path / "cifar10-jpeg"
  found = {}
  with tarfile.open(JPEG_COPY, "r:gz") as tar:
    for member in tar:
      parts = tuple(member.name.split("/")[-3:])
      if member.isfile() and parts in wanted:
        os.makedirs(root / parts[0] / parts[1], exist_ok=True)
        payload = tar.extractfile(member).read()
        (root / "/".join(parts)).write_bytes(payload)
        found[parts] = payload
        if len(found) == len(wanted):
          break
  assert len(found) == len(wanted)
  kw = dict(data_dir=str(tmp_path / "data"), source_dir=str(root))
  info = data.dataset_info("image_folder", **kw)
  assert (info.num_classes, info.image_shape, info.split_sizes) == (2, (32, 32, 3), {"train": 8, "test": 8})
  label_of = {"airplane": 0, "automobile": 1}
  for split in ("train", "test"):
    exp = [(_decode(p, "RGB"), label_of[cls]) for (s, cls, _), p in found.items() if s == split]
    images, labels = data.load_arrays("image_folder", split, **kw)
    assert_same_examples(images, labels, exp)


def test_digits_split_is_the_documented_one(digits):
  from sklearn.datasets import load_digits

  d = load_digits()
  seen = collections.Counter()
  test_idx = []
  for i, y in enumerate(d.target):  # every 5th example of each class, counting from 1, is a test example
    seen[y] += 1
    if seen[y] % 5 == 0:
      test_idx.append(i)
  train_idx = sorted(set(range(len(d.target))) - set(test_idx))
  info = data.dataset_info("digits", **digits)
  assert info.split_sizes == {"train": len(train_idx), "test": len(test_idx)} == {"train": 1442, "test": 355}
  assert (info.num_classes, info.image_shape) == (10, (8, 8, 1))
  for split, idx in (("train", train_idx), ("test", test_idx)):
    images, labels = data.load_arrays("digits", split, **digits)
    got = collections.Counter((im.tobytes(), int(lab)) for im, lab in zip(images, labels))
    want = collections.Counter(
      ((d.images[i].astype(np.float32) / 16)[..., None].tobytes(), int(d.target[i])) for i in idx
    )
    assert got == want
    assert images.min() == 0.0 and images.max() == 1.0


def test_official_copy_of_another_version_is_used_as_is(cifar10, tmp_path):
  kw, _ = cifar10
  ours = data.dataset_info("cifar10", **kw).data_path
  other = tmp_path / "tfds" / "cifar10" / "3.0.1"
  shutil.copytree(ours, other)
  info = data.dataset_info("cifar10", data_dir=str(tmp_path / "tfds"), source_dir=str(tmp_path / "nothing"))
  assert info.data_path == str(other) and info.split_sizes == {"train": 20, "test": 6}
  # A TFRecord-only copy cannot be read by data_source: clear error, nothing overwritten.
  tf_copy = tmp_path / "tfrec" / "cifar10" / "3.0.2"
  tf_copy.mkdir(parents=True)
  shutil.copy(os.path.join(ours, "dataset_info.json"), tf_copy)
  (tf_copy / "cifar10-train.tfrecord-00000-of-00001").write_bytes(b"")
  with pytest.raises(ValueError, match="no ArrayRecord files"):
    data.dataset_info("cifar10", data_dir=str(tmp_path / "tfrec"))


# ---------------------------------------------------------------------------------------------
# Errors.
# ---------------------------------------------------------------------------------------------
def test_missing_sources_name_the_expected_file(tmp_path):
  kw = dict(data_dir=str(tmp_path / "data"), source_dir=str(tmp_path / "src"))
  with pytest.raises(
    data.SourceError,
    match=r"src/cifar-10-python\.tar\.gz.*https://www\.cs\.toronto\.edu/~kriz/"
    r"cifar-10-python\.tar\.gz",
  ):
    data.dataset_info("cifar10", **kw)
  with pytest.raises(data.SourceError, match=r"src/cifar-100-python\.tar\.gz.*kriz/cifar-100-python\.tar\.gz"):
    data.dataset_info("cifar100", **kw)
  with pytest.raises(data.SourceError, match=r"src/tiny-imagenet-200\.zip.*cs231n\.stanford\.edu/tiny-imagenet-200"):
    data.dataset_info("tiny_imagenet", **kw)
  with pytest.raises(data.SourceError, match=r"src/train-images-idx3-ubyte\.gz.*dataset-fashion-mnist"):
    data.dataset_info("fashion_mnist", **kw)
  with pytest.raises(ValueError, match="image_folder: source_dir is required"):
    data.dataset_info("image_folder", data_dir=kw["data_dir"])
  # Default source folder: <data_dir>/downloads/manual.
  with pytest.raises(data.SourceError, match=r"data/downloads/manual/cifar-10-python\.tar\.gz"):
    data.dataset_info("cifar10", data_dir=kw["data_dir"])
  # A member missing inside the archive is named too.
  os.makedirs(tmp_path / "src")
  write_cifar10(str(tmp_path / "src" / "cifar-10-python.tar.gz"), np.random.default_rng(0), skip_member="data_batch_3")
  with pytest.raises(data.SourceError, match="cifar-10-batches-py/data_batch_3"):
    data.dataset_info("cifar10", **kw)
  assert not os.path.exists(tmp_path / "data" / "cifar10" / "3.0.2")


def test_bad_arguments_are_named(digits):
  with pytest.raises(ValueError, match="unknown dataset 'cifar11'"):
    data.dataset_info("cifar11", **digits)
  with pytest.raises(ValueError, match="unknown split 'validation'.*'test', 'train'"):
    data.create_loader("digits", "validation", batch_size=8, train=False, seed=0, **digits)
  with pytest.raises(ValueError, match="data.augment must be one of"):
    data.create_loader("digits", "train", batch_size=8, train=True, seed=0, augment="cutout", **digits)
  with pytest.raises(ValueError, match="batch_size must be a positive multiple of process_count=3, got 8"):
    data.create_loader("digits", "train", batch_size=8, train=True, seed=0, process_index=0, process_count=3, **digits)
  with pytest.raises(ValueError, match="seed must be an integer"):
    data.create_loader("digits", "train", batch_size=8, train=True, seed=-1, **digits)


def test_image_folder_with_mixed_sizes_is_refused(tmp_path):
  write_png_folder(str(tmp_path / "f"), np.random.default_rng(6))
  (tmp_path / "f" / "test" / "cat" / "big.png").write_bytes(_encode(np.zeros((7, 6, 3), np.uint8), "PNG"))
  with pytest.raises(data.SourceError, match=r"test/cat/big\.png is 6x7, expected 6x5"):
    data.dataset_info("image_folder", data_dir=str(tmp_path / "data"), source_dir=str(tmp_path / "f"))


def test_interrupted_preparation_leaves_no_dataset(tmp_path):
  write_png_folder(str(tmp_path / "f"), np.random.default_rng(7))
  good = (tmp_path / "f" / "train" / "dog" / "2.png").read_bytes()
  (tmp_path / "f" / "train" / "dog" / "2.png").write_bytes(good[: len(good) // 2])  # header fine, pixels cut
  kw = dict(data_dir=str(tmp_path / "data"), source_dir=str(tmp_path / "f"))
  with pytest.raises(data.SourceError, match=r"train/dog/2\.png: not a readable image"):
    data.dataset_info("image_folder", **kw)
  root = builders.dataset_root("image_folder", kw["data_dir"], os.path.abspath(kw["source_dir"]))
  assert builders.find_prepared("image_folder", kw["data_dir"], os.path.abspath(kw["source_dir"])) is None
  assert not os.path.exists(os.path.join(root, "1.0.0"))
  (tmp_path / "f" / "train" / "dog" / "2.png").write_bytes(good)
  assert data.dataset_info("image_folder", **kw).split_sizes == {"train": 9, "test": 6}


def test_prepare_command(digits, tmp_path, capsys):
  assert prepare_cli.main(["--dataset=digits", f"--data_dir={digits['data_dir']}"]) == 0
  out = capsys.readouterr().out
  assert "digits: 10 classes" in out and os.path.join(digits["data_dir"], "digits", "1.0.0") in out
  assert prepare_cli.main(["--dataset=cifar10", f"--data_dir={tmp_path}", f"--source_dir={tmp_path}"]) == 1
  assert "cifar-10-python.tar.gz" in capsys.readouterr().err


def test_default_data_dir(monkeypatch):
  monkeypatch.setenv("MDRAD_DATA_DIR", "/some/where")
  assert data.default_data_dir() == "/some/where"
  monkeypatch.delenv("MDRAD_DATA_DIR")
  assert data.default_data_dir() == os.path.join(os.path.expanduser("~"), "tensorflow_datasets")


# ---------------------------------------------------------------------------------------------
# Loaders.
# ---------------------------------------------------------------------------------------------
def test_batches_shapes_types_and_range(cifar10, digits):
  kw, _ = cifar10
  batch = next(iter(data.create_loader("cifar10", "train", batch_size=8, train=True, seed=0, **kw)))
  assert batch["image"].shape == (8, 32, 32, 3) and batch["image"].dtype == np.float32
  assert batch["label"].shape == (8,) and batch["label"].dtype == np.int32
  assert 0.0 <= batch["image"].min() and batch["image"].max() <= 1.0
  batch = next(iter(data.create_loader("digits", "train", batch_size=16, train=True, seed=0, **digits)))
  assert batch["image"].shape == (16, 8, 8, 1) and batch["image"].dtype == np.float32
  assert 0.0 <= batch["image"].min() and batch["image"].max() <= 1.0 and batch["label"].max() < 10


def test_eval_loader_is_ordered_and_keeps_the_last_partial_batch(digits):
  images, labels = data.load_arrays("digits", "test", **digits)
  loader = data.create_loader("digits", "test", batch_size=100, train=False, seed=0, drop_remainder=False, **digits)
  batches = list(loader)
  assert [b["label"].shape[0] for b in batches] == [100, 100, 100, 55]
  np.testing.assert_array_equal(np.concatenate([b["image"] for b in batches]), images)
  np.testing.assert_array_equal(np.concatenate([b["label"] for b in batches]), labels)
  # num_examples keeps the first N of the same order.
  first = list(
    data.create_loader(
      "digits", "test", batch_size=10, train=False, seed=0, num_examples=25, drop_remainder=False, **digits
    )
  )
  np.testing.assert_array_equal(np.concatenate([b["label"] for b in first]), labels[:25])


def test_shuffle_is_seeded_and_reshuffles_each_epoch(digits):
  def labels_of(seed, n):
    loader = data.create_loader(
      "digits", "train", batch_size=8, train=True, seed=seed, augment="none", num_examples=40, num_epochs=2, **digits
    )
    batches = list(loader)
    assert len(batches) == n
    return [b for b in batches]

  a, b, c = labels_of(0, 10), labels_of(0, 10), labels_of(1, 10)
  assert_batches_equal(a, b)
  assert any(not np.array_equal(x["image"], y["image"]) for x, y in zip(a, c))
  images, labels = data.load_arrays("digits", "train", num_examples=40, **digits)
  full = collections.Counter((im.tobytes(), int(lab)) for im, lab in zip(images, labels))
  for epoch in (a[:5], a[5:]):  # each epoch is a permutation of the 40 examples
    got = collections.Counter((im.tobytes(), int(lab)) for bt in epoch for im, lab in zip(bt["image"], bt["label"]))
    assert got == full
  assert any(not np.array_equal(x["label"], y["label"]) for x, y in zip(a[:5], a[5:]))


def test_iterator_state_round_trips_through_orbax(cifar10, tmp_path):
  kw, _ = cifar10

  def loader():
    return data.create_loader("cifar10", "train", batch_size=4, train=True, seed=3, augment="crop_flip", **kw)

  it = iter(loader())
  first = take(it, 3)  # 20 examples / 4 = 5 batches per epoch: stop mid-epoch
  manager = ocp.CheckpointManager(str(tmp_path / "ckpt"))
  manager.save(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
  manager.wait_until_finished()
  expected = take(it, 4)  # crosses into the next epoch
  fresh = iter(loader())
  assert_batches_equal(take(fresh, 3), first)
  resumed = iter(loader())
  manager.restore(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(resumed)))
  assert_batches_equal(take(resumed, 4), expected)
  manager.close()


def test_process_shards_are_disjoint_and_cover_the_split(cifar10):
  kw, expected = cifar10
  rows, labels = expected["train"]
  all_keys = [img.tobytes() for img in rows_to_images(rows)]

  def keys(process_index, train):
    loader = data.create_loader(
      "cifar10",
      "train",
      batch_size=6,
      train=train,
      seed=0,
      augment="none",
      num_epochs=1,
      drop_remainder=False,
      process_index=process_index,
      process_count=3,
      **kw,
    )
    out = []
    for b in loader:
      assert b["image"].shape[0] <= 2  # the global batch of 6 is split over 3 processes
      out += [np.round(im * 255).astype(np.uint8).tobytes() for im in b["image"]]
    return out

  for train, sizes in ((False, [7, 7, 6]), (True, [6, 6, 6])):
    shards = [keys(i, train) for i in range(3)]
    assert [len(s) for s in shards] == sizes
    union = [k for s in shards for k in s]
    assert len(set(union)) == len(union)  # disjoint
    assert set(union) <= set(all_keys)
    if not train:
      assert sorted(union) == sorted(all_keys)  # evaluation covers the whole split


# ---------------------------------------------------------------------------------------------
# Augmentation.
# ---------------------------------------------------------------------------------------------
def reference_crop_flip(image, oy, ox, flip, p):
  """Pixel (r, c) of the output is input pixel (r + oy - p, c' + ox - p), c' = W-1-c when flipped, or 0."""
  h, w, _ = image.shape
  src_r = np.arange(h) + oy - p
  src_c = (np.arange(w)[::-1] if flip else np.arange(w)) + ox - p
  ok_r, ok_c = (src_r >= 0) & (src_r < h), (src_c >= 0) & (src_c < w)
  out = np.zeros_like(image)
  out[np.ix_(ok_r, ok_c)] = image[np.ix_(src_r[ok_r], src_c[ok_c])]
  return out


def test_crop_flip_hand_worked():
  image = np.arange(1, 10, dtype=np.float32).reshape(1, 3, 3, 1)  # [[1 2 3] [4 5 6] [7 8 9]]
  got = data.crop_flip(image, [0], [2], [False], 1)  # padded 5x5, window at row 0, col 2
  np.testing.assert_array_equal(got[0, ..., 0], [[0, 0, 0], [2, 3, 0], [5, 6, 0]])
  got = data.crop_flip(image, [2], [1], [True], 1)  # window at row 2, col 1, then mirrored
  np.testing.assert_array_equal(got[0, ..., 0], [[6, 5, 4], [9, 8, 7], [0, 0, 0]])


def test_crop_flip_matches_reference():
  rng = np.random.default_rng(8)
  images = rng.random((3, 5, 6, 2), dtype=np.float32)
  p = 2
  for oy in range(2 * p + 1):
    for ox in range(2 * p + 1):
      for flip in (False, True):
        got = data.crop_flip(images, [oy] * 3, [ox] * 3, [flip] * 3, p)
        for i in range(3):
          np.testing.assert_array_equal(got[i], reference_crop_flip(images[i], oy, ox, flip, p))
  np.testing.assert_array_equal(data.crop_flip(images, [p] * 3, [p] * 3, [False] * 3, p), images)
  with pytest.raises(ValueError, match=r"offset_x must lie in \[0, 4\]"):
    data.crop_flip(images, [0] * 3, [5] * 3, [False] * 3, p)


@pytest.mark.parametrize("augment", ["crop_flip", "crop", "flip"])
def test_loader_augmentation_is_a_crop_flip_of_the_stored_image(cifar10, augment):
  kw, _ = cifar10
  clean, _ = data.load_arrays("cifar10", "train", **kw)
  p = 4
  allowed = [
    (oy, ox, f)
    for oy in (range(2 * p + 1) if "crop" in augment else [p])
    for ox in (range(2 * p + 1) if "crop" in augment else [p])
    for f in ((False, True) if "flip" in augment else (False,))
  ]

  def run(seed):
    loader = data.create_loader(
      "cifar10",
      "train",
      batch_size=20,
      train=True,
      seed=seed,
      augment=augment,
      crop_padding=p,
      shuffle=False,
      num_epochs=1,
      **kw,
    )
    return next(iter(loader))["image"]

  aug = run(5)
  assert aug.shape == clean.shape and aug.dtype == np.float32 and aug.min() >= 0 and aug.max() <= 1
  used = []
  for img, orig in zip(aug, clean):
    matches = [a for a in allowed if np.array_equal(img, reference_crop_flip(orig, *a, p))]
    assert matches, "augmented image is not a padded crop/flip of the stored image"
    used.append(matches[0])
  assert len(set(used)) > 1  # not all the same transform
  np.testing.assert_array_equal(run(5), aug)  # seeded
  assert not np.array_equal(run(6), aug)


@pytest.mark.slow
def test_worker_processes_give_the_same_batches_and_resume(cifar10):
  kw, _ = cifar10

  def loader(workers):
    return data.create_loader(
      "cifar10", "train", batch_size=4, train=True, seed=7, augment="crop_flip", worker_count=workers, **kw
    )

  reference = take(iter(loader(0)), 8)
  it = iter(loader(1))
  assert_batches_equal(take(it, 3), reference[:3])
  state = it.get_state()
  resumed = iter(loader(1))
  resumed.set_state(state)
  assert_batches_equal(take(resumed, 5), reference[3:])
