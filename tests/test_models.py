"""Model zoo: parameter counts against the PyTorch architectures, shapes, BatchNorm semantics, dtypes,
the feature projector. Large models are only traced (jax.eval_shape); real forwards use tiny inputs."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mdrad_jax import models


# ---------------------------------------------------------------------------------------------
# Parameter counts of the PyTorch models, counted layer by layer from their constructors
# (kuangliu/pytorch-cifar ResNet, PreActResNet, MobileNetV2, VGG; TRADES WideResNet without its unused
# sub_block1). BatchNorm contributes weight + bias; running statistics are not parameters.
# ---------------------------------------------------------------------------------------------
def _conv(cin, cout, k, groups=1, bias=False):
  return k * k * (cin // groups) * cout + (cout if bias else 0)


def _bn(c):
  return 2 * c


def _linear(i, o):
  return i * o + o


def torch_resnet(blocks, nc, widths=(64, 128, 256, 512), bottleneck=False, cin=3):
  p, inp = _conv(cin, widths[0], 3) + _bn(widths[0]), widths[0]
  for i, (n, w) in enumerate(zip(blocks, widths)):
    for j in range(n):
      stride = 2 if (i > 0 and j == 0) else 1
      out = 4 * w if bottleneck else w
      if bottleneck:
        p += _conv(inp, w, 1) + _bn(w) + _conv(w, w, 3) + _bn(w) + _conv(w, out, 1) + _bn(out)
      else:
        p += _conv(inp, w, 3) + _bn(w) + _conv(w, w, 3) + _bn(w)
      if stride != 1 or inp != out:
        p += _conv(inp, out, 1) + _bn(out)
      inp = out
  return p + _linear(inp, nc)


def torch_preact_resnet18(nc):
  p, inp = _conv(3, 64, 3), 64
  for i, w in enumerate((64, 128, 256, 512)):
    for j in range(2):
      stride = 2 if (i > 0 and j == 0) else 1
      p += _bn(inp) + _conv(inp, w, 3) + _bn(w) + _conv(w, w, 3)
      if stride != 1 or inp != w:
        p += _conv(inp, w, 1)
      inp = w
  return p + _linear(512, nc)


def torch_wrn(depth, k, nc):
  n = (depth - 4) // 6
  p, inp = _conv(3, 16, 3), 16
  for w in (16 * k, 32 * k, 64 * k):
    for _ in range(n):
      p += _bn(inp) + _conv(inp, w, 3) + _bn(w) + _conv(w, w, 3)
      if inp != w:
        p += _conv(inp, w, 1)
      inp = w
  return p + _bn(inp) + _linear(inp, nc)


def torch_mobilenet_v2(nc):
  cfg = [(1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]
  p, inp = _conv(3, 32, 3) + _bn(32), 32
  for e, out, n, s in cfg:
    for stride in [s] + [1] * (n - 1):
      planes = e * inp
      p += _conv(inp, planes, 1) + _bn(planes) + _conv(planes, planes, 3, groups=planes) + _bn(planes)
      p += _conv(planes, out, 1) + _bn(out)
      if stride == 1 and inp != out:
        p += _conv(inp, out, 1) + _bn(out)
      inp = out
  return p + _conv(320, 1280, 1) + _bn(1280) + _linear(1280, nc)


def torch_vgg16_bn(nc):
  cfg = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]
  p, inp = 0, 3
  for v in cfg:
    if v != "M":
      p += _conv(inp, v, 3, bias=True) + _bn(v)
      inp = v
  return p + _linear(512, nc)


# Published counts for 10 classes (the usual figures for these PyTorch models).
PUBLISHED_10 = {
  "resnet18": 11_173_962,
  "resnet34": 21_282_122,
  "preact_resnet18": 11_171_146,
  "wrn34_10": 46_160_474,
  "mobilenet_v2": 2_296_922,
  "vgg16_bn": 14_728_266,
}

HAND_COUNT = {
  "resnet18": lambda nc: torch_resnet((2, 2, 2, 2), nc),
  "resnet34": lambda nc: torch_resnet((3, 4, 6, 3), nc),
  "resnet50": lambda nc: torch_resnet((3, 4, 6, 3), nc, bottleneck=True),
  "resnet56": lambda nc: torch_resnet((9, 9, 9), nc, widths=(16, 32, 64)),
  "preact_resnet18": torch_preact_resnet18,
  "wrn34_10": lambda nc: torch_wrn(34, 10, nc),
  "wrn34_20": lambda nc: torch_wrn(34, 20, nc),
  "wrn28_10": lambda nc: torch_wrn(28, 10, nc),
  "mobilenet_v2": torch_mobilenet_v2,
  "vgg16_bn": torch_vgg16_bn,
}


# features['last'] for a 32x32x3 input: the PyTorch models' map before their final average pooling.
LAST_32 = {
  "resnet18": (4, 4, 512),
  "resnet34": (4, 4, 512),
  "resnet50": (4, 4, 2048),
  "resnet56": (8, 8, 64),
  "preact_resnet18": (4, 4, 512),
  "wrn34_10": (8, 8, 640),
  "wrn34_20": (8, 8, 1280),
  "wrn28_10": (8, 8, 640),
  "mobilenet_v2": (4, 4, 1280),
  "vgg16_bn": (1, 1, 512),
}


def _shapes(model, input_shape):
  """(variables, logits, features) as ShapeDtypeStructs: traced once, never compiled."""
  x = jax.ShapeDtypeStruct(input_shape, jnp.float32)
  (logits, feats), variables = jax.eval_shape(
    lambda x: model.init_with_output(jax.random.key(0), x, train=False, return_features=True), x
  )
  return variables, logits, feats


def _np_variables(model, input_shape, seed=0):
  """Random variables built with NumPy on the traced shapes: a forward pass without compiling the
  (slow to compile) Flax random initialisers. Running statistics start at mean 0, variance 1."""
  x = jax.ShapeDtypeStruct(input_shape, jnp.float32)
  shapes = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x)
  rng = np.random.default_rng(seed)

  def fill(path, s):
    last = jax.tree_util.keystr(path[-1:])
    if "var" in last or "scale" in last:
      return jnp.ones(s.shape, s.dtype)
    if "mean" in last or "bias" in last:
      return jnp.zeros(s.shape, s.dtype)
    fan_in = int(np.prod(s.shape[:-1]))
    return jnp.asarray(rng.normal(0, np.sqrt(2 / fan_in), s.shape), s.dtype)

  return jax.tree_util.tree_map_with_path(fill, shapes)


def _run(module, variables, x, **kwargs):
  """``module.apply`` under one jit (cheaper to compile than op-by-op on CPU)."""
  return jax.jit(functools.partial(module.apply, **kwargs))(variables, jnp.asarray(x, jnp.float32))


def test_hand_counter_reproduces_published_numbers():
  for name, published in PUBLISHED_10.items():
    assert HAND_COUNT[name](10) == published, name


@pytest.mark.parametrize(
  "name,nc",
  [
    ("resnet18", 10),
    ("resnet34", 10),
    ("resnet50", 10),
    ("resnet56", 100),
    ("preact_resnet18", 10),
    ("wrn34_10", 10),
    ("wrn34_20", 10),
    ("wrn28_10", 100),
    ("mobilenet_v2", 10),
    ("vgg16_bn", 200),
  ],
)
def test_param_count_matches_pytorch(name, nc):
  variables, logits, feats = _shapes(models.get_model(name, num_classes=nc), (1, 32, 32, 3))
  assert models.count_params(variables["params"]) == HAND_COUNT[name](nc)
  assert logits.shape == (1, nc) and logits.dtype == jnp.float32
  assert feats["last"].shape == (1,) + LAST_32[name]
  if name in PUBLISHED_10 and nc == 10:
    assert models.count_params(variables["params"]) == PUBLISHED_10[name]


def test_generic_wide_resnet_counts():
  m = models.get_model("wide_resnet", num_classes=10, depth=16, widen_factor=4)
  variables, _, feats = _shapes(m, (1, 32, 32, 3))
  assert models.count_params(variables) == torch_wrn(16, 4, 10)  # variables dict: params only
  assert feats["last"].shape == (1, 8, 8, 256)


# ---------------------------------------------------------------------------------------------
# Shapes for 1/3 channels, several sizes and class counts (traced only).
# ---------------------------------------------------------------------------------------------
def _out(h, k=3, s=1, p=1):  # PyTorch conv output size
  return (h + 2 * p - k) // s + 1


def _pool(h):  # ceil-mode 2x2 max-pool
  return -(-h // 2)


@pytest.mark.parametrize("input_shape,nc", [((2, 8, 8, 1), 200), ((2, 28, 28, 1), 100)])
@pytest.mark.parametrize("name", ["resnet18", "preact_resnet18", "wrn28_10", "mobilenet_v2", "vgg16_bn"])
def test_big_model_shapes(name, input_shape, nc):
  model = models.get_model(name, num_classes=nc)
  variables, logits, feats = _shapes(model, input_shape)
  assert logits.shape == (input_shape[0], nc) and logits.dtype == jnp.float32
  h = input_shape[1]
  if name in ("resnet18", "preact_resnet18"):
    for _ in range(3):
      h = _out(h, s=2)
    channels = 512
  elif name == "wrn28_10":
    for _ in range(2):
      h = _out(h, s=2)
    channels = 640
  elif name == "mobilenet_v2":
    for _ in range(3):
      h = _out(h, s=2)
    channels = 1280
  else:
    for _ in range(5):
      h = _pool(h)
    channels = 512
  assert feats["last"].shape == (input_shape[0], h, h, channels)
  assert all(f.dtype == jnp.float32 for f in feats.values())
  assert "batch_stats" in variables


def test_resnet_stage_features():
  _, _, feats = _shapes(models.get_model("resnet18", num_classes=10), (2, 32, 32, 3))
  assert [feats[f"stage{i}"].shape for i in range(1, 5)] == [
    (2, 32, 32, 64),
    (2, 16, 16, 128),
    (2, 8, 8, 256),
    (2, 4, 4, 512),
  ]


# ---------------------------------------------------------------------------------------------
# Real forwards of the small nets.
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
  "name,input_shape,nc,last",
  [
    ("tiny_cnn", (3, 8, 8, 1), 10, (4, 4, 32)),
    ("small_cnn", (2, 28, 28, 1), 100, (7, 7, 128)),
    ("small_cnn", (2, 32, 32, 3), 10, (8, 8, 128)),
    ("mlp", (2, 8, 8, 1), 200, (1, 1, 128)),
    ("resnet18", (2, 8, 8, 3), 10, (1, 1, 512)),
  ],
)
def test_small_forward(name, input_shape, nc, last):
  model = models.get_model(name, num_classes=nc)
  variables = _np_variables(model, input_shape)
  x = jax.random.uniform(jax.random.key(1), input_shape)
  logits, feats = _run(model, variables, x, return_features=True)
  assert logits.shape == (input_shape[0], nc) and logits.dtype == jnp.float32
  assert feats["last"].shape == (input_shape[0],) + last
  assert np.all(np.isfinite(np.asarray(logits)))
  # logits are the linear classifier applied to the globally pooled 'last' features
  head = variables["params"][{"mlp": "out"}.get(name, "linear")]
  want = np.asarray(feats["last"]).mean(axis=(1, 2)) @ np.asarray(head["kernel"]) + np.asarray(head["bias"])
  np.testing.assert_allclose(logits, want, rtol=1e-4, atol=1e-4)
  assert ("batch_stats" in variables) == (name != "mlp")


@pytest.mark.parametrize("name", ["tiny_cnn", "mlp"])
def test_init_model(name):
  model = models.get_model(name, num_classes=10)
  variables = models.init_model(model, jax.random.key(0), (8, 8, 1))
  want = {"params", "batch_stats"} if name == "tiny_cnn" else {"params"}
  assert set(variables) == want
  if name == "mlp":
    assert models.count_params(variables) == (64 * 128 + 128) + (128 * 128 + 128) + (128 * 10 + 10)
  else:
    assert models.count_params(variables) == (9 * 16 + 2 * 16) + (9 * 16 * 32 + 2 * 32) + (32 * 10 + 10)
    # He (fan-out) normal conv init, PyTorch-like fresh BatchNorm
    k = np.asarray(variables["params"]["conv2"]["kernel"])
    assert abs(k.std() / np.sqrt(2 / (9 * 32)) - 1) < 0.1 and abs(k.mean()) < 0.01
    np.testing.assert_array_equal(variables["params"]["bn2"]["scale"], np.ones(32))
    np.testing.assert_array_equal(variables["batch_stats"]["bn2"]["var"], np.ones(32))
    np.testing.assert_array_equal(variables["batch_stats"]["bn2"]["mean"], np.zeros(32))


def _np_conv(x, w, stride):
  """NHWC conv, HWIO kernel, zero padding 1 (the PyTorch 3x3 conv)."""
  n, h, wd, _ = x.shape
  k = w.shape[0]
  xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  ho, wo = (h + 2 - k) // stride + 1, (wd + 2 - k) // stride + 1
  out = np.zeros((n, ho, wo, w.shape[-1]))
  for i in range(ho):
    for j in range(wo):
      patch = xp[:, i * stride : i * stride + k, j * stride : j * stride + k, :]
      out[:, i, j, :] = np.einsum("nhwc,hwco->no", patch, w)
  return out


def test_tiny_cnn_matches_numpy_forward_and_bn_update():
  model = models.get_model("tiny_cnn", num_classes=10)
  variables = _np_variables(model, (4, 8, 8, 1))
  p = jax.tree.map(np.asarray, variables["params"])
  x = np.asarray(jax.random.uniform(jax.random.key(1), (4, 8, 8, 1)), np.float64)
  eps = 1e-5

  # eval mode, fresh running stats (mean 0, var 1, scale 1, bias 0)
  h1 = np.maximum(_np_conv(x, p["conv1"]["kernel"], 1) / np.sqrt(1 + eps), 0)
  h2 = np.maximum(_np_conv(h1, p["conv2"]["kernel"], 2) / np.sqrt(1 + eps), 0)
  want = h2.mean(axis=(1, 2)) @ p["linear"]["kernel"] + p["linear"]["bias"]
  got = _run(model, variables, x)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)

  # train mode: batch statistics, running averages with PyTorch momentum 0.1
  _, upd = _run(model, variables, x, train=True, mutable=["batch_stats"])
  c1 = _np_conv(x, p["conv1"]["kernel"], 1)
  np.testing.assert_allclose(upd["batch_stats"]["bn1"]["mean"], 0.1 * c1.mean(axis=(0, 1, 2)), rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(upd["batch_stats"]["bn1"]["var"], 0.9 + 0.1 * c1.var(axis=(0, 1, 2)), rtol=1e-4, atol=1e-6)
  assert set(upd["batch_stats"]) == {"bn1", "bn2"}


def test_bfloat16_compute_keeps_float32_params_and_outputs():
  model = models.get_model("small_cnn", num_classes=10, dtype="bfloat16")
  model32 = models.get_model("small_cnn", num_classes=10)
  variables = _np_variables(model32, (2, 8, 8, 3))
  assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(variables))
  x = jax.random.uniform(jax.random.key(1), (2, 8, 8, 3))
  logits, feats = _run(model, variables, x, return_features=True)
  assert logits.dtype == jnp.float32 and feats["last"].dtype == jnp.float32
  ref = _run(model32, variables, x)
  np.testing.assert_allclose(logits, ref, rtol=0.1, atol=0.1)
  # big model, traced: float32 logits and params with bf16 compute
  variables, logits, _ = _shapes(models.get_model("resnet18", num_classes=10, dtype=jnp.bfloat16), (2, 32, 32, 3))
  assert logits.dtype == jnp.float32
  assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(variables))


def test_in_model_normalisation():
  mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
  plain = models.get_model("tiny_cnn", num_classes=10)
  normed = models.get_model("tiny_cnn", num_classes=10, mean=mean, std=std)
  variables = _np_variables(plain, (2, 8, 8, 3))
  x = np.asarray(jax.random.uniform(jax.random.key(1), (2, 8, 8, 3)))
  x_norm = (x - np.array(mean)) / np.array(std)
  np.testing.assert_allclose(_run(normed, variables, x), _run(plain, variables, x_norm), rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="3 values, the input has 1 channels"):
    normed.apply(variables, jnp.zeros((1, 8, 8, 1)))


def test_wide_resnet_small_forward_with_dropout():
  model = models.get_model("wide_resnet", num_classes=10, depth=10, widen_factor=1, dropout_rate=0.3)
  variables = _np_variables(model, (2, 8, 8, 1))
  x = jax.random.uniform(jax.random.key(1), (2, 8, 8, 1))
  logits, upd = _run(model, variables, x, train=True, mutable=["batch_stats"], rngs={"dropout": jax.random.key(2)})
  assert logits.shape == (2, 10)
  changed = jax.tree.map(lambda a, b: not np.allclose(a, b), variables["batch_stats"], upd["batch_stats"])
  assert all(jax.tree.leaves(changed))


# ---------------------------------------------------------------------------------------------
# Feature projector.
# ---------------------------------------------------------------------------------------------
def _np_bilinear_up(f, out_h, out_w):
  """PyTorch interpolate(mode='bilinear', align_corners=False) for upsampling, NHWC."""
  n, h, w, c = f.shape

  def coords(out, size):
    src = np.maximum((np.arange(out) + 0.5) * size / out - 0.5, 0)
    i0 = np.floor(src).astype(int)
    i1 = np.minimum(i0 + 1, size - 1)
    return i0, i1, src - i0

  y0, y1, ly = coords(out_h, h)
  x0, x1, lx = coords(out_w, w)
  top = f[:, y0][:, :, x0] * (1 - lx)[None, None, :, None] + f[:, y0][:, :, x1] * lx[None, None, :, None]
  bot = f[:, y1][:, :, x0] * (1 - lx)[None, None, :, None] + f[:, y1][:, :, x1] * lx[None, None, :, None]
  return top * (1 - ly)[None, :, None, None] + bot * ly[None, :, None, None]


def _np_avg_pool(f, oh, ow):
  n, h, w, c = f.shape
  sh, sw = h // oh, w // ow
  out = np.zeros((n, oh, ow, c))
  for i in range(oh):
    for j in range(ow):
      out[:, i, j] = f[:, i * sh : (i + 1) * sh, j * sw : (j + 1) * sw].mean(axis=(1, 2))
  return out


@pytest.mark.parametrize(
  "in_hw,out_hw,reference",
  [
    ((4, 4), (8, 8), _np_bilinear_up),  # ResNet-18 student -> WRN teacher
    ((8, 8), (4, 4), _np_avg_pool),  # integer downsizing: adaptive average pooling
    ((4, 4), (4, 4), None),  # same size: no resizing
  ],
)
def test_projector_matches_resize_then_embed(in_hw, out_hw, reference):
  proj = models.FeatureProjector(out_channels=6, out_hw=out_hw)
  f = np.asarray(jax.random.uniform(jax.random.key(0), (2, *in_hw, 5)), np.float64)
  variables = _np_variables(proj, f.shape)
  got = _run(proj, variables, f)
  assert got.shape == (2, *out_hw, 6) and got.dtype == jnp.float32
  resized = f if reference is None else reference(f, *out_hw)
  kernel = np.asarray(variables["params"]["conv"]["kernel"])[0, 0]
  want = np.maximum(resized @ kernel / np.sqrt(1 + 1e-5), 0)  # fresh BN in eval mode
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
  # train mode updates the projector's BatchNorm statistics
  _, upd = _run(proj, variables, f, train=True, mutable=["batch_stats"])
  assert not np.allclose(upd["batch_stats"]["bn"]["mean"], 0)


def test_projector_maps_student_features_to_teacher_shape():
  x = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)
  _, _, fs = _shapes(models.get_model("mobilenet_v2", num_classes=10), x.shape)
  _, _, ft = _shapes(models.get_model("vgg16_bn", num_classes=10), x.shape)
  _, _, fw = _shapes(models.get_model("wrn34_10", num_classes=10), x.shape)
  for tf in (ft["last"], fw["last"], jax.ShapeDtypeStruct((2, 3, 3, 7), jnp.float32)):
    proj = models.FeatureProjector(out_channels=tf.shape[-1], out_hw=tuple(tf.shape[1:3]))
    pv = jax.eval_shape(lambda f: proj.init(jax.random.key(0), f), fs["last"])
    out = jax.eval_shape(lambda v, f: proj.apply(v, f, train=False), pv, fs["last"])
    assert out.shape == tf.shape and out.dtype == jnp.float32


# ---------------------------------------------------------------------------------------------
# Registry and errors.
# ---------------------------------------------------------------------------------------------
def test_registry_errors():
  with pytest.raises(ValueError, match="unknown model 'resnet1'.*resnet18"):
    models.get_model("resnet1", num_classes=10)
  with pytest.raises(ValueError, match="no option"):
    models.get_model("resnet18", num_classes=10, depth=20)
  with pytest.raises(ValueError, match="num_classes"):
    models.get_model("resnet18", num_classes=0)
  with pytest.raises(ValueError, match="6n\\+4"):
    _shapes(models.get_model("wide_resnet", num_classes=10, depth=33), (1, 8, 8, 3))
  with pytest.raises(ValueError, match="rank 4"):
    _shapes(models.get_model("tiny_cnn", num_classes=10), (8, 8, 3))
  with pytest.raises(ValueError, match="input_shape"):
    models.init_model(models.get_model("tiny_cnn", num_classes=10), jax.random.key(0), (8, 8))
  for name in (
    "resnet18",
    "resnet34",
    "preact_resnet18",
    "wrn34_10",
    "wrn34_20",
    "wrn28_10",
    "wide_resnet",
    "mobilenet_v2",
    "vgg16_bn",
    "small_cnn",
    "tiny_cnn",
    "mlp",
  ):
    assert name in models.MODELS


def _np_max_pool_ceil(x, k=2):
  """float64 reference: k x k / stride-k max pool in ceil mode, and the index of each window's maximum."""
  n, h, w, c = x.shape
  ho, wo = -(-h // k), -(-w // k)
  out = np.empty((n, ho, wo, c))
  arg = np.empty((n, ho, wo, c, 2), int)
  for i in range(ho):
    for j in range(wo):
      win = x[:, i * k : (i + 1) * k, j * k : (j + 1) * k, :]  # the edge window is cut short (ceil mode)
      flat = win.reshape(n, -1, c)
      a = flat.argmax(axis=1)
      out[:, i, j, :] = flat.max(axis=1)
      arg[:, i, j, :, 0] = i * k + a // win.shape[2]
      arg[:, i, j, :, 1] = j * k + a % win.shape[2]
  return out, arg


@pytest.mark.parametrize("hw", [(8, 8), (7, 5), (1, 1)])
def test_max_pool_matches_numpy_forward_and_gradient(hw):
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, *hw, 3))  # continuous values: every window has a unique maximum
  want, arg = _np_max_pool_ceil(x)
  got = models._max_pool(jnp.asarray(x, jnp.float32))
  np.testing.assert_array_equal(np.asarray(got), want.astype(np.float32))
  # and it equals Flax's reduce_window pool exactly
  np.testing.assert_array_equal(got, nn.max_pool(jnp.asarray(x, jnp.float32), (2, 2), strides=(2, 2), padding="SAME"))
  # gradient of sum(g * pool(x)): g lands on each window's maximum, nowhere else
  g = rng.standard_normal(want.shape)
  dx = jax.grad(lambda v: jnp.sum(jnp.asarray(g, jnp.float32) * models._max_pool(v)))(jnp.asarray(x, jnp.float32))
  ref = np.zeros_like(x)
  n_idx, i_idx, j_idx, c_idx = np.indices(want.shape)
  ref[n_idx, arg[..., 0], arg[..., 1], c_idx] = g
  np.testing.assert_allclose(np.asarray(dx), ref, rtol=1e-6, atol=1e-7)


def test_max_pool_shares_the_gradient_of_tied_maxima():
  x = jnp.asarray([[[[2.0], [2.0]], [[1.0], [0.5]]]])  # one 2x2 window, two entries tie at the maximum
  dx = jax.grad(lambda v: models._max_pool(v).sum())(x)
  np.testing.assert_allclose(np.asarray(dx)[0, :, :, 0], [[0.5, 0.5], [0.0, 0.0]])


@pytest.mark.parametrize("name", ["small_cnn", "vgg11_bn"])
def test_max_pool_option_gives_the_same_network(name):
  # the two lowerings of the pool: same logits and the same input gradient (what PGD uses) on random images
  fast = models.get_model(name, num_classes=10)
  ref = models.get_model(name, num_classes=10, max_pool="reduce_window")
  variables = _np_variables(fast, (2, 32, 32, 3))
  x = jax.random.uniform(jax.random.key(3), (2, 32, 32, 3))
  np.testing.assert_array_equal(_run(fast, variables, x), _run(ref, variables, x))
  grads = [jax.grad(lambda v, m=m: m.apply(variables, v, train=False)[:, 0].sum())(x) for m in (fast, ref)]
  np.testing.assert_allclose(grads[0], grads[1], rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="max_pool must be one of"):
    models.get_model(name, num_classes=10, max_pool="avg").init(jax.random.key(0), x)


# ---------------------------------------------------------------------------------------------
# The shifted lowering of the depthwise convolution (models.depthwise_conv_shifted).
# ---------------------------------------------------------------------------------------------
def _np_depthwise(x, k, stride, pad):
  """float64 reference: depthwise conv y[n, a, b, c] = sum_ij xpad[n, s*a + i, s*b + j, c] * k[i, j, 0, c], and
  its adjoints for a cotangent ``g`` (returned as a function of g)."""
  (pt, pb), (pl, pr) = pad
  xp = np.pad(x, ((0, 0), (pt, pb), (pl, pr), (0, 0)))
  kh, kw = k.shape[:2]
  ho, wo = (xp.shape[1] - kh) // stride + 1, (xp.shape[2] - kw) // stride + 1
  y = np.zeros((x.shape[0], ho, wo, x.shape[3]))
  for a in range(ho):
    for b in range(wo):
      win = xp[:, a * stride : a * stride + kh, b * stride : b * stride + kw, :]
      y[:, a, b, :] = np.einsum("nijc,ijc->nc", win, k[:, :, 0, :])

  def adjoints(g):
    dxp = np.zeros_like(xp)
    dk = np.zeros_like(k)
    for a in range(ho):
      for b in range(wo):
        sl = (slice(None), slice(a * stride, a * stride + kh), slice(b * stride, b * stride + kw), slice(None))
        dxp[sl] += np.einsum("nc,ijc->nijc", g[:, a, b, :], k[:, :, 0, :])
        dk[:, :, 0, :] += np.einsum("nc,nijc->ijc", g[:, a, b, :], xp[sl])
    return dxp[:, pt : pt + x.shape[1], pl : pl + x.shape[2], :], dk

  return y, adjoints


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("hw", [(8, 8), (7, 5)])
def test_depthwise_shifted_matches_grouped_conv_and_numpy(stride, hw):
  rng = np.random.default_rng(stride)
  c, pad = 6, ((1, 1), (1, 1))  # the models' PyTorch-style symmetric padding of a 3x3 conv
  x = rng.standard_normal((2, *hw, c))
  k = rng.standard_normal((3, 3, 1, c))
  want, adjoints = _np_depthwise(x, k, stride, pad)
  g = rng.standard_normal(want.shape)
  want_dx, want_dk = adjoints(g)

  def grouped(xx, kk):
    return jax.lax.conv_general_dilated(
      xx, kk, (stride, stride), pad, dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=c
    )

  def shifted(xx, kk):
    return models.depthwise_conv_shifted(xx, kk, (stride, stride), pad)

  xj, kj, gj = (jnp.asarray(a, jnp.float32) for a in (x, k, g))
  results = {}
  for name, f in (("grouped", grouped), ("shifted", shifted)):
    y, vjp = jax.vjp(jax.jit(f), xj, kj)
    dx, dk = vjp(gj)
    results[name] = (np.asarray(y), np.asarray(dx), np.asarray(dk))
  y, dx, dk = results["shifted"]
  assert y.shape == want.shape and y.dtype == np.float32
  for got, ref in ((y, want), (dx, want_dx), (dk, want_dk)):
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
  for got, ref in zip(results["shifted"], results["grouped"]):
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
  # the same on 'SAME' padding given as a string (nn.Conv's other spelling)
  same = models.shifted_conv_general_dilated(xj, kj, (stride, stride), "SAME", feature_group_count=c)
  ref = jax.lax.conv_general_dilated(
    xj, kj, (stride, stride), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=c
  )
  np.testing.assert_allclose(np.asarray(same), np.asarray(ref), rtol=1e-5, atol=1e-5)


def test_depthwise_shifted_bfloat16_and_errors():
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((2, 8, 8, 4)), jnp.bfloat16)
  k = jnp.asarray(rng.standard_normal((3, 3, 1, 4)), jnp.bfloat16)
  y = models.depthwise_conv_shifted(x, k)
  want, _ = _np_depthwise(np.asarray(x, np.float64), np.asarray(k, np.float64), 1, ((1, 1), (1, 1)))
  assert y.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(y, np.float64), want, rtol=2e-2, atol=2e-2)  # bfloat16 output rounding
  with pytest.raises(ValueError, match="depthwise"):
    models.shifted_conv_general_dilated(x, jnp.zeros((3, 3, 2, 4)), (1, 1), ((1, 1), (1, 1)), feature_group_count=2)
  with pytest.raises(ValueError, match="dilation"):
    models.shifted_conv_general_dilated(x, k, (1, 1), ((1, 1), (1, 1)), rhs_dilation=(2, 2), feature_group_count=4)


@pytest.mark.parametrize(
  "name,kwargs",
  [
    ("mobilenet_v2", {"cfg": ((1, 16, 1, 1), (6, 24, 1, 2), (6, 24, 1, 1))}),  # stride 1 and 2, a residual
    ("mobilenetv2_x0_5", {"cfg": ((1, 16, 1, 1), (6, 24, 2, 2))}),
  ],
)
def test_depthwise_option_gives_the_same_network(name, kwargs):
  # same parameter tree, same initial values, same logits and gradients (input and parameters) in train mode
  conv = models.get_model(name, num_classes=10, **kwargs)
  shifted = models.get_model(name, num_classes=10, depthwise="shifted", **kwargs)
  x = jax.random.uniform(jax.random.key(3), (2, 16, 16, 3))
  v_conv = jax.jit(functools.partial(conv.init, train=False))(jax.random.key(0), x)
  v_shifted = jax.jit(functools.partial(shifted.init, train=False))(jax.random.key(0), x)
  assert jax.tree.structure(v_conv) == jax.tree.structure(v_shifted)
  for a, b in zip(jax.tree.leaves(v_conv), jax.tree.leaves(v_shifted)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  variables = _np_variables(conv, x.shape)

  def loss(params, xx, m):
    out, _ = m.apply({**variables, "params": params}, xx, train=True, mutable=["batch_stats"])
    return jnp.sum(out * jnp.arange(10.0))

  got = [
    jax.jit(jax.value_and_grad(loss, argnums=(0, 1)), static_argnums=2)(variables["params"], x, m)
    for m in (conv, shifted)
  ]
  (l0, (dp0, dx0)), (l1, (dp1, dx1)) = got
  np.testing.assert_allclose(float(l1), float(l0), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(dx1), np.asarray(dx0), rtol=1e-4, atol=1e-5)
  for a, b in zip(jax.tree.leaves(dp1), jax.tree.leaves(dp0)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-4)
  with pytest.raises(ValueError, match="depthwise must be one of"):
    models.get_model(name, num_classes=10, depthwise="fft", **kwargs).init(jax.random.key(0), x)


# ---------------------------------------------------------------------------------------------
# Networks of public checkpoints (see docs/teachers.md): published parameter counts, traced only.
# ---------------------------------------------------------------------------------------------
# chenyaofo/pytorch-cifar-models' README (CIFAR-10, millions to 2 decimals), torchvision's model docs
# (ImageNet-1k, exact), DeepMind's WRN-70-16 (266.8M).
@pytest.mark.parametrize(
  "name,kwargs,nc,hw,published,tol",
  [
    ("resnet32", {}, 10, 32, 0.47e6, 5e3),
    ("resnet44", {}, 10, 32, 0.66e6, 5e3),
    ("mobilenetv2_x0_5", {}, 10, 32, 0.70e6, 5e3),
    ("mobilenetv2_x0_75", {}, 10, 32, 1.37e6, 5e3),
    ("mobilenetv2_x1_0", {}, 10, 32, 2.24e6, 5e3),
    ("mobilenetv2_x1_4", {}, 10, 32, 4.33e6, 5e3),
    ("vgg11_bn", {"classifier_hidden": (512, 512)}, 10, 32, 9.76e6, 5e3),
    ("vgg19_bn", {"classifier_hidden": (512, 512)}, 10, 32, 20.57e6, 5e3),
    ("resnet18", {"stem_kernel": 7, "stem_stride": 2, "stem_pool": True}, 1000, 224, 11689512, 0),
    ("resnet50", {"stem_kernel": 7, "stem_stride": 2, "stem_pool": True}, 1000, 224, 25557032, 0),
    ("mobilenet_v2_torchvision", {}, 1000, 224, 3504872, 0),
    (
      "wide_resnet",
      {"depth": 70, "widen_factor": 16, "activation": "swish", "conv_padding": "same"},
      10,
      32,
      266.8e6,
      5e4,
    ),
  ],
)
def test_public_checkpoint_networks_have_published_sizes(name, kwargs, nc, hw, published, tol):
  model = models.get_model(name, num_classes=nc, **kwargs)
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, hw, hw, 3)), train=False))
  assert abs(models.count_params(variables) - published) <= tol


def test_stem_pool_and_same_padding_shapes():
  # torchvision's stem: 7x7/2 conv then 3x3/2 max-pool (padding 1): 224 -> 112 -> 56; then 56, 28, 14, 7
  m = models.get_model("resnet18", num_classes=10, stem_kernel=7, stem_stride=2, stem_pool=True)
  _, _, feats = _shapes(m, (1, 224, 224, 3))
  assert [feats[f"stage{i}"].shape[1] for i in range(1, 5)] == [56, 28, 14, 7]
  # SAME-style stride-2 padding (one row/column after) halves even sizes, as the symmetric padding does
  m = models.get_model("wide_resnet", num_classes=10, depth=10, widen_factor=1, conv_padding="same")
  _, _, feats = _shapes(m, (1, 32, 32, 3))
  assert [feats[f"stage{i}"].shape[1] for i in range(1, 4)] == [32, 16, 8]
