"""Where a run's metrics go: ``metrics.jsonl`` and TensorBoard event files, both through ``clu.metric_writers``.

:func:`create_writer` gives a run's writer (:class:`RunWriter`, a ``clu.metric_writers.MultiWriter``) of

* :class:`JsonLinesWriter`: ``WORKDIR/metrics.jsonl``, one JSON object per ``write_scalars`` call,
  ``{"step": STEP, "time": UNIX_SECONDS, NAME: VALUE, ...}`` with sorted keys;
* :class:`TensorBoardWriter`: ``WORKDIR/events.out.tfevents.*``, the same scalars (as float32, TensorBoard's
  scalar type), so that ``tensorboard --logdir WORKDIR`` shows the run (and ``--logdir`` on a folder of
  workdirs, all of them).

Only process 0 writes; the writer of any other process writes nothing.  Neither writer needs TensorFlow: the
event files are written by the ``tensorboard`` package's own TensorFlow-free writer (clu's ``SummaryWriter``
imports TensorFlow, and ``import clu.metric_writers`` itself does in clu 0.0.12, so where TensorFlow is not
installed this module gives clu a stand-in for that one class before importing it).  Nor does either need
PyTorch.  Import ``clu.periodic_actions`` (which imports ``clu.metric_writers``) from here for the same reason.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import time
import types
from typing import Any, Mapping

from absl import logging

from mdrad_jax.progress import is_main_process

METRICS_FILE = "metrics.jsonl"
EVENTS_PREFIX = "events.out.tfevents."  # TensorBoard finds event files by this prefix


class _SummaryWriterNeedsTensorFlow:
  """Stands in for ``clu.metric_writers.SummaryWriter`` where TensorFlow is not installed."""

  def __init__(self, *args, **kwargs):
    raise ImportError(
      "clu.metric_writers.SummaryWriter needs TensorFlow, which is not installed; "
      "mdrad_jax.metric_writers.TensorBoardWriter writes TensorBoard files without it"
    )


def _importable(module: str) -> bool:
  try:
    return importlib.util.find_spec(module) is not None
  except (ImportError, ValueError):  # an import hook that refuses it; a module object without a spec
    return False


def _import_clu_metric_writers():
  """``clu.metric_writers``, importable without TensorFlow (its ``__init__`` imports clu's TF summary writer)."""
  name = "clu.metric_writers.summary_writer"
  if "clu.metric_writers" not in sys.modules and name not in sys.modules:
    if not _importable("tensorflow"):
      stub = types.ModuleType(name, "Stand-in: clu's SummaryWriter needs TensorFlow (not installed).")
      stub.SummaryWriter = _SummaryWriterNeedsTensorFlow
      sys.modules[name] = stub
  from clu import metric_writers

  return metric_writers


clu_writers = _import_clu_metric_writers()
from clu import periodic_actions  # noqa: E402, F401  (it imports clu.metric_writers)

# The tensorboard package's TensorFlow-free pieces: the event protos, the event-file writer and reader.
from tensorboard.backend.event_processing.event_file_loader import RawEventFileLoader  # noqa: E402
from tensorboard.compat.proto import event_pb2  # noqa: E402
from tensorboard.summary.writer.event_file_writer import EventFileWriter  # noqa: E402
from tensorboard.summary.writer.record_writer import RecordWriter  # noqa: E402


def _unsupported(writer: str, kind: str) -> None:
  logging.log_first_n(logging.WARNING, "%s records scalars only: %s are not written", 1, writer, kind)


class _ScalarsOnly(clu_writers.MetricWriter):
  """The kinds of data other than scalars: not written (a warning the first time)."""

  def write_summaries(self, step: int, values: Mapping[str, Any], metadata: Mapping[str, Any] | None = None):
    _unsupported(type(self).__name__, "summaries")

  def write_images(self, step: int, images: Mapping[str, Any]):
    _unsupported(type(self).__name__, "images")

  def write_videos(self, step: int, videos: Mapping[str, Any]):
    _unsupported(type(self).__name__, "videos")

  def write_audios(self, step: int, audios: Mapping[str, Any], *, sample_rate: int):
    _unsupported(type(self).__name__, "audios")

  def write_texts(self, step: int, texts: Mapping[str, str]):
    _unsupported(type(self).__name__, "texts")

  def write_histograms(self, step: int, arrays: Mapping[str, Any], num_buckets: Mapping[str, int] | None = None):
    _unsupported(type(self).__name__, "histograms")

  def write_hparams(self, hparams: Mapping[str, Any]):
    _unsupported(type(self).__name__, "hparams")


class JsonLinesWriter(_ScalarsOnly):
  """Appends one JSON object per ``write_scalars`` call to ``path``: ``{"step": ..., "time": ..., **scalars}``
  (sorted keys; NumPy and JAX scalars as floats; a ``time`` among the scalars is kept), flushed at once."""

  def __init__(self, path: str):
    self.path = path
    self._f = open(path, "a")

  def write_scalars(self, step: int, scalars: Mapping[str, Any]):
    record = {"step": int(step), **scalars}
    record.setdefault("time", time.time())
    self._f.write(json.dumps(record, sort_keys=True, default=float) + "\n")
    self._f.flush()

  def flush(self):
    if self._f is not None:
      self._f.flush()

  def close(self):
    if self._f is not None:
      self._f.close()
      self._f = None


class TensorBoardWriter(_ScalarsOnly):
  """Writes scalars to a TensorBoard event file in ``logdir`` (one event per ``write_scalars`` call, flushed
  at once).  The file is created at the first write: a run that writes nothing leaves none."""

  def __init__(self, logdir: str):
    self.logdir = logdir
    self._events: EventFileWriter | None = None

  def write_scalars(self, step: int, scalars: Mapping[str, Any]):
    if self._events is None:
      self._events = EventFileWriter(self.logdir)
    event = event_pb2.Event(step=int(step), wall_time=time.time())
    for tag, value in scalars.items():
      event.summary.value.add(tag=tag, simple_value=float(value))
    self._events.add_event(event)
    self._events.flush()

  def flush(self):
    if self._events is not None:
      self._events.flush()

  def close(self):
    if self._events is not None:
      self._events.close()
      self._events = None


class RunWriter(clu_writers.MultiWriter):
  """A run's writer: its ``metrics.jsonl`` and, unless turned off, its TensorBoard files (``jsonl`` and
  ``tensorboard`` are the parts, None where absent: both on any process but 0)."""

  def __init__(self, jsonl: JsonLinesWriter | None, tensorboard: TensorBoardWriter | None):
    super().__init__([w for w in (jsonl, tensorboard) if w is not None])
    self.jsonl, self.tensorboard = jsonl, tensorboard


def tensorboard_enabled() -> bool:
  """Whether runs write TensorBoard event files: yes unless ``MDRAD_TENSORBOARD=0`` (like ``MDRAD_PROGRESS``, a
  setting of the output, not of the run: configs, and so the configs studies recorded, do not carry it)."""
  return os.environ.get("MDRAD_TENSORBOARD", "1") != "0"


def create_writer(workdir: str, *, tensorboard: bool | None = None) -> RunWriter:
  """The writer of the run in ``workdir``: ``metrics.jsonl`` and TensorBoard event files there (``tensorboard``:
  None = :func:`tensorboard_enabled`), on process 0; on any other process a writer that writes nothing."""
  if not is_main_process():
    return RunWriter(None, None)
  if tensorboard is None:
    tensorboard = tensorboard_enabled()
  return RunWriter(
    JsonLinesWriter(os.path.join(workdir, METRICS_FILE)), TensorBoardWriter(workdir) if tensorboard else None
  )


def event_files(logdir: str) -> list[str]:
  """The TensorBoard event files directly in ``logdir``, oldest first (their names start with the time)."""
  if not os.path.isdir(logdir):
    return []
  return [os.path.join(logdir, n) for n in sorted(os.listdir(logdir)) if n.startswith(EVENTS_PREFIX)]


def read_events(path: str) -> list:
  """The ``Event`` protos of one event file, up to a record cut short or damaged (as TensorBoard reads it)."""
  return [event_pb2.Event.FromString(r) for r in RawEventFileLoader(path).Load()]


def drop_replayed_events(logdir: str, last_step: int) -> int:
  """Removes from the event files in ``logdir`` the events after ``last_step`` (the step the run resumes from;
  what ``train.drop_replayed_metrics`` does for ``metrics.jsonl``), and a last record cut short by a crash.
  Returns how many events were dropped (a file is rewritten only then)."""
  dropped = 0
  for path in event_files(logdir):
    records = list(RawEventFileLoader(path).Load())
    keep = [r for r in records if event_pb2.Event.FromString(r).step <= last_step]
    # each record is framed in 16 bytes (length, its CRC, the data's CRC): anything more is a partial record
    complete = sum(len(r) + 16 for r in records) == os.path.getsize(path)
    if len(keep) == len(records) and complete:
      continue
    dropped += len(records) - len(keep) + (0 if complete else 1)
    tmp = os.path.join(logdir, f".events-rewrite.tmp{os.getpid()}")  # no "tfevents": TensorBoard skips it
    with open(tmp, "wb") as f:
      out = RecordWriter(f)
      for r in keep:
        out.write(r)
    os.replace(tmp, path)
  return dropped
