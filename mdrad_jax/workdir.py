"""A job's workdir: one writer at a time, JSON files read with the file named on error, ``config.json``.

* :func:`lock`: an exclusive ``fcntl`` lock on ``WORKDIR/writer.lock`` for as long as a job runs (process 0 of
  a multi-process run takes it); a second job on the same workdir gets one line naming the holder's pid.  The
  lock goes with the process, so a killed job never leaves a stale lock behind.
* :func:`read_json`: a JSON file the run reads, or ``UserError`` naming the file when it is not valid JSON.
* :func:`check_same_run` / :func:`write_config`: ``config.json`` is written (by process 0) only after the job
  validated its config and restored its checkpoint, and a config that trains something else than the run
  already in the workdir is refused with the differing fields listed.  :mod:`mdrad_jax.runs` reads a trained
  run's workdir back (its best or latest checkpoint and the network in it).
* :func:`upgrade_config`: a saved config in today's spelling (values renamed since, :data:`RENAMED_VALUES`),
  for every reader of saved configs.
"""

from __future__ import annotations

import contextlib
import copy
import errno
import fcntl
import json
import os
from typing import Any, Iterator

import jax

from mdrad_jax.errors import UserError

LOCK_FILE = "writer.lock"
CONFIG_FILE = "config.json"

# The fields of a training config that decide what is trained: changing any of them on a workdir that holds
# a run would mix two runs in one (its checkpoints, metrics and config.json).  Any other field (evaluation
# cadence, logging, checkpoint retention, data location, devices) may change between a run and its resume.
RUN_FIELDS = (
  "seed",
  "data.name",
  "data.source_dir",
  "data.augment",
  "data.crop_padding",
  "num_train_examples",
  "model",
  "teachers",
  "teacher_dtype",
  "method",
  "attack",
  "optim",
  "num_epochs",
  "batch_size",
  "checkpoint.best_metric",
  "checkpoint.best_mode",
  "quickstart",
  "job",
)


@contextlib.contextmanager
def lock(workdir: str, *, enabled: bool = True) -> Iterator[str | None]:
  """Holds an exclusive lock on ``workdir`` (created if needed) for the duration of the block.  A workdir
  that the lock created and that holds nothing else when the block ends (a job that failed before writing) is
  removed again, so that a refused job leaves nothing behind."""
  if not enabled:
    yield None
    return
  created = not os.path.isdir(workdir)
  try:
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, LOCK_FILE)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
  except OSError as e:
    raise UserError(f"workdir {workdir}: cannot create it or its lock file: {e.strerror}") from None
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
        raise
      holder = os.pread(fd, 64, 0).decode("ascii", "replace").strip() or "unknown"
      raise UserError(
        f"workdir {os.path.abspath(workdir)} is in use by process {holder} (lock {path}); "
        f"wait for it to finish or use another --workdir"
      ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    yield path
  finally:
    if created and os.listdir(workdir) == [LOCK_FILE]:
      os.remove(path)
      with contextlib.suppress(OSError):
        os.rmdir(workdir)
    os.close(fd)  # closing the descriptor releases the lock


def read_json(path: str, what: str | None = None) -> Any:
  """The parsed JSON file ``path``; a file that is not valid JSON (or unreadable) is a one-line UserError."""
  try:
    with open(path) as f:
      return json.load(f)
  except json.JSONDecodeError as e:
    raise UserError(
      f"{what or 'file'} {path} is not valid JSON (line {e.lineno} column {e.colno}: {e.msg}); "
      f"restore it or move the run aside"
    ) from None
  except UnicodeDecodeError:
    raise UserError(f"{what or 'file'} {path} is not valid JSON (not UTF-8 text)") from None
  except OSError as e:
    if isinstance(e, FileNotFoundError):
      raise
    raise UserError(f"{what or 'file'} {path}: cannot read it: {e.strerror}") from None


# Config values spelled differently by earlier releases: field -> {old value: today's value}.  Saved configs
# (config.json, the study's records and snapshots) are read through :func:`upgrade_config`, so that an old run
# compares equal to the same run configured today; a config given today with an old value is upgraded, with a
# warning, by ``validation.validate``.
RENAMED_VALUES = {
  "method.teacher_view": {"nat": "clean"},  # SA-MDRAD's teachers on the clean batch only
}


def upgrade_config(config):
  """A copy of a saved config (a dict, e.g. a parsed ``config.json``) with the :data:`RENAMED_VALUES` of
  earlier releases replaced by today's; anything that is not a dict is returned unchanged."""
  if not isinstance(config, dict):
    return config
  out = copy.deepcopy(config)
  for field, renamed in RENAMED_VALUES.items():
    *parents, leaf = field.split(".")
    node = out
    for part in parents:
      node = node.get(part) if isinstance(node, dict) else None
    if isinstance(node, dict) and isinstance(node.get(leaf), str) and node[leaf] in renamed:
      node[leaf] = renamed[node[leaf]]
  return out


def read_run_config(workdir: str) -> dict | None:
  """``WORKDIR/config.json`` parsed (:func:`upgrade_config`: in today's spelling), None when there is none."""
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.isfile(path):
    return None
  d = read_json(path, "run config")
  if not isinstance(d, dict):
    raise UserError(f"run config {path}: expected a JSON object, got {type(d).__name__}")
  return upgrade_config(d)


def _pick(d: dict, path: str):
  node: Any = d
  for part in path.split("."):
    if not isinstance(node, dict) or part not in node:
      return None
    node = node[part]
  return node


def _flat(value, prefix: str) -> dict[str, Any]:
  if isinstance(value, dict):
    out = {}
    for k, v in value.items():
      out.update(_flat(v, f"{prefix}.{k}"))
    return out
  if isinstance(value, (list, tuple)):
    return {prefix: [_normalise(v) for v in value]}
  return {prefix: _normalise(value)}


def _normalise(v):
  if isinstance(v, (list, tuple)):
    return [_normalise(x) for x in v]
  if isinstance(v, bool) or v is None or isinstance(v, str):
    return v
  if isinstance(v, (int, float)):
    return float(v)
  return str(v)


def differing_fields(old: dict, new: dict, fields=RUN_FIELDS) -> list[str]:
  """Dotted names of the ``fields`` (and their sub-fields) whose values differ between two config dicts."""
  diff = []
  for field in fields:
    a, b = _flat(_pick(old, field), field), _flat(_pick(new, field), field)
    for key in sorted(set(a) | set(b)):
      if a.get(key) != b.get(key):
        diff.append(key)
  return diff


def config_dict(config, extra: dict | None = None) -> dict:
  d = config.to_dict() if hasattr(config, "to_dict") else dict(config)
  if extra:
    d.update(extra)
  return json.loads(json.dumps(d, sort_keys=True, default=str))


def check_same_run(config, workdir: str, extra: dict | None = None) -> dict | None:
  """Refuses ``config`` when ``workdir`` holds a run whose ``config.json`` differs in a :data:`RUN_FIELDS`
  field; returns the existing config (None for a new workdir)."""
  old = read_run_config(workdir)
  if old is None:
    return None
  new = upgrade_config(config_dict(config, extra))
  diff = differing_fields(old, new)
  if diff:
    shown = ", ".join(f"{k} ({_pick_flat(old, k)!r} -> {_pick_flat(new, k)!r})" for k in diff[:6])
    more = f" and {len(diff) - 6} more" if len(diff) > 6 else ""
    raise UserError(
      f"workdir {workdir} holds another run: this config differs from its config.json in "
      f"{shown}{more}; use another --workdir (or the run's own config) to keep both"
    )
  return old


def _pick_flat(d: dict, key: str):
  head = key.split(".")[0]
  return _flat(_pick(d, head), head).get(key)


def write_config(config, workdir: str, extra: dict | None = None) -> bool:
  """Writes ``WORKDIR/config.json`` on process 0 (temporary file, then renamed) unless it already holds the
  same text; returns whether it wrote.  Call it only once the config is validated, :func:`check_same_run`
  accepted it and the checkpoint (if any) restored."""
  if jax.process_index() != 0:
    return False
  path = os.path.join(workdir, CONFIG_FILE)
  text = json.dumps(config_dict(config, extra), indent=2, sort_keys=True, default=str)
  if os.path.isfile(path):
    with open(path) as f:
      if f.read() == text:
        return False
  tmp = f"{path}.tmp{os.getpid()}"
  try:
    with open(tmp, "w") as f:
      f.write(text)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  return True
