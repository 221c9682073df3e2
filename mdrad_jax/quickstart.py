"""The end-to-end demo job (``configs/quickstart.py``), offline on scikit-learn's digits.

1. trains K small heterogeneous teachers with standard (non-adversarial) training;
2. distils a student from them with SA-MDRAD, and trains the same student with PGD-AT as a baseline;
3. evaluates every network on the test split (clean and PGD-20 accuracy at the config's ε);
4. prints a table and writes ``results.json``, ``results.md`` and ``results.png`` to the workdir.

Every stage is an ordinary training run in its own sub-directory, so re-running the job on the same workdir
resumes where it stopped and skips what is complete.
"""

from __future__ import annotations

import copy
import json
import os
import time

import jax
import ml_collections

from mdrad_jax import config_lib
from mdrad_jax import data as data_lib
from mdrad_jax import evaluation
from mdrad_jax import runs
from mdrad_jax import train
from mdrad_jax import workdir as workdir_lib
from mdrad_jax.progress import is_main_process, log


def stage_config(config, *, model: str, method: str, teachers=(), epochs: int, lr: float) -> ml_collections.ConfigDict:
  q = config.quickstart
  c = config_lib.base_config()
  config_lib.apply_dataset_defaults(c, config.data.name)
  c.data = copy.deepcopy(config.data)
  c.seed = config.seed
  c.model.name = model
  c.method = config_lib.method_config(method)
  c.teachers = tuple(teachers)
  c.attack = copy.deepcopy(config.attack)
  c.num_epochs = epochs
  c.batch_size = q.batch_size
  c.eval_batch_size = q.eval_batch_size
  c.optim.lr = lr
  c.optim.schedule = "cosine"
  c.optim.weight_decay = 5e-4
  c.log_every_steps = q.log_every_steps
  c.eval.every_epochs = q.eval_every_epochs
  c.checkpoint.best_metric = ""  # keep the last checkpoint: the demo reports the final model
  return c


def run(config, workdir: str) -> dict:
  q = config.quickstart
  os.makedirs(workdir, exist_ok=True)
  t0 = time.perf_counter()
  workdir_lib.check_same_run(config, workdir)
  workdir_lib.write_config(config, workdir)

  teacher_dirs = []
  for name in q.teachers:
    tdir = os.path.join(workdir, "teachers", name)
    log(f"== teacher {name}: standard training, {q.teacher_epochs} epochs")
    train.train_and_evaluate(
      stage_config(config, model=name, method="natural", epochs=q.teacher_epochs, lr=q.teacher_lr), tdir
    )
    teacher_dirs.append(tdir)

  student_dirs = {}
  for method in q.student_methods:
    sdir = os.path.join(workdir, "students", method)
    uses_teachers = method not in ("pgd_at", "trades", "natural")
    log(f"== student {q.student} with {method}" + (f" from {len(teacher_dirs)} teachers" if uses_teachers else ""))
    scfg = stage_config(
      config,
      model=q.student,
      method=method,
      teachers=teacher_dirs if uses_teachers else (),
      epochs=q.student_epochs,
      lr=q.student_lr,
    )
    train.train_and_evaluate(scfg, sdir)
    student_dirs[method] = sdir

  # -- evaluation ----------------------------------------------------------------------------
  info = data_lib.dataset_info(config.data.name, **data_lib.data_kwargs(config))
  images, labels = data_lib.load_arrays(config.data.name, info.test_split, **data_lib.data_kwargs(config))
  rows = []
  nets = [("teacher", n, d) for n, d in zip(q.teachers, teacher_dirs)]
  nets += [("student", m, d) for m, d in student_dirs.items()]
  eps = float(config.attack.eps)
  for role, name, d in nets:
    trained = runs.load_trained(d, "latest", num_classes=info.num_classes)
    logits_fn = evaluation.logits_fn_from_model(trained.module, trained.variables)
    res = evaluation.evaluate(
      logits_fn,
      images,
      labels,
      attacks=("clean", "pgd20"),
      eps=eps,
      step_size=float(config.attack.step_size),
      seed=config.seed,
      batch_size=q.eval_batch_size,
      progress=False,
    )
    rows.append(
      {
        "role": role,
        "name": name,
        "model": trained.run_config["model"]["name"],
        "clean": res["clean"]["accuracy"],
        "pgd20": res["pgd20"]["accuracy"],
      }
    )
  elapsed = time.perf_counter() - t0

  results = {
    "dataset": config.data.name,
    "split": info.test_split,
    "num_examples": int(labels.shape[0]),
    "eps": eps,
    "pgd20": {"steps": 20, "step_size": float(config.attack.step_size), "init": "uniform"},
    "rows": rows,
    "seconds": elapsed,
    "devices": [str(d) for d in jax.devices()],
  }
  table = format_table(results)
  if is_main_process():
    print(table)
    with open(os.path.join(workdir, "results.json"), "w") as f:
      json.dump(results, f, indent=2)
    with open(os.path.join(workdir, "results.md"), "w") as f:
      f.write(table + "\n")
    plot_results(results, os.path.join(workdir, "results.png"))
    log(f"wrote {workdir}/results.json, results.md, results.png ({elapsed:.0f} s)")
  return results


def format_table(results: dict) -> str:
  eps = results["eps"]
  lines = [
    f"Quickstart on {results['dataset']} ({results['split']} split, {results['num_examples']} "
    f"examples), L-inf eps = {eps:.4g}, PGD-20 step {results['pgd20']['step_size']:.4g}",
    "",
    "| role | name | model | clean acc | PGD-20 acc |",
    "|---|---|---|---:|---:|",
  ]
  for r in results["rows"]:
    lines.append(f"| {r['role']} | {r['name']} | {r['model']} | {100 * r['clean']:.2f} | {100 * r['pgd20']:.2f} |")
  return "\n".join(lines)


def plot_results(results: dict, path: str) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  import numpy as np

  rows = results["rows"]
  names = [f"{r['role']}\n{r['name']}" for r in rows]
  x = np.arange(len(rows))
  fig, ax = plt.subplots(figsize=(1.6 * len(rows) + 2, 4))
  ax.bar(x - 0.2, [100 * r["clean"] for r in rows], 0.4, label="clean")
  ax.bar(x + 0.2, [100 * r["pgd20"] for r in rows], 0.4, label=f"PGD-20 (eps={results['eps']:.3g})")
  ax.set_xticks(x, names, fontsize=8)
  ax.set_ylabel("accuracy (%)")
  ax.set_ylim(0, 115)
  ax.set_title(f"{results['dataset']}: standard teachers vs robust students")
  ax.legend(loc="upper center", ncol=2, frameon=False)
  fig.tight_layout()
  tmp = path + ".tmp.png"
  fig.savefig(tmp, dpi=120)
  plt.close(fig)
  os.replace(tmp, path)
