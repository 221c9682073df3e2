#!/usr/bin/env python
"""Times the library's jitted train step and compares it with a PyTorch eager reference of the same step.

    .venv/bin/python benchmarks/bench_train_step.py                      # the full set (slow on a CPU)
    .venv/bin/python benchmarks/bench_train_step.py --methods sa_mdrad --configs tiny_cnn:4 --image-size 8 \
        --steps 1 --warmup 0 --pgd-steps 1 --matmul-size 128 --torch off  # a tiny configuration

For every method x (student model, batch size) case and every variant of the levers asked for (XLA flags,
rolled/unrolled attack loop, buffer donation, compute dtype, student options, the lowering of the depthwise
convolutions of the networks that have them), one child process builds the student, random teachers and a
train state (random 32x32x3 images, 10 classes, PGD-k) and reports

* compile time (``lower`` + ``compile`` of the jitted step);
* step time: median (and min) over ``--steps`` timed steps after ``--warmup`` untimed ones; images/s;
* memory: the child's peak RSS while running the steps (the kernel's peak mark is reset after compiling, so
  the compiler's own memory is not counted; the whole-process peak is in the JSON too), XLA's buffer assignment
  of the step (``compiled.memory_analysis()``: arguments, outputs, temporaries), and the accelerator's peak bytes
  where JAX reports memory statistics (GPU);
* FLOPs: the compiled step's FLOPs from XLA's cost analysis, and the method's *necessary* FLOPs, each part
  measured by the cost analysis of a small jitted function (teacher forwards the method needs, one student
  forward + input gradient per attack step (plus the teachers' when the attack goes through them), one student
  forward + backward per outer view the loss depends on (a forward alone for a view that only moves BatchNorm
  statistics), feature projectors, the optimizer update).  Their ratio is a
  hardware-independent figure of wasted work (goal <= 1.05).  XLA counts a rolled loop's body once, so with
  ``--unroll false`` the step FLOPs (and the ratio) are not reported;
* achieved FLOP/s (necessary FLOPs / median step time, and XLA's step FLOPs / time) against the machine's
  measured peak: the median time of one large float32 matmul taken in the same child just before.

The PyTorch reference (``benchmarks/torch_reference.py``, the same architectures, attack and losses in eager
mode, float32 and bfloat16 autocast) runs in its own child process for each (method, model, batch) case when
torch is installed (``pip install -e '.[bench]'``); the speed ratios are printed next to the JAX rows.  Without
torch the reference is skipped and the output says so.  Each child is a fresh process, so peak memory and XLA
flags are per case.  The load average is recorded before and after every child.

Models are initialised with the library's initialiser distributions drawn by NumPy (no compile of the random
initialisers, which costs minutes on a CPU); ``--real-init`` uses ``mdrad_jax.models.init_model`` instead.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)

METHODS = ("sa_mdrad", "adaad", "rslad", "pgd_at")
CONFIGS = ("resnet18:32", "resnet18:128", "small_cnn:128")

# Teachers per student model.  SA-MDRAD takes all three (heterogeneous: different families, depths and
# feature-map sizes, each reachable from the student's last feature map by the projector's average pooling or
# identity); single-teacher methods (AdaAD, RSLAD) take the first.
TEACHER_SETS = {
  # ResNet-18 student (4x4x512 features): the CIFAR teachers of the multi-teacher literature.
  "resnet18": [["resnet18", {}], ["vgg16_bn", {}], ["mobilenet_v2", {}]],
  # small_cnn student (8x8x128): a wider small CNN (8x8x256), a deeper one (4x4x256) and an MLP (1x1x256).
  "small_cnn": [
    ["small_cnn", {"widths": [64, 128, 256]}],
    ["small_cnn", {"widths": [32, 64, 128, 256], "convs_per_stage": 2}],
    ["mlp", {"hidden": [256, 256]}],
  ],
  # the GPU benchmark (benchmarks/gpu.sh): a WRN-34-10 and two smaller standard teachers, ResNet-18 student
  "wrn34_10": [["wrn34_10", {}], ["resnet18", {}], ["mobilenet_v2", {}]],
  # tiny_cnn student (smoke tests, 8x8 inputs)
  "tiny_cnn": [["tiny_cnn", {"widths": [16, 32]}], ["mlp", {"hidden": [32]}], ["tiny_cnn", {"widths": [8, 16]}]],
  # smoke tests of --depthwise: a two-stage MobileNetV2 (depthwise layers of stride 1 and 2) and a tiny CNN
  "tiny_depthwise": [["mobilenet_v2", {"cfg": [[1, 16, 1, 1], [6, 24, 1, 2]]}], ["tiny_cnn", {"widths": [8, 16]}]],
}


def _bool(s: str) -> bool:
  if s.lower() in ("1", "true", "yes", "on"):
    return True
  if s.lower() in ("0", "false", "no", "off"):
    return False
  raise argparse.ArgumentTypeError(f"expected true/false, got {s!r}")


def _csv(s: str) -> list[str]:
  return [p.strip() for p in s.split(",") if p.strip()]


def parse_args(argv=None):
  p = argparse.ArgumentParser(
    description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
  )
  p.add_argument("--methods", type=_csv, default=list(METHODS), help="comma-separated method names")
  p.add_argument(
    "--configs",
    type=_csv,
    default=list(CONFIGS),
    help="comma-separated student:batch cases, e.g. resnet18:32,small_cnn:128",
  )
  p.add_argument(
    "--teacher-set", default="", help=f"teacher set name (default: the student model's); one of {sorted(TEACHER_SETS)}"
  )
  p.add_argument("--image-size", type=int, default=32)
  p.add_argument("--channels", type=int, default=3)
  p.add_argument("--num-classes", type=int, default=10)
  p.add_argument("--pgd-steps", type=int, default=10)
  p.add_argument("--steps", type=int, default=5, help="timed steps per case (the median is reported)")
  p.add_argument("--warmup", type=int, default=1, help="untimed steps after compiling")
  p.add_argument("--unroll", type=_csv, default=["true"], help="attack loop variants: true,false")
  p.add_argument("--donate", type=_csv, default=["true"], help="state donation variants: true,false")
  p.add_argument(
    "--student-kwargs",
    action="append",
    default=None,
    metavar="JSON",
    help="student model option variant, repeatable, e.g. '{\"max_pool\": \"reduce_window\"}' ('{}' = the defaults)",
  )
  p.add_argument(
    "--depthwise",
    type=_csv,
    default=["conv"],
    help="lowering variants of the depthwise convolutions of every network that has them (the MobileNetV2 "
    "teachers): conv (the default), shifted (mdrad_jax.models.depthwise_conv_shifted), e.g. conv,shifted",
  )
  p.add_argument(
    "--jax-dtypes",
    type=_csv,
    default=["float32"],
    help="JAX compute dtype variants: float32,bfloat16 (bfloat16 = config.model.dtype and "
    "config.teacher_dtype; parameters and optimizer state stay float32)",
  )
  p.add_argument(
    "--xla-variant",
    action="append",
    default=None,
    metavar="SPEC",
    help="XLA flag variant, repeatable: 'default' (the library's defaults, mdrad_jax/xla_flags.py), "
    "'none' (MDRAD_NO_DEFAULT_XLA_FLAGS=1) or literal flags, e.g. "
    "'--xla_cpu_experimental_ynn_fusion_type=-individual_convolution' (added to the "
    "defaults; a flag given here wins over a default of the same name)",
  )
  p.add_argument(
    "--torch", choices=("auto", "on", "off"), default="auto", help="PyTorch reference: auto = when torch is installed"
  )
  p.add_argument(
    "--torch-dtypes",
    type=_csv,
    default=["fp32", "bf16"],
    help="reference variants: fp32, bf16 (autocast), each optionally +compile (torch.compile of "
    "every network), e.g. fp32,bf16,fp32+compile,bf16+compile",
  )
  p.add_argument(
    "--peak-tflops",
    type=float,
    default=0.0,
    help="the chip's peak (e.g. dense bfloat16 TFLOP/s from its data sheet): adds model FLOP "
    "utilisation, the method's necessary FLOPs / step time / this peak, for every row",
  )
  p.add_argument("--torch-channels-last", action="store_true", help="NHWC memory format in the reference")
  p.add_argument("--torch-threads", type=int, default=0, help="torch.set_num_threads (0 = torch's default)")
  p.add_argument(
    "--torch-count-flops",
    type=_bool,
    default=True,
    help="one extra untimed reference step under torch.utils.flop_counter",
  )
  p.add_argument("--necessary", type=_bool, default=True, help="measure the necessary FLOPs (compiles the parts)")
  p.add_argument("--matmul-size", type=int, default=0, help="peak matmul n (0: 2048 on CPU, 8192 otherwise)")
  p.add_argument("--real-init", action="store_true", help="initialise with mdrad_jax.models.init_model")
  p.add_argument(
    "--malloc-trim",
    action="store_true",
    help="after compiling, hand the C heap's free memory back to the kernel (glibc malloc_trim) before the steps, "
    "to tell the compiler's leftovers from the step's own memory",
  )
  p.add_argument(
    "--repeats",
    type=int,
    default=1,
    help="run every case's children this many times, interleaved (medians of the repeats)",
  )
  p.add_argument("--json", default="", help="write all results to this JSON file")
  p.add_argument("--child-timeout", type=float, default=3600.0)
  p.add_argument("--quiet", action="store_true", help="do not echo the children's output")
  # internal: a child measures one case
  p.add_argument("--child-spec", default="", help=argparse.SUPPRESS)
  p.add_argument("--child-out", default="", help=argparse.SUPPRESS)
  return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------
# Machine and versions (no JAX import in the parent: XLA flags differ per child).
# ---------------------------------------------------------------------------------------------
def _version(pkg: str) -> str | None:
  try:
    return importlib.metadata.version(pkg)
  except importlib.metadata.PackageNotFoundError:
    return None


def cpu_model() -> str:
  from mdrad_jax import runtime

  return runtime.cpu_model()


def machine_info() -> dict:
  mem = None
  try:
    with open("/proc/meminfo") as f:
      mem = int(f.readline().split()[1]) * 1024
  except (OSError, ValueError, IndexError):
    pass
  return {
    "host": platform.node(),
    "platform": platform.platform(),
    "cpu": cpu_model(),
    "cpu_count": os.cpu_count(),
    "memory_bytes": mem,
    "python": platform.python_version(),
    "versions": {k: _version(k) for k in ("jax", "jaxlib", "flax", "optax", "numpy", "torch")},
    "env_XLA_FLAGS": os.environ.get("XLA_FLAGS", ""),
  }


def loadavg() -> list[float]:
  try:
    return [round(v, 2) for v in os.getloadavg()]
  except OSError:
    return []


# ---------------------------------------------------------------------------------------------
# Child: one JAX case.
# ---------------------------------------------------------------------------------------------
def _rss_bytes() -> int | None:
  return _status_bytes("VmRSS")


def _status_bytes(field: str) -> int | None:
  try:
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith(field + ":"):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  return None


def _reset_peak_rss() -> bool:
  """Resets the kernel's peak-RSS mark (VmHWM) of this process (Linux >= 4.0); False where impossible."""
  try:
    with open("/proc/self/clear_refs", "w") as f:
      f.write("5")
    return True
  except OSError:
    return False


def _peak_rss_bytes() -> int:
  import resource

  return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # KiB on Linux


def num_teachers_for(method, available: int) -> int:
  hi = method.max_teachers
  k = available if hi is None else min(hi, available)
  if k < method.min_teachers:
    raise ValueError(f"method {method.name!r} needs at least {method.min_teachers} teachers, the set has {available}")
  return k


def attack_through_teachers(name: str, hparams: dict) -> bool:
  """Whether the method's inner objective differentiates through the teachers (AdaAD-style)."""
  return name == "adaad" or (name == "sa_mdrad" and hparams.get("inner") == "adaad")


def fast_init(model, rng, input_shape):
  """Variables of ``model`` with the library's initialiser distributions, drawn by NumPy.

  Convolution kernels N(0, 2 / fan_out) (``models.conv_init``), dense kernels U(±1/sqrt(fan_in))
  (``models.dense_init``), biases 0, BatchNorm scale 1 / bias 0 / running mean 0 / running var 1 (Flax's
  defaults).  Only the values' distribution matters for timing; no initialiser is compiled.
  """
  import jax
  import jax.numpy as jnp
  import numpy as np

  shape = tuple(int(s) for s in input_shape)
  if len(shape) == 3:
    shape = (1,) + shape
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(shape, jnp.float32), train=False))
  seed = int(np.asarray(jax.random.key_data(rng)).ravel()[-1])
  gen = np.random.default_rng(seed)

  def draw(path, leaf):
    names = [str(getattr(k, "key", k)) for k in path]
    name, collection = names[-1], names[0]
    shp, dt = leaf.shape, leaf.dtype
    if collection == "batch_stats":
      return np.ones(shp, dt) if name == "var" else np.zeros(shp, dt)
    if name == "kernel" and len(shp) == 4:
      fan_out = int(np.prod(shp[:2])) * shp[-1]
      return (gen.standard_normal(shp) * np.sqrt(2.0 / fan_out)).astype(dt)
    if name == "kernel":
      bound = 1.0 / np.sqrt(shp[0])
      return gen.uniform(-bound, bound, shp).astype(dt)
    if name == "scale":
      return np.ones(shp, dt)
    return np.zeros(shp, dt)

  variables = jax.tree_util.tree_map_with_path(draw, shapes)
  return jax.tree.map(jnp.asarray, dict(variables))


def _flops(compiled) -> float | None:
  ca = compiled.cost_analysis()
  if isinstance(ca, (list, tuple)):
    ca = ca[0] if ca else None
  if not ca or "flops" not in ca:
    return None
  return float(ca["flops"])


def _cost(fn, *args) -> float | None:
  import jax

  return _flops(jax.jit(fn).lower(*args).compile())


def measure_peak_matmul(n: int, reps: int = 5) -> dict:
  import jax
  import jax.numpy as jnp

  a = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
  b = jax.random.normal(jax.random.key(2), (n, n), jnp.float32)
  f = jax.jit(jnp.matmul)
  f(a, b).block_until_ready()
  times = []
  for _ in range(reps):
    t = time.perf_counter()
    f(a, b).block_until_ready()
    times.append(time.perf_counter() - t)
  med = statistics.median(times)
  return {"n": n, "median_s": med, "flops_per_s": 2.0 * n**3 / med}


def loss_inputs(*, method, hparams, plan, state, teacher_models, teacher_vars, model, x, y):
  """Random values, of the step's shapes, for what the method's outer loss reads, and the loss as a function of
  the student's part: returns ``(views, projected, loss)`` with ``views`` {view: logits}, ``projected`` the
  projected features (or None) and ``loss(views, projected) -> scalar``."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from mdrad_jax import train_step as ts

  rng = np.random.default_rng(0)

  def rnd(shape):
    return jnp.asarray(rng.standard_normal(shape), jnp.float32)

  logits_shape = jax.eval_shape(
    lambda: model.apply(
      {
        "params": state.params["model"],
        **({"batch_stats": state.batch_stats["model"]} if state.batch_stats.get("model") else {}),
      },
      x,
      train=False,
    )
  ).shape
  t_clean_on = [("clean" in v) or plan.teacher_features for v in plan.teacher_views]
  t_adv_on = [("adv" in v) for v in plan.teacher_views]
  t_clean = tuple(rnd(logits_shape) if on else None for on in t_clean_on)
  t_adv = tuple(rnd(logits_shape) if on else None for on in t_adv_on)
  feats = None
  if plan.teacher_features:
    shapes = [
      jax.eval_shape(lambda tm=tm, tv=tv: tm.apply(tv, x, train=False, return_features=True))[1]["last"].shape
      for tm, tv in zip(teacher_models, teacher_vars)
    ]
    feats = tuple(rnd(s) for s in shapes)
  views = {v: rnd(logits_shape) for v in plan.student_views}
  projected = tuple(rnd(f.shape) for f in feats) if (plan.student_features and feats) else None

  def loss(views, projected):
    out = ts.StepOutputs(
      labels=jnp.asarray(y),
      student_adv=views.get("adv"),
      student_clean=views.get("clean"),
      projected=projected,
      teacher_clean=t_clean,
      teacher_adv=t_adv,
      teacher_clean_features=feats,
      epoch=jnp.zeros((), jnp.float32),
      lr_scale=1.0,
    )
    return method.loss(out, state.method_state, hparams)[0]

  return views, projected, loss


def views_with_gradient(*, method, hparams, plan, state, teacher_models, teacher_vars, projectors, model, x, y) -> set:
  """The student views whose logits (or projected features) the method's loss depends on: the gradient of the
  loss with respect to them, at random values, is not identically zero."""
  import jax
  import numpy as np

  views, projected, loss = loss_inputs(
    method=method,
    hparams=hparams,
    plan=plan,
    state=state,
    teacher_models=teacher_models,
    teacher_vars=teacher_vars,
    model=model,
    x=x,
    y=y,
  )
  g_views, g_proj = jax.jit(jax.grad(loss, argnums=(0, 1)))(views, projected)
  need = {v for v, g in g_views.items() if np.any(np.asarray(g) != 0)}
  if projected is not None and any(np.any(np.asarray(g) != 0) for g in g_proj):
    need.add("adv")  # student features are taken on the adversarial view
  return need


def necessary_flops(
  *, method, hparams, plan, attack, model, state, teacher_models, teacher_vars, projectors, x, y
) -> dict:
  """Cost analysis of each part of the work the method needs; returns parts and their total."""
  import jax
  import jax.numpy as jnp
  import optax
  from mdrad_jax import losses

  params_m = state.params["model"]
  stats_m = state.batch_stats.get("model", {})
  t_clean_on = [("clean" in v) or plan.teacher_features for v in plan.teacher_views]
  t_adv_on = [("adv" in v) for v in plan.teacher_views]
  parts: dict[str, float] = {}

  def variables(p, s):
    return {"params": p, **({"batch_stats": s} if s else {})}

  # teacher forwards (eval mode), once per view the method needs
  for i, (tm, tv) in enumerate(zip(teacher_models, teacher_vars)):
    n_views = int(t_clean_on[i]) + int(t_adv_on[i])
    if n_views:
      feat = plan.teacher_features and t_clean_on[i]
      f = _cost(
        lambda v, xx, tm=tm, feat=feat: tm.apply(v, xx, train=False, **({"return_features": True} if feat else {})),
        tv,
        x,
      )
      parts[f"teacher{i}_forward x{n_views}"] = n_views * f

  # attack: one student forward + input gradient per step (and the teachers' when the objective uses them)
  if method.make_objective is not None and attack.num_steps > 0:
    train_bn = attack.bn_mode != "eval"

    def student_input_grad(p, s, xx, yy):
      def obj(xa):
        if train_bn and s:
          logits, _ = model.apply(variables(p, s), xa, train=True, mutable=["batch_stats"])
        else:
          logits = model.apply(variables(p, s), xa, train=False)
        return losses.cross_entropy(logits, yy, reduction="sum")

      return jax.grad(obj)(xx)

    per_step = _cost(student_input_grad, params_m, stats_m, x, y)
    parts[f"student_forward+input_grad x{attack.num_steps}"] = attack.num_steps * per_step
    if attack_through_teachers(method.name, hparams):
      for i, (tm, tv) in enumerate(zip(teacher_models, teacher_vars)):
        tg = _cost(lambda v, xx, tm=tm: jax.grad(lambda xa: jnp.sum(tm.apply(v, xa, train=False)))(xx), tv, x)
        parts[f"teacher{i}_forward+input_grad x{attack.num_steps}"] = attack.num_steps * tg
    if method.name == "trades":  # its objective needs S(x) once
      parts["student_forward (trades clean target)"] = _cost(
        lambda p, s, xx: model.apply(variables(p, s), xx, train=False), params_m, stats_m, x
      )

  # outer: one student forward + backward (train mode) per view whose output the loss depends on; a forward
  # alone for a view that only moves BatchNorm statistics
  grad_views = views_with_gradient(
    method=method,
    hparams=hparams,
    plan=plan,
    state=state,
    teacher_models=teacher_models,
    teacher_vars=teacher_vars,
    projectors=projectors,
    model=model,
    x=x,
    y=y,
  )
  for view in plan.student_views:
    feat = plan.student_features and view == "adv"

    def fwd_bwd(p, s, xx, feat=feat):
      def f(pp):
        out, _ = model.apply(
          variables(pp, s), xx, train=True, mutable=["batch_stats"], **({"return_features": True} if feat else {})
        )
        if feat:
          logits, feats = out
          return jnp.sum(logits) + jnp.sum(feats["last"])
        return jnp.sum(out)

      return jax.grad(f)(p)

    def fwd_only(p, s, xx):
      return model.apply(variables(p, s), xx, train=True, mutable=["batch_stats"])

    if view in grad_views:
      parts[f"student_forward+backward ({view})"] = _cost(fwd_bwd, params_m, stats_m, x)
    else:
      parts[f"student_forward, statistics only ({view})"] = _cost(fwd_only, params_m, stats_m, x)

  # feature projectors: forward + backward (parameters and input)
  if plan.student_features and projectors:
    _, s_feats = jax.eval_shape(lambda: model.apply(variables(params_m, stats_m), x, train=False, return_features=True))
    fmap = jnp.zeros(s_feats["last"].shape, jnp.float32)
    pvars = [
      (state.params["projectors"][str(i)], state.batch_stats["projectors"].get(str(i), {}))
      for i in range(len(projectors))
    ]

    def proj_grads(pv, f):  # every projector's forward + backward (parameters and input), one compile
      grads = []
      for proj, (p, s) in zip(projectors, pv):

        def g(p_and_f, proj=proj, s=s):
          out, _ = proj.apply(variables(p_and_f[0], s), p_and_f[1], train=True, mutable=["batch_stats"])
          return jnp.sum(out)

        grads.append(jax.grad(g)((p, f)))
      return grads

    total = _cost(proj_grads, pvars, fmap)
    parts[f"projectors_forward+backward x{len(projectors)}"] = total

  # optimizer update
  def update(grads, opt_state, params):
    upd, new_opt = state.tx.update(grads, opt_state, params)
    return optax.apply_updates(params, upd), new_opt

  parts["optimizer_update"] = _cost(update, state.params, state.opt_state, state.params)
  parts = {key: (v or 0.0) for key, v in parts.items()}
  return {"parts": parts, "total": float(sum(parts.values()))}


def setup_xla(spec: dict) -> str:
  """Sets XLA_FLAGS for this child (the library's defaults, or none, plus the variant's flags) before JAX
  starts; returns them."""
  if spec.get("xla_mode") == "none":
    os.environ["MDRAD_NO_DEFAULT_XLA_FLAGS"] = "1"
  sys.path.insert(0, REPO)
  from mdrad_jax import xla_flags

  xla_flags.apply_defaults()
  extra = spec.get("xla_extra", "")
  if extra:  # flags given for this variant win over defaults of the same name
    names = {f.split("=", 1)[0] for f in extra.split()}
    kept = [f for f in os.environ.get("XLA_FLAGS", "").split() if f.split("=", 1)[0] not in names]
    os.environ["XLA_FLAGS"] = " ".join(kept + extra.split())
  return os.environ.get("XLA_FLAGS", "")


def with_options(name: str, kwargs: dict, options: dict) -> dict:
  """``kwargs`` of model ``name`` plus those of ``options`` (e.g. ``{"depthwise": "shifted"}``) the model
  accepts; the others are left out (a ResNet has no depthwise convolutions)."""
  from mdrad_jax import models

  accepted = models.model_options(name)
  return {**kwargs, **{k: v for k, v in (options or {}).items() if k in accepted}}


def build_case(spec: dict):
  """The student, teachers (``spec['teachers']``), train state and un-jitted step of one case, on the mesh;
  JAX must be configured (:func:`setup_xla`) first.  Returns a namespace; ``info`` holds what the JSON
  reports about the case (parameter counts, teachers, attack, plan)."""
  import types

  import jax
  import numpy as np
  from mdrad_jax import config_lib, methods, models, parallel, train

  n_img, c = spec["image_size"], spec["channels"]
  shape = (n_img, n_img, c)
  ncls = spec["num_classes"]
  batch_size = spec["batch"]
  method = methods.get_method(spec["method"])
  tset = [list(t) for t in spec["teachers"]]
  k = num_teachers_for(method, len(tset))
  init = models.init_model if spec.get("real_init") else fast_init
  t_setup = time.perf_counter()
  dtype = spec.get("dtype", "float32")
  dkw = {} if dtype == "float32" else {"dtype": dtype}  # as models.build_model: config.model.dtype / teacher_dtype
  options = spec.get("model_options") or {}
  teachers = [[n, with_options(n, kw, options)] for n, kw in tset[:k]]
  tmods = tuple(models.get_model(n, num_classes=ncls, **kw, **dkw) for n, kw in teachers)
  tvars = tuple(init(m, jax.random.key(100 + i), shape) for i, m in enumerate(tmods))
  cfg = config_lib.base_config()
  cfg.method = config_lib.method_config(spec["method"])
  cfg.model.name = spec["model"]
  cfg.attack.num_steps = spec["pgd_steps"]
  cfg.attack.unroll = bool(spec.get("unroll", True))
  cfg.num_epochs = 1
  cfg.model.dtype = dtype
  cfg.teacher_dtype = dtype
  student_kwargs = with_options(spec["model"], spec.get("student_kwargs") or {}, options)
  model = models.get_model(spec["model"], num_classes=ncls, **dkw, **student_kwargs)
  steps_per_epoch = 1000
  state, step, projs, _, attack = train.build_train_step(
    cfg,
    model=model,
    method=method,
    image_shape=shape,
    teacher_modules=tmods,
    teacher_vars=tvars,
    steps_per_epoch=steps_per_epoch,
    init=init,
  )
  hparams = dict(cfg.method)
  plan = method.plan(hparams, k)
  mesh = parallel.create_mesh()
  rng = np.random.default_rng(0)
  host_batch = {
    "image": rng.uniform(0, 1, (batch_size, *shape)).astype(np.float32),
    "label": rng.integers(0, ncls, batch_size).astype(np.int32),
  }
  state = parallel.replicate(state, mesh)
  tvars = parallel.replicate(tvars, mesh)
  batch = parallel.shard_batch(host_batch, mesh)
  info = {
    "setup_s": time.perf_counter() - t_setup,
    "param_counts": {
      "student": models.count_params(state.params["model"]),
      "teachers": [models.count_params(v) for v in tvars],
      "projectors": [models.count_params(p) for p in state.params["projectors"].values()],
    },
    "teachers": teachers,
    "student_kwargs": student_kwargs,
    "attack": attack._asdict(),
    "plan": {
      "student_views": list(plan.student_views),
      "teacher_views": [list(v) for v in plan.teacher_views],
      "features": bool(plan.student_features),
    },
  }
  return types.SimpleNamespace(
    method=method,
    hparams=hparams,
    plan=plan,
    attack=attack,
    model=model,
    teacher_models=tmods,
    teacher_vars=tvars,
    projectors=projs,
    state=state,
    step=step,
    mesh=mesh,
    batch=batch,
    host_batch=host_batch,
    batch_size=batch_size,
    info=info,
  )


def run_child(spec: dict) -> dict:
  """Builds and times one case; returns a JSON-able dict."""
  xla_flags_used = setup_xla(spec)

  import jax
  import numpy as np
  from mdrad_jax import train_step as ts

  out: dict = {
    "backend": jax.default_backend(),
    "device": str(jax.devices()[0].device_kind),
    "num_devices": jax.device_count(),
    "xla_flags": xla_flags_used,
  }
  mm = spec.get("matmul_size") or (2048 if jax.default_backend() == "cpu" else 8192)
  out["peak_matmul"] = measure_peak_matmul(mm)

  case = build_case(spec)
  out.update(case.info)
  method, hparams, plan, attack, model = case.method, case.hparams, case.plan, case.attack, case.model
  tmods, projs, mesh, batch, host_batch = case.teacher_models, case.projectors, case.mesh, case.batch, case.host_batch
  state, tvars, step, batch_size = case.state, case.teacher_vars, case.step, case.batch_size
  out["rss_before_compile_bytes"] = _rss_bytes()

  jitted = ts.jit_train_step(step, mesh, donate=bool(spec["donate"]))
  t0 = time.perf_counter()
  compiled = jitted.lower(state, tvars, batch).compile()
  out["compile_s"] = time.perf_counter() - t0
  try:  # whether the compiled step computes in bfloat16 anywhere (it should exactly when dtype is bfloat16)
    out["hlo_has_bf16"] = "bf16[" in compiled.as_text()
  except Exception:  # noqa: BLE001 - not every backend returns the optimised HLO
    out["hlo_has_bf16"] = None
  out["peak_rss_through_compile_bytes"] = _status_bytes("VmHWM")
  try:
    ma = compiled.memory_analysis()
    out["xla_memory"] = {
      k: int(getattr(ma, k))
      for k in (
        "argument_size_in_bytes",
        "output_size_in_bytes",
        "alias_size_in_bytes",
        "temp_size_in_bytes",
        "generated_code_size_in_bytes",
      )
      if hasattr(ma, k)
    }
  except Exception:  # noqa: BLE001 - not every backend reports it
    out["xla_memory"] = None
  out["rss_after_compile_bytes"] = _rss_bytes()
  if spec.get("malloc_trim"):  # what of that is the compiler's freed memory that the C heap still holds
    from mdrad_jax import runtime

    out["malloc_trim_released"] = runtime.release_free_heap()
    out["rss_after_trim_bytes"] = _rss_bytes()
  # from here on the peak RSS mark covers running the step only (not the compiler's memory)
  out["peak_rss_reset"] = _reset_peak_rss()
  step_flops = _flops(compiled)
  out["step_flops_xla"] = step_flops if spec["unroll"] else None
  if not spec["unroll"]:
    out["step_flops_note"] = "rolled attack loop: XLA's cost analysis counts the loop body once"

  for _ in range(spec["warmup"]):
    state, metrics = compiled(state, tvars, batch)
    jax.block_until_ready((state, metrics))
  times = []
  for _ in range(spec["steps"]):
    t = time.perf_counter()
    state, metrics = compiled(state, tvars, batch)
    jax.block_until_ready((state, metrics))
    times.append(time.perf_counter() - t)
  out["step_times_s"] = times
  med = statistics.median(times)
  out["step_median_s"] = med
  out["images_per_s"] = batch_size / med
  out["loss"] = float(metrics["loss"])
  out["peak_rss_bytes"] = _peak_rss_bytes()  # whole process, compiler included
  out["peak_rss_steps_bytes"] = _status_bytes("VmHWM") if out["peak_rss_reset"] else None
  try:
    ms = jax.devices()[0].memory_stats() or {}
  except Exception:  # noqa: BLE001 - not every backend has memory statistics
    ms = {}
  out["device_peak_bytes"] = ms.get("peak_bytes_in_use")

  if spec["necessary"]:
    host_state = jax.tree.map(np.asarray, state)
    host_tvars = jax.tree.map(np.asarray, tvars)
    nec = necessary_flops(
      method=method,
      hparams=hparams,
      plan=plan,
      attack=attack,
      model=model,
      state=host_state,
      teacher_models=tmods,
      teacher_vars=host_tvars,
      projectors=projs,
      x=host_batch["image"],
      y=host_batch["label"],
    )
    out["necessary_flops"] = nec
    out["useful_flops_per_s"] = nec["total"] / med
    if out["step_flops_xla"]:
      out["flops_ratio"] = out["step_flops_xla"] / nec["total"]
  if out.get("step_flops_xla"):
    out["xla_flops_per_s"] = out["step_flops_xla"] / med
  return out


# ---------------------------------------------------------------------------------------------
# Parent: cases, children, report.
# ---------------------------------------------------------------------------------------------
def _run_process(cmd, env, timeout, quiet) -> tuple[int, str]:
  proc = subprocess.run(
    cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout
  )
  if not quiet and proc.stdout.strip():
    sys.stdout.write("".join("    | " + ln + "\n" for ln in proc.stdout.strip().splitlines()[-20:]))
  return proc.returncode, proc.stdout


def run_jax_case(spec: dict, args, script: str = "") -> dict:
  """Runs one JAX child (``script --child-spec SPEC --child-out FILE``; default: this script) and returns its
  result with the wall time and the load average before and after."""
  with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, "out.json")
    cmd = [sys.executable, script or os.path.abspath(__file__), "--child-spec", json.dumps(spec), "--child-out", path]
    env = dict(os.environ)
    env.pop("MDRAD_NO_DEFAULT_XLA_FLAGS", None)
    before = loadavg()
    t = time.perf_counter()
    rc, text = _run_process(cmd, env, args.child_timeout, args.quiet)
    res = {"wall_s": time.perf_counter() - t, "load_before": before, "load_after": loadavg()}
    if rc != 0 or not os.path.exists(path):
      res["error"] = f"exit {rc}: " + " | ".join(text.strip().splitlines()[-3:])
      return res
    with open(path) as f:
      res.update(json.load(f))
    return res


def run_torch_case(spec: dict, dtype: str, args) -> dict:
  with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, "out.json")
    tspec = dict(spec, dtype=dtype, channels_last=args.torch_channels_last, threads=args.torch_threads)
    cmd = [sys.executable, os.path.join(HERE, "torch_reference.py"), "--spec", json.dumps(tspec), "--out", path]
    before = loadavg()
    t = time.perf_counter()
    rc, text = _run_process(cmd, dict(os.environ), args.child_timeout, args.quiet)
    res = {"wall_s": time.perf_counter() - t, "load_before": before, "load_after": loadavg()}
    if rc != 0 or not os.path.exists(path):
      res["error"] = f"exit {rc}: " + " | ".join(text.strip().splitlines()[-3:])
      return res
    with open(path) as f:
      res.update(json.load(f))
    return res


def xla_variants(args) -> list[dict]:
  out = []
  for v in args.xla_variant or ["default"]:
    if v == "default":
      out.append({"name": "default", "xla_mode": "default", "xla_extra": ""})
    elif v == "none":
      out.append({"name": "no-default-flags", "xla_mode": "none", "xla_extra": ""})
    else:
      out.append({"name": v, "xla_mode": "default", "xla_extra": v})
  return out


def _fmt(v, spec="{:.3g}", none="-"):
  return none if v is None else spec.format(v)


def _median(vals):
  vals = [v for v in vals if v is not None]
  return statistics.median(vals) if vals else None


def summarise(runs: list[dict]) -> dict:
  """Medians over repeats of one variant."""
  ok = [r for r in runs if "error" not in r]
  if not ok:
    return {"error": runs[0].get("error", "no result")}
  s = dict(ok[0])
  for key in ("step_median_s", "compile_s", "peak_rss_bytes", "peak_rss_steps_bytes"):
    s[key] = _median([r.get(key) for r in ok])
  s["step_times_s"] = [t for r in ok for t in r.get("step_times_s", [])]
  s["images_per_s"] = s["batch"] / s["step_median_s"] if s.get("batch") else None
  nec = (s.get("necessary_flops") or {}).get("total")
  s["useful_flops_per_s"] = nec / s["step_median_s"] if nec else None
  if s.get("step_flops_xla"):
    s["xla_flops_per_s"] = s["step_flops_xla"] / s["step_median_s"]
  s["peak_matmul_flops_per_s"] = _median([(r.get("peak_matmul") or {}).get("flops_per_s") for r in ok])
  s["repeats"] = len(ok)
  s["load_before"] = [r.get("load_before") for r in ok]
  s["load_after"] = [r.get("load_after") for r in ok]
  return s


DEPTHWISE_IMPLS = ("conv", "shifted")  # mdrad_jax.models.DEPTHWISE_IMPLS (the parent does not import JAX)


def case_spec(args, *, method: str, model: str, batch: int, teacher_set: str, teachers=None, pgd_steps=None) -> dict:
  """What every child of one (method, student, batch) case gets, from the command line's options;
  ``teachers`` (default: the set's) and ``pgd_steps`` (default: ``args.pgd_steps``) override."""
  return dict(
    method=method,
    model=model,
    batch=batch,
    teacher_set=teacher_set,
    image_size=args.image_size,
    channels=args.channels,
    num_classes=args.num_classes,
    pgd_steps=args.pgd_steps if pgd_steps is None else pgd_steps,
    steps=args.steps,
    warmup=args.warmup,
    necessary=getattr(args, "necessary", False),
    matmul_size=getattr(args, "matmul_size", 0),
    real_init=getattr(args, "real_init", False),
    malloc_trim=getattr(args, "malloc_trim", False),
    teachers=[list(t) for t in (TEACHER_SETS[teacher_set] if teachers is None else teachers)],
    count_flops=getattr(args, "torch_count_flops", False),
  )


def jax_spec(base, *, xla=None, unroll=True, donate=True, dtype="float32", student_kwargs=None, depthwise="conv"):
  """A JAX child's spec: the case's ``base`` and one variant of the levers."""
  if dtype not in ("float32", "bfloat16"):
    raise SystemExit(f"JAX dtypes are float32 or bfloat16, got {dtype!r}")
  if depthwise not in DEPTHWISE_IMPLS:
    raise SystemExit(f"--depthwise entries are {', '.join(DEPTHWISE_IMPLS)}, got {depthwise!r}")
  xla = xla or {"name": "default", "xla_mode": "default", "xla_extra": ""}
  return dict(
    base,
    unroll=bool(unroll),
    donate=bool(donate),
    xla_mode=xla["xla_mode"],
    xla_extra=xla["xla_extra"],
    xla_name=xla["name"],
    dtype=dtype,
    student_kwargs=dict(student_kwargs or {}),
    model_options={} if depthwise == "conv" else {"depthwise": depthwise},
  )


def jax_variant_name(spec) -> str:
  """``jax[<xla variant>,<levers that differ from the defaults>]``."""
  return (
    f"jax[{spec.get('xla_name', 'default')}"
    + ("" if spec["unroll"] else ",rolled")
    + ("" if spec["donate"] else ",no-donate")
    + ("" if spec["dtype"] == "float32" else ",bf16")
    + "".join(f",{k}={v}" for k, v in sorted(spec["student_kwargs"].items()))
    + "".join(f",{k}={v}" for k, v in sorted(spec["model_options"].items()))
    + "]"
  )


def main(argv=None) -> int:
  args = parse_args(argv)
  if args.child_spec:
    res = run_child(json.loads(args.child_spec))
    with open(args.child_out, "w") as f:
      json.dump(res, f)
    return 0

  info = machine_info()
  cmdline = " ".join(
    [
      os.path.relpath(sys.executable, REPO) if sys.executable.startswith(REPO) else sys.executable,
      os.path.relpath(os.path.abspath(__file__), os.getcwd()),
      *sys.argv[1:],
    ]
  )
  have_torch = importlib.util.find_spec("torch") is not None
  use_torch = args.torch == "on" or (args.torch == "auto" and have_torch)
  if args.torch == "on" and not have_torch:
    print("error: --torch on but torch is not installed (pip install -e '.[bench]')", file=sys.stderr)
    return 2
  print(f"command: {cmdline}")
  print(
    f"machine: {info['cpu']}, {info['cpu_count']} CPUs, "
    f"{_fmt(info['memory_bytes'] and info['memory_bytes'] / 2**30, '{:.0f}')} GiB; {info['platform']}"
  )
  print("versions: python " + info["python"] + ", " + ", ".join(f"{k} {v}" for k, v in info["versions"].items() if v))
  print(f"load average at start: {loadavg()}")
  if not use_torch:
    print(
      "PyTorch reference: skipped ("
      + ("--torch off" if args.torch == "off" else "torch is not installed; pip install -e '.[bench]'")
      + ")"
    )

  cases = []
  for cfg in args.configs:
    model, _, b = cfg.partition(":")
    if not b:
      raise SystemExit(f"--configs entries are model:batch, got {cfg!r}")
    for m in args.methods:
      cases.append((m, model, int(b)))

  student_kwargs = []
  for text in args.student_kwargs or ["{}"]:
    try:
      kw = json.loads(text)
    except json.JSONDecodeError as e:
      raise SystemExit(f"--student-kwargs takes a JSON object, got {text!r}: {e}")
    if not isinstance(kw, dict):
      raise SystemExit(f"--student-kwargs takes a JSON object, got {text!r}")
    student_kwargs.append(kw)

  results = []
  for method, model, batch in cases:
    tset = args.teacher_set or model
    if tset not in TEACHER_SETS:
      raise SystemExit(f"no teacher set for {model!r}; give --teacher-set (one of {sorted(TEACHER_SETS)})")
    base = case_spec(args, method=method, model=model, batch=batch, teacher_set=tset)
    variants = []
    for xv in xla_variants(args):
      for un in args.unroll:
        for dn in args.donate:
          for dt in args.jax_dtypes:
            for skw in student_kwargs:
              for dw in args.depthwise:
                spec = jax_spec(
                  base, xla=xv, unroll=_bool(un), donate=_bool(dn), dtype=dt, student_kwargs=skw, depthwise=dw
                )
                variants.append((jax_variant_name(spec), spec))
    torch_variants = [(f"torch[{d}]", d) for d in args.torch_dtypes] if use_torch else []
    runs: dict[str, list] = {name: [] for name, _ in variants + torch_variants}
    for rep in range(args.repeats):
      for name, spec in variants:
        print(f"[{method} {model} b{batch}] {name} (repeat {rep + 1}/{args.repeats}) ...", flush=True)
        r = run_jax_case(spec, args)
        runs[name].append(dict(spec, **r))
        _print_line(name, runs[name][-1])
      for name, d in torch_variants:
        print(f"[{method} {model} b{batch}] {name} (repeat {rep + 1}/{args.repeats}) ...", flush=True)
        r = run_torch_case(base, d, args)
        runs[name].append(dict(base, **r))
        _print_line(name, runs[name][-1])
    summary = {name: summarise(rs) for name, rs in runs.items()}
    check_reference(summary)
    results.append({"method": method, "model": model, "batch": batch, "variants": summary, "runs": runs})
    if args.json:  # after every case, so that an interrupted run keeps what it measured
      write_json(args.json, cmdline, info, use_torch, results)

  print()
  print_table(results, peak_tflops=args.peak_tflops)
  print(f"load average at end: {loadavg()}")
  if args.json:
    write_json(args.json, cmdline, info, use_torch, results, load_end=loadavg())
    print(f"wrote {args.json}")
  failed = [(r["method"], r["model"], r["batch"], n) for r in results for n, v in r["variants"].items() if "error" in v]
  if failed:
    print(f"FAILED: {failed}", file=sys.stderr)
    return 1
  return 0


def write_json(path, cmdline, info, use_torch, results, load_end=None) -> None:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path + ".tmp", "w") as f:
    json.dump(
      {
        "command": cmdline,
        "machine": info,
        "torch_reference": use_torch,
        "load_at_end": load_end,
        "complete": load_end is not None,
        "results": results,
      },
      f,
      indent=1,
      default=str,
    )
  os.replace(path + ".tmp", path)


def check_reference(summary: dict) -> None:
  """Records whether the reference ran the same architectures (parameter counts) and plan as the JAX step."""
  jax_ok = [s for n, s in summary.items() if n.startswith("jax") and "error" not in s]
  if not jax_ok:
    return
  ref = jax_ok[0]
  for name, s in summary.items():
    if not name.startswith("torch") or "error" in s:
      continue
    same_params = s.get("param_counts") == ref.get("param_counts")
    same_plan = s.get("plan") == ref.get("plan")
    same_attack = all(
      s["attack"].get(k) == ref["attack"].get(k, True if k == "clip_start" else None)
      for k in ("init", "bn_mode", "num_steps", "clip_start")
    )
    s["same_as_jax"] = {"param_counts": same_params, "plan": same_plan, "attack": same_attack}
    if not (same_params and same_plan and same_attack):
      print(
        f"    WARNING {name} differs from the JAX step: params {s.get('param_counts')} vs "
        f"{ref.get('param_counts')}, plan {s.get('plan')} vs {ref.get('plan')}, attack {s.get('attack')} vs "
        f"{ref.get('attack')}"
      )


def _print_line(name, r):
  if "error" in r:
    print(f"    {name}: ERROR {r['error']}")
    return
  print(
    f"    {name}: step {r['step_median_s']:.4f} s (median of {len(r['step_times_s'])}), "
    f"{r['batch'] / r['step_median_s']:.1f} img/s, compile {_fmt(r.get('compile_s'), '{:.1f}')} s, "
    f"peak RSS {_steps_rss(r) / 2**20:.0f} MiB, load {r['load_before']} -> {r['load_after']}"
  )


def _steps_rss(r):
  return r.get("peak_rss_steps_bytes") or r["peak_rss_bytes"]


def print_table(results, peak_tflops: float = 0.0):
  head = (
    "method",
    "student",
    "batch",
    "variant",
    "compile s",
    "step s",
    "min s",
    "img/s",
    "peak RSS MiB",
    "XLA temp MiB",
    "GFLOP step",
    "GFLOP needed",
    "ratio",
    "useful GFLOP/s",
    "% matmul peak",
    "x vs torch fp32",
    "x vs torch bf16",
    "MFU %",
  )
  rows = []
  peak_chip = peak_tflops * 1e12
  for res in results:
    v = res["variants"]
    nec_case = next(
      (
        (s.get("necessary_flops") or {}).get("total")
        for s in v.values()
        if (s.get("necessary_flops") or {}).get("total")
      ),
      None,
    )
    t32 = v.get("torch[fp32]", {}).get("step_median_s")
    t16 = v.get("torch[bf16]", {}).get("step_median_s")
    for name, s in v.items():
      if "error" in s:
        rows.append((res["method"], res["model"], res["batch"], name, "ERROR", *[""] * (len(head) - 5)))
        continue
      med = s["step_median_s"]
      nec = (s.get("necessary_flops") or {}).get("total")
      step_f = s.get("step_flops_xla")
      useful = s.get("useful_flops_per_s")
      peak = s.get("peak_matmul_flops_per_s")
      is_jax = name.startswith("jax")
      rows.append(
        (
          res["method"],
          res["model"],
          res["batch"],
          name,
          _fmt(s.get("compile_s"), "{:.1f}"),
          _fmt(med, "{:.4f}"),
          _fmt(min(s["step_times_s"]), "{:.4f}"),
          _fmt(res["batch"] / med, "{:.1f}"),
          _fmt(_steps_rss(s) / 2**20, "{:.0f}"),
          _fmt((s.get("xla_memory") or {}).get("temp_size_in_bytes", 0) / 2**20 or None, "{:.0f}"),
          _fmt(step_f and step_f / 1e9, "{:.2f}"),
          _fmt(nec and nec / 1e9, "{:.2f}"),
          _fmt(s.get("flops_ratio"), "{:.3f}"),
          _fmt(useful and useful / 1e9, "{:.1f}"),
          _fmt(useful and peak and 100 * useful / peak, "{:.0f}"),
          _fmt(t32 / med if (is_jax and t32) else None, "{:.2f}"),
          _fmt(t16 / med if (is_jax and t16) else None, "{:.2f}"),
          _fmt(100 * nec_case / med / peak_chip if (nec_case and peak_chip) else None, "{:.1f}"),
        )
      )
  widths = [max(len(str(h)), *(len(str(r[i])) for r in rows)) for i, h in enumerate(head)] if rows else []
  print(" | ".join(str(h).ljust(w) for h, w in zip(head, widths)))
  print("-+-".join("-" * w for w in widths))
  for r in rows:
    print(" | ".join(str(c).ljust(w) for c, w in zip(r, widths)))
  print(
    "step s: median step time (median of the repeats' medians); min s: fastest timed step.  peak RSS: while running the steps (JAX: after compiling).  x vs torch: torch step time / JAX step time "
    "(> 1: JAX faster), same invocation.  ratio: XLA step FLOPs / necessary FLOPs.  useful GFLOP/s: necessary FLOPs / step time; % of the float32 matmul peak measured "
    "in the same child.  MFU %: the case's necessary FLOPs / step time / --peak-tflops (the same work for every row)."
  )
  for res in results:
    for name, s in res["variants"].items():
      if s.get("necessary_flops"):
        parts = ", ".join(f"{k} {v / 1e9:.3f}" for k, v in s["necessary_flops"]["parts"].items())
        print(f"  necessary GFLOPs {res['method']} {res['model']} b{res['batch']}: {parts}")
        break


if __name__ == "__main__":
  sys.exit(main())
