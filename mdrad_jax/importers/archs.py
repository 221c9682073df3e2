"""Supported source architectures and the table-driven conversion of their state dicts to Flax variables.

Each ``arch`` name (``SOURCE:NAME``) says which network of the zoo (``mdrad_jax.models``) a file holds, with
which options, which input it was trained on, which input normalisation it expects, and how the source names
its layers (a *convention*).  A convention maps the path of every Flax variable to the source's PyTorch
module name; the suffix follows from the variable (``kernel`` -> ``weight``, ``bias`` -> ``bias``, BatchNorm
``scale`` / ``bias`` / ``mean`` / ``var`` -> ``weight`` / ``bias`` / ``running_mean`` / ``running_var``).

Conversion rules (:func:`convert`): convolution weights OIHW -> HWIO (a depthwise ``[C, 1, k, k]`` weight becomes
``[k, k, 1, C]``, the kernel of a ``feature_group_count=C`` conv); linear weights ``[out, in]`` are transposed;
BatchNorm statistics are copied (every source uses PyTorch's ε = 1e-5, the zoo's ``BN_EPSILON``).  A classifier
that reads a flattened ``AdaptiveAvgPool2d((k, k))`` copy of a 1x1 map (huyvnphan's older VGG head, ``512*7*7``
inputs) is folded exactly: the ``k*k`` column blocks of each channel are summed.  Every key of the file must be
used, except BatchNorm counters and a convention's documented unused entries (the TRADES WideResNet's
``sub_block1``).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Callable

import jax
import numpy as np

from mdrad_jax.errors import UserError

CIFAR10_MEAN_STD = ((0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616))  # huyvnphan, RobustBench DM
CHENYAOFO_CIFAR10 = ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010))
CHENYAOFO_CIFAR100 = ((0.5070, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))
DM_CIFAR100 = ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))
IMAGENET_MEAN_STD = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
SOURCE_BN_EPSILON = 1e-5
CIFAR_INPUT = (32, 32, 3)

_BN_SUFFIX = {"scale": "weight", "bias": "bias", "mean": "running_mean", "var": "running_var"}


# ---------------------------------------------------------------------------------------------
# Naming conventions: Flax module path (tuple of names) -> PyTorch module name.
# ---------------------------------------------------------------------------------------------
def _torchvision_resnet(path, model, paths):
  """torchvision / chenyaofo / huyvnphan ResNets: ``layerI.J.convK``, ``downsample.0/1``, ``fc``."""
  if path == ("linear",):
    return "fc"
  if len(path) == 1:
    return path[0]
  m = re.fullmatch(r"layer(\d+)_(\d+)", path[0])
  sub = {"shortcut_conv": "downsample.0", "shortcut_bn": "downsample.1"}.get(path[1], path[1])
  return f"layer{m.group(1)}.{m.group(2)}.{sub}"


def _kuangliu_resnet(path, model, paths):
  """kuangliu / RobustBench ResNets and PreActResNets: ``layerI.J.convK``, ``shortcut.0/1``, ``linear``."""
  if len(path) == 1:
    return path[0]
  m = re.fullmatch(r"layer(\d+)_(\d+)", path[0])
  sub = {"shortcut_conv": "shortcut.0", "shortcut_bn": "shortcut.1"}.get(path[1], path[1])
  return f"layer{m.group(1)}.{m.group(2)}.{sub}"


def _trades_wrn(path, model, paths):
  """TRADES / Madry / RobustBench ``WideResNet``: ``blockG.layer.J.{bn1,conv1,bn2,conv2,convShortcut}``."""
  if len(path) == 1:
    return path[0]  # conv1, bn1, fc
  m = re.fullmatch(r"block(\d+)_(\d+)", path[0])
  sub = {"shortcut_conv": "convShortcut"}.get(path[1], path[1])
  return f"block{m.group(1)}.layer.{m.group(2)}.{sub}"


def _dm_wrn(path, model, paths):
  """DeepMind / RobustBench ``DMWideResNet``: ``init_conv``, ``layer.G.block.J.{batchnorm_0,conv_0,...}``."""
  if len(path) == 1:
    return {"conv1": "init_conv", "bn1": "batchnorm", "fc": "logits"}[path[0]]
  m = re.fullmatch(r"block(\d+)_(\d+)", path[0])
  sub = {"bn1": "batchnorm_0", "conv1": "conv_0", "bn2": "batchnorm_1", "conv2": "conv_1", "shortcut_conv": "shortcut"}[
    path[1]
  ]
  return f"layer.{int(m.group(1)) - 1}.block.{m.group(2)}.{sub}"


def _torchvision_vgg(path, model, paths):
  """torchvision-style VGG (chenyaofo, huyvnphan): ``features.I`` (conv, BN, ReLU, ..., max-pool) and
  ``classifier.0/3/6`` (Linear, ReLU, Dropout, Linear, ReLU, Dropout, Linear)."""
  name = path[0]
  if name == "classifier":
    return f"classifier.{3 * len(model.classifier_hidden)}" if model.classifier_hidden else "classifier"
  m = re.fullmatch(r"fc(\d+)", name)
  if m:
    return f"classifier.{3 * (int(m.group(1)) - 1)}"
  m = re.fullmatch(r"(conv|bn)(\d+)", name)
  idx, conv_i = 0, 0
  for v in model.cfg:
    if v == "M":
      idx += 1
      continue
    if conv_i == int(m.group(2)):
      return f"features.{idx if m.group(1) == 'conv' else idx + 1}"
    idx += 3
    conv_i += 1
  raise AssertionError(f"VGG layer {name} not in cfg")


def _torchvision_mobilenetv2(path, model, paths):
  """torchvision-style MobileNetV2 (torchvision, chenyaofo, huyvnphan): ``features.0.0/1`` (stem),
  ``features.K.conv.*`` (blocks), ``features.N+1.0/1`` (head), ``classifier.1``."""
  name = path[0]
  num_blocks = sum(int(row[2]) for row in model.cfg)
  if name == "classifier":
    return "classifier.1"
  if name in ("stem_conv", "stem_bn"):
    return f"features.0.{0 if name == 'stem_conv' else 1}"
  if name in ("head_conv", "head_bn"):
    return f"features.{num_blocks + 1}.{0 if name == 'head_conv' else 1}"
  k = int(re.fullmatch(r"block(\d+)", name).group(1))
  if (name, "expand_conv") in paths:
    sub = {
      "expand_conv": "0.0",
      "expand_bn": "0.1",
      "dw_conv": "1.0",
      "dw_bn": "1.1",
      "project_conv": "2",
      "project_bn": "3",
    }[path[1]]
  else:
    sub = {"dw_conv": "0.0", "dw_bn": "0.1", "project_conv": "1", "project_bn": "2"}[path[1]]
  return f"features.{k}.conv.{sub}"


def _flax(path, model, paths):
  """This project's own export (``mdrad_jax.export``): keys are the Flax paths joined by '/'."""
  return "/".join(path)


CONVENTIONS: dict[str, Callable] = {
  "mdrad": _flax,
  "torchvision_resnet": _torchvision_resnet,
  "kuangliu_resnet": _kuangliu_resnet,
  "trades_wrn": _trades_wrn,
  "dm_wrn": _dm_wrn,
  "torchvision_vgg": _torchvision_vgg,
  "torchvision_mobilenetv2": _torchvision_mobilenetv2,
}
# Keys a convention's files may hold that the network does not use.
IGNORED_KEYS = {
  "trades_wrn": (r"sub_block1\..*",),
  "dm_wrn": (r"mean", r"std"),  # the normalisation buffers, read separately (normalisation_from_file)
}


# ---------------------------------------------------------------------------------------------
# The table of sources.
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Arch:
  source: str  # where such files come from (docs)
  model: str  # mdrad_jax.models name
  kwargs: dict  # model options
  convention: str  # key of CONVENTIONS
  normalisation: dict  # dataset -> (mean, std) or None (no normalisation); '*' = any dataset
  input_shape: tuple | None = CIFAR_INPUT  # the input the source's network was built for (None = any)
  fold_classifier: bool = False  # fold a flattened AdaptiveAvgPool2d((k, k)) head (see module docstring)
  layout: str = "torch"  # 'torch' (OIHW convs, [out, in] linears) | 'flax' (this project's export)


def _chenyaofo(model, convention, **kw):
  return Arch(
    "chenyaofo/pytorch-cifar-models",
    model,
    kw,
    convention,
    {"cifar10": CHENYAOFO_CIFAR10, "cifar100": CHENYAOFO_CIFAR100},
  )


def _huyvnphan(model, convention, **kw):
  return Arch(
    "huyvnphan/PyTorch_CIFAR10",
    model,
    kw,
    convention,
    {"cifar10": CIFAR10_MEAN_STD},
    fold_classifier=convention == "torchvision_vgg",
  )


def _robustbench(model, convention, norm=None, **kw):
  return Arch("RobustBench model zoo", model, kw, convention, norm or {"*": None})


_DM_NORM = {"cifar10": CIFAR10_MEAN_STD, "cifar100": DM_CIFAR100}
_TV_RESNET = dict(stem_kernel=7, stem_stride=2, stem_pool=True)

ARCHS: dict[str, Arch] = {}
for _n in ("resnet20", "resnet32", "resnet44", "resnet56"):
  ARCHS[f"chenyaofo:{_n}"] = _chenyaofo(_n, "torchvision_resnet")
for _n in ("vgg11_bn", "vgg13_bn", "vgg16_bn", "vgg19_bn"):
  ARCHS[f"chenyaofo:{_n}"] = _chenyaofo(_n, "torchvision_vgg", classifier_hidden=(512, 512))
for _n in ("mobilenetv2_x0_5", "mobilenetv2_x0_75", "mobilenetv2_x1_0", "mobilenetv2_x1_4"):
  ARCHS[f"chenyaofo:{_n}"] = _chenyaofo(_n, "torchvision_mobilenetv2")
for _n in ("resnet18", "resnet34", "resnet50"):
  ARCHS[f"huyvnphan:{_n}"] = _huyvnphan(_n, "torchvision_resnet", stem_pool=True)
for _n in ("vgg11_bn", "vgg13_bn", "vgg16_bn", "vgg19_bn"):
  ARCHS[f"huyvnphan:{_n}"] = _huyvnphan(_n, "torchvision_vgg", classifier_hidden=(4096, 4096))
ARCHS["huyvnphan:mobilenet_v2"] = _huyvnphan("mobilenetv2_x1_0", "torchvision_mobilenetv2")
ARCHS["robustbench:wrn28_10"] = _robustbench("wrn28_10", "trades_wrn")
ARCHS["robustbench:wrn34_10"] = _robustbench("wrn34_10", "trades_wrn")
ARCHS["robustbench:wrn34_20"] = _robustbench("wrn34_20", "trades_wrn")
ARCHS["robustbench:resnet18"] = _robustbench("resnet18", "kuangliu_resnet")
ARCHS["robustbench:preact_resnet18"] = _robustbench("preact_resnet18", "kuangliu_resnet")
for _d, _w in ((28, 10), (70, 16), (34, 10), (34, 20)):
  for _act in ("relu", "swish"):
    ARCHS[f"robustbench:dm_wrn{_d}_{_w}" + ("_swish" if _act == "swish" else "")] = _robustbench(
      "wide_resnet", "dm_wrn", _DM_NORM, depth=_d, widen_factor=_w, activation=_act, conv_padding="same"
    )
for _n in ("resnet18", "resnet34", "resnet50"):
  ARCHS[f"torchvision:{_n}"] = Arch(
    "torchvision.models", _n, dict(_TV_RESNET), "torchvision_resnet", {"*": IMAGENET_MEAN_STD}, input_shape=None
  )
ARCHS["torchvision:mobilenet_v2"] = Arch(
  "torchvision.models",
  "mobilenet_v2_torchvision",
  {},
  "torchvision_mobilenetv2",
  {"*": IMAGENET_MEAN_STD},
  input_shape=None,
)


# A file written by ``python -m mdrad_jax.export``: the network and its options are in the file's metadata.
ARCHS["mdrad:export"] = Arch("mdrad_jax.export", "", {}, "mdrad", {"*": None}, input_shape=None, layout="flax")


def get_arch(name: str) -> Arch:
  if name not in ARCHS:
    raise UserError(f"unknown arch {name!r}; supported: {', '.join(sorted(ARCHS))}")
  return ARCHS[name]


def source_normalisation(arch: Arch, dataset: str):
  """The (mean, std) the source's network expects on ``dataset``, or None for [0, 1] inputs."""
  if dataset in arch.normalisation:
    return arch.normalisation[dataset]
  if "*" in arch.normalisation:
    return arch.normalisation["*"]
  raise UserError(
    f"no normalisation constants known for a {arch.source} network on {dataset!r} (known: "
    f"{', '.join(sorted(arch.normalisation))}); give them with mean=.../std=... "
    f"(values joined by '/') or mean=none,std=none"
  )


def options_from_file(state: dict, arch: Arch) -> dict:
  """Model options that the file decides: a PreActResNet with BN-ReLU before the classifier (RobustBench's
  ``bn_before_fc``) has ``bn.*`` entries."""
  if arch.model == "preact_resnet18" and "bn.weight" in state:
    return {"final_bn": True}
  return {}


def normalisation_from_file(state: dict, arch: Arch):
  """(mean, std) stored in the file itself (DeepMind's ``mean``/``std`` buffers), else None."""
  if arch.convention != "dm_wrn" or "mean" not in state or "std" not in state:
    return None
  return (tuple(float(v) for v in state["mean"].reshape(-1)), tuple(float(v) for v in state["std"].reshape(-1)))


# ---------------------------------------------------------------------------------------------
# The conversion.
# ---------------------------------------------------------------------------------------------
def _leaves(tree, prefix=()):
  for k, v in tree.items():
    if isinstance(v, dict) or hasattr(v, "items"):
      yield from _leaves(v, prefix + (k,))
    else:
      yield prefix + (k,), v


def _torch_shape(leaf: str, shape: tuple) -> tuple:
  if leaf == "kernel" and len(shape) == 4:
    h, w, i, o = shape
    return (o, i, h, w)
  if leaf == "kernel" and len(shape) == 2:
    return (shape[1], shape[0])
  return shape


def _fold(a_shape: tuple, want: tuple, fold: bool) -> bool:
  """Whether a linear weight ``[out, C*k*k]`` is folded to ``[out, C]`` (see the module docstring)."""
  return fold and len(a_shape) == 2 and a_shape[0] == want[1] and a_shape[1] != want[0] and a_shape[1] % want[0] == 0


def _converted_shape(leaf: str, a_shape: tuple, want: tuple, fold: bool, layout: str = "torch") -> tuple:
  if layout == "flax":
    return tuple(a_shape)
  if leaf == "kernel" and len(a_shape) == 4:
    o, i, h, w = a_shape
    return (h, w, i, o)
  if leaf == "kernel" and len(a_shape) == 2:
    return (want[0] if _fold(a_shape, want, fold) else a_shape[1], a_shape[0])
  return tuple(a_shape)


def _to_flax(leaf: str, a: np.ndarray, want: tuple, fold: bool, layout: str = "torch") -> np.ndarray:
  """Converts one source array to the Flax layout ``want`` (its shape already checked)."""
  if layout == "flax":
    pass
  elif leaf == "kernel" and a.ndim == 4:
    a = a.transpose(2, 3, 1, 0)
  elif leaf == "kernel" and a.ndim == 2:
    if _fold(a.shape, want, fold):
      a = a.reshape(a.shape[0], want[0], a.shape[1] // want[0]).sum(axis=2)
    a = a.T
  return np.ascontiguousarray(a, dtype=np.float32)


def _fmt(items, n=4):
  text = ", ".join(items[:n])
  return text + (f" (+{len(items) - n} more)" if len(items) > n else "")


def match(shapes: dict[str, tuple], module, arch: Arch, image_shape, *, label: str = "weights") -> tuple:
  """Pairs every variable of ``module`` with a key of the source (``shapes``: key -> shape), by shapes only.

  Returns ``(plan, target)``: ``[(collection, path, key), ...]`` and the variables' shapes.  Raises a
  one-line :class:`UserError` naming the first missing, unexpected and wrongly shaped keys (expected shapes
  in the source's layout).
  """
  rename = CONVENTIONS[arch.convention]
  target = jax.eval_shape(lambda: module.init(jax.random.key(0), np.zeros((1, *image_shape), np.float32)))
  target = {k: dict(target[k]) for k in sorted(target, key=lambda c: c != "params")}  # params first
  module_paths = {p[:-1] for col in target.values() for p, _ in _leaves(col)}
  plan, used, missing, wrong = [], set(), [], []
  for col, tree in target.items():
    for path, sds in _leaves(tree):
      mod_path, leaf = path[:-1], path[-1]
      suffix = (
        _BN_SUFFIX[leaf] if (col == "batch_stats" or leaf == "scale") else ("weight" if leaf == "kernel" else leaf)
      )
      if arch.layout == "flax":
        key = "/".join((col,) + path)
      else:
        key = f"{rename(mod_path, module, module_paths)}.{suffix}"
      want = tuple(sds.shape)
      if key not in shapes:
        missing.append(f"{key} {want if arch.layout == 'flax' else _torch_shape(leaf, want)}")
        continue
      used.add(key)
      if _converted_shape(leaf, tuple(shapes[key]), want, arch.fold_classifier, arch.layout) != want:
        expected = want if arch.layout == "flax" else _torch_shape(leaf, want)
        wrong.append(f"{key} is {tuple(shapes[key])}, expected {expected}")
        continue
      plan.append((col, path, key))
  ignored = [re.compile(p) for p in IGNORED_KEYS.get(arch.convention, ())]
  unexpected = [
    f"{k} {tuple(v)}" for k, v in shapes.items() if k not in used and not any(p.fullmatch(k) for p in ignored)
  ]
  if missing or unexpected or wrong:
    parts = []
    if missing:
      parts.append(f"missing {len(missing)}: {_fmt(missing)}")
    if unexpected:
      parts.append(f"unexpected {len(unexpected)}: {_fmt(unexpected)}")
    if wrong:
      parts.append(f"wrong shape {len(wrong)}: {_fmt(wrong)}")
    raise UserError(f"{label} does not match arch {module_name(arch)}: " + "; ".join(parts))
  return plan, target


def convert(state: dict[str, np.ndarray], module, arch: Arch, image_shape, *, label: str = "weights") -> dict:
  """Flax variables ``{'params', 'batch_stats'}`` of ``module`` from the source ``state`` dict (checked by
  :func:`match` first, so a mismatch converts nothing)."""
  plan, target = match({k: tuple(v.shape) for k, v in state.items()}, module, arch, image_shape, label=label)
  out = {col: {} for col in target}
  for col, path, key in plan:
    node = out[col]
    for p in path[:-1]:
      node = node.setdefault(p, {})
    leaf_sds = target[col]
    for p in path:
      leaf_sds = leaf_sds[p]
    value = _to_flax(path[-1], state[key], tuple(leaf_sds.shape), arch.fold_classifier, arch.layout)
    if not np.all(np.isfinite(value)):
      raise UserError(f"{label}: {key} holds NaN or Inf values")
    node[path[-1]] = value
  return out


def module_name(arch: Arch) -> str:
  for k, v in ARCHS.items():
    if v is arch:
      return k
  return arch.model
