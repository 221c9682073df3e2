#!/usr/bin/env python
"""PyTorch eager reference of the library's train step (``mdrad_jax.train_step``), for the benchmark.

Run by ``benchmarks/bench_train_step.py`` in a child process per case (``--spec`` JSON, ``--out`` file); it can
also be run alone:

    .venv/bin/python benchmarks/torch_reference.py --spec '{"method": "pgd_at", "model": "small_cnn",
        "batch": 32, "teachers": [], "pgd_steps": 2, "steps": 2, "warmup": 1, "dtype": "fp32"}'

The step is the one the library compiles, written the way the official PyTorch codes write it:

* the same architectures (``mdrad_jax/models.py``: the kuangliu CIFAR ResNet / VGG-BN / MobileNetV2 and the
  small CPU networks, with PyTorch's BatchNorm defaults) — parameter counts are reported and checked against the
  JAX models by the benchmark;
* what the method's ``Plan`` (read from ``mdrad_jax.methods``) asks for: the teachers' eval-mode forwards on
  the clean and/or adversarial batch, the student's train-mode forwards in the plan's order (a view the loss
  does not use only moves BatchNorm statistics, as in the official loops);
* L∞ PGD with the method's random start ('uniform' / 'normal' σ = 0.001, projected or not as
  ``Method.attack_clip_start`` says), BatchNorm in eval mode, gradients from ``torch.autograd.grad`` with
  respect to the input only;
* the method's inner objective and outer loss (SA-MDRAD: swap rectifier, CA-MKD fusion, τ = 4, feature
  projectors; AdaAD: KL through teacher and student; RSLAD: soft labels of T(x); PGD-AT: CE);
* SGD with momentum 0.9 and coupled weight decay 5e-4 (``torch.optim.SGD``), the gradient norm as a metric.

``dtype``: 'fp32', or 'bf16' for ``torch.autocast`` with bfloat16 (forward/backward of every network; losses
in float32).  Optional ``count_flops``: one extra untimed step under ``torch.utils.flop_counter`` (matmuls and
convolutions, 2 FLOPs per multiply-add), to compare the work with the JAX step's necessary FLOPs.

``"breakdown": true`` times each part of the step on its own instead (:func:`breakdown`, for
``benchmarks/bench_breakdown.py``).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)


# ---------------------------------------------------------------------------------------------
# Models (NCHW).  forward(x, return_features=False) -> logits or (logits, last feature map).
# ---------------------------------------------------------------------------------------------
def _conv(cin, cout, k, stride=1, groups=1, bias=False):
  return nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=bias)


def _head(feat, linear):
  return linear(torch.flatten(F.adaptive_avg_pool2d(feat, 1), 1))


class BasicBlock(nn.Module):
  def __init__(self, cin, cout, stride):
    super().__init__()
    self.conv1, self.bn1 = _conv(cin, cout, 3, stride), nn.BatchNorm2d(cout)
    self.conv2, self.bn2 = _conv(cout, cout, 3), nn.BatchNorm2d(cout)
    self.shortcut = nn.Sequential()
    if stride != 1 or cin != cout:
      self.shortcut = nn.Sequential(_conv(cin, cout, 1, stride), nn.BatchNorm2d(cout))

  def forward(self, x):
    out = F.relu(self.bn1(self.conv1(x)))
    out = self.bn2(self.conv2(out))
    return F.relu(out + self.shortcut(x))


class ResNet(nn.Module):
  def __init__(self, num_classes, stage_sizes=(2, 2, 2, 2), widths=(64, 128, 256, 512), in_ch=3):
    super().__init__()
    self.conv1, self.bn1 = _conv(in_ch, widths[0], 3), nn.BatchNorm2d(widths[0])
    layers, cin = [], widths[0]
    for i, (n, w) in enumerate(zip(stage_sizes, widths)):
      for j in range(n):
        layers.append(BasicBlock(cin, w, 2 if (i > 0 and j == 0) else 1))
        cin = w
    self.layers = nn.Sequential(*layers)
    self.linear = nn.Linear(cin, num_classes)

  def forward(self, x, return_features=False):
    f = self.layers(F.relu(self.bn1(self.conv1(x))))
    logits = _head(f, self.linear)
    return (logits, f) if return_features else logits


class WideBasicBlock(nn.Module):
  """TRADES WRN block, as ``mdrad_jax.models.WideBasicBlock`` (no dropout)."""

  def __init__(self, cin, cout, stride):
    super().__init__()
    self.bn1, self.conv1 = nn.BatchNorm2d(cin), _conv(cin, cout, 3, stride)
    self.bn2, self.conv2 = nn.BatchNorm2d(cout), _conv(cout, cout, 3)
    self.shortcut = None if cin == cout else _conv(cin, cout, 1, stride)

  def forward(self, x):
    act = F.relu(self.bn1(x))
    out = self.conv2(F.relu(self.bn2(self.conv1(act))))
    return out + (x if self.shortcut is None else self.shortcut(act))


class WideResNet(nn.Module):
  def __init__(self, num_classes, depth=34, widen_factor=10, in_ch=3):
    super().__init__()
    n, k = (depth - 4) // 6, widen_factor
    self.conv1 = _conv(in_ch, 16, 3)
    blocks, cin = [], 16
    for i, w in enumerate((16 * k, 32 * k, 64 * k)):
      for j in range(n):
        blocks.append(WideBasicBlock(cin, w, 2 if (i > 0 and j == 0) else 1))
        cin = w
    self.blocks = nn.Sequential(*blocks)
    self.bn1 = nn.BatchNorm2d(cin)
    self.linear = nn.Linear(cin, num_classes)

  def forward(self, x, return_features=False):
    f = F.relu(self.bn1(self.blocks(self.conv1(x))))
    logits = _head(f, self.linear)
    return (logits, f) if return_features else logits


VGG_CFGS = {
  "vgg11": (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
  "vgg13": (64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
  "vgg16": (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"),
  "vgg19": (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M"),
}


class VGG(nn.Module):
  def __init__(self, num_classes, cfg, in_ch=3):
    super().__init__()
    layers, cin = [], in_ch
    for v in cfg:
      if v == "M":
        layers.append(nn.MaxPool2d(2, 2, ceil_mode=True))
      else:
        layers += [_conv(cin, v, 3, bias=True), nn.BatchNorm2d(v), nn.ReLU(inplace=True)]
        cin = v
    self.features = nn.Sequential(*layers)
    self.classifier = nn.Linear(cin, num_classes)

  def forward(self, x, return_features=False):
    f = self.features(x)
    logits = _head(f, self.classifier)
    return (logits, f) if return_features else logits


MOBILENETV2_CFG = (
  (1, 16, 1, 1),
  (6, 24, 2, 1),
  (6, 32, 3, 2),
  (6, 64, 4, 2),
  (6, 96, 3, 1),
  (6, 160, 3, 2),
  (6, 320, 1, 1),
)


class InvertedResidual(nn.Module):
  def __init__(self, cin, cout, expansion, stride):
    super().__init__()
    planes = expansion * cin
    self.stride = stride
    self.conv1, self.bn1 = _conv(cin, planes, 1), nn.BatchNorm2d(planes)
    self.conv2, self.bn2 = _conv(planes, planes, 3, stride, groups=planes), nn.BatchNorm2d(planes)
    self.conv3, self.bn3 = _conv(planes, cout, 1), nn.BatchNorm2d(cout)
    self.shortcut = nn.Sequential()
    if stride == 1 and cin != cout:
      self.shortcut = nn.Sequential(_conv(cin, cout, 1), nn.BatchNorm2d(cout))

  def forward(self, x):
    out = F.relu(self.bn1(self.conv1(x)))
    out = F.relu(self.bn2(self.conv2(out)))
    out = self.bn3(self.conv3(out))
    return out + self.shortcut(x) if self.stride == 1 else out


class MobileNetV2(nn.Module):
  def __init__(self, num_classes, cfg=MOBILENETV2_CFG, in_ch=3):
    super().__init__()
    self.conv1, self.bn1 = _conv(in_ch, 32, 3), nn.BatchNorm2d(32)
    layers, cin = [], 32
    for e, c, n, s in cfg:
      for j in range(n):
        layers.append(InvertedResidual(cin, c, e, s if j == 0 else 1))
        cin = c
    self.layers = nn.Sequential(*layers)
    self.conv2, self.bn2 = _conv(cin, 1280, 1), nn.BatchNorm2d(1280)
    self.linear = nn.Linear(1280, num_classes)

  def forward(self, x, return_features=False):
    out = self.layers(F.relu(self.bn1(self.conv1(x))))
    f = F.relu(self.bn2(self.conv2(out)))
    logits = _head(f, self.linear)
    return (logits, f) if return_features else logits


class SmallCNN(nn.Module):
  def __init__(self, num_classes, widths=(32, 64, 128), convs_per_stage=1, in_ch=3):
    super().__init__()
    layers, cin = [], in_ch
    for i, w in enumerate(widths):
      if i > 0:
        layers.append(nn.MaxPool2d(2, 2, ceil_mode=True))
      for _ in range(convs_per_stage):
        layers += [_conv(cin, w, 3), nn.BatchNorm2d(w), nn.ReLU(inplace=True)]
        cin = w
    self.features = nn.Sequential(*layers)
    self.linear = nn.Linear(cin, num_classes)

  def forward(self, x, return_features=False):
    f = self.features(x)
    logits = _head(f, self.linear)
    return (logits, f) if return_features else logits


class TinyCNN(nn.Module):
  def __init__(self, num_classes, widths=(16, 32), in_ch=3):
    super().__init__()
    layers, cin = [], in_ch
    for i, w in enumerate(widths):
      layers += [_conv(cin, w, 3, 1 if i == 0 else 2), nn.BatchNorm2d(w), nn.ReLU(inplace=True)]
      cin = w
    self.features = nn.Sequential(*layers)
    self.linear = nn.Linear(cin, num_classes)

  def forward(self, x, return_features=False):
    f = self.features(x)
    logits = _head(f, self.linear)
    return (logits, f) if return_features else logits


class MLP(nn.Module):
  def __init__(self, num_classes, in_features, hidden=(128, 128)):
    super().__init__()
    dims = [in_features, *hidden]
    self.hidden = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))
    self.out = nn.Linear(dims[-1], num_classes)

  def forward(self, x, return_features=False):
    h = torch.flatten(x, 1)
    for layer in self.hidden:
      h = F.relu(layer(h))
    logits = self.out(h)
    return (logits, h[:, :, None, None]) if return_features else logits


class FeatureProjector(nn.Module):
  """CA-MKD ``Embed`` as ``mdrad_jax.models.FeatureProjector``: spatial match, 1x1 conv, BN, ReLU."""

  def __init__(self, cin, out_channels, out_hw):
    super().__init__()
    self.out_hw = tuple(out_hw)
    self.conv, self.bn = _conv(cin, out_channels, 1), nn.BatchNorm2d(out_channels)

  def forward(self, f):
    h, w = f.shape[-2:]
    th, tw = self.out_hw
    if (h, w) != (th, tw):
      if h % th == 0 and w % tw == 0:
        f = F.adaptive_avg_pool2d(f, (th, tw))
      else:
        f = F.interpolate(f, size=(th, tw), mode="bilinear", align_corners=False, antialias=True)
    return F.relu(self.bn(self.conv(f)))


def build_model(name: str, kwargs: dict, num_classes: int, image_shape) -> nn.Module:
  h, w, c = image_shape
  kw = dict(kwargs or {})
  if name in ("resnet18", "resnet34"):
    sizes = {"resnet18": (2, 2, 2, 2), "resnet34": (3, 4, 6, 3)}[name]
    return ResNet(
      num_classes,
      stage_sizes=tuple(kw.get("stage_sizes", sizes)),
      widths=tuple(kw.get("widths", (64, 128, 256, 512))),
      in_ch=c,
    )
  if name.startswith("vgg") and name.endswith("_bn"):
    return VGG(num_classes, VGG_CFGS[name[:-3]], in_ch=c)
  if name == "mobilenet_v2":
    return MobileNetV2(num_classes, cfg=tuple(tuple(r) for r in kw.get("cfg", MOBILENETV2_CFG)), in_ch=c)
  wrn = {"wrn28_10": (28, 10), "wrn34_10": (34, 10), "wrn34_20": (34, 20)}
  if name in wrn or name == "wide_resnet":
    depth, k = wrn.get(name, (34, 10))
    return WideResNet(
      num_classes, depth=int(kw.get("depth", depth)), widen_factor=int(kw.get("widen_factor", k)), in_ch=c
    )
  if name == "small_cnn":
    return SmallCNN(
      num_classes,
      widths=tuple(kw.get("widths", (32, 64, 128))),
      convs_per_stage=int(kw.get("convs_per_stage", 1)),
      in_ch=c,
    )
  if name == "tiny_cnn":
    return TinyCNN(num_classes, widths=tuple(kw.get("widths", (16, 32))), in_ch=c)
  if name == "mlp":
    return MLP(num_classes, h * w * c, hidden=tuple(kw.get("hidden", (128, 128))))
  raise ValueError(f"no PyTorch version of model {name!r}")


def count_params(module: nn.Module) -> int:
  return sum(p.numel() for p in module.parameters())


# ---------------------------------------------------------------------------------------------
# Attack, objectives and losses.
# ---------------------------------------------------------------------------------------------
def _project(xa, x, eps):
  return torch.min(torch.max(xa, x - eps), x + eps).clamp(0.0, 1.0)


def pgd(objective, x, *, eps, step_size, num_steps, init, clip_start, leaf_input=True):
  """L∞ PGD maximising ``objective(x_adv).sum()``; gradients with respect to the input only.

  ``leaf_input=False`` feeds the networks a non-leaf view of the iterate (``torch.utils.flop_counter``'s
  module hooks do not accept a leaf input under ``torch.autograd.grad``)."""
  if init == "uniform":
    xa = x + torch.empty_like(x).uniform_(-eps, eps)
  elif init == "normal":
    xa = x + 0.001 * torch.randn_like(x)
  else:
    xa = x.clone()
  if clip_start or num_steps == 0:
    xa = _project(xa, x, eps)
  for _ in range(num_steps):
    xa.requires_grad_(True)
    loss = objective(xa if leaf_input else xa.view_as(xa)).sum()
    (grad,) = torch.autograd.grad(loss, [xa])
    xa = _project(xa.detach() + step_size * grad.sign(), x, eps)
  return xa.detach()


def _kl_rows(log_p, log_q):
  return torch.sum(log_p.exp() * (log_p - log_q), dim=-1)


def _reduce(per_sample, num_classes, reduction):
  total = per_sample.sum()
  if reduction == "sum":
    return total
  n = per_sample.shape[0]
  return total / n if reduction == "batchmean" else total / (n * num_classes)


def kl_from_logits(t, s, *, temperature=1.0, reduction="batchmean", rslad_eps=False):
  log_p = F.log_softmax(t / temperature, dim=-1)
  log_q = F.log_softmax(s / temperature, dim=-1)
  p = log_p.exp()
  pw = (-p * log_q + p * torch.log(p + 1e-5)) if rslad_eps else p * (log_p - log_q)
  return _reduce(pw.sum(-1), t.shape[-1], reduction)


def fused_target(t, labels, *, temperature):
  """SA-MDRAD target with the swap rectifier and CA-MKD fusion (the teachers' side of the library's defaults);
  t: [K, N, C]."""
  k, n, c = t.shape
  logp = F.log_softmax(t, dim=-1)
  logp_y = logp.gather(-1, labels[None, :, None].expand(k, n, 1))[..., 0]
  w = (1.0 - torch.softmax(-logp_y, dim=0)) / (k - 1) if k > 1 else torch.ones(k, n, device=t.device)
  m = t.argmax(-1)
  y = labels[None].expand(k, n)
  oh_m, oh_y = F.one_hot(m, c).bool(), F.one_hot(y, c).bool()
  z_m = t.max(-1, keepdim=True).values
  z_y = t.gather(-1, y[..., None])
  swapped = torch.where(oh_m, z_y, torch.where(oh_y, z_m, t))
  z = torch.where((m != y)[..., None], swapped, t)
  p = torch.softmax(z / temperature, dim=-1)
  return (w[..., None] * p).sum(0), w


def method_loss(name, hp, *, labels, s_adv, s_clean, t_clean, t_adv, projected, t_feats):
  f32 = lambda a: None if a is None else a.float()  # noqa: E731
  s_adv, s_clean = f32(s_adv), f32(s_clean)
  if name == "pgd_at":
    return F.cross_entropy(s_adv, labels)
  if name == "rslad":
    t = t_clean[0].float()
    kw = dict(reduction=hp["reduction"], rslad_eps=True)
    return hp["kl_scale"] * (
      hp["alpha"] * kl_from_logits(t, s_adv, **kw) + (1 - hp["alpha"]) * kl_from_logits(t, s_clean, **kw)
    )
  if name == "adaad":
    loss = hp["alpha"] * kl_from_logits(t_adv[0].float(), s_adv, reduction=hp["reduction"])
    if hp["alpha"] != 1.0:
      loss = loss + (1 - hp["alpha"]) * kl_from_logits(t_clean[0].float(), s_clean, reduction=hp["reduction"])
    return loss
  if name == "sa_mdrad":
    if hp["rectifier"] not in ("swap", "dynamic") or (hp["fusion"], hp["teacher_view"]) != ("camkd", "clean"):
      raise NotImplementedError(
        "the reference implements SA-MDRAD with the swap or dynamic rectifier, camkd fusion, teacher_view clean"
      )
    tau = hp["temperature"]
    t = torch.stack([z.float() for z in t_clean])
    p_hat, w = fused_target(t, labels, temperature=tau)
    if hp["rectifier"] == "dynamic":  # λ_i = (1 − P_S(y_i|x'_i))^β mixes in the fallback q_i, all detached
      p_y = torch.softmax(s_adv.detach(), dim=-1).gather(-1, labels[:, None])[:, 0]
      lam = (1.0 - p_y).clamp(0.0, 1.0).pow(hp["dynamic_beta"])[:, None]
      if hp["dynamic_target"] == "label":
        q = F.one_hot(labels, p_hat.shape[-1]).float()
      else:
        q = torch.softmax(s_clean.detach() / tau, dim=-1)
      p_hat = lam * p_hat + (1.0 - lam) * q

    def tkl(p, s):
      log_q = F.log_softmax(s / tau, dim=-1)
      pw = torch.xlogy(p, p) - p * log_q
      return tau**2 * _reduce(pw.sum(-1), p.shape[-1], hp["reduction"])

    loss = hp["alpha"] * tkl(p_hat, s_adv)
    if s_clean is not None and hp["alpha"] != 1.0:
      loss = loss + (1 - hp["alpha"]) * tkl(p_hat, s_clean)
    if hp["feature_weight"] != 0.0:
      feat = sum(
        torch.mean(w[k] * (projected[k].float() - t_feats[k].float()).pow(2).flatten(1).mean(1))
        for k in range(len(projected))
      )
      loss = loss + hp["feature_weight"] * feat
    if hp["ce_weight"] != 0.0:
      loss = loss + hp["ce_weight"] * F.cross_entropy(s_adv, labels)
    return loss
  raise NotImplementedError(f"no PyTorch reference for method {name!r}")


def make_objective(name, hp, *, student, teachers, labels, t_clean, autocast):
  if name in ("pgd_at",) or (name == "sa_mdrad" and hp["inner"] == "ce"):

    def ce(xa):
      with autocast():
        s = student(xa)
      return F.cross_entropy(s.float(), labels, reduction="none")

    return ce
  if name == "rslad":
    log_p = F.log_softmax(t_clean[0].float(), dim=-1)

    def kl(xa):
      with autocast():
        s = student(xa)
      return _kl_rows(log_p, F.log_softmax(s.float(), dim=-1))

    return kl
  if name == "adaad":

    def adaad(xa):
      with autocast():
        s = student(xa)
        t = teachers[0](xa)
      return _kl_rows(F.log_softmax(t.float(), dim=-1), F.log_softmax(s.float(), dim=-1))

    return adaad
  raise NotImplementedError(f"no PyTorch reference for the inner objective of {name!r}")


# ---------------------------------------------------------------------------------------------
# The step and its timing.
# ---------------------------------------------------------------------------------------------
def library_plan(method_name: str, num_available: int):
  """Method defaults, plan and attack settings from the library (imports JAX, starts no backend)."""
  sys.path.insert(0, REPO)
  from mdrad_jax import config_lib, methods

  method = methods.get_method(method_name)
  hp = dict(config_lib.method_config(method_name))
  hi = method.max_teachers
  k = num_available if hi is None else min(hi, num_available)
  plan = method.plan(hp, k)
  attack = dict(
    init=method.attack_init, bn_mode=method.attack_bn, clip_start=bool(getattr(method, "attack_clip_start", True))
  )
  return hp, plan, attack, k


def build(spec: dict):
  """The networks, optimizer, batch and step closure of one case (see :func:`run`), as a namespace."""
  import types

  device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
  if spec.get("threads"):
    torch.set_num_threads(int(spec["threads"]))
  torch.manual_seed(spec.get("seed", 0))
  dtype_name, _, mode = spec.get("dtype", "fp32").partition("+")
  if dtype_name not in ("fp32", "bf16") or mode not in ("", "compile"):
    raise ValueError(f"dtype must be fp32 or bf16, optionally with '+compile', got {spec.get('dtype')!r}")
  bf16 = dtype_name == "bf16"

  def autocast():
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)

  name = spec["method"]
  n_img, c = spec.get("image_size", 32), spec.get("channels", 3)
  shape = (n_img, n_img, c)
  ncls = spec.get("num_classes", 10)
  hp, plan, att, k = library_plan(name, len(spec["teachers"]))
  mem_fmt = torch.channels_last if spec.get("channels_last") else torch.contiguous_format

  student = build_model(spec["model"], spec.get("student_kwargs", {}), ncls, shape).to(device, memory_format=mem_fmt)
  teachers = [
    build_model(n, kw, ncls, shape).to(device, memory_format=mem_fmt).eval() for n, kw in spec["teachers"][:k]
  ]
  for t in teachers:
    t.requires_grad_(False)
  x = torch.rand(spec["batch"], c, n_img, n_img, device=device).contiguous(memory_format=mem_fmt)
  y = torch.randint(0, ncls, (spec["batch"],), device=device)

  projectors = []
  if plan.student_features:
    with torch.no_grad():
      _, fs = student.eval()(x[:2], return_features=True)
      for t in teachers:
        _, ft = t(x[:2], return_features=True)
        projectors.append(FeatureProjector(fs.shape[1], ft.shape[1], ft.shape[-2:]).to(device, memory_format=mem_fmt))
  projectors = nn.ModuleList(projectors)
  # '+compile': every network's forward through torch.compile (the attack's input gradients and the update
  # stay eager autograd calls on the compiled graphs); compilation happens in the warm-up steps.
  params_of = {"student": student, "teachers": list(teachers), "projectors": list(projectors)}
  counts = {
    "student": count_params(student),
    "teachers": [count_params(t) for t in teachers],
    "projectors": [count_params(p) for p in projectors],
  }
  if mode == "compile":
    student = torch.compile(student)
    teachers = [torch.compile(t) for t in teachers]
    projectors = nn.ModuleList([torch.compile(p) for p in projectors])
  opt = torch.optim.SGD(
    list(params_of["student"].parameters()) + [q for p in params_of["projectors"] for q in p.parameters()],
    lr=0.1,
    momentum=0.9,
    weight_decay=5e-4,
  )
  eps, step_size = 8 / 255, 2 / 255
  t_clean_on = [("clean" in v) or plan.teacher_features for v in plan.teacher_views]
  t_adv_on = [("adv" in v) for v in plan.teacher_views]

  def teacher_views(xx, which, features=False):
    logits, feats = [], []
    with torch.no_grad(), autocast():
      for t, on in zip(teachers, which):
        if not on:
          logits.append(None)
          feats.append(None)
          continue
        out = t(xx, return_features=features)
        if features:
          out, f = out
          feats.append(f)
        logits.append(out)
    return logits, feats

  def attack(t_clean, leaf_input=True):
    if att["bn_mode"] == "eval":
      student.eval()
    elif att["bn_mode"] == "train_update":
      student.train()
    else:
      raise NotImplementedError("attack bn_mode 'train_no_update' has no reference")
    objective = make_objective(
      name, hp, student=student, teachers=teachers, labels=y, t_clean=t_clean, autocast=autocast
    )
    return pgd(
      objective,
      x,
      eps=eps,
      step_size=step_size,
      num_steps=spec["pgd_steps"],
      init=att["init"],
      clip_start=att["clip_start"],
      leaf_input=leaf_input,
    )

  def student_view(view, xin):
    """One train-mode student forward: (logits, projected features or None)."""
    want = plan.student_features and view == "adv"  # features are distilled on the adversarial view
    with autocast():
      out = student(xin, return_features=want)
      projected = None
      if want:
        out, f = out
        projected = [p(f) for p in projectors]
    return out, projected

  def loss_of(s_adv, s_clean, projected, t_clean, t_adv, t_feats):
    return method_loss(
      name,
      hp,
      labels=y,
      s_adv=s_adv,
      s_clean=s_clean,
      t_clean=t_clean,
      t_adv=t_adv,
      projected=projected,
      t_feats=t_feats,
    )

  def step(leaf_input=True):
    t_clean, t_feats = teacher_views(x, t_clean_on, plan.teacher_features)
    x_adv = attack(t_clean, leaf_input=leaf_input)
    student.train()
    projectors.train()
    t_adv, _ = teacher_views(x_adv, t_adv_on)
    s_adv = s_clean = projected = None
    for view in plan.student_views:
      out, proj = student_view(view, x_adv if view == "adv" else x)
      if proj is not None:
        projected = proj
      if view == "adv":
        s_adv = out
      else:
        s_clean = out
    loss = loss_of(s_adv, s_clean, projected, t_clean, t_adv, t_feats)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = torch.sqrt(sum((p.grad.float() ** 2).sum() for p in student.parameters() if p.grad is not None))
    opt.step()
    accuracy = (s_adv if s_adv is not None else s_clean).argmax(-1).eq(y).float().mean()
    return loss.detach(), grad_norm.detach(), accuracy

  def sync():
    if device.type == "cuda":
      torch.cuda.synchronize()

  info = {
    "device": str(device),
    "torch": torch.__version__,
    "threads": torch.get_num_threads(),
    "dtype": ("bf16 autocast" if bf16 else "fp32") + (" + torch.compile" if mode else ""),
    "param_counts": counts,
    "plan": {
      "student_views": list(plan.student_views),
      "teacher_views": [list(v) for v in plan.teacher_views],
      "features": bool(plan.student_features),
    },
    "attack": dict(att, eps=eps, step_size=step_size, num_steps=spec["pgd_steps"]),
  }
  return types.SimpleNamespace(
    device=device,
    autocast=autocast,
    hp=hp,
    plan=plan,
    student=student,
    teachers=teachers,
    projectors=projectors,
    opt=opt,
    x=x,
    y=y,
    t_clean_on=t_clean_on,
    t_adv_on=t_adv_on,
    teacher_views=teacher_views,
    attack=attack,
    student_view=student_view,
    loss_of=loss_of,
    step=step,
    sync=sync,
    info=info,
  )


def run(spec: dict) -> dict:
  case = build(spec)
  step, sync = case.step, case.sync
  out = dict(case.info)
  rss_reset = _reset_peak_rss()  # the peak RSS mark then covers the steps only
  t0 = time.perf_counter()
  for _ in range(spec.get("warmup", 1)):
    loss, _, _ = step()
    float(loss)
  sync()
  out["warmup_s"] = time.perf_counter() - t0
  times = []
  for _ in range(spec.get("steps", 5)):
    t = time.perf_counter()
    loss, gn, acc = step()
    float(loss)
    sync()
    times.append(time.perf_counter() - t)
  out["step_times_s"] = times
  out["step_median_s"] = statistics.median(times)
  out["images_per_s"] = spec["batch"] / out["step_median_s"]
  out["loss"] = float(loss)
  out["peak_rss_bytes"] = int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
  out["peak_rss_steps_bytes"] = _vm_hwm() if rss_reset else None
  out["device_peak_bytes"] = torch.cuda.max_memory_allocated() if case.device.type == "cuda" else None
  if spec.get("count_flops"):
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
      step(leaf_input=False)
    out["step_flops_counted"] = float(counter.get_total_flops())
  return out


def _timed(fn, sync, warmup: int, reps: int) -> dict:
  for _ in range(warmup):
    fn()
  sync()
  times = []
  for _ in range(reps):
    t = time.perf_counter()
    fn()
    sync()
    times.append(time.perf_counter() - t)
  return {"median_s": statistics.median(times), "min_s": min(times), "times_s": times}


def breakdown(spec: dict) -> dict:
  """Times each part of the step on its own, on the step's shapes (``benchmarks/bench_breakdown.py`` names
  the same parts on the JAX side): each teacher's eval-mode forward per view, the attack, the student's
  train-mode forward + backward per view (a forward alone for a view the loss does not use), the feature
  projectors' forward + backward, the loss's forward + backward, the optimizer update, and the whole step.
  Cotangents are random tensors of the outputs' shapes; ``steps`` timed calls of each after ``warmup``."""
  case = build(spec)
  reps, warmup = spec.get("steps", 5), spec.get("warmup", 1)
  plan, x, sync, autocast = case.plan, case.x, case.sync, case.autocast
  student, projectors, opt = case.student, case.projectors, case.opt
  names = [n for n, _ in spec["teachers"][: len(case.teachers)]]
  k = len(case.teachers)
  parts: dict = {}

  def timed(name, fn):
    parts[name] = _timed(fn, sync, warmup, reps)

  def only(i):
    return [j == i for j in range(k)]

  t_clean, t_feats = case.teacher_views(x, case.t_clean_on, plan.teacher_features)
  for i, on in enumerate(case.t_clean_on):
    if on:
      timed(
        f"teacher{i} {names[i]} forward (clean)",
        lambda i=i: case.teacher_views(x, only(i), plan.teacher_features),
      )
  x_adv = case.attack(t_clean)
  timed(f"attack: PGD-{spec['pgd_steps']}", lambda: case.attack(t_clean))
  t_adv, _ = case.teacher_views(x_adv, case.t_adv_on)
  for i, on in enumerate(case.t_adv_on):
    if on:
      timed(f"teacher{i} {names[i]} forward (adv)", lambda i=i: case.teacher_views(x_adv, only(i)))

  # the loss's inputs as leaves: which views it uses, and its own forward + backward
  student.train()
  projectors.train()
  with torch.no_grad(), autocast():
    logits_shape = student(x[:2]).shape[1:]
  leaf = {v: torch.randn((x.shape[0], *logits_shape), device=x.device, requires_grad=True) for v in plan.student_views}
  proj_leaf = (
    [torch.randn(f.shape, device=x.device, requires_grad=True) for f in t_feats] if plan.student_features else None
  )

  def loss_fn():
    return case.loss_of(leaf.get("adv"), leaf.get("clean"), proj_leaf, t_clean, t_adv, t_feats)

  grads = torch.autograd.grad(loss_fn(), list(leaf.values()) + (proj_leaf or []), allow_unused=True)
  used = {v for v, g in zip(leaf, grads) if g is not None and bool(torch.any(g != 0))}
  if proj_leaf and any(g is not None and bool(torch.any(g != 0)) for g in grads[len(leaf) :]):
    used.add("adv")  # the projected features are those of the adversarial view

  for view in plan.student_views:
    xin = x_adv if view == "adv" else x
    want = plan.student_features and view == "adv"  # features are distilled on the adversarial view
    if view not in used:

      def fwd(xin=xin):
        with autocast():
          student(xin)

      timed(f"student forward, statistics only ({view})", fwd)
      continue
    with torch.no_grad(), autocast():
      out = student(xin, return_features=want)
    cot = [torch.randn_like(o) for o in (out if want else (out,))]

    def fwd_bwd(xin=xin, want=want, cot=cot):
      opt.zero_grad(set_to_none=True)
      with autocast():
        out = student(xin, return_features=want)
      torch.autograd.backward(list(out) if want else [out], cot)

    timed(f"student forward+backward ({view})", fwd_bwd)

  if plan.student_features and len(projectors):
    with torch.no_grad(), autocast():
      _, fs = student(x, return_features=True)
    f_in = torch.randn(fs.shape, device=x.device, dtype=torch.float32, requires_grad=True)
    with torch.no_grad(), autocast():
      cot = [torch.randn_like(p(f_in)) for p in projectors]

    def proj_fwd_bwd():
      opt.zero_grad(set_to_none=True)
      f_in.grad = None
      with autocast():
        outs = [p(f_in) for p in projectors]
      torch.autograd.backward(outs, cot)

    timed(f"projectors forward+backward x{len(projectors)}", proj_fwd_bwd)

  def loss_fwd_bwd():
    for t in list(leaf.values()) + (proj_leaf or []):
      t.grad = None
    loss_fn().backward()

  timed("loss forward+backward", loss_fwd_bwd)
  case.step()  # every parameter has a gradient for the update
  timed("optimizer update", opt.step)
  timed("whole step", lambda: float(case.step()[0]))
  return dict(case.info, parts=parts, views_with_gradient=sorted(used))


def _reset_peak_rss() -> bool:
  try:
    with open("/proc/self/clear_refs", "w") as f:
      f.write("5")
    return True
  except OSError:
    return False


def _vm_hwm() -> int | None:
  try:
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith("VmHWM:"):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  return None


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--spec", required=True, help="JSON: method, model, batch, teachers, pgd_steps, steps, ...")
  p.add_argument("--out", default="", help="write the result JSON here (default: print it)")
  args = p.parse_args(argv)
  spec = json.loads(args.spec)
  res = breakdown(spec) if spec.get("breakdown") else run(spec)
  if args.out:
    with open(args.out, "w") as f:
      json.dump(res, f)
  else:
    print(json.dumps(res, indent=1))
  return 0


if __name__ == "__main__":
  sys.exit(main())
