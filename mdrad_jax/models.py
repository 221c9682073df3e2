"""Flax Linen image classifiers used as students and teachers, and the feature projector.

Every model is a pure function of ``(variables, x, train)``:

  * input ``x``: NHWC float32 images in [0, 1], any size >= 8x8, 1 or 3 (or any number of) channels;
  * optional input normalisation ``(x - mean) / std`` applied INSIDE the model (``mean``/``std`` attributes),
    so that perturbation budgets are measured in [0, 1] pixel space;
  * ``__call__(x, train=False, return_features=False)`` returns float32 logits ``[N, num_classes]``, or
    ``(logits, features)`` where ``features['last']`` is the map fed to global average pooling (NHWC; for
    the MLP ``[N, 1, 1, D]``) and ``features['stage<i>']`` are the outputs of the network's stages.
    Features are returned in float32 whatever the compute dtype;
  * BatchNorm statistics live in the ``batch_stats`` collection, ``use_running_average = not train``,
    momentum 0.9 and epsilon 1e-5 (PyTorch's defaults; PyTorch ``momentum=0.1`` is Flax ``momentum=0.9``).
    Flax updates the running variance with the biased batch variance, PyTorch with the unbiased one;
  * ``dtype`` is the compute dtype (e.g. ``jnp.bfloat16``); parameters stay float32. Pooling, the
    classifier and the returned logits/features are float32.

The CIFAR architectures follow the public PyTorch code used by the adversarial-distillation literature
(kuangliu/pytorch-cifar for ResNet/PreActResNet/MobileNetV2/VGG, the TRADES/Madry WideResNet), so
parameter counts equal those of the PyTorch models (``count_params``). Convolutions use explicit
PyTorch-style symmetric padding, so spatial sizes match PyTorch for every input size; max-pooling uses
ceil mode (``SAME``) so that small inputs never shrink to zero size (identical to PyTorch for even sizes).
Global average pooling replaces the fixed ``avg_pool2d(4)``/``avg_pool2d(8)`` of the PyTorch code (the same
operation for 32x32 inputs).
"""

from __future__ import annotations

import functools
import inspect
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Dtype = Any

__all__ = [
  "MODELS",
  "get_model",
  "init_model",
  "count_params",
  "model_options",
  "depthwise_conv_shifted",
  "FeatureProjector",
  "ResNet",
  "PreActResNet",
  "WideResNet",
  "MobileNetV2",
  "MobileNetV2Torchvision",
  "VGG",
  "SmallCNN",
  "TinyCNN",
  "MLP",
]

# PyTorch's kaiming_normal_(mode='fan_out', nonlinearity='relu') for convolutions (torchvision's choice;
# also the TRADES WideResNet's normal(0, sqrt(2 / (k*k*out_channels)))).
conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
# PyTorch's default nn.Linear weight init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
dense_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")

BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5


# ---------------------------------------------------------------------------------------------
# Shared pieces.
# ---------------------------------------------------------------------------------------------
def _conv(
  features: int,
  kernel: int,
  stride: int = 1,
  *,
  dtype: Dtype,
  name: str,
  groups: int = 1,
  use_bias: bool = False,
  padding=None,
  depthwise: str = "conv",
) -> nn.Conv:
  """A conv with PyTorch's symmetric zero padding ``kernel // 2`` (or the explicit ``padding`` given as
  ``((top, bottom), (left, right))``).  For a depthwise conv (``groups == features``), ``depthwise`` picks
  its lowering (:data:`DEPTHWISE_IMPLS`); the parameter is the same either way."""
  p = kernel // 2
  if padding is None:
    padding = ((p, p), (p, p))
  extra = {}
  if depthwise != "conv":
    if depthwise not in DEPTHWISE_IMPLS:
      raise ValueError(f"depthwise must be one of {DEPTHWISE_IMPLS}, got {depthwise!r}")
    if groups != features:
      raise ValueError(
        f"depthwise={depthwise!r} is for depthwise convolutions, got groups={groups}, {features} features"
      )
    extra["conv_general_dilated"] = shifted_conv_general_dilated
  return nn.Conv(
    features,
    (kernel, kernel),
    strides=(stride, stride),
    padding=padding,
    feature_group_count=groups,
    use_bias=use_bias,
    dtype=dtype,
    param_dtype=jnp.float32,
    kernel_init=conv_init,
    name=name,
    **extra,
  )


def _bn(train: bool, *, dtype: Dtype, name: str) -> nn.BatchNorm:
  return nn.BatchNorm(
    use_running_average=not train,
    momentum=BN_MOMENTUM,
    epsilon=BN_EPSILON,
    dtype=dtype,
    param_dtype=jnp.float32,
    name=name,
  )


MAX_POOL_IMPLS = ("reshape", "reduce_window")


def _max_pool(x, window: int = 2, impl: str = "reshape"):
  """``window`` x ``window`` / stride-``window`` max pool in ceil mode (a 1x1 map stays 1x1).

  ``impl='reshape'`` (the default): the windows do not overlap, so the pool is a reshape and a max over the two
  window axes.  ``impl='reduce_window'`` is ``nn.max_pool``, whose gradient is XLA's ``select_and_scatter``.

  The reshape form's forward equals
  ``nn.max_pool(x, (w, w), strides=(w, w), padding='SAME')`` exactly; its gradient is elementwise (a mask of
  the maxima) instead of XLA's ``select_and_scatter``, whose forward+backward took several times as long on
  the CPU (docs/performance.md).  The gradients agree wherever a window's maximum is unique;
  where several entries of a window tie for the maximum, the gradient is shared equally between them (PyTorch
  and ``select_and_scatter`` give it all to one).  After a ReLU, ties are mostly zeros, whose gradient the ReLU
  drops either way.
  """
  if impl == "reduce_window":
    return nn.max_pool(x, (window, window), strides=(window, window), padding="SAME")
  if impl != "reshape":
    raise ValueError(f"max_pool must be one of {MAX_POOL_IMPLS}, got {impl!r}")
  n, h, w, c = x.shape
  ph, pw = -h % window, -w % window
  if ph or pw:  # ceil mode: pad the bottom/right edge with -inf, as padding='SAME' does here
    x = jnp.pad(x, ((0, 0), (0, ph), (0, pw), (0, 0)), constant_values=-jnp.inf)
  x = x.reshape(n, (h + ph) // window, window, (w + pw) // window, window, c)
  return jnp.max(x, axis=(2, 4))


DEPTHWISE_IMPLS = ("conv", "shifted")


def depthwise_conv_shifted(x, kernel, strides=(1, 1), padding=((1, 1), (1, 1))):
  """Depthwise convolution of NHWC ``x`` with an HWIO ``kernel [kh, kw, 1, C]`` as a sum of ``kh * kw``
  shifted elementwise products: zero-pad, then for every kernel tap the strided slice of ``x`` it sees times
  that tap's per-channel weights.

  The same function as ``lax.conv_general_dilated(x, kernel, strides, padding, feature_group_count=C)``
  with NHWC/HWIO layouts (up to the order of the float additions).  Its forward and both gradients are
  elementwise products, sums, pads and slices, which XLA fuses into loops over the map, instead of a grouped
  convolution kernel.  ``padding`` is ``((top, bottom), (left, right))``; low-precision (bfloat16) products
  are summed in float32 and the result cast back.
  """
  kh, kw, one, c = kernel.shape
  if x.ndim != 4 or one != 1 or x.shape[-1] != c:
    raise ValueError(
      f"depthwise_conv_shifted takes NHWC x and an HWIO kernel [kh, kw, 1, C] with C = x's channels, "
      f"got x {tuple(x.shape)} and kernel {tuple(kernel.shape)}"
    )
  sh, sw = (int(s) for s in strides)
  (pt, pb), (pl, pr) = ((int(a), int(b)) for a, b in padding)
  xp = jnp.pad(x, ((0, 0), (pt, pb), (pl, pr), (0, 0)))
  n, hp, wp, _ = xp.shape
  ho, wo = (hp - kh) // sh + 1, (wp - kw) // sw + 1
  if ho < 1 or wo < 1:
    raise ValueError(f"a {kh}x{kw} kernel does not fit the padded {hp}x{wp} map")
  acc = jnp.promote_types(jnp.result_type(x, kernel), jnp.float32)  # bfloat16 products summed in float32
  out = None
  for i in range(kh):
    for j in range(kw):
      tap = jax.lax.slice(xp, (0, i, j, 0), (n, i + (ho - 1) * sh + 1, j + (wo - 1) * sw + 1, c), (1, sh, sw, 1))
      term = tap.astype(acc) * kernel[i, j, 0].astype(acc)
      out = term if out is None else out + term
  return out.astype(jnp.result_type(x, kernel))


def shifted_conv_general_dilated(
  lhs,
  rhs,
  window_strides,
  padding,
  lhs_dilation=None,
  rhs_dilation=None,
  dimension_numbers=None,
  feature_group_count=1,
  precision=None,
):
  """``lax.conv_general_dilated``'s signature for ``nn.Conv(conv_general_dilated=...)``: the depthwise case
  (NHWC/HWIO, no dilation, one filter per channel) by :func:`depthwise_conv_shifted`; anything else is an
  error (``precision`` does not apply: the products are elementwise)."""
  del precision
  nhwc = jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, ("NHWC", "HWIO", "NHWC"))
  if dimension_numbers is not None and jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers) != nhwc:
    raise ValueError(f"the shifted depthwise convolution takes NHWC/HWIO layouts, got {dimension_numbers}")
  for nm, d in (("lhs_dilation", lhs_dilation), ("rhs_dilation", rhs_dilation)):
    if d is not None and any(int(v) != 1 for v in d):
      raise ValueError(f"the shifted depthwise convolution has no dilation, got {nm}={tuple(d)}")
  c = lhs.shape[-1]
  if feature_group_count != c or rhs.shape[-2:] != (1, c):
    raise ValueError(
      f"the shifted lowering is for depthwise convolutions (one filter per channel), got {c} channels, "
      f"feature_group_count={feature_group_count}, kernel {tuple(rhs.shape)}"
    )
  if isinstance(padding, str):
    padding = jax.lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], window_strides, padding)
  return depthwise_conv_shifted(lhs, rhs, window_strides, padding)


_ACTIVATIONS = {"relu": nn.relu, "swish": nn.swish}


def _prepare_input(x, mean, std, dtype):
  """Checks the NHWC input, applies the in-model normalisation in float32, casts to the compute dtype."""
  if x.ndim != 4:
    raise ValueError(f"expected NHWC images of rank 4, got shape {tuple(x.shape)}")
  x = jnp.asarray(x, jnp.float32)
  c = x.shape[-1]
  if (mean is None) != (std is None):
    raise ValueError("give both mean and std for the input normalisation, or neither")
  if mean is not None:
    mean_a = jnp.asarray(mean, jnp.float32).reshape(-1)
    std_a = jnp.asarray(std, jnp.float32).reshape(-1)
    for nm, a in (("mean", mean_a), ("std", std_a)):
      if a.shape[0] not in (1, c):
        raise ValueError(f"normalisation {nm} has {a.shape[0]} values, the input has {c} channels")
    x = (x - mean_a) / std_a
  return x.astype(dtype)


def _classify(feat_map, num_classes: int, *, name: str = "linear"):
  """Global average pooling (float32) then a float32 linear classifier."""
  pooled = jnp.mean(feat_map.astype(jnp.float32), axis=(1, 2))
  return nn.Dense(num_classes, dtype=jnp.float32, param_dtype=jnp.float32, kernel_init=dense_init, name=name)(pooled)


def _output(logits, features: dict, return_features: bool):
  logits = logits.astype(jnp.float32)
  if not return_features:
    return logits
  return logits, {k: v.astype(jnp.float32) for k, v in features.items()}


# ---------------------------------------------------------------------------------------------
# ResNet (kuangliu CIFAR variant: 3x3 stem, stride 1, no max-pool) and CIFAR ResNet-20/56/110.
# ---------------------------------------------------------------------------------------------
class BasicBlock(nn.Module):
  """conv3x3-BN-ReLU-conv3x3-BN + shortcut (1x1 conv + BN when the shape changes), then ReLU."""

  features: int
  stride: int = 1
  dtype: Dtype = jnp.float32
  expansion = 1

  @nn.compact
  def __call__(self, x, train: bool):
    out = _conv(self.features, 3, self.stride, dtype=self.dtype, name="conv1")(x)
    out = nn.relu(_bn(train, dtype=self.dtype, name="bn1")(out))
    out = _conv(self.features, 3, dtype=self.dtype, name="conv2")(out)
    out = _bn(train, dtype=self.dtype, name="bn2")(out)
    if self.stride != 1 or x.shape[-1] != self.features:
      x = _conv(self.features, 1, self.stride, dtype=self.dtype, name="shortcut_conv")(x)
      x = _bn(train, dtype=self.dtype, name="shortcut_bn")(x)
    return nn.relu(out + x)


class Bottleneck(nn.Module):
  """1x1-3x3-1x1 bottleneck with expansion 4 (kuangliu ResNet-50 block)."""

  features: int
  stride: int = 1
  dtype: Dtype = jnp.float32
  expansion = 4

  @nn.compact
  def __call__(self, x, train: bool):
    out_ch = self.features * self.expansion
    out = _conv(self.features, 1, dtype=self.dtype, name="conv1")(x)
    out = nn.relu(_bn(train, dtype=self.dtype, name="bn1")(out))
    out = _conv(self.features, 3, self.stride, dtype=self.dtype, name="conv2")(out)
    out = nn.relu(_bn(train, dtype=self.dtype, name="bn2")(out))
    out = _conv(out_ch, 1, dtype=self.dtype, name="conv3")(out)
    out = _bn(train, dtype=self.dtype, name="bn3")(out)
    if self.stride != 1 or x.shape[-1] != out_ch:
      x = _conv(out_ch, 1, self.stride, dtype=self.dtype, name="shortcut_conv")(x)
      x = _bn(train, dtype=self.dtype, name="shortcut_bn")(x)
    return nn.relu(out + x)


_BLOCKS = {"basic": BasicBlock, "bottleneck": Bottleneck}


class ResNet(nn.Module):
  """CIFAR ResNet: 3x3 stride-1 stem conv + BN + ReLU, no max-pool, stages of residual blocks.

  The first stage keeps the resolution, each later stage halves it. ``widths=(64, 128, 256, 512)`` gives
  kuangliu's ResNet-18/34/50; ``widths=(16, 32, 64)`` with ``stage_sizes=(n, n, n)`` gives the CIFAR
  ResNet-(6n+2) with projection shortcuts (the ResNet-20/32/44/56/110 of the KD literature and of
  chenyaofo/pytorch-cifar-models, "option B").

  Stem options for imported networks (the defaults are the CIFAR stem above): ``stem_kernel``/``stem_stride``
  (torchvision's ImageNet stem is 7 and 2, padding 3) and ``stem_pool`` (PyTorch's
  ``MaxPool2d(3, stride=2, padding=1)`` after the stem, padded with -inf, as torchvision's ResNets and
  huyvnphan/PyTorch_CIFAR10's CIFAR ResNets have).
  """

  num_classes: int
  dtype: Dtype = jnp.float32
  mean: tuple | None = None
  std: tuple | None = None
  stage_sizes: Sequence[int] = (2, 2, 2, 2)
  widths: Sequence[int] = (64, 128, 256, 512)
  block: str = "basic"
  stem_kernel: int = 3
  stem_stride: int = 1
  stem_pool: bool = False

  @nn.compact
  def __call__(self, x, train: bool = False, return_features: bool = False):
    if self.block not in _BLOCKS:
      raise ValueError(f"unknown ResNet block {self.block!r}; known: {sorted(_BLOCKS)}")
    if len(self.stage_sizes) != len(self.widths):
      raise ValueError(f"stage_sizes {tuple(self.stage_sizes)} and widths {tuple(self.widths)} differ in length")
    block_cls = _BLOCKS[self.block]
    x = _prepare_input(x, self.mean, self.std, self.dtype)
    x = _conv(self.widths[0], self.stem_kernel, self.stem_stride, dtype=self.dtype, name="conv1")(x)
    x = nn.relu(_bn(train, dtype=self.dtype, name="bn1")(x))
    if self.stem_pool:
      x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    feats = {}
    for i, (n, w) in enumerate(zip(self.stage_sizes, self.widths)):
      for j in range(n):
        stride = 2 if (i > 0 and j == 0) else 1
        x = block_cls(w, stride, dtype=self.dtype, name=f"layer{i + 1}_{j}")(x, train)
      feats[f"stage{i + 1}"] = x
    feats["last"] = x
    return _output(_classify(x, self.num_classes), feats, return_features)


# ---------------------------------------------------------------------------------------------
# PreActResNet (kuangliu: no BN after the last stage).
# ---------------------------------------------------------------------------------------------
class PreActBlock(nn.Module):
  """BN-ReLU-conv3x3-BN-ReLU-conv3x3; the projection shortcut reads the pre-activated input."""

  features: int
  stride: int = 1
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    out = nn.relu(_bn(train, dtype=self.dtype, name="bn1")(x))
    if self.stride != 1 or x.shape[-1] != self.features:
      shortcut = _conv(self.features, 1, self.stride, dtype=self.dtype, name="shortcut_conv")(out)
    else:
      shortcut = x
    out = _conv(self.features, 3, self.stride, dtype=self.dtype, name="conv1")(out)
    out = nn.relu(_bn(train, dtype=self.dtype, name="bn2")(out))
    out = _conv(self.features, 3, dtype=self.dtype, name="conv2")(out)
    return out + shortcut


class PreActResNet(nn.Module):
  """Pre-activation ResNet (kuangliu layout). ``final_bn=True`` adds BN-ReLU before pooling (the variant
  of several robust-overfitting codebases, +2·512 parameters)."""

  num_classes: int
  dtype: Dtype = jnp.float32
  mean: tuple | None = None
  std: tuple | None = None
  stage_sizes: Sequence[int] = (2, 2, 2, 2)
  widths: Sequence[int] = (64, 128, 256, 512)
  final_bn: bool = False

  @nn.compact
  def __call__(self, x, train: bool = False, return_features: bool = False):
    x = _prepare_input(x, self.mean, self.std, self.dtype)
    x = _conv(self.widths[0], 3, dtype=self.dtype, name="conv1")(x)
    feats = {}
    for i, (n, w) in enumerate(zip(self.stage_sizes, self.widths)):
      for j in range(n):
        stride = 2 if (i > 0 and j == 0) else 1
        x = PreActBlock(w, stride, dtype=self.dtype, name=f"layer{i + 1}_{j}")(x, train)
      feats[f"stage{i + 1}"] = x
    if self.final_bn:
      x = nn.relu(_bn(train, dtype=self.dtype, name="bn")(x))
    feats["last"] = x
    return _output(_classify(x, self.num_classes), feats, return_features)


# ---------------------------------------------------------------------------------------------
# WideResNet (TRADES / Madry layout).
# ---------------------------------------------------------------------------------------------
class WideBasicBlock(nn.Module):
  """TRADES WRN block: BN-ReLU-conv3x3(stride)-BN-ReLU-[dropout]-conv3x3 + shortcut.

  When the channel count changes, both branches read the pre-activated input and the shortcut is a 1x1
  conv (no BN); otherwise the shortcut is the raw input.
  """

  features: int
  stride: int = 1
  dropout_rate: float = 0.0
  dtype: Dtype = jnp.float32
  activation: str = "relu"
  conv_padding: str = "pytorch"

  @nn.compact
  def __call__(self, x, train: bool):
    act_fn = _ACTIVATIONS[self.activation]
    equal_in_out = x.shape[-1] == self.features
    act = act_fn(_bn(train, dtype=self.dtype, name="bn1")(x))
    padding = None
    if self.conv_padding == "same" and self.stride == 2:
      padding = ((0, 1), (0, 1))  # DeepMind's explicit F.pad(v, (0, 1, 0, 1)) before a padding-0 conv
    out = _conv(self.features, 3, self.stride, dtype=self.dtype, name="conv1", padding=padding)(act)
    out = act_fn(_bn(train, dtype=self.dtype, name="bn2")(out))
    if self.dropout_rate > 0:
      out = nn.Dropout(self.dropout_rate, deterministic=not train)(out)
    out = _conv(self.features, 3, dtype=self.dtype, name="conv2")(out)
    if equal_in_out:
      if self.stride != 1:
        raise ValueError("WideResNet block with equal in/out channels cannot have stride != 1")
      shortcut = x
    else:
      shortcut = _conv(self.features, 1, self.stride, dtype=self.dtype, name="shortcut_conv")(act)
    return out + shortcut


class WideResNet(nn.Module):
  """WRN-depth-k: 3x3 conv (16) + 3 groups of (depth-4)/6 blocks with 16k, 32k, 64k channels, BN-ReLU,
  global pooling, linear. The TRADES PyTorch class also builds an unused ``sub_block1``; it takes no part
  in the forward pass and is not built here (so the count equals the forward-used PyTorch parameters).
  Dropout (``dropout_rate > 0``, train mode) needs a ``'dropout'`` rng.

  Options for DeepMind's WideResNets (RobustBench's ``DMWideResNet``): ``activation='swish'`` (x·sigmoid(x)
  everywhere ReLU is) and ``conv_padding='same'`` (a stride-2 3x3 conv pads one row/column at the bottom/right
  only, TensorFlow's ``SAME`` for even sizes; PyTorch's symmetric padding 1 otherwise).  As in DeepMind's
  code, that needs even map sizes at every stride-2 block (e.g. 32x32 inputs), where the 1x1 shortcut's
  output size matches."""

  num_classes: int
  dtype: Dtype = jnp.float32
  mean: tuple | None = None
  std: tuple | None = None
  depth: int = 34
  widen_factor: int = 10
  dropout_rate: float = 0.0
  activation: str = "relu"  # 'relu' | 'swish'
  conv_padding: str = "pytorch"  # 'pytorch' | 'same'

  @nn.compact
  def __call__(self, x, train: bool = False, return_features: bool = False):
    if self.depth < 10 or (self.depth - 4) % 6 != 0:
      raise ValueError(f"WideResNet depth must be 6n+4 with n >= 1, got {self.depth}")
    if self.widen_factor < 1:
      raise ValueError(f"WideResNet widen_factor must be >= 1, got {self.widen_factor}")
    if self.activation not in _ACTIVATIONS:
      raise ValueError(f"WideResNet activation must be one of {sorted(_ACTIVATIONS)}, got {self.activation!r}")
    if self.conv_padding not in ("pytorch", "same"):
      raise ValueError(f"WideResNet conv_padding must be 'pytorch' or 'same', got {self.conv_padding!r}")
    n = (self.depth - 4) // 6
    k = self.widen_factor
    x = _prepare_input(x, self.mean, self.std, self.dtype)
    x = _conv(16, 3, dtype=self.dtype, name="conv1")(x)
    feats = {}
    for i, w in enumerate((16 * k, 32 * k, 64 * k)):
      for j in range(n):
        stride = 2 if (i > 0 and j == 0) else 1
        x = WideBasicBlock(
          w,
          stride,
          self.dropout_rate,
          dtype=self.dtype,
          activation=self.activation,
          conv_padding=self.conv_padding,
          name=f"block{i + 1}_{j}",
        )(x, train)
      feats[f"stage{i + 1}"] = x
    x = _ACTIVATIONS[self.activation](_bn(train, dtype=self.dtype, name="bn1")(x))
    feats["last"] = x
    return _output(_classify(x, self.num_classes, name="fc"), feats, return_features)


# ---------------------------------------------------------------------------------------------
# MobileNetV2 (kuangliu CIFAR variant: stem stride 1, second stage stride 1).
# ---------------------------------------------------------------------------------------------
# (expansion, out_channels, num_blocks, stride)
MOBILENETV2_CIFAR_CFG = (
  (1, 16, 1, 1),
  (6, 24, 2, 1),
  (6, 32, 3, 2),
  (6, 64, 4, 2),
  (6, 96, 3, 1),
  (6, 160, 3, 2),
  (6, 320, 1, 1),
)


class InvertedResidual(nn.Module):
  """1x1 expand-BN-ReLU, 3x3 depthwise-BN-ReLU, 1x1 project-BN; residual only at stride 1 (with a 1x1
  conv + BN shortcut when the channel count changes), as in kuangliu's ``Block``."""

  expansion: int
  features: int
  stride: int = 1
  dtype: Dtype = jnp.float32
  depthwise: str = "conv"

  @nn.compact
  def __call__(self, x, train: bool):
    planes = self.expansion * x.shape[-1]
    out = _conv(planes, 1, dtype=self.dtype, name="conv1")(x)
    out = nn.relu(_bn(train, dtype=self.dtype, name="bn1")(out))
    out = _conv(planes, 3, self.stride, groups=planes, dtype=self.dtype, name="conv2", depthwise=self.depthwise)(out)
    out = nn.relu(_bn(train, dtype=self.dtype, name="bn2")(out))
    out = _conv(self.features, 1, dtype=self.dtype, name="conv3")(out)
    out = _bn(train, dtype=self.dtype, name="bn3")(out)
    if self.stride == 1:
      if x.shape[-1] != self.features:
        x = _conv(self.features, 1, dtype=self.dtype, name="shortcut_conv")(x)
        x = _bn(train, dtype=self.dtype, name="shortcut_bn")(x)
      out = out + x
    return out


class MobileNetV2(nn.Module):
  """MobileNetV2 for 32x32 inputs: 3x3 stride-1 stem (32), inverted residual stages, 1x1 conv to 1280.

  ``depthwise`` is the lowering of the 3x3 depthwise convolutions: ``'conv'`` (the default, XLA's grouped
  convolution) or ``'shifted'`` (:func:`depthwise_conv_shifted`); same parameters, same function."""

  num_classes: int
  dtype: Dtype = jnp.float32
  mean: tuple | None = None
  std: tuple | None = None
  cfg: Sequence[Sequence[int]] = MOBILENETV2_CIFAR_CFG
  depthwise: str = "conv"  # 'conv' | 'shifted' (see depthwise_conv_shifted)

  @nn.compact
  def __call__(self, x, train: bool = False, return_features: bool = False):
    x = _prepare_input(x, self.mean, self.std, self.dtype)
    x = _conv(32, 3, dtype=self.dtype, name="conv1")(x)
    x = nn.relu(_bn(train, dtype=self.dtype, name="bn1")(x))
    feats = {}
    for i, (e, c, n, s) in enumerate(self.cfg):
      for j in range(n):
        x = InvertedResidual(
          e, c, s if j == 0 else 1, dtype=self.dtype, depthwise=self.depthwise, name=f"layer{i + 1}_{j}"
        )(x, train)
      feats[f"stage{i + 1}"] = x
    x = _conv(1280, 1, dtype=self.dtype, name="conv2")(x)
    x = nn.relu(_bn(train, dtype=self.dtype, name="bn2")(x))
    feats["last"] = x
    return _output(_classify(x, self.num_classes), feats, return_features)


# torchvision's MobileNetV2 (ImageNet strides) and the CIFAR variant of chenyaofo/pytorch-cifar-models and
# huyvnphan/PyTorch_CIFAR10 (stem stride 1, second stage stride 1), (expansion, out_channels, num_blocks, stride).
MOBILENETV2_TORCHVISION_CFG = (
  (1, 16, 1, 1),
  (6, 24, 2, 2),
  (6, 32, 3, 2),
  (6, 64, 4, 2),
  (6, 96, 3, 1),
  (6, 160, 3, 2),
  (6, 320, 1, 1),
)


def make_divisible(v: float, divisor: int = 8) -> int:
  """torchvision's ``_make_divisible``: the nearest multiple of ``divisor``, never below 90% of ``v``."""
  new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
  if new_v < 0.9 * v:
    new_v += divisor
  return int(new_v)


class TorchvisionInvertedResidual(nn.Module):
  """torchvision's block: [1x1 expand-BN-ReLU6] (absent when the expansion is 1), 3x3 depthwise-BN-ReLU6,
  1x1 project-BN; identity residual when stride is 1 and the channel count is unchanged (no shortcut conv)."""

  expansion: int
  features: int
  stride: int = 1
  dtype: Dtype = jnp.float32
  depthwise: str = "conv"

  @nn.compact
  def __call__(self, x, train: bool):
    in_ch = x.shape[-1]
    hidden = int(round(in_ch * self.expansion))
    out = x
    if self.expansion != 1:
      out = _conv(hidden, 1, dtype=self.dtype, name="expand_conv")(out)
      out = nn.relu6(_bn(train, dtype=self.dtype, name="expand_bn")(out))
    out = _conv(hidden, 3, self.stride, groups=hidden, dtype=self.dtype, name="dw_conv", depthwise=self.depthwise)(out)
    out = nn.relu6(_bn(train, dtype=self.dtype, name="dw_bn")(out))
    out = _conv(self.features, 1, dtype=self.dtype, name="project_conv")(out)
    out = _bn(train, dtype=self.dtype, name="project_bn")(out)
    if self.stride == 1 and in_ch == self.features:
      out = out + x
    return out


class MobileNetV2Torchvision(nn.Module):
  """MobileNetV2 in torchvision's layout (ReLU6, channel counts rounded by ``make_divisible``, width
  multiplier).  The defaults are the CIFAR variant (stem stride 1, ``MOBILENETV2_CIFAR_CFG``) of
  chenyaofo/pytorch-cifar-models' ``mobilenetv2_x*`` and huyvnphan/PyTorch_CIFAR10's ``mobilenet_v2``;
  ``stem_stride=2`` with ``MOBILENETV2_TORCHVISION_CFG`` is torchvision's ImageNet network.  Blocks are
  ``block1``..``blockN`` in order (torchvision's ``features.1``..``features.N``); the classifier's dropout is
  not built (identity in eval mode).  ``depthwise``: as :class:`MobileNetV2`'s."""

  num_classes: int
  dtype: Dtype = jnp.float32
  mean: tuple | None = None
  std: tuple | None = None
  width_mult: float = 1.0
  stem_stride: int = 1
  cfg: Sequence[Sequence[int]] = MOBILENETV2_CIFAR_CFG
  last_channel: int = 1280
  round_nearest: int = 8
  depthwise: str = "conv"  # 'conv' | 'shifted' (see depthwise_conv_shifted)

  @nn.compact
  def __call__(self, x, train: bool = False, return_features: bool = False):
    x = _prepare_input(x, self.mean, self.std, self.dtype)
    stem = make_divisible(32 * self.width_mult, self.round_nearest)
    last = make_divisible(self.last_channel * max(1.0, self.width_mult), self.round_nearest)
    x = _conv(stem, 3, self.stem_stride, dtype=self.dtype, name="stem_conv")(x)
    x = nn.relu6(_bn(train, dtype=self.dtype, name="stem_bn")(x))
    feats = {}
    k = 0
    for i, (e, c, n, s) in enumerate(self.cfg):
      out_ch = make_divisible(c * self.width_mult, self.round_nearest)
      for j in range(n):
        k += 1
        x = TorchvisionInvertedResidual(
          e, out_ch, s if j == 0 else 1, dtype=self.dtype, depthwise=self.depthwise, name=f"block{k}"
        )(x, train)
      feats[f"stage{i + 1}"] = x
    x = _conv(last, 1, dtype=self.dtype, name="head_conv")(x)
    x = nn.relu6(_bn(train, dtype=self.dtype, name="head_bn")(x))
    feats["last"] = x
    return _output(_classify(x, self.num_classes, name="classifier"), feats, return_features)


# ---------------------------------------------------------------------------------------------
# VGG with BatchNorm (kuangliu CIFAR variant: conv stack + one linear layer).
# ---------------------------------------------------------------------------------------------
VGG_CFGS = {
  "vgg11": (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
  "vgg13": (64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
  "vgg16": (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"),
  "vgg19": (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M"),
}


class VGG(nn.Module):
  """conv3x3 (with bias) - BN - ReLU stacks separated by 2x2 max-pools, global pooling, one linear layer.
  ``features['last']`` is the map after the final max-pool (1x1 for 32x32 inputs).

  ``classifier_hidden`` adds Dense-ReLU layers (``fc1``, ``fc2``...) between the pooling and the classifier:
  ``(512, 512)`` is chenyaofo/pytorch-cifar-models' head, ``(4096, 4096)`` huyvnphan/PyTorch_CIFAR10's.  Their
  dropout layers are not built (identity in eval mode, which is how an imported teacher runs); their flatten
  equals the global pooling here because the last map is 1x1 for 32x32 inputs."""

  num_classes: int
  dtype: Dtype = jnp.float32
  mean: tuple | None = None
  std: tuple | None = None
  cfg: Sequence[Any] = VGG_CFGS["vgg16"]
  max_pool: str = "reshape"  # 'reshape' | 'reduce_window' (see _max_pool)
  classifier_hidden: Sequence[int] = ()

  @nn.compact
  def __call__(self, x, train: bool = False, return_features: bool = False):
    x = _prepare_input(x, self.mean, self.std, self.dtype)
    feats = {}
    conv_i, stage = 0, 1
    for v in self.cfg:
      if v == "M":
        x = _max_pool(x, impl=self.max_pool)
        feats[f"stage{stage}"] = x
        stage += 1
      else:
        x = _conv(int(v), 3, use_bias=True, dtype=self.dtype, name=f"conv{conv_i}")(x)
        x = nn.relu(_bn(train, dtype=self.dtype, name=f"bn{conv_i}")(x))
        conv_i += 1
    feats["last"] = x
    if not self.classifier_hidden:
      return _output(_classify(x, self.num_classes, name="classifier"), feats, return_features)
    h = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
    for k, width in enumerate(self.classifier_hidden):
      h = nn.relu(
        nn.Dense(int(width), dtype=jnp.float32, param_dtype=jnp.float32, kernel_init=dense_init, name=f"fc{k + 1}")(h)
      )
    logits = nn.Dense(
      self.num_classes, dtype=jnp.float32, param_dtype=jnp.float32, kernel_init=dense_init, name="classifier"
    )(h)
    return _output(logits, feats, return_features)


# ---------------------------------------------------------------------------------------------
# Small networks for CPU runs.
# ---------------------------------------------------------------------------------------------
class SmallCNN(nn.Module):
  """Stages of ``convs_per_stage`` x (conv3x3-BN-ReLU) with ``widths`` channels, a 2x2 max-pool between
  stages, global pooling, linear. 32x32 -> 8x8x128 features; 8x8 -> 2x2x128."""

  num_classes: int
  dtype: Dtype = jnp.float32
  mean: tuple | None = None
  std: tuple | None = None
  widths: Sequence[int] = (32, 64, 128)
  convs_per_stage: int = 1
  max_pool: str = "reshape"  # 'reshape' | 'reduce_window' (see _max_pool)

  @nn.compact
  def __call__(self, x, train: bool = False, return_features: bool = False):
    x = _prepare_input(x, self.mean, self.std, self.dtype)
    feats = {}
    for i, w in enumerate(self.widths):
      if i > 0:
        x = _max_pool(x, impl=self.max_pool)
      for j in range(self.convs_per_stage):
        x = _conv(w, 3, dtype=self.dtype, name=f"conv{i + 1}_{j}")(x)
        x = nn.relu(_bn(train, dtype=self.dtype, name=f"bn{i + 1}_{j}")(x))
      feats[f"stage{i + 1}"] = x
    feats["last"] = x
    return _output(_classify(x, self.num_classes), feats, return_features)


class TinyCNN(nn.Module):
  """Two conv3x3-BN-ReLU layers (the second with stride 2), global pooling, linear: compiles in seconds.
  8x8x1 digits -> 4x4x32 features."""

  num_classes: int
  dtype: Dtype = jnp.float32
  mean: tuple | None = None
  std: tuple | None = None
  widths: Sequence[int] = (16, 32)

  @nn.compact
  def __call__(self, x, train: bool = False, return_features: bool = False):
    x = _prepare_input(x, self.mean, self.std, self.dtype)
    feats = {}
    for i, w in enumerate(self.widths):
      x = _conv(w, 3, 1 if i == 0 else 2, dtype=self.dtype, name=f"conv{i + 1}")(x)
      x = nn.relu(_bn(train, dtype=self.dtype, name=f"bn{i + 1}")(x))
      feats[f"stage{i + 1}"] = x
    feats["last"] = x
    return _output(_classify(x, self.num_classes), feats, return_features)


class MLP(nn.Module):
  """Flatten, ``hidden`` Dense-ReLU layers, linear. No BatchNorm (so no ``batch_stats``); the parameter
  count depends on the input size. ``features['last']`` is the last hidden layer as ``[N, 1, 1, D]``."""

  num_classes: int
  dtype: Dtype = jnp.float32
  mean: tuple | None = None
  std: tuple | None = None
  hidden: Sequence[int] = (128, 128)

  @nn.compact
  def __call__(self, x, train: bool = False, return_features: bool = False):
    x = _prepare_input(x, self.mean, self.std, self.dtype)
    x = x.reshape(x.shape[0], -1)
    for i, h in enumerate(self.hidden):
      x = nn.relu(nn.Dense(h, dtype=self.dtype, param_dtype=jnp.float32, kernel_init=dense_init, name=f"fc{i + 1}")(x))
    feat = x[:, None, None, :]
    logits = _classify(feat, self.num_classes, name="out")
    return _output(logits, {"last": feat}, return_features)


# ---------------------------------------------------------------------------------------------
# Feature projector (CA-MKD ``Embed``).
# ---------------------------------------------------------------------------------------------
class FeatureProjector(nn.Module):
  """Maps a student feature map ``[N, h, w, c]`` to a teacher's ``[N, H, W, out_channels]``.

  Spatial matching: identity when ``(h, w) == out_hw``; adaptive average pooling when ``h`` and ``w`` are
  integer multiples of ``H`` and ``W`` (the exact PyTorch ``adaptive_avg_pool2d`` for that case);
  otherwise bilinear ``jax.image.resize`` (half-pixel centres: equal to PyTorch
  ``interpolate(mode='bilinear', align_corners=False)`` when upsampling; antialiased when downsizing by a
  non-integer factor). Then 1x1 conv (no bias) -> BatchNorm -> ReLU, as CA-MKD's ``Embed``.
  Output is float32.
  """

  out_channels: int
  out_hw: tuple[int, int]
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, f, train: bool = False):
    if f.ndim != 4:
      raise ValueError(f"FeatureProjector expects an NHWC feature map of rank 4, got shape {tuple(f.shape)}")
    if len(self.out_hw) != 2 or min(self.out_hw) < 1:
      raise ValueError(f"out_hw must be two positive sizes, got {self.out_hw}")
    n, h, w, c = f.shape
    th, tw = int(self.out_hw[0]), int(self.out_hw[1])
    f = f.astype(jnp.float32)
    if (h, w) != (th, tw):
      if h % th == 0 and w % tw == 0:
        f = f.reshape(n, th, h // th, tw, w // tw, c).mean(axis=(2, 4))
      else:
        f = jax.image.resize(f, (n, th, tw, c), method="bilinear", antialias=True)
    f = f.astype(self.dtype)
    f = nn.Conv(
      self.out_channels,
      (1, 1),
      use_bias=False,
      dtype=self.dtype,
      param_dtype=jnp.float32,
      kernel_init=conv_init,
      name="conv",
    )(f)
    f = nn.relu(_bn(train, dtype=self.dtype, name="bn")(f))
    return f.astype(jnp.float32)


# ---------------------------------------------------------------------------------------------
# Registry.
# ---------------------------------------------------------------------------------------------
MODELS: dict[str, Callable[..., nn.Module]] = {
  "resnet18": functools.partial(ResNet, stage_sizes=(2, 2, 2, 2)),
  "resnet34": functools.partial(ResNet, stage_sizes=(3, 4, 6, 3)),
  "resnet50": functools.partial(ResNet, stage_sizes=(3, 4, 6, 3), block="bottleneck"),
  "resnet20": functools.partial(ResNet, stage_sizes=(3, 3, 3), widths=(16, 32, 64)),
  "resnet32": functools.partial(ResNet, stage_sizes=(5, 5, 5), widths=(16, 32, 64)),
  "resnet44": functools.partial(ResNet, stage_sizes=(7, 7, 7), widths=(16, 32, 64)),
  "resnet56": functools.partial(ResNet, stage_sizes=(9, 9, 9), widths=(16, 32, 64)),
  "resnet110": functools.partial(ResNet, stage_sizes=(18, 18, 18), widths=(16, 32, 64)),
  "preact_resnet18": functools.partial(PreActResNet, stage_sizes=(2, 2, 2, 2)),
  "wide_resnet": WideResNet,
  "wrn28_10": functools.partial(WideResNet, depth=28, widen_factor=10),
  "wrn34_10": functools.partial(WideResNet, depth=34, widen_factor=10),
  "wrn34_20": functools.partial(WideResNet, depth=34, widen_factor=20),
  "mobilenet_v2": MobileNetV2,
  "mobilenetv2_x0_5": functools.partial(MobileNetV2Torchvision, width_mult=0.5),
  "mobilenetv2_x0_75": functools.partial(MobileNetV2Torchvision, width_mult=0.75),
  "mobilenetv2_x1_0": functools.partial(MobileNetV2Torchvision, width_mult=1.0),
  "mobilenetv2_x1_4": functools.partial(MobileNetV2Torchvision, width_mult=1.4),
  "mobilenet_v2_torchvision": functools.partial(MobileNetV2Torchvision, stem_stride=2, cfg=MOBILENETV2_TORCHVISION_CFG),
  "vgg11_bn": functools.partial(VGG, cfg=VGG_CFGS["vgg11"]),
  "vgg13_bn": functools.partial(VGG, cfg=VGG_CFGS["vgg13"]),
  "vgg16_bn": functools.partial(VGG, cfg=VGG_CFGS["vgg16"]),
  "vgg19_bn": functools.partial(VGG, cfg=VGG_CFGS["vgg19"]),
  "small_cnn": SmallCNN,
  "tiny_cnn": TinyCNN,
  "mlp": MLP,
}


def _accepted_kwargs(factory) -> set[str]:
  cls = factory.func if isinstance(factory, functools.partial) else factory
  return {p for p in inspect.signature(cls).parameters if p not in ("parent", "name")}


def _as_tuple(value):
  return tuple(_as_tuple(v) if isinstance(v, (list, tuple)) else v for v in value)


def model_options(name: str) -> set[str]:
  """The options (keyword arguments besides ``num_classes``) model ``name`` of ``MODELS`` accepts."""
  if name not in MODELS:
    raise ValueError(f"unknown model {name!r}; known models: {', '.join(sorted(MODELS))}")
  return _accepted_kwargs(MODELS[name]) - {"num_classes"}


def get_model(name: str, *, num_classes: int, **kwargs) -> nn.Module:
  """Builds model ``name`` from ``MODELS``; ``kwargs`` override its attributes (``dtype`` may be a string)."""
  if name not in MODELS:
    raise ValueError(f"unknown model {name!r}; known models: {', '.join(sorted(MODELS))}")
  if not isinstance(num_classes, (int, np.integer)) or isinstance(num_classes, bool) or num_classes < 1:
    raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
  factory = MODELS[name]
  accepted = _accepted_kwargs(factory)
  unknown = sorted(set(kwargs) - accepted)
  if unknown:
    raise ValueError(f"model {name!r} has no option(s) {unknown}; its options: {sorted(accepted - {'num_classes'})}")
  if isinstance(kwargs.get("dtype"), str):
    kwargs["dtype"] = jnp.dtype(kwargs["dtype"])
  for key, value in kwargs.items():  # lists (e.g. read back from config.json) become hashable tuples
    if isinstance(value, (list, tuple)):
      kwargs[key] = _as_tuple(value)
  return factory(num_classes=int(num_classes), **kwargs)


def build_model(model_config, num_classes: int) -> nn.Module:
  """The network of a config's ``model`` block (``name``, ``kwargs``, ``dtype``) for ``num_classes`` classes:
  :func:`get_model` with the block's options, computing in ``dtype`` when it is not float32."""
  kwargs = dict(model_config.get("kwargs", {}) or {})
  if model_config.get("dtype", "float32") != "float32":
    kwargs["dtype"] = jnp.dtype(model_config.dtype)
  return get_model(model_config.name, num_classes=num_classes, **kwargs)


# Compiling the random initialisers dominates initialisation on CPU (XLA spends seconds optimising each
# threefry draw; these options cut that to a fraction for ResNet-18). Initialisation runs once, so its
# code is compiled with the backend optimisations off; the values equal those of ``model.init`` up to
# float rounding.
_FAST_COMPILE_OPTIONS = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def init_model(model: nn.Module, rng: jax.Array, input_shape: Sequence[int]) -> dict:
  """Initialises ``model`` (eval mode) for images of ``input_shape`` = (H, W, C) or (N, H, W, C).

  Returns a dict with ``'params'`` and, for models with BatchNorm, ``'batch_stats'``. The initialisation
  is one jitted computation (compiled without backend optimisations on CPU, where that compile dominates).
  """
  shape = tuple(int(s) for s in input_shape)
  if len(shape) == 3:
    shape = (1,) + shape
  if len(shape) != 4:
    raise ValueError(f"input_shape must be (H, W, C) or (N, H, W, C), got {tuple(input_shape)}")
  x = jnp.zeros(shape, jnp.float32)
  lowered = jax.jit(functools.partial(model.init, train=False)).lower(rng, x)
  options = _FAST_COMPILE_OPTIONS if jax.default_backend() == "cpu" else None
  variables = lowered.compile(compiler_options=options)(rng, x)
  return dict(variables)


def count_params(params) -> int:
  """Number of scalars in a parameter tree (arrays or ``jax.ShapeDtypeStruct``s). Given a full variables
  dict (with a ``'params'`` entry), counts ``variables['params']`` only, never running statistics."""
  if isinstance(params, dict) and "params" in params:
    params = params["params"]
  return int(sum(int(np.prod(leaf.shape)) for leaf in jax.tree_util.tree_leaves(params)))
