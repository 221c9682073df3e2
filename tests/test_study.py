"""The study job on its small grid (every method once on digits): table shape, numbers from each cell's own
evaluation, mean ± std against NumPy, resume without retraining, subsets."""

import importlib.util
import json
import os
import shutil

import numpy as np
import pytest

from mdrad_jax import runtime
from mdrad_jax import study as study_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def small_config(**study_overrides):
  spec = importlib.util.spec_from_file_location("study_config", os.path.join(ROOT, "configs", "study.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  c = mod.get_config("small")
  c.study.rows.pgd_at.seeds = (0, 1)  # one row with two seeds, so that the std is exercised
  for k, v in study_overrides.items():
    c.study[k] = v
  return c


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("study"))
  os.environ["MDRAD_PROGRESS"] = "0"
  result = runtime.run(small_config(), workdir)
  # the whole grid's study.json, before later tests run subsets (which rewrite it with their selection)
  shutil.copy(os.path.join(workdir, "study.json"), os.path.join(workdir, "study_full.json"))
  return workdir, result


def _read(path):
  with open(path) as f:
    return json.load(f)


def test_every_row_and_method_is_in_the_table(finished):
  workdir, _ = finished
  study = _read(os.path.join(workdir, "study.json"))
  config = small_config()
  assert {r["row"] for r in study["rows"]} == set(config.study.rows.keys())
  methods = {r["method"] for r in study["rows"]}
  assert {"sa_mdrad", "adaad", "rslad", "ard", "iad1", "mtard", "bmtard", "kd", "pgd_at", "trades"} <= methods
  assert len(study["cells"]) == len(config.study.rows) + 1  # pgd_at has two seeds
  lines = open(os.path.join(workdir, "study.md")).read().splitlines()
  for r in study["rows"]:
    found = [i for i, x in enumerate(lines) if x.startswith(f"| {r['label']} |")]
    assert len(found) == 1, r["label"]
    header = next(lines[i] for i in range(found[0], -1, -1) if lines[i].startswith("| row |"))
    assert lines[found[0]].count("|") == header.count("|")
    assert f"| {r['n_seeds']} |" in lines[found[0]]
  for name in ("study_robust_vs_clean.png", "study_robust_vs_compute.png"):
    assert os.path.getsize(os.path.join(workdir, name)) > 1000
  # each cell records the machine that made it, and study.md counts the cells per machine
  assert all(c["machine"]["cpu"] == runtime.cpu_model() for c in study["cells"])
  (machines,) = [x for x in lines if x.startswith("Machines of the cells: ")]
  assert machines.endswith(f" cores, jax {study['cells'][0]['machine']['jax']}): {len(study['cells'])}")


def test_cell_numbers_come_from_its_own_evaluations(finished):
  workdir, _ = finished
  study = _read(os.path.join(workdir, "study.json"))
  dirs = set()
  for cell in study["cells"]:
    d = os.path.join(workdir, "runs", cell["row"], f"seed{cell['seed']}")
    assert os.path.realpath(cell["dir"]) == os.path.realpath(d)
    dirs.add(d)
    main = _read(os.path.join(d, "eval_main", "eval.json"))
    aa = _read(os.path.join(d, "eval_aa", "eval.json"))
    for rep in (main, aa):
      assert os.path.realpath(rep["meta"]["checkpoint"]["path"]) == os.path.realpath(d)
      assert rep["meta"]["checkpoint"]["step"] == cell["checkpoint_step"]
      for key, entry in rep["attacks"].items():
        assert cell["attacks"][key]["correct"] == entry["correct"]
        assert cell["attacks"][key]["accuracy"] == entry["accuracy"]
    assert set(cell["attacks"]) == {"clean", "pgd20", "cw", "autoattack_apgd_subset"}
    run_cfg = _read(os.path.join(d, "config.json"))
    assert run_cfg["seed"] == cell["seed"] and run_cfg["method"]["name"] == cell["method"]
    # the last checkpoint, the same rule for every method
    steps = sorted(int(s) for s in os.listdir(os.path.join(d, "checkpoints")) if s.isdigit())
    assert cell["checkpoint_step"] == steps[-1]
    cost = _read(os.path.join(d, "cost.json"))
    assert cell["train_flops"] == pytest.approx(cost["train_step_flops"] * cost["total_steps"])
    assert cell["train_flops"] > 0
  assert len(dirs) == len(study["cells"])
  # the two seeds of one row are different runs
  a, b = [c for c in study["cells"] if c["row"] == "pgd_at"]
  assert a["attacks"] != b["attacks"] or a["in_training"] != b["in_training"]


def test_row_statistics_against_numpy(finished):
  workdir, _ = finished
  study = _read(os.path.join(workdir, "study.json"))
  for r in study["rows"]:
    for key in ("clean", "pgd20", "cw", "autoattack_apgd_subset"):
      vals = []
      for seed in r["seeds"]:
        d = os.path.join(workdir, "runs", r["row"], f"seed{seed}")
        name = "eval_aa" if key.startswith("autoattack") else "eval_main"
        vals.append(_read(os.path.join(d, name, "eval.json"))["attacks"][key]["accuracy"])
      vals = np.asarray(vals, np.float64)
      assert r[key]["mean"] == pytest.approx(vals.mean())
      assert r[key]["std"] == pytest.approx(vals.std(ddof=1) if len(vals) > 1 else 0.0)
    teacher_flops = sum(study["teachers"][t]["train_flops"] for t in r["teachers"])
    assert r["total_flops"] == pytest.approx(r["train_flops"] + teacher_flops)


def test_rank_names_take_the_most_accurate_teachers(finished):
  workdir, _ = finished
  study = _read(os.path.join(workdir, "study.json"))
  acc = {n: study["teachers"][n]["test_accuracy"] for n in ("tiny", "mlp")}
  best = max(acc, key=acc.get)
  assert next(r for r in study["rows"] if r["row"] == "adaad")["teachers"] == [best]
  assert next(r for r in study["rows"] if r["row"] == "mtard")["teachers"] == [best, min(acc, key=acc.get)]


def test_rerun_skips_finished_cells_and_only_selects(finished):
  workdir, _ = finished
  cells = [os.path.join(workdir, "runs", r, "seed0", "cell.json") for r in ("sa_mdrad", "pgd_at")]
  before = [os.stat(p).st_mtime_ns for p in cells]
  out = runtime.run(small_config(only="sa_mdrad,pgd_at/seed1"), workdir)
  assert sorted((c["row"], c["seed"]) for c in out["cells"]) == [("pgd_at", 1), ("sa_mdrad", 0)]
  assert [os.stat(p).st_mtime_ns for p in cells] == before
  with pytest.raises(ValueError, match="selects no cell"):
    runtime.run(small_config(only="no_such_row"), workdir)


def test_changed_row_config_is_refused(finished):
  workdir, _ = finished
  c = small_config(only="kd")
  c.study.rows.kd.overrides = type(c.study.rows.kd.overrides)({"method": {"temperature": 2.0}})
  with pytest.raises(ValueError, match="another config"):
    study_lib.run(c, workdir)


def test_restore_takes_over_matching_cells_and_retrains_for_full_autoattack(finished, tmp_path):
  """A study continued elsewhere from its study.json: teachers retrained, an unchanged cell taken over, a
  changed one trained; the full AutoAttack retrains the restored cell and finds the same numbers."""
  workdir, _ = finished
  snapshot = os.path.join(workdir, "study_full.json")
  c = small_config(only="kd,pgd_at/seed0", restore=snapshot)
  c.study.rows.kd.overrides = type(c.study.rows.kd.overrides)({"method": {"temperature": 2.0}})
  c.study.eval.full_aa_rows = 1
  out = runtime.run(c, str(tmp_path))
  old = {(x["row"], x["seed"]): x for x in _read(snapshot)["cells"]}
  cells = {(x["row"], x["seed"]): x for x in out["cells"]}
  kd, pgd = cells[("kd", 0)], cells[("pgd_at", 0)]
  assert "restored_from" not in kd and os.path.isdir(os.path.join(kd["dir"], "checkpoints"))
  assert pgd["restored_from"] == snapshot
  assert os.path.realpath(pgd["dir"]) == os.path.realpath(os.path.join(tmp_path, "runs", "pgd_at", "seed0"))
  # pgd_at beats kd under the APGD subset here, so it is the row that gets the full AutoAttack
  assert pgd["attacks"]["autoattack_apgd_subset"]["accuracy"] > kd["attacks"]["autoattack_apgd_subset"]["accuracy"]
  assert "autoattack" in pgd["attacks"] and pgd["reproduced"] is True
  for key in ("clean", "pgd20", "cw", "autoattack_apgd_subset"):
    assert pgd["attacks"][key]["correct"] == old[("pgd_at", 0)]["attacks"][key]["correct"]


def test_restore_needs_the_same_teacher_records(finished):
  workdir, _ = finished
  snap = _read(os.path.join(workdir, "study_full.json"))
  s = small_config().study
  teachers = study_lib.resolve_teachers(s, snap["teachers"])
  cell = next(x for x in snap["cells"] if x["row"] == "sa_mdrad")
  cfg = study_lib.cell_config(s, "sa_mdrad", 0, {k: v["dir"] for k, v in teachers.items()})
  names = cell["teachers"]
  assert study_lib._restorable(snap, "sa_mdrad", 0, cfg, teachers, names) is not None
  other = json.loads(json.dumps(snap))
  other["teachers"][names[0]]["test_accuracy"] += 0.01
  assert study_lib._restorable(other, "sa_mdrad", 0, cfg, teachers, names) is None
  assert study_lib._restorable(snap, "sa_mdrad", 1, cfg, teachers, names) is None


def _snapshot_with_teachers(workdir, where, edit=None):
  """study_full.json and the teachers' exported networks copied to ``where``, as a committed snapshot is."""
  os.makedirs(os.path.join(where, "teachers"))
  snap = _read(os.path.join(workdir, "study_full.json"))
  for name in snap["teachers"]:
    shutil.copy(study_lib.teacher_export_path(workdir, name), os.path.join(where, "teachers"))
  if edit is not None:
    edit(snap)
  path = os.path.join(where, "study.json")
  with open(path, "w") as f:
    json.dump(snap, f)
  return path


def test_restore_imports_the_teachers_and_a_cell_trained_from_them_is_the_same(finished, tmp_path):
  """Continued elsewhere: the teachers come from the snapshot's exported networks (not trained), and a cell
  trained from them gives exactly the numbers of the cell trained from the original teachers."""
  workdir, _ = finished

  def drop_sa_mdrad(snap):  # so that the continued study trains that cell
    snap["cells"] = [c for c in snap["cells"] if c["row"] != "sa_mdrad"]

  snapshot = _snapshot_with_teachers(workdir, str(tmp_path / "snap"), drop_sa_mdrad)
  out = runtime.run(small_config(only="sa_mdrad", restore=snapshot), str(tmp_path / "new"))
  original = next(c for c in _read(os.path.join(workdir, "study_full.json"))["cells"] if c["row"] == "sa_mdrad")
  (cell,) = out["cells"]
  assert "restored_from" not in cell and os.path.isdir(os.path.join(cell["dir"], "checkpoints"))
  for name in original["teachers"]:
    t = _read(os.path.join(tmp_path, "new", "teachers", name, study_lib.TEACHER_FILE))
    assert t["imported_from"] == os.path.join(tmp_path, "snap", "teachers", f"{name}.safetensors")
    with open(os.path.join(t["dir"], "metrics.jsonl")) as f:
      assert [json.loads(line)["step"] for line in f] == [0]  # the import's record only: no training step
  assert cell["in_training"] == original["in_training"]
  for key, numbers in original["attacks"].items():
    assert cell["attacks"][key]["correct"] == numbers["correct"], key


def test_restore_joins_the_parts_of_a_study_run_apart(finished, tmp_path):
  """study.restore=B,A: a study run in two parts (A with the teachers' networks, B without) is joined; every cell
  is taken over from the part that holds it, the teachers are imported from A (B has no files), nothing trains."""
  workdir, _ = finished
  full = _read(os.path.join(workdir, "study_full.json"))
  keys = sorted((c["row"], c["seed"]) for c in full["cells"])
  in_b = set(keys[::2])

  def only_a(snap):
    snap["cells"] = [c for c in snap["cells"] if (c["row"], c["seed"]) not in in_b]

  part_a = _snapshot_with_teachers(workdir, str(tmp_path / "a"), only_a)
  os.makedirs(tmp_path / "b")
  part_b = str(tmp_path / "b" / "study.json")
  with open(part_b, "w") as f:
    json.dump(dict(full, cells=[c for c in full["cells"] if (c["row"], c["seed"]) in in_b]), f)
  out = runtime.run(small_config(restore=f"{part_b},{part_a}"), str(tmp_path / "joined"))
  original = {(c["row"], c["seed"]): c for c in full["cells"]}
  cells = {(c["row"], c["seed"]): c for c in out["cells"]}
  assert sorted(cells) == keys
  for key, cell in cells.items():
    assert cell["restored_from"] == (part_b if key in in_b else part_a), key
    assert not os.path.isdir(os.path.join(cell["dir"], "checkpoints")), key
    for attack, numbers in original[key]["attacks"].items():
      assert cell["attacks"][attack]["correct"] == numbers["correct"], (key, attack)
  for name in full["teachers"]:
    t = _read(os.path.join(tmp_path, "joined", "teachers", name, study_lib.TEACHER_FILE))
    assert t["imported_from"] == os.path.join(tmp_path, "a", "teachers", f"{name}.safetensors")
  with pytest.raises(ValueError, match="listed twice"):
    study_lib.load_snapshots(f"{part_a}, {part_a}")
  with pytest.raises(ValueError, match="no such file"):
    study_lib.load_snapshots(f"{part_a},{tmp_path}/missing.json")


def test_restore_without_teacher_files_trains_them_and_leaves_the_snapshot_alone(finished, tmp_path):
  """A snapshot with no teachers/ folder: the teachers are trained into the new workdir, the file is unchanged."""
  workdir, _ = finished
  path = _snapshot_with_teachers(workdir, str(tmp_path / "snap"))
  shutil.rmtree(tmp_path / "snap" / "teachers")
  before = open(path, "rb").read()
  out = runtime.run(small_config(only="kd", restore=path), str(tmp_path / "new"))
  assert open(path, "rb").read() == before
  (cell,) = out["cells"]
  assert cell["restored_from"] == path
  for name in cell["teachers"]:
    t = _read(os.path.join(tmp_path, "new", "teachers", name, study_lib.TEACHER_FILE))
    assert "imported_from" not in t and t["name"] == name


def test_restore_refuses_a_teacher_file_that_does_not_give_its_record(finished, tmp_path):
  workdir, _ = finished

  def shift_accuracy(snap):
    snap["teachers"]["tiny"]["test_accuracy"] += 0.25

  snapshot = _snapshot_with_teachers(workdir, str(tmp_path / "snap"), shift_accuracy)
  with pytest.raises(ValueError, match="teacher tiny imported from .* does not hold that teacher"):
    runtime.run(small_config(only="sa_mdrad", restore=snapshot), str(tmp_path / "new"))


def test_the_committed_snapshot_is_taken_over_by_the_fashion_mnist_study():
  """docs/study_fashion_mnist/first_teachers/study.json, written before ``teacher_view='nat'`` was spelled 'clean',
  still matches configs/study.py:fashion_mnist cell by cell (so a restored study takes over its finished cells)
  and teacher by teacher (the retrained teachers' configs)."""
  spec = importlib.util.spec_from_file_location("study_config", os.path.join(ROOT, "configs", "study.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  s = mod.get_config("fashion_mnist").study
  snap = study_lib.load_snapshot(os.path.join(ROOT, "docs", "study_fashion_mnist", "first_teachers", "study.json"))
  assert [c for c in snap["cells"] if c["config"]["method"].get("teacher_view") == "nat"]  # the old spelling
  for name, record in snap["teachers"].items():
    assert study_lib._same_config(record["config"], study_lib.teacher_config(s, name).to_dict()), name
  teachers = study_lib.resolve_teachers(s, snap["teachers"])
  dirs = {k: v["dir"] for k, v in teachers.items()}
  for cell in snap["cells"]:
    row, seed = cell["row"], cell["seed"]
    cfg = study_lib.cell_config(s, row, seed, dirs)
    names = [teachers[t]["name"] for t in s.rows[row].teachers]
    assert study_lib._restorable(snap, row, seed, cfg, teachers, names) is cell, (row, seed)
  assert len(snap["cells"]) == 31
