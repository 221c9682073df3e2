"""The study job (``configs/study.py``): a grid of training runs compared under one evaluation protocol.

A study is data in its config (``config.study``):

* ``teachers``: named teacher runs (model, method -- ``natural`` for standard teachers, ``pgd_at`` for robust
  ones -- and their training recipe), each trained once under ``DIR/teachers/<name>`` and shared by every cell;
* ``rows``: named rows (a method, its teachers by name, method/config overrides, the table it belongs to);
* ``seeds``: every row is trained once per seed, a *cell* ``DIR/runs/<row>/seed<k>``, an ordinary training
  workdir made by the method's own config file (``configs/<method>.py``) and ``mdrad_jax.train``;
* ``train``: what every cell shares (student, data subset, epochs, batch, learning rate and schedule);
* ``eval``: the protocol every cell is evaluated with by the evaluation job (``mdrad_jax.evaluation_job``):
  clean, PGD-20 and CW∞ on ``eval.num_examples`` test points, the AutoAttack APGD subset (APGD-CE + APGD-T) on
  ``eval.aa_examples``, and the full standard AutoAttack on the best ``eval.full_aa_rows`` rows of each table.

The job trains what is missing, evaluates what is not evaluated, and writes ``study.json`` (every cell's config,
seed, checkpoint step, every attack's accuracy, wall time and compute in FLOPs), ``study.md`` (mean ± std over
seeds per row) and plots (``study_robust_vs_clean.png``, ``study_robust_vs_compute.png``).  It can be stopped
at any point and run again: finished cells are skipped (a cell is finished when ``cell.json`` is written after
its evaluations), interrupted ones resume from their checkpoints.  ``study.only`` runs a subset.

A study can also be continued on another machine from its ``study.json`` (``study.restore=PATH``), or from
several (``study.restore=A/study.json,B/study.json``: the parts of one study run on different machines or in
different workdirs, joined; where two hold the same cell or teacher, the first one listed is used).  Each
teacher is imported from its exported network, ``teachers/<name>.safetensors`` next to that ``study.json`` (the
study writes ``DIR/teachers/<name>.safetensors`` for every teacher), when the snapshot trained it with the same
config and the network gives the recorded clean accuracy (``study.restore_teachers``, default True); otherwise
it is retrained (training is deterministic for a fixed config and machine type).  A finished cell of the
snapshot is taken over only when its config equals the cell's and every teacher it used has the same record
(config, test accuracy, PGD accuracy); it is marked ``restored_from``.  A restored cell has no
checkpoint; when the full AutoAttack needs one, the cell is trained again and its clean/PGD-20/CW∞ numbers are
compared with the restored ones (``reproduced`` in its record).
"""

from __future__ import annotations

import fnmatch
import json
import os
import shutil
import time

import ml_collections
import numpy as np

from mdrad_jax import config_lib
from mdrad_jax import evaluation_job
from mdrad_jax import evaluation_report
from mdrad_jax import export as export_lib
from mdrad_jax import runs
from mdrad_jax import runtime
from mdrad_jax import train
from mdrad_jax import workdir as workdir_lib
from mdrad_jax.errors import UserError
from mdrad_jax.importers import job as importer_job
from mdrad_jax.progress import is_main_process, log

CELL_FILE = "cell.json"
TEACHER_FILE = "teacher.json"
# The attack keys of the evaluation reports that the study tabulates, with their column titles.
COLUMNS = (
  ("clean", "clean"),
  ("pgd20", "PGD-20"),
  ("cw", "CW∞"),
  ("autoattack_apgd_subset", "AA (APGD-CE+APGD-T)"),
  ("autoattack", "AA (standard)"),
)


# ---------------------------------------------------------------------------------------------
# Configs of the stages: each is an ordinary job config.
# ---------------------------------------------------------------------------------------------
def _merge(config: ml_collections.ConfigDict, overrides, where: str) -> None:
  """Sets every leaf of the nested mapping ``overrides`` on ``config`` (an unknown field is an error)."""
  for key, value in overrides.items():
    if key not in config:
      raise UserError(f"{where}: unknown config field {key!r}; known: {sorted(config.keys())}")
    if isinstance(value, (ml_collections.ConfigDict, dict)) and isinstance(config[key], ml_collections.ConfigDict):
      _merge(config[key], value, f"{where}.{key}")
    else:
      if isinstance(value, list):
        value = tuple(value)
      config[key] = value


def _shared_training(c: ml_collections.ConfigDict, s: ml_collections.ConfigDict, t) -> None:
  """What every cell (and, through ``t``, every teacher) shares: data, subset, epochs, batch, lr, schedule."""
  c.data.data_dir = s.data_dir
  c.data.source_dir = s.source_dir
  c.num_epochs = t.epochs
  c.num_train_examples = t.num_train_examples
  c.batch_size = t.batch_size
  c.eval_batch_size = s.eval.batch_size
  c.optim.lr = float(t.lr)
  c.optim.schedule = t.schedule
  c.optim.boundaries = tuple(round(float(f) * t.epochs, 4) for f in t.boundary_fractions)
  c.log_every_steps = s.log_every_steps
  c.checkpoint.keep = 1
  c.eval.num_examples = s.eval.in_training_examples
  c.eval.every_epochs = t.epochs  # in-training evaluation only at the end: the study evaluates the last checkpoint
  c.checkpoint.best_metric = ""  # the last checkpoint, the same rule for every method


def teacher_config(s: ml_collections.ConfigDict, name: str) -> ml_collections.ConfigDict:
  t = s.teachers[name]
  arg = f"dataset={s.dataset}"
  if t.method == "natural":
    c = config_lib.load_config_file("teacher", f"model={t.model},{arg}")
  else:
    c = config_lib.load_config_file(t.method, f"student={t.model},{arg}")
    c.eval.pgd_steps = s.eval.in_training_pgd_steps
  _shared_training(c, s, t)
  c.model.kwargs = ml_collections.ConfigDict(dict(t.model_kwargs))
  c.optim.weight_decay = float(t.weight_decay)
  c.seed = int(t.seed)
  return c


def cell_config(
  s: ml_collections.ConfigDict, row_name: str, seed: int, teacher_dirs: dict[str, str]
) -> ml_collections.ConfigDict:
  r = s.rows[row_name]
  c = config_lib.load_config_file(r.method, f"dataset={s.dataset},student={s.train.student},epochs={s.train.epochs}")
  _shared_training(c, s, s.train)
  c.model.kwargs = ml_collections.ConfigDict(dict(s.train.student_kwargs))
  c.teachers = tuple(teacher_dirs[t] for t in r.teachers)
  c.attack.num_steps = s.train.pgd_steps
  c.eval.pgd_steps = s.eval.in_training_pgd_steps
  c.seed = int(seed)
  _merge(c, r.overrides, f"study.rows.{row_name}.overrides")
  return c


def eval_config(s, cell_dir: str, kind: str) -> ml_collections.ConfigDict:
  """The evaluation job's config for one report of a cell: 'main' (clean, PGD-20, CW∞), 'aa' (the APGD
  subset) or 'full_aa' (standard AutoAttack)."""
  e = s.eval
  if kind == "main":
    arg = f"attacks=clean+pgd20+cw,num_examples={e.num_examples}"
  elif kind == "aa":
    arg = f"attacks=autoattack,aa=apgd,num_examples={e.aa_examples}"
  else:
    arg = f"attacks=autoattack,aa=standard,num_examples={e.full_aa_examples}"
  c = config_lib.load_config_file("evaluate", f"checkpoint={cell_dir},which=latest,{arg}")
  c.data.data_dir = s.data_dir
  c.data.source_dir = s.source_dir
  c.evaluate.batch_size = e.batch_size
  c.evaluate.seed = e.seed
  c.evaluate.masking_square_examples = e.square_examples if kind == "main" else 0
  c.evaluate.masking_square_queries = e.square_queries
  c.evaluate.aa_overrides = e.aa_overrides if kind == "aa" else ""
  return c


# ---------------------------------------------------------------------------------------------
# Small file helpers.
# ---------------------------------------------------------------------------------------------
def _read_json(path: str) -> dict | None:
  """A JSON file of the study (None when absent); a malformed one is a one-line error naming it."""
  if not os.path.isfile(path):
    return None
  return workdir_lib.read_json(path, "study file")


def _finished(path: str, config, where: str, run_dir: str) -> dict | None:
  """The record at ``path`` when that stage finished with ``config``; None when it has not finished; an error
  when it finished with another config (nothing is overwritten)."""
  done = _read_json(path)
  if done is None:
    return None
  if _same_config(done["config"], config.to_dict()):
    return done
  raise UserError(f"{where}: {run_dir} was made with another config; move it away or restore the study's settings")


def _write_json(path: str, obj) -> None:
  if not is_main_process():
    return
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=2, sort_keys=True, default=evaluation_report.json_default)
    f.write("\n")
  os.replace(tmp, path)


def _same_config(a, b) -> bool:
  """Whether two configs (or recorded values) are equal, saved ones read in today's spelling
  (``workdir.upgrade_config``: a record written before a value was renamed still matches)."""
  a, b = workdir_lib.upgrade_config(a), workdir_lib.upgrade_config(b)
  return json.dumps(a, sort_keys=True, default=str) == json.dumps(b, sort_keys=True, default=str)


def _flops(run_dir: str) -> float | None:
  cost = _read_json(os.path.join(run_dir, runs.COST_FILE)) or {}
  return cost.get("train_flops")


# ---------------------------------------------------------------------------------------------
# Stages.
# ---------------------------------------------------------------------------------------------
def _train(config, run_dir: str) -> tuple[dict, float]:
  """Trains (or resumes) one run; returns its final in-training metrics and the seconds spent now."""
  t0 = time.perf_counter()
  metrics = train.train_and_evaluate(config, run_dir)
  return {k: float(v) for k, v in metrics.items()}, time.perf_counter() - t0


def run_teacher(s, name: str, workdir: str, snapshots: list[tuple[str, dict]] = ()) -> dict:
  tdir = os.path.join(workdir, "teachers", name)
  cfg = teacher_config(s, name)
  path = os.path.join(tdir, TEACHER_FILE)
  done = _finished(path, cfg, f"study.teachers.{name}", tdir)
  for source, snapshot in snapshots if s.restore_teachers else ():
    if done is not None:
      break
    done = import_teacher(s, name, tdir, cfg, snapshot, source)
  if done is None:
    log(f"== study teacher {name}: {s.teachers[name].method} training of {s.teachers[name].model}")
    metrics, seconds = _train(cfg, tdir)
    done = {
      "name": name,
      "dir": tdir,
      "model": s.teachers[name].model,
      "method": s.teachers[name].method,
      "config": cfg.to_dict(),
      "test_accuracy": metrics.get("test/accuracy"),
      "test_pgd_accuracy": metrics.get("test/pgd_accuracy"),
      "test_examples": metrics.get("test/num_examples"),
      "seconds": round(seconds, 1),
      "train_flops": _flops(tdir),
    }
    _write_json(path, done)
  exported = teacher_export_path(workdir, name)
  if is_main_process() and not os.path.isfile(exported):
    if done.get("imported_from"):
      shutil.copyfile(done["imported_from"], exported)
    else:
      export_lib.export(tdir, exported, which="latest")
  return done


def teacher_export_path(workdir: str, name: str) -> str:
  """``DIR/teachers/<name>.safetensors``: the trained teacher's network (``mdrad_jax.export``), which a study
  continued elsewhere from this one's ``study.json`` imports instead of training the teacher again."""
  return os.path.join(workdir, "teachers", f"{name}.safetensors")


def import_teacher(s, name: str, tdir: str, cfg, snapshot: dict, path: str) -> dict | None:
  """The snapshot's teacher ``name`` taken over from its exported network, ``teachers/<name>.safetensors`` next
  to the snapshot's ``study.json`` (``path``), when the snapshot trained it with this config (None otherwise: it is then
  trained).  The import job measures the network's clean accuracy on the record's test points; it must give the
  recorded accuracy, or the study stops (the file does not hold that teacher)."""
  before = snapshot["teachers"].get(name)
  source = teacher_export_path(os.path.dirname(os.path.abspath(path)), name)
  if before is None or not os.path.isfile(source) or not _same_config(before["config"], cfg.to_dict()):
    return None
  count = int(before["test_examples"])
  icfg = config_lib.load_config_file(
    "import_teacher", f"source={source},arch=mdrad:export,dataset={s.dataset},num_examples={count}"
  )
  icfg.data.data_dir, icfg.data.source_dir = s.data_dir, s.source_dir
  icfg.eval_batch_size = s.eval.batch_size
  config_file = os.path.join(tdir, workdir_lib.CONFIG_FILE)
  partial = _read_json(config_file)
  if partial is not None and partial.get("import", {}).get("file") == source:
    shutil.rmtree(tdir)  # an import of this file stopped before its record was written: import it again
  log(f"== study teacher {name}: imported from {source} (study.restore)")
  result = importer_job.run(icfg, tdir)
  accuracy, got = float(result["test/accuracy"]), int(result["test/num_examples"])
  if got != count or abs(accuracy - float(before["test_accuracy"])) * count > 0.5:
    raise UserError(
      f"study.restore: teacher {name} imported from {source} has clean accuracy {accuracy:.4f} on {got} test "
      f"points, the snapshot recorded {float(before['test_accuracy']):.4f} on {count}: the file does not hold that "
      f"teacher (--config.study.restore_teachers=false trains it instead)"
    )
  record = dict(before, dir=tdir, imported_from=source)
  _write_json(os.path.join(tdir, TEACHER_FILE), record)
  return record


def _evaluate(s, cell_dir: str, kind: str) -> dict:
  """Runs (or reuses) one evaluation report of a cell; returns the report."""
  out = os.path.join(cell_dir, f"eval_{kind}")
  cfg = eval_config(s, cell_dir, kind)
  report = _read_json(os.path.join(out, "eval.json"))
  if report and _same_config(report["meta"]["evaluate_config"], cfg.evaluate.to_dict()):
    return report
  os.makedirs(out, exist_ok=True)
  return evaluation_job.run(cfg, out)


def _attack_numbers(report: dict) -> dict[str, dict]:
  return {
    k: {"accuracy": v["accuracy"], "correct": v["correct"], "n": v["n"], "label": v.get("label")}
    for k, v in report["attacks"].items()
  }


TEACHER_RECORD_FIELDS = ("config", "test_accuracy", "test_pgd_accuracy", "test_examples")


def load_snapshots(spec: str) -> list[tuple[str, dict]]:
  """``study.restore``: the comma-separated ``study.json`` files, as (path, snapshot) in the order given."""
  paths = [p.strip() for p in spec.split(",") if p.strip()]
  repeated = sorted({p for p in paths if paths.count(p) > 1})
  if repeated:
    raise UserError(f"study.restore: {repeated[0]} is listed twice")
  return [(p, load_snapshot(p)) for p in paths]


def load_snapshot(path: str) -> dict | None:
  """A previous study's ``study.json`` for ``study.restore`` (None for '')."""
  if not path:
    return None
  if not os.path.isfile(path):
    raise UserError(f"study.restore: no such file {path}")
  snap = workdir_lib.read_json(path, "study.restore")
  if not isinstance(snap, dict) or "cells" not in snap or "teachers" not in snap:
    raise UserError(f"study.restore: {path} is not a study.json (expected keys 'cells' and 'teachers')")
  return snap


def _restorable(
  snapshot: dict | None, row_name: str, seed: int, cfg, teachers: dict[str, dict], names: list[str]
) -> dict | None:
  """The snapshot's record of this cell when it may be taken over (same config, same teacher records)."""
  if snapshot is None:
    return None
  old = next((c for c in snapshot["cells"] if c["row"] == row_name and c["seed"] == seed), None)
  if old is None:
    return None
  # teachers compared by name and record, not by the directory they were trained in
  if not _same_config(dict(old["config"], teachers=old["teachers"]), dict(cfg.to_dict(), teachers=names)):
    return None
  for name in names:
    before = snapshot["teachers"].get(name)
    if before is None or any(not _same_config(before.get(k), teachers[name].get(k)) for k in TEACHER_RECORD_FIELDS):
      return None
  return old


def run_cell(
  s, row_name: str, seed: int, workdir: str, teachers: dict[str, dict], snapshots: list[tuple[str, dict]] = ()
) -> dict:
  cell_dir = os.path.join(workdir, "runs", row_name, f"seed{seed}")
  cfg = cell_config(s, row_name, seed, {k: v["dir"] for k, v in teachers.items()})
  path = os.path.join(cell_dir, CELL_FILE)
  done = _finished(path, cfg, f"study.rows.{row_name}", cell_dir)
  if done:
    return done
  r = s.rows[row_name]
  for source, snapshot in snapshots:
    old = _restorable(snapshot, row_name, seed, cfg, teachers, [teachers[t]["name"] for t in r.teachers])
    if old is not None:
      log(f"== study cell {row_name}/seed{seed}: restored from {source}")
      os.makedirs(cell_dir, exist_ok=True)
      record = dict(old, dir=cell_dir, config=cfg.to_dict(), restored_from=old.get("restored_from") or source)
      _write_json(path, record)
      return record
  names = [teachers[t]["name"] for t in r.teachers]
  log(f"== study cell {row_name}/seed{seed}: {r.method}" + (f" from {', '.join(names)}" if names else ""))
  prior = _read_json(os.path.join(cell_dir, "progress.json")) or {}
  metrics, seconds = _train(cfg, cell_dir)
  train_seconds = prior.get("train_seconds", 0.0) + seconds
  _write_json(os.path.join(cell_dir, "progress.json"), {"train_seconds": train_seconds})
  t0 = time.perf_counter()
  reports = {kind: _evaluate(s, cell_dir, kind) for kind in ("main", "aa")}
  eval_seconds = time.perf_counter() - t0
  attacks: dict[str, dict] = {}
  for rep in reports.values():
    attacks.update(_attack_numbers(rep))
  step = reports["main"]["meta"]["checkpoint"]["step"]
  if reports["aa"]["meta"]["checkpoint"]["step"] != step:
    raise RuntimeError(f"{cell_dir}: the two evaluations read different checkpoints")
  teacher_flops = [teachers[t].get("train_flops") for t in r.teachers]
  record = {
    "row": row_name,
    "seed": seed,
    "method": r.method,
    "table": r.table,
    "label": r.label or row_name,
    "teachers": [teachers[t]["name"] for t in r.teachers],
    "dir": cell_dir,
    "config": cfg.to_dict(),
    "checkpoint_step": step,
    "attacks": attacks,
    "in_training": metrics,
    "masking_flags": [f["reason"] for rep in reports.values() for f in rep["masking_check"]["flags"]],
    "train_seconds": round(train_seconds, 1),
    "eval_seconds": round(eval_seconds, 1),
    "train_flops": _flops(cell_dir),
    "teacher_flops": None if any(f is None for f in teacher_flops) else float(sum(teacher_flops)),
    "machine": runtime.host_description(),
  }
  _write_json(path, record)
  return record


def retrain_restored(s, cell: dict, teachers: dict[str, dict]) -> dict:
  """Trains a restored cell again (it came without a checkpoint) and records whether its clean, PGD-20 and CW∞
  numbers are reproduced exactly; the new numbers are the ones kept."""
  log(f"== study cell {cell['row']}/seed{cell['seed']}: restored without a checkpoint; training it again")
  cfg = cell_config(s, cell["row"], cell["seed"], {k: v["dir"] for k, v in teachers.items()})
  _, seconds = _train(cfg, cell["dir"])
  report = _evaluate(s, cell["dir"], "main")
  new = _attack_numbers(report)
  same = all(new[k]["correct"] == cell["attacks"][k]["correct"] for k in new if k in cell["attacks"])
  if not same:
    log(
      f"warning: {cell['row']}/seed{cell['seed']} retrained to other numbers than its restored record: "
      + ", ".join(f"{k} {cell['attacks'][k]['correct']} -> {new[k]['correct']}" for k in new if k in cell["attacks"])
    )
  return dict(cell, attacks=dict(cell["attacks"], **new), reproduced=same, retrain_seconds=round(seconds, 1))


def add_full_autoattack(s, cell: dict, teachers: dict[str, dict] | None = None) -> dict:
  if not runs.has_checkpoint(cell["dir"]):
    if not cell.get("restored_from") or teachers is None:
      raise RuntimeError(f"{cell['dir']}: no checkpoint for the full AutoAttack")
    cell = retrain_restored(s, cell, teachers)
  report = _evaluate(s, cell["dir"], "full_aa")
  cell = dict(cell, attacks=dict(cell["attacks"], **_attack_numbers(report)))
  _write_json(os.path.join(cell["dir"], CELL_FILE), cell)
  return cell


# ---------------------------------------------------------------------------------------------
# Selection, aggregation and the report.
# ---------------------------------------------------------------------------------------------
def selected(s) -> tuple[list[str], list[tuple[str, int]]]:
  """Rows and cells that ``study.only`` selects (comma-separated patterns on row names, ``table<T>``, or
  ``<row>/seed<k>``; '' = everything).  Cells are ordered table by table and, within a table, seed-major, so
  that every row of the first table has all its seeds before the next table starts."""
  patterns = [p.strip() for p in s.only.split(",") if p.strip()]
  rows = list(s.rows.keys())

  def chosen(row, seed):
    if not patterns:
      return True
    names = (row, f"table{s.rows[row].table}", f"{row}/seed{seed}")
    return any(fnmatch.fnmatchcase(n, p) for p in patterns for n in names)

  def seeds_of(row):
    return tuple(s.rows[row].seeds) or tuple(s.seeds)

  cells = []
  tables = sorted({s.rows[r].table for r in rows})
  for table in tables:
    mine = [r for r in rows if s.rows[r].table == table]
    for i in range(max(len(seeds_of(r)) for r in mine)):
      for row in mine:
        if i < len(seeds_of(row)) and chosen(row, seeds_of(row)[i]):
          cells.append((row, int(seeds_of(row)[i])))
  if patterns and not cells:
    raise UserError(f"study.only={s.only!r} selects no cell; rows: {rows}")
  return [r for r in rows if any(c[0] == r for c in cells)], cells


RANK_PREFIX = "best"


def _is_rank(name: str) -> bool:
  return name.startswith(RANK_PREFIX) and name[len(RANK_PREFIX) :].isdigit()


def resolve_teachers(s, teachers: dict[str, dict]) -> dict[str, dict]:
  """Adds the rank names ``best1``, ``best2``, ... : the standard teachers of ``study.ranked_teachers`` by
  test accuracy, best first (so that 'single-teacher methods take the strongest' needs no guess)."""
  ranked = sorted((teachers[n] for n in s.ranked_teachers if n in teachers), key=lambda t: -t["test_accuracy"])
  out = dict(teachers)
  for k, t in enumerate(ranked, start=1):
    out[f"{RANK_PREFIX}{k}"] = t
  return out


def _mean_std(values: list[float]) -> tuple[float | None, float | None]:
  if not values:
    return None, None
  a = np.asarray(values, np.float64)
  return float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else 0.0


def aggregate(s, cells: list[dict]) -> list[dict]:
  """One entry per row: mean and sample standard deviation over its seeds of every tabulated number."""
  out = []
  for row in s.rows.keys():
    mine = sorted([c for c in cells if c["row"] == row], key=lambda c: c["seed"])
    if not mine:
      continue
    r = s.rows[row]
    entry = {
      "row": row,
      "label": r.label or row,
      "method": r.method,
      "table": r.table,
      "also_in": list(r.also_in),
      "teachers": mine[0]["teachers"],
      "seeds": [c["seed"] for c in mine],
      "n_seeds": len(mine),
    }
    for key, _ in COLUMNS:
      vals = [c["attacks"][key]["accuracy"] for c in mine if key in c["attacks"]]
      m, sd = _mean_std(vals)
      entry[key] = {"mean": m, "std": sd, "n": len(vals)}
    entry["minutes"] = _mean_std([(c["train_seconds"] + c["eval_seconds"]) / 60 for c in mine])[0]
    flops = [c["train_flops"] for c in mine if c["train_flops"] is not None]
    entry["train_flops"] = _mean_std(flops)[0]
    tf = mine[0]["teacher_flops"] if r.teachers else 0.0
    entry["teacher_flops"] = tf
    entry["total_flops"] = None if entry["train_flops"] is None or tf is None else entry["train_flops"] + tf
    entry["masking_flags"] = sum(len(c["masking_flags"]) for c in mine)
    out.append(entry)
  return out


def best_rows(s, rows: list[dict], k: int) -> list[str]:
  """The ``k`` best rows of each table by the APGD subset's mean accuracy, then clean accuracy."""
  picked = []
  for table in sorted({r["table"] for r in rows}):
    ranked = [r for r in rows if r["table"] == table and r["autoattack_apgd_subset"]["mean"] is not None]
    ranked.sort(key=lambda r: (-r["autoattack_apgd_subset"]["mean"], -r["clean"]["mean"]))
    picked += [r["row"] for r in ranked[:k]]
  return picked


def _fmt(entry: dict | None) -> str:
  if not entry or entry.get("mean") is None:
    return "–"
  text = f"{100 * entry['mean']:.2f}"
  if entry["n"] > 1:
    text += f" ± {100 * entry['std']:.2f}"
  return text


def format_markdown(study: dict) -> str:
  s = study["settings"]
  lines = [
    f"# Study `{study['name']}`",
    "",
    f"- data: `{s['dataset']}`, {s['train']['num_train_examples']} training examples (-1 = all), "
    f"student `{s['train']['student']}`, {s['train']['epochs']} epochs, batch {s['train']['batch_size']}, "
    f"lr {s['train']['lr']} ({s['train']['schedule']}), PGD-{s['train']['pgd_steps']} in training",
    f"- evaluation of the last checkpoint of every cell: clean, PGD-20, CW∞ on {s['eval']['num_examples']} "
    f"test points; APGD-CE + APGD-T on {s['eval']['aa_examples']}; standard AutoAttack on "
    f"{s['eval']['full_aa_examples']} for the best rows; seed {s['eval']['seed']}",
    "- accuracies in %, mean ± sample std over seeds; compute from XLA's cost analysis of each train step",
    "",
    "## Teachers",
    "",
    "| teacher | model | training | test accuracy (%) | PGD-10 (%) | TFLOPs | minutes |",
    "|---|---|---|---:|---:|---:|---:|",
  ]
  for t in study["teachers"].values():
    pgd = "–" if t.get("test_pgd_accuracy") is None else f"{100 * t['test_pgd_accuracy']:.2f}"
    tf = "–" if t.get("train_flops") is None else f"{t['train_flops'] / 1e12:.3g}"
    lines.append(
      f"| {t['name']} | `{t['model']}` | {t['method']} | {100 * t['test_accuracy']:.2f} "
      f"(n = {int(t['test_examples'])}) | {pgd} | {tf} | {t['seconds'] / 60:.1f} |"
    )
  present = [(k, title) for k, title in COLUMNS if any(r[k]["n"] for r in study["rows"])]
  for table in sorted({r["table"] for r in study["rows"]}):
    title = study["table_titles"].get(table, "")
    lines += [
      "",
      f"## Table {table}" + (f": {title}" if title else ""),
      "",
      "| row | method | teachers | seeds | "
      + " | ".join(t for _, t in present)
      + " | minutes / cell | total TFLOPs | masking flags |",
      "|---|---|---|---:|" + "---:|" * len(present) + "---:|---:|---:|",
    ]
    for r in [r for r in study["rows"] if r["table"] == table or table in r.get("also_in", ())]:
      tf = "–" if r["total_flops"] is None else f"{r['total_flops'] / 1e12:.3g}"
      lines.append(
        f"| {r['label']} | {r['method']} | {', '.join(r['teachers']) or '–'} | {r['n_seeds']} | "
        + " | ".join(_fmt(r[k]) for k, _ in present)
        + f" | {r['minutes']:.1f} | {tf} | {r['masking_flags']} |"
      )
  machines: dict[str, int] = {}
  for c in study["cells"]:
    m = c.get("machine")
    name = f"{m['cpu']} ({m['platform']}, {m['cores']} cores, jax {m['jax']})" if m else "not recorded"
    machines[name] = machines.get(name, 0) + 1
  lines += [
    "",
    f"Cells finished: {len(study['cells'])} of {study['num_cells_selected']} selected. Command: `{study['command']}`",
    "",
    "Machines of the cells: " + "; ".join(f"{k}: {v}" for k, v in sorted(machines.items())),
  ]
  return "\n".join(lines) + "\n"


def plot(study: dict, workdir: str) -> list[str]:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  rows = study["rows"]
  key = "autoattack_apgd_subset" if any(r["autoattack_apgd_subset"]["n"] for r in rows) else "pgd20"
  ylabel = dict(COLUMNS)[key] + " accuracy (%)"
  written = []
  markers = dict(zip(sorted({r["table"] for r in rows}), "os^Dv"))

  def figure(points, xlabel, title, name, log_x=False):
    fig, ax = plt.subplots(figsize=(8, 5.5))
    for r, x, xerr in points:
      ax.errorbar(
        x,
        100 * r[key]["mean"],
        xerr=xerr,
        yerr=100 * (r[key]["std"] or 0.0),
        fmt=markers[r["table"]],
        capsize=3,
        label=f"{r['label']} (table {r['table']})",
      )
    if log_x:
      ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(f"study {study['name']}: {title}", fontsize=9)
    ax.legend(fontsize=6, ncol=2, loc="best")
    fig.tight_layout()
    path = os.path.join(workdir, name)
    evaluation_report.save_figure(fig, path)
    written.append(path)

  done = [r for r in rows if r[key]["mean"] is not None]
  figure(
    [(r, 100 * r["clean"]["mean"], 100 * (r["clean"]["std"] or 0.0)) for r in done],
    "clean accuracy (%)",
    "robust vs clean accuracy (mean ± std over seeds)",
    "study_robust_vs_clean.png",
  )
  with_flops = [r for r in done if r["total_flops"]]
  if with_flops:
    figure(
      [(r, r["total_flops"] / 1e12, None) for r in with_flops],
      "total compute, teacher training + this run's training (TFLOPs, log scale)",
      "robust accuracy vs total compute",
      "study_robust_vs_compute.png",
      log_x=True,
    )
  return written


def _settings(s) -> dict:
  return {"dataset": s.dataset, "train": s.train.to_dict(), "eval": s.eval.to_dict(), "seeds": list(s.seeds)}


def write_outputs(s, workdir: str, teachers: dict, cells: list[dict], num_selected: int) -> dict:
  rows = aggregate(s, cells)
  study = {
    "name": s.name,
    "settings": _settings(s),
    "teachers": teachers,
    "rows": rows,
    "cells": sorted(cells, key=lambda c: (c["row"], c["seed"])),
    "num_cells_selected": num_selected,
    "table_titles": dict(s.table_titles),
    "command": s.command or "python main.py --config=configs/study.py",
  }
  if is_main_process():
    _write_json(os.path.join(workdir, "study.json"), study)
    evaluation_report.atomic_write_text(os.path.join(workdir, "study.md"), format_markdown(study))
    plot(study, workdir)
  return study


def run(config, workdir: str) -> dict:
  s = config.study
  os.makedirs(workdir, exist_ok=True)
  for name, r in s.rows.items():
    missing = [
      t
      for t in r.teachers
      if t not in s.teachers and not (_is_rank(t) and int(t[len(RANK_PREFIX) :]) <= len(s.ranked_teachers))
    ]
    if missing:
      raise UserError(
        f"study.rows.{name}.teachers: unknown teacher(s) {missing}; defined: {sorted(s.teachers)} "
        f"and best1..best{len(s.ranked_teachers)} (ranked by test accuracy)"
      )
  row_names, cells_todo = selected(s)
  wanted = {t for r in row_names for t in s.rows[r].teachers}
  if any(_is_rank(t) for t in wanted):
    wanted = (wanted - {t for t in wanted if _is_rank(t)}) | set(s.ranked_teachers)
  needed = sorted(wanted, key=list(s.teachers).index)
  log(f"study {s.name}: {len(cells_todo)} cells ({len(row_names)} rows), {len(needed)} teachers, in {workdir}")
  snapshots = load_snapshots(s.restore)
  teachers = {name: run_teacher(s, name, workdir, snapshots) for name in needed}
  for name, t in teachers.items():
    log(f"teacher {name} ({t['model']}, {t['method']}): test accuracy {100 * t['test_accuracy']:.2f}%")
  by_name = resolve_teachers(s, teachers)
  cells = []
  for i, (row, seed) in enumerate(cells_todo):
    cells.append(run_cell(s, row, seed, workdir, by_name, snapshots))
    c = cells[-1]
    log(
      f"[{i + 1}/{len(cells_todo)}] {row}/seed{seed}: "
      + ", ".join(f"{title} {100 * c['attacks'][k]['accuracy']:.2f}" for k, title in COLUMNS if k in c["attacks"])
    )
    write_outputs(s, workdir, teachers, cells, len(cells_todo))
  if s.eval.full_aa_rows > 0:
    best = set(best_rows(s, aggregate(s, cells), int(s.eval.full_aa_rows)))
    for i, c in enumerate(cells):
      if c["row"] in best:
        log(f"== standard AutoAttack on {c['row']}/seed{c['seed']}")
        cells[i] = add_full_autoattack(s, c, by_name)
  study = write_outputs(s, workdir, teachers, cells, len(cells_todo))
  if is_main_process():
    print(format_markdown(study))
    log(f"wrote {workdir}/study.json, study.md and plots")
  return study
