"""A run's metrics through ``clu.metric_writers``: ``metrics.jsonl`` keeps its record format, the TensorBoard event
files hold the same scalars (read back with TensorBoard's own reader), a resumed run trims both, a process
other than 0 writes nothing, and neither TensorFlow nor PyTorch is needed."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from tensorboard.backend.event_processing import event_accumulator

from mdrad_jax import metric_writers, parallel, train

import tiny_runs  # tests/ is on sys.path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(data_dir):
  """Two epochs of 4 steps on digits (a tiny CNN, PGD-AT with 2 attack steps), logged every 2 steps."""
  c = tiny_runs.digits_pgd_at(data_dir)
  c.checkpoint.best_metric = ""
  return c


def _jsonl(workdir) -> list[dict]:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def _series_of_jsonl(records) -> dict[str, list]:
  """``{tag: [(step, value as float32), ...]}`` of the records, in the order they were written."""
  out: dict[str, list] = {}
  for r in records:
    for k, v in r.items():
      if k not in ("step", "time"):
        out.setdefault(k, []).append((r["step"], np.float32(v)))
  return out


def _series_of_tensorboard(logdir) -> dict[str, list]:
  """The same from the event files in ``logdir``, as TensorBoard reads them (without its own purging of
  replayed steps, so that only the files' content counts)."""
  acc = event_accumulator.EventAccumulator(
    str(logdir), size_guidance={event_accumulator.SCALARS: 0}, purge_orphaned_data=False
  )
  acc.Reload()
  return {tag: [(e.step, np.float32(e.value)) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


class _Interrupt(Exception):
  pass


def test_training_writes_tensorboard_events_equal_to_metrics_jsonl_and_resume_trims_both(tmp_path, monkeypatch):
  cfg = _config(tmp_path / "data")
  w = str(tmp_path / "w")
  real = parallel.shard_batch
  calls = {"n": 0}

  def flaky(batch, mesh):
    if batch["image"].shape[0] == cfg.batch_size:  # training batches only
      calls["n"] += 1
      if calls["n"] == 7:  # step 7: steps 2, 4 (with the epoch-1 evaluation) and 6 are logged, step 4 saved
        raise _Interrupt()
    return real(batch, mesh)

  monkeypatch.setattr(parallel, "shard_batch", flaky)
  with pytest.raises(_Interrupt):
    train.train_and_evaluate(cfg, w)
  monkeypatch.setattr(parallel, "shard_batch", real)
  first = _jsonl(w)
  assert [r["step"] for r in first if "train/loss" in r] == [2, 4, 6]
  assert len(metric_writers.event_files(w)) == 1
  assert _series_of_tensorboard(w)["train/loss"] == _series_of_jsonl(first)["train/loss"]

  train.train_and_evaluate(cfg, w)  # resumes from step 4: steps 5-8 again, step 6 logged a second time
  records = _jsonl(w)
  # metrics.jsonl: the step-6 line of the first run was dropped; the records keep their format
  assert [r["step"] for r in records if "train/loss" in r] == [2, 4, 6, 8]
  assert [r["step"] for r in records if "test/accuracy" in r] == [4, 8]
  assert records[:3] == first[:3]  # steps 2, 4 and the evaluation at 4, as the first run wrote them
  for r in records:
    assert {"step", "time", "epoch"} <= set(r) and r["epoch"] == r["step"] / 4
    assert all(k.startswith("train/") for k in r if k not in ("step", "time", "epoch")) or "test/accuracy" in r
  lines = open(os.path.join(w, "metrics.jsonl")).read().splitlines()
  assert all(line == json.dumps(json.loads(line), sort_keys=True) for line in lines)

  # TensorBoard: a second event file; the first one lost its step-6 events; every metrics.jsonl scalar, at the
  # same steps, with the same values (as float32, TensorBoard's scalar type)
  assert len(metric_writers.event_files(w)) == 2
  tb, js = _series_of_tensorboard(w), _series_of_jsonl(records)
  assert {k: tb[k] for k in js} == js
  assert len(js["train/loss"]) == 4 and len(set(v for _, v in js["train/loss"])) == 4
  # clu's ReportProgress: steps/s and uptime at the logged steps, in TensorBoard only
  assert set(tb) - set(js) == {"steps_per_sec", "uptime"}
  assert [s for s, _ in tb["steps_per_sec"]] == [2, 4, 6, 8] and all(v > 0 for _, v in tb["steps_per_sec"])


def test_jsonl_record_format(tmp_path):
  """One sorted JSON object per call: the step, the scalars (NumPy and JAX scalars as numbers) and the time."""
  path = str(tmp_path / "metrics.jsonl")
  writer = metric_writers.JsonLinesWriter(path)
  writer.write_scalars(3, {"epoch": 0.75, "train/loss": np.float32(1.25), "train/lr": jax.numpy.asarray(0.5)})
  writer.write_scalars(np.int64(4), {"epoch": 1, "test/num_examples": 7, "time": 12.5})
  writer.close()
  with open(path) as f:
    lines = f.read().split("\n")
  assert lines[2] == "" and len(lines) == 3
  a, b = json.loads(lines[0]), json.loads(lines[1])
  assert list(a) == ["epoch", "step", "time", "train/loss", "train/lr"]
  assert a["step"] == 3 and a["train/loss"] == 1.25 and a["train/lr"] == 0.5 and a["epoch"] == 0.75
  assert isinstance(a["time"], float) and a["time"] > 1.7e9
  assert b == {"epoch": 1, "step": 4, "test/num_examples": 7, "time": 12.5}
  assert lines[1] == '{"epoch": 1, "step": 4, "test/num_examples": 7, "time": 12.5}'


def test_only_process_zero_writes(tmp_path, monkeypatch):
  quiet = tmp_path / "process1"
  quiet.mkdir()
  monkeypatch.setattr(jax, "process_index", lambda *a, **k: 1)
  writer = metric_writers.create_writer(str(quiet))
  assert writer.jsonl is None and writer.tensorboard is None
  writer.write_scalars(1, {"train/loss": 0.5})
  writer.close()
  assert os.listdir(quiet) == []

  monkeypatch.setattr(jax, "process_index", lambda *a, **k: 0)
  main = tmp_path / "process0"
  main.mkdir()
  writer = metric_writers.create_writer(str(main))
  writer.write_scalars(1, {"train/loss": 0.5})
  writer.close()
  assert len(metric_writers.event_files(str(main))) == 1 and "metrics.jsonl" in os.listdir(main)


def test_tensorboard_files_only_when_written_and_not_when_turned_off(tmp_path, monkeypatch):
  a, b = tmp_path / "a", tmp_path / "b"
  a.mkdir(), b.mkdir()
  metric_writers.create_writer(str(a)).close()  # nothing written: no event file (a finished run restarted)
  assert os.listdir(a) == ["metrics.jsonl"]
  monkeypatch.setenv("MDRAD_TENSORBOARD", "0")
  writer = metric_writers.create_writer(str(b))
  assert writer.tensorboard is None
  writer.write_scalars(1, {"train/loss": 0.5})
  writer.close()
  assert os.listdir(b) == ["metrics.jsonl"]


def test_drop_replayed_events_keeps_the_steps_up_to_the_checkpoint(tmp_path):
  w = metric_writers.TensorBoardWriter(str(tmp_path))
  for step in range(1, 6):
    w.write_scalars(step, {"train/loss": step / 10, "epoch": step / 5})
  w.close()
  (path,) = metric_writers.event_files(str(tmp_path))
  with open(path, "ab") as f:  # a record cut short by a crash
    f.write(b"\x20\x00\x00\x00\x00\x00\x00\x00\x01\x02")
  assert metric_writers.drop_replayed_events(str(tmp_path), 3) == 3  # steps 4, 5 and the partial record
  events = metric_writers.read_events(path)
  assert events[0].file_version.startswith("brain.Event")  # the file's header event (step 0) stays
  assert [(e.step, [v.tag for v in e.summary.value]) for e in events[1:]] == [
    (s, ["train/loss", "epoch"]) for s in (1, 2, 3)
  ]
  assert _series_of_tensorboard(tmp_path)["train/loss"] == [(s, np.float32(s / 10)) for s in (1, 2, 3)]
  before = open(path, "rb").read()
  assert metric_writers.drop_replayed_events(str(tmp_path), 3) == 0
  assert open(path, "rb").read() == before
  assert os.listdir(tmp_path) == [os.path.basename(path)]  # no temporary file left


def test_writers_need_neither_tensorflow_nor_torch(tmp_path):
  """With ``import tensorflow`` and ``import torch`` failing, clu's writers and periodic actions import, and
  a run's writer writes event files that TensorBoard reads."""
  code = (
    "import sys\n"
    "class Refuse:\n"
    "  def find_spec(self, name, path=None, target=None):\n"
    "    if name.split('.')[0] in ('tensorflow', 'torch'):\n"
    "      raise ModuleNotFoundError(f'No module named {name!r}', name=name)\n"
    "sys.meta_path.insert(0, Refuse())\n"
    "from mdrad_jax import metric_writers, train\n"
    "from clu import metric_writers as clu_writers, periodic_actions\n"
    "w = metric_writers.create_writer(sys.argv[1])\n"
    "assert isinstance(w, clu_writers.MultiWriter)\n"
    "w.write_scalars(2, {'train/loss': 0.25}); w.close()\n"
    "try:\n  clu_writers.SummaryWriter(sys.argv[1])\nexcept ImportError as e:\n  print('SummaryWriter:', e)\n"
    "from tensorboard.backend.event_processing import event_accumulator\n"
    "acc = event_accumulator.EventAccumulator(sys.argv[1]); acc.Reload()\n"
    "print('read', [(e.step, e.value) for e in acc.Scalars('train/loss')])\n"
    "print('loaded', sorted(m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'torch')))\n"
  )
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
  r = subprocess.run(
    [sys.executable, "-c", code, str(tmp_path)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
  )
  assert r.returncode == 0, r.stderr[-3000:]
  assert "read [(2, 0.25)]" in r.stdout and "loaded []" in r.stdout
  assert "SummaryWriter: clu.metric_writers.SummaryWriter needs TensorFlow" in r.stdout
