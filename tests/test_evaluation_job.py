"""The evaluation job on a tiny trained run: report contents against an independent computation, files and
plots, one-line errors, the same numbers on four simulated devices, and the gradient-masking flags on a model
whose gradient is zero everywhere (flagged) and on a linear model (not flagged)."""

import importlib.util
import json
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from mdrad_jax import checkpointing, config_lib, data, evaluation_job, gradient_masking, runs, runtime, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EPS = 0.03
N = 64
AA_OVERRIDES = "apgd-ce.n_iter=5,apgd-t.n_iter=5,apgd-t.n_target_classes=3"


def _eval_config_module():
  spec = importlib.util.spec_from_file_location("evaluate_cfg", os.path.join(ROOT, "configs", "evaluate.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """tiny_cnn (8, 16) trained for one epoch on digits."""
  root = tmp_path_factory.mktemp("evaljob")
  c = config_lib.base_config()
  config_lib.apply_dataset_defaults(c, "digits")
  c.model.name = "tiny_cnn"
  c.model.kwargs.widths = (8, 16)
  c.method = config_lib.method_config("natural")
  c.num_epochs = 1
  c.batch_size = 64
  c.eval_batch_size = 128
  c.eval.num_examples = 128
  c.log_every_steps = 100
  c.optim.name = "adam"
  c.optim.lr = 0.01
  c.optim.weight_decay = 0.0
  c.optim.schedule = "constant"
  workdir = str(root / "run")
  train.train_and_evaluate(c, workdir)
  return root, workdir


def _job_config(checkpoint, **evaluate):
  c = _eval_config_module().get_config(
    f"checkpoint={checkpoint},aa=apgd,num_examples={N},attacks=clean+fgsm+pgd20+autoattack"
  )
  e = c.evaluate
  e.eps = EPS
  e.batch_size = 32
  e.aa_overrides = AA_OVERRIDES
  e.eps_sweep_multiples = (0.0, 0.5, 1.0, 2.0)
  e.sweep_attack = "fgsm"
  e.masking_square_examples = 32
  e.masking_square_queries = 50
  for k, v in evaluate.items():
    e[k] = v
  return c


@pytest.fixture(scope="module")
def job(trained):
  root, workdir = trained
  out = str(root / "eval")
  report = evaluation_job.run(_job_config(workdir), out)
  return workdir, out, report


def test_report_matches_an_independent_computation(job):
  workdir, out, report = job
  with open(os.path.join(out, "eval.json")) as f:
    saved = json.load(f)
  # clean accuracy recomputed from the checkpoint with plain model.apply
  model, variables = runs.load_trained(workdir, "best", num_classes=10)[:2]
  images, labels = data.load_arrays("digits", "test", num_examples=N)
  pred = np.argmax(np.asarray(model.apply(variables, jnp.asarray(images), train=False)), axis=1)
  clean = saved["attacks"]["clean"]
  assert clean["correct"] == int((pred == labels).sum()) and clean["n"] == N
  assert 0 < clean["correct"] < N  # the model learnt something, and is not perfect

  meta = saved["meta"]
  steps = checkpointing.Checkpointer(workdir, best_metric="test/accuracy").all_steps()
  assert meta["checkpoint"]["step"] == max(steps) and meta["checkpoint"]["which"] == "best"
  assert (meta["dataset"], meta["split"], meta["num_examples"]) == ("digits", "test", N)
  assert saved["eps"] == EPS and saved["seed"] == 0
  assert saved["step_size"] == pytest.approx(0.02 * EPS / 0.1)  # digits' step, scaled with the overridden ε
  assert meta["autoattack_label"].startswith("AutoAttack (APGD-CE + APGD-T subset)")
  assert saved["attacks"]["pgd20"]["params"] == {
    "eps": EPS,
    "loss": "ce",
    "steps": 20,
    "init": "uniform",
    "step_size": pytest.approx(0.006),
  }
  assert saved["attacks"]["fgsm"]["params"]["init"] == "none"

  # robust accuracy never above clean; AutoAttack counts consistent with its stages
  for k, v in saved["attacks"].items():
    assert v["correct"] <= clean["correct"], k
  aa_res = saved["attacks"]["autoattack_apgd_subset"]
  stages = {s["attack"]: s for s in saved["autoattack_stages"]}
  assert list(stages) == ["clean", "apgd-ce", "apgd-t"]
  assert stages["clean"]["robust"] == clean["correct"]
  assert stages["apgd-ce"]["attacked"] == clean["correct"]
  assert stages["apgd-ce"]["robust"] == clean["correct"] - stages["apgd-ce"]["flips"]
  assert stages["apgd-t"]["robust"] == stages["apgd-ce"]["robust"] - stages["apgd-t"]["flips"]
  assert aa_res["correct"] == stages["apgd-t"]["robust"] and aa_res["params"]["apgd-ce"]["n_iter"] == 5

  # ε sweep: ε = 0 is the clean accuracy, the sweep point at ε equals the main FGSM number, and FGSM on this
  # model loses accuracy as ε grows (or the check says so)
  pts = saved["eps_sweep"]["points"]
  assert [p["eps"] for p in pts] == pytest.approx([0, EPS / 2, EPS, 2 * EPS])
  assert pts[0]["correct"] == clean["correct"] and pts[2]["correct"] == saved["attacks"]["fgsm"]["correct"]
  acc = [p["accuracy"] for p in pts]
  monotone = all(b <= a for a, b in zip(acc, acc[1:]))
  assert monotone or any(f["check"] == "c" for f in saved["masking_check"]["flags"])
  assert saved["square_alone"]["n"] == 32 and "[only: square]" in saved["square_alone"]["label"]
  assert report["attacks"]["clean"]["correct"] == clean["correct"]


def test_report_files_are_written(job):
  _, out, _ = job
  for name in ("eval.json", "eval.md", "eval_accuracy.png", "eval_eps_sweep.png"):
    assert os.path.getsize(os.path.join(out, name)) > 0, name
  for name in ("eval_accuracy.png", "eval_eps_sweep.png"):
    with Image.open(os.path.join(out, name)) as im:
      im.verify()
      assert im.format == "PNG" and im.size[0] > 100
  assert not [f for f in os.listdir(out) if ".tmp" in f]
  md = open(os.path.join(out, "eval.md")).read()
  assert "| PGD-20 |" in md and "Gradient-masking check" in md and "APGD-T" in md
  assert f"; CPU: {runtime.cpu_model()} (" in md  # the machine, recorded with the numbers


def test_bad_checkpoint_path_is_one_line_error(tmp_path):
  missing = str(tmp_path / "no_such_run")
  with pytest.raises(FileNotFoundError) as err:
    evaluation_job.run(_job_config(missing), str(tmp_path / "out"))
  msg = str(err.value)
  assert missing in msg and "evaluate.checkpoint" in msg and "\n" not in msg
  os.makedirs(tmp_path / "empty")
  with pytest.raises(FileNotFoundError, match="neither a training workdir"):
    evaluation_job.run(_job_config(str(tmp_path / "empty")), str(tmp_path / "out"))
  assert not os.path.exists(tmp_path / "out" / "eval.json")


def test_same_numbers_on_four_devices(job, tmp_path):
  """main.py with four simulated CPU devices (batch split over them) reproduces the one-device numbers."""
  workdir, _, report = job
  out = tmp_path / "eval4"
  env = dict(
    os.environ,
    MDRAD_PROGRESS="0",
    JAX_PLATFORMS="cpu",
    JAX_DISABLE_MOST_OPTIMIZATIONS="true",
    XLA_FLAGS="--xla_force_host_platform_device_count=4",
  )
  args = [
    sys.executable,
    "main.py",
    f"--config=configs/evaluate.py:checkpoint={workdir},aa=apgd,num_examples={N},attacks=clean+pgd20+autoattack",
    f"--workdir={out}",
    f"--config.evaluate.eps={EPS}",
    "--config.evaluate.batch_size=32",
    f"--config.evaluate.aa_overrides={AA_OVERRIDES}",
    "--config.evaluate.masking_square_examples=0",
  ]
  r = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  assert "| PGD-20 |" in r.stdout  # the table is printed
  with open(out / "eval.json") as f:
    four = json.load(f)
  assert four["meta"]["num_devices"] == 4
  for key in ("clean", "pgd20", "autoattack_apgd_subset"):
    assert four["attacks"][key]["correct"] == report["attacks"][key]["correct"], key
  assert four["autoattack_stages"] == report["autoattack_stages"]


# ----------------------------------------------------------------------------------------------------------
# Gradient-masking flags.

MEPS = 0.1


def _linear_problem(quantised: bool):
  """4 classes on 8x8x1 inputs: classes 0/1 are ±w·x, classes 2/3 far below.  Half the points lie at L∞
  distance 0.25ε from the boundary (any sound attack breaks them), half at 2.5ε.  With ``quantised`` the model
  sees round(255 x)/255, whose gradient is zero everywhere: the same decisions, but no gradient signal."""
  rng = np.random.default_rng(0)
  dim = 64
  w = rng.uniform(0.5, 1.5, dim) * rng.choice([-1.0, 1.0], dim)
  w -= w.mean()
  n = 16
  radii = MEPS * np.where(np.arange(n) % 2 == 0, 0.25, 2.5)
  v = rng.uniform(-0.05, 0.05, (n, dim))
  v -= np.outer(v @ w / (w @ w), w)
  sides = np.where(np.arange(n) % 4 < 2, 1.0, -1.0)
  x = (0.5 + v + np.outer(sides * radii * np.abs(w).sum(), w / (w @ w))).reshape(n, 8, 8, 1)
  near = x[::2]
  assert near.min() - 2 * MEPS > 0 and near.max() + 2 * MEPS < 1 and x.min() > 0 and x.max() < 1
  y = np.where(sides > 0, 0, 1).astype(np.int32)
  wmat = jnp.asarray(np.stack([w, -w, 0 * w, 0 * w]), jnp.float32)
  bias = jnp.asarray([0.0, 0.0, -50.0, -51.0], jnp.float32)

  def logits_fn(xb):
    if quantised:
      xb = jnp.round(xb * 255.0) / 255.0
    return xb.reshape(xb.shape[0], -1) @ wmat.T + bias

  return logits_fn, x.astype(np.float32), y


def _report(quantised):
  fn, x, y = _linear_problem(quantised)
  return evaluation_job.robustness_report(
    fn,
    x,
    y,
    attacks=("clean", "fgsm", "pgd20"),
    eps=MEPS,
    step_size=MEPS / 4,
    batch_size=16,
    eps_sweep=(0.0, MEPS / 2, MEPS, 2 * MEPS),
    sweep_attack="fgsm",
    square_examples=16,
    square_queries=300,
  )


def test_masking_flags_fire_on_a_zero_gradient_model():
  rep = _report(quantised=True)
  acc = {k: v["accuracy"] for k, v in rep["attacks"].items()}
  assert acc["clean"] == 1.0 and acc["fgsm"] == 1.0  # the gradient is zero: FGSM does not move
  assert rep["square_alone"]["accuracy"] < 0.75  # Square breaks most of the near points
  checks = {(f["check"], f["attack"]) for f in rep["masking_check"]["flags"]}
  assert {("a", "pgd20"), ("c", "fgsm")} <= checks
  assert rep["masking_check"]["flagged"]


def test_no_masking_flag_on_a_linear_model():
  rep = _report(quantised=False)
  acc = {k: v["accuracy"] for k, v in rep["attacks"].items()}
  assert acc["clean"] == 1.0 and acc["fgsm"] == acc["pgd20"] == 0.5  # closed form: the 0.25ε points fall
  assert rep["square_alone"]["accuracy"] >= 0.5
  assert rep["masking_check"]["flags"] == [] and not rep["masking_check"]["flagged"]


def test_masking_flag_rules_on_given_numbers():
  def rep(**acc):
    return {
      "num_examples": 100,
      "attacks": {k: {"accuracy": v} for k, v in acc.items()},
      "autoattack_stages": [],
      "eps_sweep": None,
      "square_alone": None,
    }

  assert gradient_masking.masking_flags(rep(clean=0.9, fgsm=0.5, pgd20=0.45, autoattack=0.40)) == []
  flags = gradient_masking.masking_flags(rep(clean=0.9, fgsm=0.5, pgd20=0.55, autoattack=0.40))
  assert [(f["check"], f["attack"]) for f in flags] == [("b", "pgd20"), ("d", "autoattack")]
  r = rep(clean=0.9)
  r["autoattack_stages"] = [
    {"attack": "clean", "flips": None},
    {"attack": "apgd-ce", "flips": 30},
    {"attack": "square", "flips": 5},
  ]
  r["eps_sweep"] = {
    "attack": "pgd20",
    "points": [{"eps": 0.0, "accuracy": 0.9}, {"eps": 0.1, "accuracy": 0.5}, {"eps": 0.2, "accuracy": 0.6}],
  }
  flags = gradient_masking.masking_flags(r)
  assert [(f["check"], f["attack"]) for f in flags] == [("a", "square"), ("c", "pgd20")]
  assert "Square flipped 5 of 100" in flags[0]["reason"]

  # (a) on the same points: a 2-point gap with nothing the other way is noise (p = 0.25), 6 points are not
  def square(wb_correct, b):
    r = rep(clean=0.8)
    r["square_alone"] = {
      "n": 100,
      "accuracy": 0.60,
      "correct": 60,
      "white_box_on_same_points": {
        "pgd20": {
          "accuracy": wb_correct / 100,
          "correct": wb_correct,
          "square_broke_white_box_survivors": b,
          "white_box_broke_square_survivors": 60 - (wb_correct - b),
        }
      },
    }
    return gradient_masking.masking_flags(r)

  assert square(62, 2) == []
  flagged = square(66, 6)
  assert [(f["check"], f["attack"]) for f in flagged] == [("a", "pgd20")]
  assert flagged[0]["p_value"] == pytest.approx(0.5**6)
  assert square(66, 8) == []  # 8 one way, 2 the other: p = 0.055

  # FGSM far weaker than Square, PGD-20 not: a weak single-step attack, not masking; no flag
  r = rep(clean=0.8)
  r["square_alone"] = {
    "n": 100,
    "accuracy": 0.40,
    "correct": 40,
    "white_box_on_same_points": {
      "fgsm": {
        "accuracy": 0.70,
        "correct": 70,
        "square_broke_white_box_survivors": 30,
        "white_box_broke_square_survivors": 0,
      },
      "pgd20": {
        "accuracy": 0.41,
        "correct": 41,
        "square_broke_white_box_survivors": 3,
        "white_box_broke_square_survivors": 2,
      },
    },
  }
  assert gradient_masking.masking_flags(r) == []
  r["square_alone"]["white_box_on_same_points"]["cw"] = {
    "accuracy": 0.70,
    "correct": 70,
    "square_broke_white_box_survivors": 30,
    "white_box_broke_square_survivors": 0,
  }
  assert [(f["check"], f["attack"]) for f in gradient_masking.masking_flags(r)] == [("a", "cw")]
  assert gradient_masking.sign_test_p(3, 0) == 0.125 and gradient_masking.sign_test_p(0, 0) == 1.0


def test_config_arguments():
  mod = _eval_config_module()
  c = mod.get_config("checkpoint=runs/x,aa=apgd,num_examples=100,attacks=clean+pgd20,sweep")
  e = c.evaluate
  assert c.job == "evaluate" and c.data.name == ""  # dataset from the trained run
  assert (e.checkpoint, e.aa_version, e.num_examples, e.attacks) == ("runs/x", "apgd", 100, ("clean", "pgd20"))
  assert e.eps == -1.0 and e.eps_sweep_multiples == (0.0, 0.25, 0.5, 1.0, 1.5, 2.0)
  d = mod.get_config().evaluate
  assert d.aa_version == "standard" and d.num_examples == -1 and d.attacks[-1] == "autoattack"
  s = mod.get_config("small").evaluate
  assert s.aa_version == "apgd" and s.num_examples == 500
  assert mod.get_config("small,aa=standard").evaluate.aa_version == "standard"
  with pytest.raises(ValueError, match="aa must be 'standard' or 'apgd'"):
    mod.get_config("aa=plus")
  with pytest.raises(ValueError, match="evaluate.aa_overrides"):
    evaluation_job.parse_overrides("square=5")
  assert evaluation_job.parse_overrides("square.n_queries=100, apgd-ce.rho=0.5") == {
    "square": {"n_queries": 100},
    "apgd-ce": {"rho": 0.5},
  }
