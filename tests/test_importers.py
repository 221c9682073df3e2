"""Teachers from elsewhere: PyTorch networks written with each source's module names and structure, random
weights and random BatchNorm statistics, saved in each format, imported through the real job, and compared
with PyTorch's eval-mode logits; parameter counts and key matching at full size; refusal of pickles carrying
code, of mismatching files and of used workdirs; export -> import round trips; a distillation from imported
teachers."""

import io
import json
import os
import pickle
import subprocess
import sys
import tarfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
import torch_sources as ts  # noqa: E402  (tests/ is on sys.path)
from safetensors.numpy import save_file  # noqa: E402

from mdrad_jax import data as data_lib, export, models, runs, train  # noqa: E402
from mdrad_jax.errors import UserError  # noqa: E402
from mdrad_jax.importers import archs, files, job  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def _load_config(name, arg):
  import importlib.util

  spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "configs", f"{name}.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config(arg)


def _write_cifar10(path, rng, per_batch=4, n_test=8):
  """A small cifar-10-python.tar.gz in the official layout (protocol-2 pickles of uint8 rows)."""

  def add(tar, name, obj):
    payload = pickle.dumps(obj, protocol=2)
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    tar.addfile(info, io.BytesIO(payload))

  with tarfile.open(path, "w:gz") as tar:
    add(
      tar,
      "cifar-10-batches-py/batches.meta",
      {b"label_names": [n.encode() for n in CIFAR10_NAMES], b"num_cases_per_batch": per_batch, b"num_vis": 3072},
    )
    for name, n in [(f"data_batch_{i}", per_batch) for i in range(1, 6)] + [("test_batch", n_test)]:
      add(
        tar,
        f"cifar-10-batches-py/{name}",
        {
          b"batch_label": name.encode(),
          b"labels": rng.integers(0, 10, n).tolist(),
          b"data": rng.integers(0, 256, size=(n, 3072), dtype=np.uint8),
          b"filenames": [f"{name}_{i}.png".encode() for i in range(n)],
        },
      )


@pytest.fixture(scope="module")
def cifar(tmp_path_factory):
  src = tmp_path_factory.mktemp("cifar_src")
  _write_cifar10(str(src / "cifar-10-python.tar.gz"), np.random.default_rng(0))
  kw = dict(data_dir=str(tmp_path_factory.mktemp("cifar_data")), source_dir=str(src))
  data_lib.dataset_info("cifar10", **kw)
  return kw


def _import_config(cifar, source, arch, overrides=None, **args):
  arg = ",".join([f"source={source}", f"arch={arch}", "dataset=cifar10"] + [f"{k}={v}" for k, v in args.items()])
  c = _load_config("import_teacher", arg)
  c.data.data_dir, c.data.source_dir = cifar["data_dir"], cifar["source_dir"]
  c.eval_batch_size = 8
  for k, v in (overrides or {}).items():
    c.model.kwargs[k] = v
  return c


def _save(tmp_path, sd, fmt, name="w"):
  """Writes a state dict as the sources publish them (plain or wrapped), in each format."""
  sd = {k: v for k, v in sd.items()}
  tmp_path = tmp_path / name
  tmp_path.mkdir(exist_ok=True)
  if fmt == "pt":
    path = tmp_path / "w.pt"
    torch.save(sd, path)
  elif fmt == "pth_module":  # DataParallel checkpoint wrapped with training state
    path = tmp_path / "w.pth"
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in sd.items()}, "best_acc": 0.5}, path)
  elif fmt == "tar_net":
    path = tmp_path / "w.tar"
    torch.save({"net": {f"model.{k}": v for k, v in sd.items()}, "acc": 91.0}, path)
  elif fmt == "th_model":
    path = tmp_path / "w.th"
    torch.save({"model": sd}, path)
  elif fmt == "safetensors":
    path = tmp_path / "w.safetensors"
    save_file({k: v.detach().numpy().copy() for k, v in sd.items()}, str(path))
  elif fmt == "npz":
    path = tmp_path / "w.npz"
    np.savez(path, **{k: v.detach().numpy() for k, v in sd.items()})
  else:
    raise AssertionError(fmt)
  return str(path)


def _torch_logits(net, x_nhwc, mean=None, std=None):
  x = torch.from_numpy(np.ascontiguousarray(x_nhwc.transpose(0, 3, 1, 2)))
  if mean is not None:
    x = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
  with torch.no_grad():
    return net(x).numpy()


CHEN = archs.CHENYAOFO_CIFAR10
HUY = archs.CIFAR10_MEAN_STD
IMNET = archs.IMAGENET_MEAN_STD
SMALL_VGG = (8, "M", 16, "M", 16, 16, "M", 32, "M", 32, "M")
# MobileNetV2 rows (expansion, channels, blocks, stride): an expansion-1 block, stride-1 and stride-2 blocks,
# identity residuals and channel changes, as in the full configuration but fewer blocks.
SMALL_MB = ((1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 2, 2), (6, 64, 1, 2))

# id: (arch, PyTorch network, model-option overrides for the small size, file format, normalisation)
CASES = {
  "chenyaofo_resnet20": (
    "chenyaofo:resnet20",
    lambda: ts.TVResNet(ts.TVBasicBlock, [3, 3, 3], [16, 32, 64]),
    {},
    "pt",
    CHEN,
  ),
  "chenyaofo_vgg": (
    "chenyaofo:vgg11_bn",
    lambda: ts.TVVGG(SMALL_VGG, 24),
    {"cfg": SMALL_VGG, "classifier_hidden": (24, 24)},
    "safetensors",
    CHEN,
  ),
  "chenyaofo_mobilenetv2": (
    "chenyaofo:mobilenetv2_x0_5",
    lambda: ts.TVMobileNetV2(width_mult=0.5, setting=SMALL_MB),
    {"cfg": SMALL_MB},
    "npz",
    CHEN,
  ),
  "huyvnphan_resnet18": (
    "huyvnphan:resnet18",
    lambda: ts.TVResNet(ts.TVBasicBlock, [2, 2, 2, 2], [8, 16, 16, 32], stem_pool=True),
    {"widths": (8, 16, 16, 32)},
    "pth_module",
    HUY,
  ),
  "huyvnphan_resnet50": (
    "huyvnphan:resnet50",
    lambda: ts.TVResNet(ts.TVBottleneck, [1, 2, 1, 1], [4, 4, 8, 8], stem_pool=True),
    {"widths": (4, 4, 8, 8), "stage_sizes": (1, 2, 1, 1)},
    "pt",
    HUY,
  ),
  "huyvnphan_vgg_7x7_head": (
    "huyvnphan:vgg13_bn",
    lambda: ts.TVVGG(SMALL_VGG, 20, pool_to=7),
    {"cfg": SMALL_VGG, "classifier_hidden": (20, 20)},
    "pt",
    HUY,
  ),
  "huyvnphan_mobilenet_v2": (
    "huyvnphan:mobilenet_v2",
    lambda: ts.TVMobileNetV2(width_mult=0.3, setting=SMALL_MB),
    {"width_mult": 0.3, "cfg": SMALL_MB},
    "th_model",
    HUY,
  ),
  "robustbench_wrn": (
    "robustbench:wrn28_10",
    lambda: ts.TradesWideResNet(depth=10, widen_factor=2),
    {"depth": 10, "widen_factor": 2},
    "pth_module",
    None,
  ),
  "robustbench_resnet18": (
    "robustbench:resnet18",
    lambda: ts.KLResNet(ts.KLBasicBlock, [2, 1, 1, 2], [8, 16, 16, 32]),
    {"widths": (8, 16, 16, 32), "stage_sizes": (2, 1, 1, 2)},
    "safetensors",
    None,
  ),
  "robustbench_preact_bn_before_fc": (
    "robustbench:preact_resnet18",
    lambda: ts.KLResNet(ts.KLPreActBlock, [1, 2, 1, 1], [8, 8, 16, 16], preact=True, bn_before_fc=True),
    {"widths": (8, 8, 16, 16), "stage_sizes": (1, 2, 1, 1)},
    "tar_net",
    None,
  ),
  "robustbench_dm_wrn_swish": (
    "robustbench:dm_wrn28_10_swish",
    lambda: ts.DMWideResNet(depth=10, width=2, act=torch.nn.SiLU, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3)),
    {"depth": 10, "widen_factor": 2},
    "pt",
    None,
  ),
  "torchvision_resnet18": (
    "torchvision:resnet18",
    lambda: ts.TVResNet(ts.TVBasicBlock, [2, 2, 2, 2], [8, 8, 16, 16], stem_kernel=7, stem_stride=2, stem_pool=True),
    {"widths": (8, 8, 16, 16)},
    "pth_module",
    IMNET,
  ),
  "torchvision_mobilenet_v2": (
    "torchvision:mobilenet_v2",
    lambda: ts.TVMobileNetV2(width_mult=0.25, setting=SMALL_MB[:3], stem_stride=2),
    {"width_mult": 0.25, "cfg": SMALL_MB[:3]},
    "safetensors",
    IMNET,
  ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_import_matches_pytorch_logits(case, cifar, tmp_path):
  arch, build, overrides, fmt, norm = CASES[case]
  torch.manual_seed(0)
  net = ts.randomise(build(), seed=len(case))
  path = _save(tmp_path, net.state_dict(), fmt)
  workdir = str(tmp_path / "teacher")
  res = job.run(_import_config(cifar, path, arch, overrides), workdir)

  # the workdir is a teacher like a trained one: load_teachers reads it
  (module,), (variables,) = runs.load_teachers([workdir], num_classes=10, image_shape=(32, 32, 3))
  x = np.random.default_rng(1).uniform(0, 1, (3, 32, 32, 3)).astype(np.float32)
  mean, std = (None, None) if norm is None else norm
  ref = _torch_logits(net, x, mean, std)
  got = np.asarray(jax.jit(module.apply)(variables, jnp.asarray(x)))  # one compile: cheaper than op by op
  np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * float(np.abs(ref).max()))
  assert np.abs(ref).max() > 1e-2 and np.std(ref) > 1e-3  # the comparison is not between near-zero logits

  # the recorded clean accuracy is PyTorch's on the same test images
  images, labels = data_lib.load_arrays("cifar10", "test", **cifar)
  torch_acc = float(
    np.mean(
      _torch_logits(net, images.astype(np.float32) / 255.0 if images.dtype == np.uint8 else images, mean, std).argmax(
        -1
      )
      == labels
    )
  )
  with open(os.path.join(workdir, "config.json")) as f:
    cfg = json.load(f)
  assert cfg["import"]["test_accuracy"] == pytest.approx(torch_acc) == pytest.approx(res["test/accuracy"])
  assert cfg["import"]["test_examples"] == len(labels)
  if case == "robustbench_dm_wrn_swish":  # constants read from the file's buffers
    assert cfg["import"]["normalisation"]["from"] == "file"
    np.testing.assert_allclose(cfg["model"]["kwargs"]["mean"], (0.5, 0.4, 0.3), rtol=1e-6)
  elif norm is not None:
    np.testing.assert_allclose(cfg["import"]["normalisation"]["mean"], norm[0])
    np.testing.assert_allclose(cfg["import"]["normalisation"]["std"], norm[1])
  else:
    assert cfg["import"]["normalisation"]["mean"] is None and cfg["model"]["kwargs"]["mean"] is None


def _full_size_torch(name):
  """The source's network at its published size (built on the meta device: shapes only, no memory)."""
  src, n = name.split(":")
  if src == "chenyaofo" and n.startswith("resnet"):
    k = {"resnet20": 3, "resnet32": 5, "resnet44": 7, "resnet56": 9}[n]
    return ts.TVResNet(ts.TVBasicBlock, [k] * 3, [16, 32, 64])
  vgg = {"vgg11_bn": "vgg11", "vgg13_bn": "vgg13", "vgg16_bn": "vgg16", "vgg19_bn": "vgg19"}
  if n in vgg:
    return ts.TVVGG(
      models.VGG_CFGS[vgg[n]], 512 if src == "chenyaofo" else 4096, pool_to=None if src == "chenyaofo" else 7
    )
  if n.startswith("mobilenetv2_x"):
    return ts.TVMobileNetV2(width_mult=float(n[len("mobilenetv2_x") :].replace("_", ".")))
  if name == "huyvnphan:mobilenet_v2":
    return ts.TVMobileNetV2()
  if name == "torchvision:mobilenet_v2":
    return ts.TVMobileNetV2(num_classes=1000, setting=ts.IMAGENET_SETTING, stem_stride=2)
  blocks = {
    "resnet18": (ts.TVBasicBlock, [2, 2, 2, 2]),
    "resnet34": (ts.TVBasicBlock, [3, 4, 6, 3]),
    "resnet50": (ts.TVBottleneck, [3, 4, 6, 3]),
  }
  if src in ("huyvnphan", "torchvision"):
    block, layers = blocks[n]
    tv = src == "torchvision"
    return ts.TVResNet(
      block,
      layers,
      [64, 128, 256, 512],
      num_classes=1000 if tv else 10,
      stem_kernel=7 if tv else 3,
      stem_stride=2 if tv else 1,
      stem_pool=True,
    )
  if n == "resnet18":
    return ts.KLResNet(ts.KLBasicBlock, [2, 2, 2, 2], [64, 128, 256, 512])
  if n == "preact_resnet18":
    return ts.KLResNet(ts.KLPreActBlock, [2, 2, 2, 2], [64, 128, 256, 512], preact=True)
  if n.startswith("dm_wrn"):
    d, w = (int(v) for v in n[len("dm_wrn") :].split("_")[:2])
    return ts.DMWideResNet(depth=d, width=w, act=torch.nn.SiLU if n.endswith("swish") else torch.nn.ReLU)
  if n.startswith("wrn"):
    d, w = (int(v) for v in n[len("wrn") :].split("_"))
    return ts.TradesWideResNet(depth=d, widen_factor=w)
  raise AssertionError(name)


# Published parameter counts (CIFAR-10 heads unless noted): chenyaofo/pytorch-cifar-models' README (in
# millions, 2 decimals), torchvision's model docs (ImageNet, exact), DeepMind's WRN-70-16 (266.8M).
PUBLISHED_M = {
  "chenyaofo:resnet20": 0.27,
  "chenyaofo:resnet32": 0.47,
  "chenyaofo:resnet44": 0.66,
  "chenyaofo:resnet56": 0.86,
  "chenyaofo:vgg11_bn": 9.76,
  "chenyaofo:vgg13_bn": 9.94,
  "chenyaofo:vgg16_bn": 15.25,
  "chenyaofo:vgg19_bn": 20.57,
  "chenyaofo:mobilenetv2_x0_5": 0.70,
  "chenyaofo:mobilenetv2_x0_75": 1.37,
  "chenyaofo:mobilenetv2_x1_0": 2.24,
  "chenyaofo:mobilenetv2_x1_4": 4.33,
  "robustbench:dm_wrn70_16_swish": 266.8,
}
PUBLISHED_EXACT = {
  "torchvision:resnet18": 11689512,
  "torchvision:resnet34": 21797672,
  "torchvision:resnet50": 25557032,
  "torchvision:mobilenet_v2": 3504872,
}


@pytest.mark.parametrize("name", sorted(set(archs.ARCHS) - {"mdrad:export"}))
def test_every_arch_matches_its_source_at_full_size(name):
  arch = archs.ARCHS[name]
  with torch.device("meta"):
    net = _full_size_torch(name)
  shapes = {k: tuple(v.shape) for k, v in net.state_dict().items() if not k.endswith("num_batches_tracked")}
  nc = 1000 if name.startswith("torchvision:") else 10
  module = models.get_model(arch.model, num_classes=nc, **dict(arch.kwargs))
  plan, target = archs.match(shapes, module, arch, (32, 32, 3), label=name)
  # every variable found its key; every parameter of the network is one of ours
  torch_params = sum(p.numel() for k, p in net.named_parameters() if not k.startswith("sub_block1."))
  ours = models.count_params(target)
  if not arch.fold_classifier:
    assert ours == torch_params
  if name in PUBLISHED_M:
    assert abs(ours / 1e6 - PUBLISHED_M[name]) <= 0.0051, ours
  if name in PUBLISHED_EXACT:
    assert ours == PUBLISHED_EXACT[name]


def test_unknown_arch_lists_the_supported_ones():
  with pytest.raises(UserError, match=r"unknown arch 'chenyaofo:resnet57'.*chenyaofo:resnet56.*torchvision:resnet18"):
    _load_config("import_teacher", "source=x.pt,arch=chenyaofo:resnet57")


def test_mismatching_file_is_one_error_and_writes_nothing(cifar, tmp_path):
  net = ts.randomise(ts.TVResNet(ts.TVBasicBlock, [3, 3, 3], [16, 32, 64]))
  sd = net.state_dict()
  sd["extra.weight"] = torch.zeros(3)
  path = _save(tmp_path, sd, "safetensors")
  workdir = tmp_path / "teacher"
  with pytest.raises(UserError) as e:
    job.run(_import_config(cifar, path, "chenyaofo:resnet32"), str(workdir))
  msg = str(e.value)
  assert "\n" not in msg and path in msg
  assert "missing 60: layer1.3.bn1.bias (16,)" in msg  # resnet32: 2 more blocks per stage, 10 keys each
  assert "unexpected 1: extra.weight (3,)" in msg
  assert not workdir.exists()
  # a wrong shape is named with both shapes
  sd = dict(net.state_dict())
  sd["fc.weight"] = torch.zeros(100, 64)
  sd["fc.bias"] = torch.zeros(100)
  path = _save(tmp_path, sd, "npz")
  with pytest.raises(UserError, match=r"wrong shape 2: fc.bias is \(100,\), expected \(10,\)"):
    job.run(_import_config(cifar, path, "chenyaofo:resnet20"), str(workdir))
  assert not workdir.exists()
  # non-finite weights are named too
  sd = dict(net.state_dict())
  sd["layer2.1.bn1.running_var"] = torch.full((32,), float("nan"))
  path = _save(tmp_path, sd, "pt", name="nan")
  with pytest.raises(UserError, match=r"layer2\.1\.bn1\.running_var holds NaN or Inf values"):
    job.run(_import_config(cifar, path, "chenyaofo:resnet20"), str(workdir))
  assert not workdir.exists()


def test_used_workdir_is_refused_and_kept(cifar, tmp_path):
  net = ts.randomise(ts.TVResNet(ts.TVBasicBlock, [3, 3, 3], [16, 32, 64]))
  path = _save(tmp_path, net.state_dict(), "pt")
  workdir = str(tmp_path / "teacher")
  job.run(_import_config(cifar, path, "chenyaofo:resnet20"), workdir)
  before = open(os.path.join(workdir, "config.json")).read()
  other = ts.randomise(ts.TVResNet(ts.TVBasicBlock, [3, 3, 3], [16, 32, 64]), seed=5)
  path2 = _save(tmp_path, other.state_dict(), "npz", name="other")
  with pytest.raises(UserError, match="already holds checkpoints"):
    job.run(_import_config(cifar, path2, "chenyaofo:resnet20"), workdir)
  assert open(os.path.join(workdir, "config.json")).read() == before


class _Payload:
  """Unpickling this would create the marker file."""

  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return (open, (self.marker, "w"))


def test_pickle_carrying_code_is_refused_and_runs_nothing(tmp_path):
  marker = tmp_path / "unpickled-marker"
  path = tmp_path / "evil.pt"
  torch.save({"state_dict": {"conv1.weight": torch.zeros(16, 3, 3, 3)}, "x": _Payload(str(marker))}, path)
  assert not marker.exists()
  with pytest.raises(UserError, match=r"evil\.pt: refused, the pickle holds more than tensors"):
    files.read_state_dict(str(path))
  assert not marker.exists()
  # through main.py: one error line, exit status 2, nothing written, nothing run
  workdir = tmp_path / "w"
  r = subprocess.run(
    [
      sys.executable,
      "main.py",
      f"--config=configs/import_teacher.py:source={path},arch=chenyaofo:resnet20,dataset=cifar10",
      f"--workdir={workdir}",
    ],
    cwd=ROOT,
    capture_output=True,
    text=True,
    env=dict(os.environ, MDRAD_PROGRESS="0"),
    timeout=300,
  )
  assert r.returncode == 2, r.stderr[-2000:]
  err = [line for line in r.stderr.splitlines() if line.startswith("error:")]
  assert len(err) == 1 and "evil.pt: refused" in err[0] and "Traceback" not in r.stderr
  assert not marker.exists() and not workdir.exists()


def test_file_reading_errors_name_the_file(tmp_path):
  with pytest.raises(UserError, match=r"w\.ckpt.*unknown weights format '\.ckpt'"):
    files.read_state_dict(str(tmp_path / "w.ckpt"))
  with pytest.raises(UserError, match=r"weights file not found: .*nothing\.pt"):
    files.read_state_dict(str(tmp_path / "nothing.pt"))
  (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
  with pytest.raises(UserError, match=r"bad\.safetensors: not a readable safetensors file"):
    files.read_state_dict(str(tmp_path / "bad.safetensors"))
  np.savez(tmp_path / "obj.npz", a=np.array([{"x": 1}], dtype=object))
  with pytest.raises(UserError, match=r"obj\.npz: refused"):
    files.read_state_dict(str(tmp_path / "obj.npz"))
  torch.save({"epoch": 1, "optimizer": {"lr": 0.1}}, tmp_path / "opt.pt")
  with pytest.raises(UserError, match=r"opt\.pt: entry 'epoch' is a int"):
    files.read_state_dict(str(tmp_path / "opt.pt"))


def test_unwrap_prefixes_and_counters():
  a = np.ones((2,), np.float32)
  got = files.unwrap(
    {"state_dict": {"module.model.conv.weight": a, "module.model.bn.num_batches_tracked": np.array(3)}, "epoch": 2}
  )
  assert list(got) == ["conv.weight"]
  # a prefix only some keys have is kept
  got = files.unwrap({"model.a": a, "b": a})
  assert sorted(got) == ["b", "model.a"]


def test_export_then_import_round_trips(cifar, tmp_path, capsys):
  net = ts.randomise(ts.TVMobileNetV2(width_mult=0.25, setting=SMALL_MB[:2]), seed=3)
  path = _save(tmp_path, net.state_dict(), "pt")
  first = str(tmp_path / "first")
  job.run(_import_config(cifar, path, "chenyaofo:mobilenetv2_x1_0", {"width_mult": 0.25, "cfg": SMALL_MB[:2]}), first)
  workdirs = [first]
  for ext in (".safetensors", ".npz"):
    out = str(tmp_path / f"exported{ext}")
    assert export.main([f"--workdir={first}", f"--out={out}"]) == 0
    # the documented layout: Flax paths, HWIO kernels, BatchNorm statistics under batch_stats
    state = files.read_state_dict(out)
    np.testing.assert_array_equal(
      state["params/stem_conv/kernel"], net.state_dict()["features.0.0.weight"].numpy().transpose(2, 3, 1, 0)
    )
    np.testing.assert_array_equal(
      state["batch_stats/block1/dw_bn/var"], net.state_dict()["features.1.conv.0.1.running_var"].numpy()
    )
    np.testing.assert_array_equal(state["params/classifier/kernel"], net.state_dict()["classifier.1.weight"].numpy().T)
    meta = json.loads(export.read_metadata(out)["model"])
    assert meta["name"] == "mobilenetv2_x1_0" and meta["kwargs"]["width_mult"] == 0.25
    workdirs.append(str(tmp_path / f"second{ext}"))
    job.run(_import_config(cifar, out, "mdrad:export"), workdirs[-1])
  mods, varss = runs.load_teachers(workdirs, num_classes=10, image_shape=(32, 32, 3))
  x = jnp.asarray(np.random.default_rng(2).uniform(0, 1, (2, 32, 32, 3)), jnp.float32)
  logits = [np.asarray(jax.jit(m.apply)(v, x)) for m, v in zip(mods, varss)]
  np.testing.assert_array_equal(logits[0], logits[1])
  np.testing.assert_array_equal(logits[0], logits[2])
  for w in workdirs[1:]:
    cfg = json.load(open(os.path.join(w, "config.json")))
    np.testing.assert_allclose(cfg["model"]["kwargs"]["mean"], archs.CHENYAOFO_CIFAR10[0])
    assert cfg["import"]["normalisation"]["from"] == "file"


def test_export_errors_are_one_line(tmp_path, capsys):
  assert export.main([f"--workdir={tmp_path / 'none'}", f"--out={tmp_path / 'x.bin'}"]) == 2
  err = capsys.readouterr().err
  assert err.startswith("error:") and err.strip().count("\n") == 0 and "x.bin" in err
  assert export.main([f"--workdir={tmp_path / 'none'}", f"--out={tmp_path / 'x.npz'}"]) == 2
  err = capsys.readouterr().err
  assert "does not exist" in err and "none" in err and err.strip().count("\n") == 0


def test_distil_a_student_from_two_imported_teachers(cifar, tmp_path):
  teachers = []
  for i, (arch, build, overrides) in enumerate(
    [
      ("chenyaofo:resnet20", lambda: ts.TVResNet(ts.TVBasicBlock, [3, 3, 3], [16, 32, 64]), {}),
      ("robustbench:wrn28_10", lambda: ts.TradesWideResNet(depth=10, widen_factor=1), {"depth": 10, "widen_factor": 1}),
    ]
  ):
    path = _save(tmp_path, ts.randomise(build(), seed=i).state_dict(), "safetensors" if i else "pt", name=f"t{i}")
    workdir = str(tmp_path / f"teacher{i}")
    job.run(_import_config(cifar, path, arch, overrides), workdir)
    teachers.append(workdir)
  c = _load_config("sa_mdrad", f"dataset=cifar10,student=tiny_cnn,teachers={'+'.join(teachers)},epochs=1")
  c.data.data_dir, c.data.source_dir = cifar["data_dir"], cifar["source_dir"]
  c.data.augment = "none"
  c.model.kwargs.widths = (8, 16)
  c.batch_size, c.eval_batch_size, c.num_train_examples = 8, 8, 16
  c.eval.num_examples, c.eval.pgd_steps, c.attack.num_steps = 8, 1, 1
  c.log_every_steps = 1
  res = train.train_and_evaluate(c, str(tmp_path / "student"))
  lines = [json.loads(line) for line in open(tmp_path / "student" / "metrics.jsonl")]
  losses = [line["train/loss"] for line in lines if "train/loss" in line]
  assert len(losses) == 2 and all(np.isfinite(losses))
  assert 0.0 <= res["test/pgd_accuracy"] <= 1.0 and res["test/num_examples"] == 8
  cfg = json.load(open(tmp_path / "student" / "config.json"))
  assert cfg["teachers"] == teachers and cfg["method"]["name"] == "sa_mdrad"


def test_without_torch_safetensors_and_npz_still_read(tmp_path, monkeypatch):
  sd = ts.randomise(ts.TVResNet(ts.TVBasicBlock, [1, 1, 1], [4, 8, 8])).state_dict()
  st, npz, pt = (_save(tmp_path, sd, fmt, name=fmt) for fmt in ("safetensors", "npz", "pt"))
  monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now fails, as without the extra
  for path in (st, npz):
    got = files.read_state_dict(path)
    np.testing.assert_array_equal(got["layer2.0.downsample.0.weight"], sd["layer2.0.downsample.0.weight"].numpy())
    assert "bn1.num_batches_tracked" not in got and len(got) == len(sd) - sum(
      k.endswith("num_batches_tracked") for k in sd
    )
  with pytest.raises(
    UserError, match=r"w\.pt: reading PyTorch files needs PyTorch \(pip install 'mdrad_jax\[torch\]'\)"
  ):
    files.read_state_dict(pt)


def test_arch_changed_after_the_config_set_the_model_is_refused(cifar, tmp_path):
  c = _import_config(cifar, str(tmp_path / "w.pt"), "chenyaofo:resnet20")
  c.source.arch = "robustbench:wrn28_10"
  with pytest.raises(UserError, match=r"config.model.name is 'resnet20' but arch robustbench:wrn28_10 is model"):
    job.run(c, str(tmp_path / "teacher"))
