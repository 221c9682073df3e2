"""Bad inputs and faults against the command line: each is one clear line (or correct handling) and a finished
run's files stay byte-identical.

Most cases run in-process through ``main.cli`` (what ``main.py`` runs); the signal, the concurrent writer and
the config file that does not parse run ``main.py`` (or a second process) for real.  One finished tiny run
(``tiny_cnn`` on digits, one epoch) is made per module and every case checks it afterwards.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib.util
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from typing import Callable

import jax
import numpy as np
import pytest

from mdrad_jax import checkpointing, runs, workdir as workdir_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("mdrad_main", os.path.join(ROOT, "main.py"))
main = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(main)

TEACHER = "--config=configs/teacher.py:model=tiny_cnn,dataset=digits"
COMMON = ["--config.num_epochs=1", "--config.batch_size=64", "--config.data.data_dir={data}"]


def cli(*args) -> tuple[int, str]:
  """``main.py ARGS`` in this process: (exit status, everything written to stderr)."""
  err = io.StringIO()
  cwd = os.getcwd()
  os.chdir(ROOT)
  try:
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
      code = main.cli(["main.py", *args], stderr=err)
  finally:
    os.chdir(cwd)
  return code, err.getvalue()


def one_error_line(text: str) -> str:
  lines = [l for l in text.splitlines() if l.startswith("error:")]
  assert len(lines) == 1, text[-3000:]
  assert "Traceback" not in text, text[-3000:]
  return lines[0]


def snapshot(path: str) -> dict[str, str]:
  """sha256 of every file under ``path`` (the lock file aside)."""
  out = {}
  for dirpath, _, files in os.walk(path):
    for f in files:
      full = os.path.join(dirpath, f)
      rel = os.path.relpath(full, path)
      if rel != workdir_lib.LOCK_FILE:
        with open(full, "rb") as fh:
          out[rel] = hashlib.sha256(fh.read()).hexdigest()
  return out


@pytest.fixture(scope="module")
def env(tmp_path_factory):
  with pytest.MonkeyPatch.context() as mp:
    mp.setenv("MDRAD_PROGRESS", "0")
    mp.setenv("MDRAD_COMPILATION_CACHE", "off")
    base = tmp_path_factory.mktemp("failures")
    data, run = str(base / "data"), str(base / "run")
    code, err = cli(TEACHER, *[a.format(data=data) for a in COMMON], f"--workdir={run}")
    assert code == 0, err
    assert os.path.isfile(os.path.join(run, "config.json"))
    yield {"base": str(base), "data": data, "run": run}


# ---------------------------------------------------------------------------------------------
# The battery.
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Ctx:
  base: str  # this case's own temporary directory
  data: str  # data_dir the case runs with (the shared one, or a copy it changed)
  run: str  # the shared finished run
  target: str  # the workdir the case runs on
  teacher: str = ""


@dataclasses.dataclass
class Case:
  id: str
  args: tuple  # argv after main.py, with {data} {run} {target} {teacher} {base} placeholders
  expect: str  # a regular expression the error line must match (placeholders allowed)
  setup: Callable | None = None  # setup(ctx): changes the copies this case made
  copy: tuple = ()  # what to copy first: 'run' (target = a copy), 'data', 'teacher'
  common: bool = True  # add COMMON to args


def _edit_json(path, fn):
  with open(path) as f:
    d = json.load(f)
  fn(d)
  with open(path, "w") as f:
    json.dump(d, f)


def _write(path, text):
  with open(path, "w") as f:
    f.write(text)


def _ckpt(ctx, *rel):
  return os.path.join(ctx.target, "checkpoints", "22", *rel)


def _digits(ctx, *rel):
  return os.path.join(ctx.data, "digits", "1.0.0", *rel)


SHARD = "digits-train.array_record-00000-of-00001"
KD = "--config=configs/kd.py:dataset=digits,student=tiny_cnn,teachers={teacher}"
EVAL = "--config=configs/evaluate.py:small"


def _truncate_arrays(ctx):
  d = _ckpt(ctx, "state", "ocdbt.process_0", "d")
  for f in os.listdir(d):
    os.truncate(os.path.join(d, f), 7)


def _image_folder(ctx, *, test_only_class=False):
  from PIL import Image

  root = os.path.join(ctx.base, "folder")
  rng = np.random.default_rng(0)
  for split, classes in (("train", ("a", "b")), ("test", ("a", "b", "c") if test_only_class else ("a", "b"))):
    for cls in classes:
      os.makedirs(os.path.join(root, split, cls), exist_ok=True)
      for i in range(3):
        Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(
          os.path.join(root, split, cls, f"{i}.png")
        )
  return root


CASES = [
  # config values: validated before anything is written
  Case("epochs-zero", (TEACHER, "--config.num_epochs=0"), r"config\.num_epochs = 0"),
  Case("epochs-negative", (TEACHER, "--config.num_epochs=-3"), r"config\.num_epochs = -3"),
  Case("eps-zero", (TEACHER, "--config.attack.eps=0.0"), r"config\.attack\.eps = 0\.0: .*\(0, 1\]"),
  Case("eps-above-one", (TEACHER, "--config.attack.eps=1.5"), r"config\.attack\.eps = 1\.5"),
  Case("eps-nan", (TEACHER, "--config.attack.eps=nan"), r"config\.attack\.eps = nan"),
  Case("eps-negative", (TEACHER, "--config.attack.eps=-0.1"), r"config\.attack\.eps = -0\.1"),
  Case("step-size-zero", (TEACHER, "--config.attack.step_size=0.0"), r"config\.attack\.step_size = 0\.0"),
  Case("attack-steps-negative", (TEACHER, "--config.attack.num_steps=-1"), r"config\.attack\.num_steps = -1"),
  Case("lr-negative", (TEACHER, "--config.optim.lr=-0.1"), r"config\.optim\.lr = -0\.1"),
  Case("lr-zero", (TEACHER, "--config.optim.lr=0.0"), r"config\.optim\.lr = 0\.0"),
  Case("lr-inf", (TEACHER, "--config.optim.lr=inf"), r"config\.optim\.lr = inf"),
  Case("momentum", (TEACHER, "--config.optim.momentum=1.5"), r"config\.optim\.momentum = 1\.5"),
  Case("weight-decay", (TEACHER, "--config.optim.weight_decay=-1e-4"), r"config\.optim\.weight_decay"),
  Case("schedule", (TEACHER, "--config.optim.schedule=linear"), r"config\.optim\.schedule = 'linear'.*cosine"),
  Case("optimiser", (TEACHER, "--config.optim.name=rmsprop"), r"config\.optim\.name = 'rmsprop'"),
  Case("boundaries", (TEACHER, "--config.optim.boundaries=(-1,)"), r"config\.optim\.boundaries"),
  Case("batch-zero", (TEACHER, "--config.batch_size=0"), r"config\.batch_size = 0: expected an integer >= 1"),
  Case("batch-negative", (TEACHER, "--config.batch_size=-5"), r"config\.batch_size = -5"),
  Case(
    "batch-too-large",
    (TEACHER, "--config.batch_size=4096"),
    r"config\.batch_size = 4096 is larger than "
    r"the training split \(1442",
  ),
  Case("eval-batch-size-zero", (TEACHER, "--config.eval_batch_size=0"), r"config\.eval_batch_size = 0"),
  Case("log-every-zero", (TEACHER, "--config.log_every_steps=0"), r"config\.log_every_steps = 0"),
  Case("ckpt-every-zero", (TEACHER, "--config.checkpoint.every_epochs=0"), r"config\.checkpoint\.every_epochs"),
  Case("ckpt-keep-zero", (TEACHER, "--config.checkpoint.keep=0"), r"config\.checkpoint\.keep = 0"),
  Case("best-mode", (TEACHER, "--config.checkpoint.best_mode=median"), r"config\.checkpoint\.best_mode"),
  Case("eval-every-negative", (TEACHER, "--config.eval.every_epochs=-1"), r"config\.eval\.every_epochs"),
  Case("eval-examples-zero", (TEACHER, "--config.eval.num_examples=0"), r"config\.eval\.num_examples = 0"),
  Case("eval-pgd-steps", (TEACHER, "--config.eval.pgd_steps=-2"), r"config\.eval\.pgd_steps = -2"),
  Case("seed-negative", (TEACHER, "--config.seed=-1"), r"config\.seed = -1"),
  Case("train-examples", (TEACHER, "--config.num_train_examples=-7"), r"config\.num_train_examples = -7"),
  Case("dataset", (TEACHER, "--config.data.name=cifar11"), r"config\.data\.name = 'cifar11'"),
  Case("augment", (TEACHER, "--config.data.augment=rotate"), r"config\.data\.augment = 'rotate'"),
  Case("crop-padding", (TEACHER, "--config.data.crop_padding=-1"), r"config\.data\.crop_padding = -1"),
  Case("model", (TEACHER, "--config.model.name=resnet_18"), r"config\.model\.name = 'resnet_18'"),
  Case("model-dtype", (TEACHER, "--config.model.dtype=float16"), r"config\.model\.dtype = 'float16'"),
  Case("teacher-dtype", (TEACHER, "--config.teacher_dtype=int8"), r"config\.teacher_dtype = 'int8'"),
  Case("attack-init", (TEACHER, "--config.attack.init=gaussian"), r"config\.attack\.init = 'gaussian'"),
  Case("attack-bn", (TEACHER, "--config.attack.bn_mode=frozen"), r"config\.attack\.bn_mode = 'frozen'"),
  Case("clip-start", (TEACHER, "--config.attack.clip_start=maybe"), r"config\.attack\.clip_start = 'maybe'"),
  Case("teacher-sharding", (TEACHER, "--config.teacher_sharding=zero3"), r"config\.teacher_sharding = 'zero3'"),
  Case("method", (TEACHER, "--config.method.name=ardd"), r"config\.method\.name = 'ardd'"),
  Case("job", (TEACHER, "--config.job=studies"), r"config\.job = 'studies'"),
  Case("distributed", (TEACHER, "--config.distributed.enabled=yes"), r"config\.distributed\.enabled = 'yes'"),
  Case("no-teachers", ("--config=configs/kd.py:dataset=digits,student=tiny_cnn",), r"config\.teachers: .*kd"),
  Case(
    "teacher-missing",
    ("--config=configs/kd.py:dataset=digits,student=tiny_cnn,teachers={base}/nowhere",),
    r"config\.teachers\[0\] = '{base}/nowhere'.*no such path",
  ),
  # a config that trains something else than the finished run in the workdir
  Case(
    "other-model", (TEACHER, "--config.model.name=mlp"), r"holds another run: .*model\.name \('tiny_cnn' -> 'mlp'\)"
  ),
  Case("other-batch-size", (TEACHER, "--config.batch_size=32"), r"holds another run: .*batch_size \(64\.0 -> 32\.0\)"),
  Case("other-lr", (TEACHER, "--config.optim.lr=0.01"), r"holds another run: .*optim\.lr"),
  Case("other-seed", (TEACHER, "--config.seed=3"), r"holds another run: .*seed"),
  Case("other-epochs", (TEACHER, "--config.num_epochs=2"), r"holds another run: .*num_epochs"),
  Case(
    "other-method",
    ("--config=configs/pgd_at.py:dataset=digits,student=tiny_cnn",),
    r"holds another run: .*method\.name \('natural' -> 'pgd_at'\)",
  ),
  # the command line
  Case("misspelt-field", (TEACHER, "--config.batch_sise=3"), r"bad command line: .*batch_sise"),
  Case("config-argument", ("--config=configs/teacher.py:modl=x",), r"unknown config argument 'modl'"),
  Case("config-missing", ("--config=configs/missing.py",), r"config file configs/missing\.py: no such file"),
  Case("field-type", (TEACHER, "--config.batch_size=abc"), r"bad command line: .*batch_size"),
  Case("positional", (TEACHER, "extra"), r"unexpected arguments: extra"),
  Case("workdir-is-a-file", (TEACHER, "--workdir={run}/config.json"), r"workdir {run}/config\.json: cannot create"),
  # JSON files the run reads
  Case(
    "config-json",
    (TEACHER,),
    r"run config {target}/config\.json is not valid JSON",
    copy=("run",),
    setup=lambda c: _write(os.path.join(c.target, "config.json"), '{"model": '),
  ),
  Case(
    "dataset-info-json",
    (TEACHER,),
    r"{data}/digits/1\.0\.0/dataset_info\.json is not valid JSON",
    copy=("data",),
    setup=lambda c: _write(_digits(c, "dataset_info.json"), "{"),
  ),
  Case(
    "features-json",
    (TEACHER,),
    r"{data}/digits/1\.0\.0/features\.json is not valid JSON",
    copy=("data",),
    setup=lambda c: _write(_digits(c, "features.json"), "[1,"),
  ),
  Case(
    "iterator-json",
    (TEACHER,),
    r"checkpoints/22/data/process_0-of-1\.json is not valid JSON",
    copy=("run",),
    setup=lambda c: _write(_ckpt(c, "data", "process_0-of-1.json"), "{next"),
  ),
  Case(
    "metrics-json",
    (TEACHER,),
    r"checkpoints/22/metrics/metrics is not valid JSON",
    copy=("run",),
    setup=lambda c: _write(_ckpt(c, "metrics", "metrics"), "{x"),
  ),
  Case(
    "teacher-config-json",
    (KD,),
    r"run config {teacher}/config\.json is not valid JSON",
    copy=("teacher",),
    setup=lambda c: _write(os.path.join(c.teacher, "config.json"), ""),
  ),
  Case(
    "eval-config-json",
    (EVAL, "--config.evaluate.checkpoint={target}"),
    r"{target}/config\.json is not valid",
    copy=("run",),
    setup=lambda c: _write(os.path.join(c.target, "config.json"), "{'single': 1}"),
  ),
  # prepared data
  Case(
    "features-import",
    (TEACHER,),
    r"features\.json: feature class 'antigravity\.Image' .*refusing",
    copy=("data",),
    setup=lambda c: _edit_json(
      _digits(c, "features.json"),
      lambda d: d["featuresDict"]["features"]["image"].update(pythonClassName="antigravity.Image"),
    ),
  ),
  Case(
    "features-missing-label",
    (TEACHER,),
    r"features\.json: expected features 'image' and 'label'",
    copy=("data",),
    setup=lambda c: _edit_json(_digits(c, "features.json"), lambda d: d["featuresDict"]["features"].pop("label")),
  ),
  Case(
    "features-deleted",
    (TEACHER,),
    r"features\.json: missing",
    copy=("data",),
    setup=lambda c: os.remove(_digits(c, "features.json")),
  ),
  Case("shard-missing", (TEACHER,), rf"{SHARD}: missing", copy=("data",), setup=lambda c: os.remove(_digits(c, SHARD))),
  Case(
    "shard-truncated",
    (TEACHER,),
    rf"{SHARD}: truncated or corrupt",
    copy=("data",),
    setup=lambda c: os.truncate(_digits(c, SHARD), 1000),
  ),
  Case(
    "shard-garbage",
    (TEACHER,),
    rf"{SHARD}: truncated or corrupt",
    copy=("data",),
    setup=lambda c: open(_digits(c, SHARD), "wb").write(np.random.default_rng(0).bytes(393216)),
  ),
  Case("folder-without-source", (TEACHER, "--config.data.name=image_folder"), r"source_dir is required"),
  Case(
    "folder-class-not-trained",
    (TEACHER, "--config.data.name=image_folder", "--config.data.source_dir={base}/folder"),
    r"class\(es\) \['c'\] have images in \['test'\] but none in train/",
    setup=lambda c: _image_folder(c, test_only_class=True),
  ),
  # checkpoints that do not restore (the only one: nothing to fall back to)
  Case(
    "ckpt-metadata-deleted",
    (TEACHER,),
    r"checkpoint {target}/checkpoints/22 does not restore",
    copy=("run",),
    setup=lambda c: os.remove(_ckpt(c, "state", "_METADATA")),
  ),
  Case(
    "ckpt-arrays-truncated",
    (TEACHER,),
    r"checkpoint {target}/checkpoints/22 does not restore",
    copy=("run",),
    setup=_truncate_arrays,
  ),
  Case(
    "ckpt-broken-config-kept",
    (TEACHER, "--config.log_every_steps=5"),
    r"checkpoint {target}/checkpoints/22 does not restore",
    copy=("run",),
    setup=_truncate_arrays,
  ),
  Case(
    "iterator-out-of-range",
    (TEACHER,),
    r"process_0-of-1\.json: data-iterator position next_index=1000000",
    copy=("run",),
    setup=lambda c: _write(_ckpt(c, "data", "process_0-of-1.json"), '{"next_index": 1000000}'),
  ),
  Case(
    "iterator-negative",
    (TEACHER,),
    r"checkpoints/22 does not restore: Checkpoint `next_index` -4 is out of range",
    copy=("run",),
    setup=lambda c: _write(_ckpt(c, "data", "process_0-of-1.json"), '{"next_index": -4}'),
  ),
  # teachers that do not fit the student's data
  Case(
    "teacher-dataset",
    (KD,),
    r"teacher {teacher} was trained on 'fashion_mnist', this run trains on 'digits'",
    copy=("teacher",),
    setup=lambda c: _edit_json(
      os.path.join(c.teacher, "config.json"), lambda d: d["data"].update(name="fashion_mnist")
    ),
  ),
  Case(
    "teacher-classes",
    (KD,),
    r"teacher {teacher} has 100 classes, the dataset has 10",
    copy=("teacher",),
    setup=lambda c: _edit_json(os.path.join(c.teacher, "config.json"), lambda d: d.update(num_classes=100)),
  ),
  Case(
    "teacher-shape",
    (KD,),
    r"teacher {teacher} was trained on \(28, 28, 1\) images",
    copy=("teacher",),
    setup=lambda c: _edit_json(os.path.join(c.teacher, "config.json"), lambda d: d.update(image_shape=[28, 28, 1])),
  ),
  Case(
    "teacher-no-config",
    (KD,),
    r"teacher/checkpoint {teacher} is neither a training workdir",
    copy=("teacher",),
    setup=lambda c: os.remove(os.path.join(c.teacher, "config.json")),
  ),
  # the evaluation job
  Case("eval-eps-zero", (EVAL, "--config.evaluate.eps=0.0"), r"config\.evaluate\.eps = 0\.0"),
  Case("eval-eps-above-one", (EVAL, "--config.evaluate.eps=1.5"), r"config\.evaluate\.eps = 1\.5"),
  Case("eval-batch-zero", (EVAL, "--config.evaluate.batch_size=0"), r"config\.evaluate\.batch_size = 0"),
  Case("eval-attack", ("--config=configs/evaluate.py:attacks=clean+pgd30",), r"config\.evaluate\.attacks"),
  Case("eval-checkpoint", (EVAL, "--config.evaluate.checkpoint={base}/none"), r"config\.evaluate\.checkpoint"),
  Case("eval-sweep", (EVAL, "--config.evaluate.eps_sweep=(2.0,)"), r"config\.evaluate\.eps_sweep"),
  Case("eval-which", ("--config=configs/evaluate.py:which=worst",), r"which must be 'best' or 'latest'"),
  # the quickstart job
  Case(
    "quickstart-epochs",
    ("--config=configs/quickstart.py", "--config.quickstart.teacher_epochs=0"),
    r"config\.quickstart\.teacher_epochs = 0",
    common=False,
  ),
  Case(
    "quickstart-model",
    ("--config=configs/quickstart.py", "--config.quickstart.student=big"),
    r"config\.quickstart\.student = 'big'",
    common=False,
  ),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_one_line_and_changes_nothing(env, tmp_path, case):
  ctx = Ctx(base=str(tmp_path), data=env["data"], run=env["run"], target=env["run"])
  if "run" in case.copy:
    ctx.target = str(tmp_path / "copy")
    shutil.copytree(env["run"], ctx.target)
  if "data" in case.copy:
    ctx.data = str(tmp_path / "data")
    shutil.copytree(env["data"], ctx.data)
  if "teacher" in case.copy:
    ctx.teacher = str(tmp_path / "teacher")
    shutil.copytree(env["run"], ctx.teacher)
  if case.setup:
    case.setup(ctx)
  fill = lambda s: s.format(**dataclasses.asdict(ctx))  # noqa: E731
  args = [fill(a) for a in case.args]
  if case.common:  # after the config file, before the case's own overrides
    args[1:1] = [fill(a) for a in COMMON]
  if not any(a.startswith("--workdir=") for a in args):
    args.append(f"--workdir={ctx.target}")
  before_run, before_target = snapshot(env["run"]), snapshot(ctx.target)
  code, err = cli(*args)
  assert code == 2, err[-3000:]
  line = one_error_line(err)
  assert re.search(fill(case.expect), line), line
  assert snapshot(env["run"]) == before_run
  assert snapshot(ctx.target) == before_target


def test_battery_size():
  assert len(CASES) >= 60 and len({c.id for c in CASES}) == len(CASES)


def test_finished_run_restarted_changes_nothing(env):
  before = snapshot(env["run"])
  code, err = cli(TEACHER, *[a.format(data=env["data"]) for a in COMMON], f"--workdir={env['run']}")
  assert code == 0, err
  assert "training already complete" in err
  assert snapshot(env["run"]) == before


def test_second_writer_in_this_process_is_refused(env):
  before = snapshot(env["run"])
  with workdir_lib.lock(env["run"]):
    code, err = cli(TEACHER, *[a.format(data=env["data"]) for a in COMMON], f"--workdir={env['run']}")
  assert code == 2
  assert f"is in use by process {os.getpid()}" in one_error_line(err)
  assert snapshot(env["run"]) == before


def test_nan_loss_is_one_line_and_saves_nothing(env, tmp_path):
  code, err = cli(
    TEACHER,
    *[a.format(data=env["data"]) for a in COMMON],
    "--config.optim.lr=1e30",
    "--config.log_every_steps=2",
    f"--workdir={tmp_path / 'w'}",
  )
  assert code == 2
  assert re.search(r"loss became (nan|inf) at step \d+; stopped without saving", one_error_line(err))
  assert checkpointing.Checkpointer(str(tmp_path / "w")).all_steps() == []


def test_stale_image_folder_copy_is_refused(env, tmp_path):
  ctx = Ctx(base=str(tmp_path), data=str(tmp_path / "data"), run=env["run"], target=str(tmp_path / "w"))
  root = _image_folder(ctx)
  from mdrad_jax import data as data_lib

  path = data_lib.prepare_dataset("image_folder", data_dir=ctx.data, source_dir=root, verbose=False)
  assert data_lib.dataset_info("image_folder", data_dir=ctx.data, source_dir=root).split_sizes["train"] == 6
  shutil.copy(os.path.join(root, "train", "a", "0.png"), os.path.join(root, "train", "a", "9.png"))
  code, err = cli(
    TEACHER,
    "--config.data.name=image_folder",
    f"--config.data.source_dir={root}",
    f"--config.data.data_dir={ctx.data}",
    f"--workdir={ctx.target}",
  )
  assert code == 2
  assert f"the prepared copy {path} is stale" in one_error_line(err)
  assert not os.path.exists(os.path.join(ctx.target, "config.json"))


# ---------------------------------------------------------------------------------------------
# Checkpoint fallback, concurrent writers, signals, config files that do not parse.
# ---------------------------------------------------------------------------------------------
def _params(workdir):
  v, _ = runs.load_model_variables(workdir, which="latest")
  return jax.tree.map(np.asarray, v)


def _assert_same_params(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  jax.tree.map(np.testing.assert_array_equal, a, b)


def _metric_steps(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [(json.loads(l)["step"], "test/accuracy" in json.loads(l)) for l in f]


def test_corrupt_latest_checkpoint_falls_back_to_the_older_one(env, tmp_path):
  w = str(tmp_path / "w")
  args = (
    TEACHER,
    "--config.num_epochs=2",
    "--config.batch_size=64",
    f"--config.data.data_dir={env['data']}",
    "--config.checkpoint.best_metric=",
    f"--workdir={w}",
  )
  code, err = cli(*args)
  assert code == 0, err
  assert checkpointing.Checkpointer(w).all_steps() == [22, 44]
  final = _params(w)
  lines_before = _metric_steps(w)
  d = os.path.join(w, "checkpoints", "44", "state", "ocdbt.process_0", "d")
  for f in os.listdir(d):
    os.truncate(os.path.join(d, f), 5)
  code, err = cli(*args)
  assert code == 0, err
  assert re.search(r"checkpoint step 44 \(.*\) does not restore: resumed from step 22 instead", err), err
  assert os.path.isdir(os.path.join(w, "checkpoints_broken", "44", "state"))  # kept aside, not deleted
  _assert_same_params(_params(w), final)  # steps 23-44 trained again from step 22: the same parameters
  # the lines logged after step 22 by the first run were dropped before they were logged again
  assert "dropped 2 line(s) after step 22" in err
  assert _metric_steps(w) == lines_before


def test_two_concurrent_writers_cannot_both_run(env, tmp_path):
  w = str(tmp_path / "w")
  holder = subprocess.Popen(
    [
      sys.executable,
      "-c",
      "import sys, time\nfrom mdrad_jax import workdir\n"
      "with workdir.lock(sys.argv[1]):\n  print('locked', flush=True)\n  time.sleep(60)\n",
      w,
    ],
    cwd=ROOT,
    stdout=subprocess.PIPE,
    text=True,
  )
  try:
    assert holder.stdout.readline().strip() == "locked"
    code, err = cli(TEACHER, *[a.format(data=env["data"]) for a in COMMON], f"--workdir={w}")
    assert code == 2
    assert f"workdir {w} is in use by process {holder.pid}" in one_error_line(err)
    assert sorted(os.listdir(w)) == [workdir_lib.LOCK_FILE]  # the refused writer wrote nothing
  finally:
    holder.kill()
    holder.wait()
  code, err = cli(TEACHER, *[a.format(data=env["data"]) for a in COMMON], f"--workdir={w}")
  assert code == 0, err  # the lock went with the process


def _subprocess_env():
  e = dict(
    os.environ,
    MDRAD_PROGRESS="0",
    MDRAD_COMPILATION_CACHE="off",
    PYTHONPATH=ROOT,
    MDRAD_NO_DEFAULT_XLA_FLAGS="1",
    JAX_DISABLE_MOST_OPTIMIZATIONS="1",
  )
  e["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "")
  return e


def test_sigterm_checkpoints_and_the_resumed_run_equals_the_uninterrupted_one(env, tmp_path):
  args = [
    TEACHER,
    "--config.num_epochs=3",
    "--config.batch_size=64",
    f"--config.data.data_dir={env['data']}",
    "--config.log_every_steps=1",
    "--config.checkpoint.best_metric=",
  ]
  w = str(tmp_path / "interrupted")
  proc = subprocess.Popen(
    [sys.executable, "main.py", *args, f"--workdir={w}"],
    cwd=ROOT,
    env=_subprocess_env(),
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  )
  metrics = os.path.join(w, "metrics.jsonl")
  deadline = time.time() + 120
  while time.time() < deadline and proc.poll() is None:  # until a few steps of epoch 2 are logged
    if os.path.isfile(metrics) and any(json.loads(l)["step"] >= 25 for l in open(metrics) if l.strip()):
      break
    time.sleep(0.05)
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=120)
  assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
  assert "Traceback" not in err
  lines = [l for l in err.splitlines() if l.startswith("interrupted:")]
  assert len(lines) == 1, err[-3000:]
  stopped = int(re.search(r"SIGTERM at step (\d+) of 66: checkpoint of step \1 saved", lines[0]).group(1))
  assert 25 <= stopped < 66
  assert checkpointing.Checkpointer(w).latest_step() == stopped

  code, err = cli(*args, f"--workdir={w}")  # resume
  assert code == 0, err
  assert f"resumed from {w}/checkpoints at step {stopped}" in err
  full = str(tmp_path / "uninterrupted")
  code, err = cli(*args, f"--workdir={full}")
  assert code == 0, err
  _assert_same_params(_params(w), _params(full))
  assert [s for s, _ in _metric_steps(w)] == [s for s, _ in _metric_steps(full)]  # no step twice


def test_config_file_that_does_not_parse(tmp_path):
  bad = tmp_path / "bad.py"
  bad.write_text("def get_config(:\n  pass\n")
  r = subprocess.run(
    [sys.executable, "main.py", f"--config={bad}", f"--workdir={tmp_path / 'w'}"],
    cwd=ROOT,
    env=_subprocess_env(),
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert r.returncode == 2
  assert f"config file {bad} line 1: invalid syntax" in one_error_line(r.stderr)
  assert not os.path.exists(tmp_path / "w")


# ---------------------------------------------------------------------------------------------
# The small variants run on digits.
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
  "config",
  [
    "configs/teacher.py:model=tiny_cnn,dataset=digits,small",
    "configs/sa_mdrad.py:dataset=digits,small,epochs=1,student=tiny_cnn,teachers={run}",
  ],
)
def test_small_variants_run_on_digits(env, tmp_path, config):
  """The small variants ask for more examples than digits has (2,048 or 10,000 training, 500 or 512 test):
  they use the whole split.  (One epoch, one attack step and a tiny student keep the test short.)"""
  code, err = cli(
    f"--config={config.format(run=env['run'])}",
    f"--config.data.data_dir={env['data']}",
    "--config.attack.num_steps=1",
    "--config.eval.pgd_steps=1",
    f"--workdir={tmp_path / 'w'}",
  )
  assert code == 0, err[-3000:]
  steps = _metric_steps(str(tmp_path / "w"))
  assert steps and steps[-1][1]  # ended with an evaluation


def test_sigterm_to_one_of_two_processes_stops_both_at_the_same_step(env, tmp_path):
  """Two processes (``jax.distributed`` on localhost): SIGTERM to process 1 only; JAX's preemption sync point
  makes both checkpoint the same step and stop there, each with one line and status 143."""
  import socket

  with socket.socket() as sock:
    sock.bind(("localhost", 0))
    port = sock.getsockname()[1]
  cfg = {
    "data": {"name": "digits", "data_dir": env["data"]},
    "model": {"name": "tiny_cnn"},
    "num_epochs": 30,
    "num_train_examples": 256,
    "batch_size": 64,
    "eval_batch_size": 128,
    "eval": {"num_examples": 128, "every_epochs": 0},
    "log_every_steps": 1,
    "checkpoint": {"best_metric": ""},
  }
  (tmp_path / "cfg.json").write_text(json.dumps(cfg))
  w = str(tmp_path / "w")
  worker_env = {k: v for k, v in _subprocess_env().items() if not k.startswith(("SLURM_", "OMPI_", "TPU_"))}
  worker_env.update(JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
  procs = [
    subprocess.Popen(
      [
        sys.executable,
        os.path.join(ROOT, "tests", "scaling_worker.py"),
        "train",
        str(tmp_path / "cfg.json"),
        w,
        str(tmp_path / f"{i}.out"),
        f"--process={i}/2",
        f"--port={port}",
      ],
      cwd=ROOT,
      env=worker_env,
      stdout=subprocess.DEVNULL,
      stderr=subprocess.PIPE,
      text=True,
    )
    for i in range(2)
  ]
  try:
    metrics = os.path.join(w, "metrics.jsonl")
    deadline = time.time() + 180
    while time.time() < deadline and all(p.poll() is None for p in procs):
      if os.path.isfile(metrics) and any(json.loads(l)["step"] >= 6 for l in open(metrics) if l.strip()):
        break
      time.sleep(0.05)
    procs[1].send_signal(signal.SIGTERM)
    errs = [p.communicate(timeout=180)[1] for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  assert [p.returncode for p in procs] == [143, 143], errs
  stops = []
  for err in errs:
    lines = [l for l in err.splitlines() if l.startswith("interrupted:")]
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    stops.append(int(re.search(r"SIGTERM at step (\d+) of 120", lines[0]).group(1)))
  assert stops[0] == stops[1] and 6 <= stops[0] < 120
  assert checkpointing.Checkpointer(w).latest_step() == stops[0]
  assert {"process_0-of-2.json", "process_1-of-2.json"} <= set(
    os.listdir(os.path.join(w, "checkpoints", str(stops[0]), "data"))
  )


def test_disk_full_while_checkpointing_is_one_line(env, tmp_path, monkeypatch):
  """What tensorstore raises when the disk is full (seen on a 60 KiB tmpfs): one line, no checkpoint."""
  import orbax.checkpoint as ocp

  def full(self, step, *a, **kw):
    raise ValueError(
      f'RESOURCE_EXHAUSTED: Error writing "params.model.conv1.kernel/0" in OCDBT database at '
      f'local file "{tmp_path}/w/checkpoints/{step}.orbax-checkpoint-tmp/": Failed writing: '
      f"No space left on device [OS error 28]"
    )

  monkeypatch.setattr(ocp.CheckpointManager, "save", full)
  code, err = cli(TEACHER, *[a.format(data=env["data"]) for a in COMMON], f"--workdir={tmp_path / 'w'}")
  assert code == 2
  assert "cannot write the checkpoint of step 22 in" in one_error_line(err)
  assert "no space left on the device (earlier checkpoints are kept)" in err
