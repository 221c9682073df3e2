"""The train-step benchmark keeps running: a tiny configuration end to end in a subprocess (no timing checks)."""

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "benchmarks", "bench_train_step.py")


def test_benchmark_tiny_configuration(tmp_path):
  out = tmp_path / "bench.json"
  env = dict(os.environ, JAX_DISABLE_MOST_OPTIMIZATIONS="true")  # compile time dominates a tiny run
  cmd = [
    sys.executable,
    SCRIPT,
    "--methods",
    "sa_mdrad",
    "--configs",
    "tiny_cnn:4",
    "--image-size",
    "8",
    "--steps",
    "1",
    "--warmup",
    "0",
    "--pgd-steps",
    "1",
    "--matmul-size",
    "128",
    "--torch",
    "off",
    "--jax-dtypes",
    "float32,bfloat16",
    "--json",
    str(out),
  ]
  proc = subprocess.run(
    cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600
  )
  assert proc.returncode == 0, proc.stdout[-3000:]
  assert "PyTorch reference: skipped (--torch off)" in proc.stdout
  assert "command:" in proc.stdout and "versions:" in proc.stdout and "load average" in proc.stdout

  res = json.loads(out.read_text())
  assert res["torch_reference"] is False
  assert res["machine"]["versions"]["jax"]
  (case,) = res["results"]
  assert (case["method"], case["model"], case["batch"]) == ("sa_mdrad", "tiny_cnn", 4)
  s = case["variants"]["jax[default]"]
  assert "error" not in s, s
  assert len(s["step_times_s"]) == 1 and s["step_median_s"] > 0 and s["compile_s"] > 0
  assert s["peak_rss_bytes"] > 0 and s["peak_matmul"]["flops_per_s"] > 0
  assert s["param_counts"]["student"] > 0 and len(s["param_counts"]["teachers"]) == 3
  parts = s["necessary_flops"]["parts"]
  assert any(k.startswith("student_forward+input_grad") for k in parts)
  assert any(k.startswith("projectors_forward+backward") for k in parts)
  # the step does the method's work and (almost) nothing else
  assert 0.9 < s["flops_ratio"] < 1.5, s["flops_ratio"]
  # the bfloat16 variant compiles a step that computes in bfloat16; the float32 one has no bfloat16 in it
  b = case["variants"]["jax[default,bf16]"]
  assert "error" not in b, b
  assert b["dtype"] == "bfloat16" and b["hlo_has_bf16"] is True
  assert s["hlo_has_bf16"] is False


# ---------------------------------------------------------------------------------------------
# The default XLA flags the benchmark and main.py start JAX with (mdrad_jax/xla_flags.py).
# ---------------------------------------------------------------------------------------------
def _run_python(code, env_updates=(), drop=()):
  env = {k: v for k, v in os.environ.items() if k not in drop}
  env.update(dict(env_updates))
  proc = subprocess.run(
    [sys.executable, "-c", code],
    cwd=REPO,
    env=env,
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    text=True,
    timeout=300,
  )
  assert proc.returncode == 0, proc.stdout[-3000:]
  return proc.stdout


def test_default_xla_flags_user_wins_and_can_be_disabled(monkeypatch):
  from mdrad_jax import xla_flags

  # whatever the shipped defaults are, check the rules with two made-up ones
  monkeypatch.setitem(xla_flags.DEFAULT_FLAGS, "cpu", {"--xla_a": "1", "--xla_b": "2"})
  for var in ("XLA_FLAGS", "MDRAD_NO_DEFAULT_XLA_FLAGS", "JAX_PLATFORMS"):
    monkeypatch.delenv(var, raising=False)
  assert xla_flags.apply_defaults() == "--xla_a=1 --xla_b=2"
  # a user's own value of a default flag is kept, and so are the user's other flags
  monkeypatch.setenv("XLA_FLAGS", "--xla_b=user --xla_dump_to=/tmp/x")
  assert xla_flags.apply_defaults().split() == ["--xla_b=user", "--xla_dump_to=/tmp/x", "--xla_a=1"]
  # no defaults for an accelerator platform that has none, nor with the switch, nor for an untested jaxlib
  monkeypatch.setenv("XLA_FLAGS", "")
  assert xla_flags.apply_defaults("cuda") == ""
  monkeypatch.setenv("MDRAD_NO_DEFAULT_XLA_FLAGS", "1")
  assert xla_flags.apply_defaults() == ""
  monkeypatch.delenv("MDRAD_NO_DEFAULT_XLA_FLAGS")
  monkeypatch.setattr(xla_flags, "TESTED_JAXLIB", ())
  assert xla_flags.apply_defaults() == ""


def test_main_applies_defaults_before_jax_starts_and_xla_accepts_them():
  # main.py imports nothing that starts JAX before runtime.configure_xla(); XLA aborts the process on a flag it
  # does not know, so running a convolution with the defaults checks that this jaxlib accepts them.
  code = (
    "import sys; sys.argv = ['main.py']\n"
    "import main\n"
    "assert 'jax' not in sys.modules, 'main imports jax before configure_xla'\n"
    "from mdrad_jax import runtime, xla_flags\n"
    "runtime.configure_xla()\n"
    "import os, jax, jax.numpy as jnp\n"
    "want = xla_flags.default_flags()\n"
    "assert all(f'{k}={v}' in os.environ.get('XLA_FLAGS', '').split() for k, v in want.items())\n"
    "x = jnp.ones((2, 8, 8, 3)); w = jnp.ones((3, 3, 3, 4))\n"
    "y = jax.lax.conv_general_dilated(x, w, (1, 1), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC'))\n"
    "print(float(y.sum()), os.environ.get('XLA_FLAGS', ''))\n"
  )
  out = _run_python(code, drop=("XLA_FLAGS", "MDRAD_NO_DEFAULT_XLA_FLAGS", "JAX_PLATFORMS"))
  assert float(out.split()[0]) > 0


def test_conv_kernel_benchmark_tiny(tmp_path):
  out = tmp_path / "conv.json"
  cmd = [
    sys.executable,
    os.path.join(REPO, "benchmarks", "bench_conv.py"),
    "--layers",
    "small_cnn conv3",
    "--frameworks",
    "jax",
    "--dtypes",
    "float32,bfloat16",
    "--reps",
    "1",
    "--warmup",
    "0",
    "--json",
    str(out),
  ]
  proc = subprocess.run(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300)
  assert proc.returncode == 0, proc.stdout[-3000:]
  rows = json.loads(out.read_text())["rows"]
  assert {(r["dtype"], r["kernel"]) for r in rows} == {
    (d, k) for d in ("float32", "bfloat16") for k in ("forward", "input_grad", "weight_grad")
  }
  assert all(r["layer"] == "small_cnn conv3" and r["xla_s"] > 0 and r["torch_s"] is None for r in rows)
  bad = subprocess.run(
    cmd[:2] + ["--layers", "no_such_layer"],
    cwd=REPO,
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    text=True,
    timeout=300,
  )
  assert bad.returncode != 0 and "no_such_layer" in bad.stdout


def test_autoattack_benchmark_tiny_configuration(tmp_path):
  """The AutoAttack benchmark end to end on a random tiny network, against the reference when it is installed
  (a benchmark extra); the PyTorch copy of the network is checked against the JAX one inside the script."""
  import importlib.util

  with_reference = (
    importlib.util.find_spec("pyautoattack") is not None and importlib.util.find_spec("torch") is not None
  )
  out = tmp_path / "aa.json"
  env = dict(os.environ, JAX_DISABLE_MOST_OPTIMIZATIONS="true", MDRAD_PROGRESS="0")
  cmd = [
    sys.executable,
    os.path.join(REPO, "benchmarks", "bench_autoattack.py"),
    "--model",
    "tiny_cnn",
    "--num-examples",
    "6",
    "--batch-size",
    "4",
    "--eps",
    "0.3",
    "--repeats",
    "2",
    "--reference",
    "on" if with_reference else "off",
    "--overrides",
    "apgd-ce.n_iter=3,apgd-t.n_iter=3,fab-t.n_iter=3,square.n_queries=20",
    "--json",
    str(out),
  ]
  proc = subprocess.run(
    cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600
  )
  assert proc.returncode == 0, proc.stdout[-3000:]
  res = json.loads(out.read_text())
  lib = [r for r in res["runs"] if r["impl"] == "library"]
  assert len(lib) == 2 and lib[0]["includes_compile"] and not lib[1]["includes_compile"]
  assert list(lib[0]["stage_seconds"]) == ["clean", "apgd-ce", "apgd-t", "fab-t", "square"]
  assert lib[0]["robust"] == lib[1]["robust"]  # same seed, same outcome
  assert res["overrides"]["square"] == {"n_queries": 20}
  if with_reference:
    ref = [r for r in res["runs"] if r["impl"] == "reference"]
    assert len(ref) == 2 and res["logit_max_diff"] < 1e-4
    assert len(res["summary"]["same_outcome_points"]) == 2
    assert "reference time / library time" in proc.stdout


def test_autoattack_cost_on_paper(capsys):
  """Passes per point follow the standard parameters (hand count), and the totals follow from them."""
  import importlib.util

  spec = importlib.util.spec_from_file_location("aa_cost", os.path.join(REPO, "benchmarks", "autoattack_cost.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  # 10 classes: APGD-CE 100 steps + its start, APGD-T 9 targets x (100 + 1), FAB-T 9 x 100, Square 5000 queries
  assert mod.passes_per_point(10) == {
    "apgd-ce": ("grad", 101),
    "apgd-t": ("grad", 909),
    "fab-t": ("grad", 900),
    "square": ("fwd", 5000),
  }
  assert mod.passes_per_point(5)["apgd-t"] == ("grad", 4 * 101)  # all classes but the true one
  f, g = mod.model_flops("tiny_cnn", num_classes=10, image_shape=(8, 8, 3), batch=2)
  assert 0 < f < g < 4 * f  # an input gradient costs about one more forward
  assert (
    mod.main(
      [
        "--models",
        "tiny_cnn",
        "--image-shape",
        "8,8,3",
        "--batch",
        "2",
        "--points",
        "100",
        "--clean",
        "1",
        "--robust",
        "1",
        "--tflops",
        "1",
      ]
    )
    == 0
  )
  row = [x for x in capsys.readouterr().out.splitlines() if x.startswith("| tiny_cnn |")][0].split("|")
  worst, typical = float(row[4]), float(row[5])
  assert worst == typical  # every point robust: the assumed case is the worst case
  expected = 100 * (f + (101 + 909 + 900) * g + 5000 * f) / 1e15
  assert abs(worst - expected) <= 5e-3 * expected  # printed to 3 significant digits


# ---------------------------------------------------------------------------------------------
# The per-part breakdown, the depthwise lowering's variants and the cost curves (tiny configurations).
# ---------------------------------------------------------------------------------------------
def _have_torch():
  import importlib.util

  return importlib.util.find_spec("torch") is not None


def _load_benchmark(name):
  import importlib.util

  sys.path.insert(0, os.path.join(REPO, "benchmarks"))
  spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "benchmarks", f"{name}.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def _bench(script, args, timeout=900):
  env = dict(os.environ, JAX_DISABLE_MOST_OPTIMIZATIONS="true")
  proc = subprocess.run(
    [sys.executable, os.path.join(REPO, "benchmarks", script), *args],
    cwd=REPO,
    env=env,
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    text=True,
    timeout=timeout,
  )
  assert proc.returncode == 0, proc.stdout[-3000:]
  return proc.stdout


def test_breakdown_tiny_configuration(tmp_path):
  """Every part of the SA-MDRAD step is timed on both sides (the reference when torch is installed), with the
  same part names, positive times, and a table row per part."""
  out = tmp_path / "breakdown.json"
  torch_on = _have_torch()
  stdout = _bench(
    "bench_breakdown.py",
    ["--configs", "tiny_cnn:4", "--image-size", "8", "--pgd-steps", "2", "--steps", "2", "--warmup", "0"]
    + ["--torch", "on" if torch_on else "off", "--json", str(out)],
  )
  assert "| part | JAX ms |" in stdout and "load average" in stdout
  res = json.loads(out.read_text())
  assert res["complete"] is True
  (case,) = res["results"]
  jax_run = case["jax"]["jax[default]"]
  assert "error" not in jax_run, jax_run
  parts = jax_run["parts"]
  want = [
    "teacher0 tiny_cnn forward (clean)",
    "teacher1 mlp forward (clean)",
    "teacher2 tiny_cnn forward (clean)",
    "attack: PGD-2",
    "student forward+backward (adv)",
    "student forward+backward (clean)",
    "projectors forward+backward x3",
    "loss forward+backward",
    "optimizer update",
    "whole step",
  ]
  assert list(parts) == want
  for name, p in parts.items():
    assert len(p["times_s"]) == 2 and p["median_s"] > 0 and p["compile_s"] > 0, name
  # the attack does two student forwards + input gradients, the student's outer view one forward + backward
  assert parts["attack: PGD-2"]["flops"] > parts["teacher0 tiny_cnn forward (clean)"]["flops"] > 0
  assert parts["whole step"]["flops"] > parts["attack: PGD-2"]["flops"]
  rows = {r["part"]: r for r in case["tables"]["jax[default]"]}
  assert list(rows) == want[:-1] + ["sum of parts", "whole step"]
  assert abs(rows["sum of parts"]["jax_s"] - sum(p["median_s"] for n, p in parts.items() if n != "whole step")) < 1e-9
  if torch_on:
    t = case["torch"]["torch[fp32]"]
    assert "error" not in t, t
    assert list(t["parts"]) == want
    assert all(p["median_s"] > 0 for p in t["parts"].values())
    assert t["views_with_gradient"] == jax_run["views_with_gradient"] == ["adv", "clean"]
    assert t["param_counts"] == jax_run["param_counts"]
    assert all(rows[n]["ratio"]["torch[fp32]"] > 0 for n in want)


@pytest.mark.slow  # about a minute of child processes; the lowering's equality is in test_models
def test_depthwise_variant_of_the_train_step(tmp_path):
  """--depthwise shifted reaches the MobileNetV2 teacher (and only the networks that have the option), and the
  step computes the same loss as with the grouped convolution (same initial variables and batch)."""
  out = tmp_path / "dw.json"
  _bench(
    "bench_train_step.py",
    ["--methods", "rslad", "--configs", "tiny_cnn:4", "--teacher-set", "tiny_depthwise", "--image-size", "8"]
    + ["--steps", "1", "--warmup", "0", "--pgd-steps", "1", "--matmul-size", "64", "--torch", "off"]
    + ["--necessary", "false", "--depthwise", "conv,shifted", "--json", str(out)],
  )
  (case,) = json.loads(out.read_text())["results"]
  conv, shifted = case["variants"]["jax[default]"], case["variants"]["jax[default,depthwise=shifted]"]
  assert "error" not in conv and "error" not in shifted
  assert conv["teachers"][0][0] == "mobilenet_v2" and "depthwise" not in conv["teachers"][0][1]
  assert shifted["teachers"][0][1]["depthwise"] == "shifted"
  assert "depthwise" not in shifted["student_kwargs"]  # tiny_cnn has no depthwise convolutions
  assert conv["param_counts"] == shifted["param_counts"]
  assert abs(conv["loss"] - shifted["loss"]) <= 1e-4 * max(1.0, abs(conv["loss"]))


def test_conv_benchmark_depthwise_layers_tiny(tmp_path):
  out = tmp_path / "dw_conv.json"
  layers = "mobilenet_v2 dw 4x4 c960 s1 b32,mobilenet_v2 dw 8x8 c576 s2 b32"
  torch_on = _have_torch()
  _bench(
    "bench_conv.py",
    ["--layers", layers, "--depthwise", "conv,shifted", "--frameworks", "jax,torch" if torch_on else "jax"]
    + ["--dtypes", "float32", "--reps", "1", "--warmup", "0", "--json", str(out)],
    timeout=300,
  )
  res = json.loads(out.read_text())
  assert res["depthwise_impls"] == ["conv", "shifted"]
  rows = res["rows"]
  assert {(r["layer"], r["kernel"]) for r in rows} == {
    (n, k) for n in layers.split(",") for k in ("forward", "input_grad", "weight_grad")
  }
  for r in rows:
    assert r["groups"] == r["cin"] == r["cout"] and r["flops"] > 0
    assert r["xla_s_by_impl"]["conv"] > 0 and r["xla_s_by_impl"]["shifted"] > 0
    assert (r["torch_s"] > 0) if torch_on else (r["torch_s"] is None)
  # the totals weight each layer by how many MobileNetV2 has: 3 of 4x4x960 s1, 1 of 8x8x576 s2
  fwd = next(t for t in res["network_totals"] if t["kernel"] == "forward")
  assert fwd["layers"] == 4
  by = {r["layer"]: r["xla_s_by_impl"]["shifted"] for r in rows if r["kernel"] == "forward"}
  assert abs(fwd["xla_s_by_impl"]["shifted"] - (3 * by[layers.split(",")[0]] + by[layers.split(",")[1]])) < 1e-12


def test_conv_benchmark_depthwise_list_is_mobilenet_v2s():
  """bench_conv's MobileNetV2 depthwise layers (input size, channels, stride, count) are the model's, at 32x32."""
  import collections

  import flax.linen as nn
  import jax
  import jax.numpy as jnp

  from mdrad_jax import models

  seen = collections.Counter()

  def record(next_fun, args, kwargs, context):
    mod = context.module
    if context.method_name == "__call__" and isinstance(mod, nn.Conv) and mod.feature_group_count > 1:
      x = args[0]
      assert mod.feature_group_count == x.shape[-1] == mod.features and mod.kernel_size == (3, 3)
      seen[(x.shape[1], x.shape[-1], mod.strides[0])] += 1
    return next_fun(*args, **kwargs)

  model = models.get_model("mobilenet_v2", num_classes=10)
  with nn.intercept_methods(record):
    jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False))
  conv = _load_benchmark("bench_conv")
  assert seen == {(hw, c, s): n for hw, c, s, n in conv.MOBILENETV2_DEPTHWISE}
  assert {layer.batch for layer in conv.DEPTHWISE_LAYERS} == {32, 128}


@pytest.mark.slow  # about a minute of child processes; the fits are tested alone below
def test_curves_tiny_configuration(tmp_path):
  """Two axes sharing their base point (measured once), JSON and markdown with a row per point and fits."""
  out = tmp_path / "curves.json"
  stdout = _bench(
    "bench_curves.py",
    ["--student", "tiny_cnn", "--image-size", "8", "--axes", "teachers,pgd_steps", "--teacher-counts", "1,2"]
    + ["--pgd-steps", "1,2", "--base-teachers", "1", "--base-pgd-steps", "1", "--base-batch", "2"]
    + ["--steps", "1", "--warmup", "0", "--matmul-size", "64", "--torch", "off", "--quiet", "--json", str(out)],
  )
  res = json.loads(out.read_text())
  assert res["complete"] is True
  teachers, pgd = res["curves"]["teachers"], res["curves"]["pgd_steps"]
  assert [(p["teachers"], p["pgd_steps"], p["batch"]) for p in teachers] == [(1, 1, 2), (2, 1, 2)]
  assert [(p["teachers"], p["pgd_steps"], p["batch"]) for p in pgd] == [(1, 1, 2), (1, 2, 2)]
  assert teachers[0]["runs"] == pgd[0]["runs"]  # the shared point, one child
  assert [t[0] for t in teachers[1]["teacher_list"]] == ["tiny_cnn", "mlp"]  # cycled from the set
  for p in teachers + pgd:
    assert p["jax_s"] > 0 and p["jax_rss"] > 0 and p["xla_temp"] is not None and p["torch_s"] is None
    assert len(p["load_before"]) == 3 and len(p["load_after"]) == 3 and not p["errors"]
  quantities = {(s["axis"], s["quantity"]) for s in res["summary"]}
  assert ("teachers", "JAX step") in quantities and ("pgd_steps", "JAX peak RSS") in quantities
  md = (tmp_path / "curves.md").read_text()
  assert "### teachers" in md and "### Linear fits" in md and "ms per PGD step" in md
  assert "### Linear fits" in stdout


def test_curve_fits():
  curves = _load_benchmark("bench_curves")
  xs = [1, 2, 4, 8, 16]
  ys = [2 * x + 1 for x in xs[:4]] + [60.0]  # linear through 8, then 60 instead of 33
  fit = curves.linear_fit(xs[:4], ys[:4])
  assert abs(fit["slope"] - 2) < 1e-12 and abs(fit["intercept"] - 1) < 1e-12 and abs(fit["r2"] - 1) < 1e-12
  lin = curves.linearity(xs, ys, fit_points=3, tolerance=0.15)
  assert lin["linear_through"] == 8 and lin["departs_at"] == 16
  assert abs(lin["deviation"][-1][1] - (60 / 33 - 1)) < 1e-12
  assert lin["marginal_slopes"][0] == (2.0, 2.0)
  assert curves.linear_fit([3, 3], [1, 2]) is None  # one distinct x: no line
  assert curves.cycled([["a", {}], ["b", {}], ["c", {}]], 4) == [["a", {}], ["b", {}], ["c", {}], ["a", {}]]


@pytest.mark.parametrize(
  "rectifier,target,alpha,beta",
  [("dynamic", "label", 5 / 6, 1.0), ("dynamic", "student", 0.5, 2.0), ("swap", "label", 5 / 6, 1.0)],
)
def test_torch_reference_sa_mdrad_loss_is_the_librarys(rectifier, target, alpha, beta):
  """The benchmark's PyTorch step computes SA-MDRAD's loss as the library does (the default dynamic rectifier
  with either fallback, and swap), on random logits and features of three teachers."""
  torch = pytest.importorskip("torch")
  import numpy as np

  sys.path.insert(0, os.path.join(REPO, "benchmarks"))
  import torch_reference as tr

  from mdrad_jax import losses, methods

  rng = np.random.default_rng(3)
  k, n, c = 3, 7, 5
  t = (3 * rng.standard_normal((k, n, c))).astype(np.float32)
  s_adv, s_clean = (2 * rng.standard_normal((2, n, c))).astype(np.float32)
  y = rng.integers(0, c, n).astype(np.int32)
  proj = [rng.standard_normal((n, 2, 2, 4)).astype(np.float32) for _ in range(k)]
  feats = [rng.standard_normal((n, 2, 2, 4)).astype(np.float32) for _ in range(k)]
  hp = dict(
    methods.get_method("sa_mdrad").defaults,
    rectifier=rectifier,
    dynamic_target=target,
    alpha=alpha,
    dynamic_beta=beta,
    ce_weight=0.3,
  )
  want, _ = losses.sa_mdrad_loss(
    student_adv_logits=s_adv,
    student_clean_logits=s_clean,
    teacher_clean_logits=t,
    labels=y,
    projected_features=proj,
    teacher_features=feats,
    **{key: hp[key] for key in ("rectifier", "fusion", "temperature", "alpha", "feature_weight", "ce_weight")},
    **{key: hp[key] for key in ("adr_lambda", "reduction", "dynamic_target", "dynamic_beta")},
  )
  tt = lambda a: torch.from_numpy(np.asarray(a))  # noqa: E731
  got = tr.method_loss(
    "sa_mdrad",
    hp,
    labels=tt(y).long(),
    s_adv=tt(s_adv),
    s_clean=tt(s_clean),
    t_clean=[tt(z) for z in t],
    t_adv=None,
    projected=[tt(p) for p in proj],
    t_feats=[tt(f) for f in feats],
  )
  np.testing.assert_allclose(float(got), float(want), rtol=1e-5)
