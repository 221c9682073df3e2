"""The evaluation job (``configs/evaluate.py``): robustness report of a trained checkpoint.

``run(config, workdir)`` loads a trained network (the best checkpoint by default) and the test split of its
dataset, runs the attacks of ``mdrad_jax.evaluation`` with the network in evaluation mode and the batch
sharded over the devices, checks the numbers for signs of gradient masking (``mdrad_jax.gradient_masking``),
and writes into ``workdir`` (``mdrad_jax.evaluation_report``):

* ``eval.json``: every number with the attack's parameters, dataset, split, sample count, seed, checkpoint
  step, AutoAttack version label, per-attack robust counts and flips, the ε sweep and the masking flags;
* ``eval.md``: the same as Markdown tables (also printed);
* ``eval_accuracy.png`` (accuracy per attack) and, with an ε sweep, ``eval_eps_sweep.png``.

Every file is written to a temporary name and renamed, so an interrupted job never leaves a broken report in
place of a good one.  :func:`robustness_report` is the same evaluation for any ``logits_fn(x)``.
"""

from __future__ import annotations

import inspect
import math
import os
import time
from typing import Any, Callable, Sequence

import jax
import numpy as np

from mdrad_jax import autoattack as aa
from mdrad_jax import config_lib
from mdrad_jax import data as data_lib
from mdrad_jax import evaluation
from mdrad_jax import evaluation_report
from mdrad_jax import gradient_masking
from mdrad_jax import parallel
from mdrad_jax import runs
from mdrad_jax import runtime
from mdrad_jax import validation
from mdrad_jax.errors import MissingFileError, UserError

# Kept for compatibility: the report files and the masking check have their own modules.
from mdrad_jax.evaluation_report import format_markdown, plot_accuracy, plot_sweep, write_report  # noqa: F401
from mdrad_jax.gradient_masking import MULTI_STEP_WHITE_BOX, WHITE_BOX, masking_flags, sign_test_p  # noqa: F401
from mdrad_jax.progress import is_main_process, log, progress_enabled

NAMES = evaluation.TITLES  # kept for compatibility


# ---------------------------------------------------------------------------------------------
# Sharding and checkpoints.
# ---------------------------------------------------------------------------------------------
class ShardedJit:
  """A ``jit`` hook for ``evaluation.evaluate`` / ``autoattack.autoattack``: compiles a batch function with
  its batch arguments split over the mesh's ``'data'`` axis and its PRNG key (an argument named ``key``)
  replicated.  The batch must be a multiple of the number of devices (``batch_multiple``)."""

  def __init__(self, mesh):
    self.mesh = mesh
    self.num_devices = int(mesh.devices.size)
    self._data = parallel.data_sharding(mesh)
    self._replicated = parallel.replicated(mesh)

  def __call__(self, fn: Callable) -> Callable:
    params = [
      p
      for p in inspect.signature(fn).parameters.values()
      if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty
    ]
    shardings = tuple(self._replicated if p.name in ("key", "rng") else self._data for p in params)
    return jax.jit(fn, in_shardings=shardings)


def resolve_checkpoint(path: str, which: str = "best") -> tuple[str, int, dict | None]:
  """Kept for compatibility: :func:`mdrad_jax.runs.resolve_checkpoint` with errors naming
  ``evaluate.checkpoint``."""
  return runs.resolve_checkpoint(path, which, what="evaluate.checkpoint")


# ---------------------------------------------------------------------------------------------
# The evaluation of any logits function.
# ---------------------------------------------------------------------------------------------
def _strip(entry: dict) -> dict:
  return {k: v for k, v in entry.items() if k not in ("per_point", "broken_by")}


def robustness_report(
  logits_fn,
  images,
  labels,
  *,
  attacks: Sequence[str] = evaluation.ATTACKS,
  eps: float,
  step_size: float,
  cw_kappa: float = 50.0,
  seed: int = 0,
  batch_size: int = 256,
  aa_version: str = "standard",
  aa_overrides: dict | None = None,
  eps_sweep: Sequence[float] = (),
  sweep_attack: str = "pgd20",
  square_examples: int = 500,
  square_queries: int = 5000,
  tolerance: float = 0.01,
  aa_gap: float = 0.10,
  significance: float = 0.05,
  progress: bool = False,
  jit: Callable = jax.jit,
  batch_multiple: int = 1,
) -> dict[str, Any]:
  """Accuracies under ``attacks``, the ε sweep, Square alone on a subset, and the gradient-masking flags.

  Returns a JSON-ready dict: ``attacks`` (``evaluation.evaluate``'s entries, in order, with ``seconds``),
  ``autoattack_stages`` (robust count and flips after each AutoAttack attack), ``eps_sweep`` (``sweep_attack``
  at each ε; the PGD step size scales with ε as ``step_size · ε_i / ε``; ε = 0 is the clean accuracy),
  ``square_alone`` (Square with ``square_queries`` queries on the first ``square_examples`` points, 0 = skip)
  and ``masking_check`` (see ``gradient_masking.masking_flags``).
  """
  attacks = tuple(attacks)
  unknown = [a for a in attacks if a not in evaluation.ATTACKS]
  if unknown or not attacks:
    raise UserError(f"evaluate.attacks: unknown or no attacks {unknown or list(attacks)}; valid: {evaluation.ATTACKS}")
  if sweep_attack not in evaluation.ATTACKS or sweep_attack == "clean":
    raise UserError(f"evaluate.sweep_attack must be one of {evaluation.ATTACKS[1:]}, got {sweep_attack!r}")
  sweep = sorted({float(e) for e in eps_sweep})
  if sweep and sweep[0] < 0:
    raise UserError(f"evaluate.eps_sweep: every ε must be >= 0, got {sweep[0]}")
  if not (isinstance(square_examples, int) and square_examples >= 0):
    raise UserError(f"evaluate.masking_square_examples must be an int >= 0, got {square_examples!r}")
  images = np.asarray(images, np.float32)
  labels = np.asarray(labels, np.int32)
  n = int(labels.shape[0])
  common = dict(
    cw_kappa=cw_kappa,
    seed=seed,
    batch_size=batch_size,
    aa_version=aa_version,
    progress=progress,
    jit=jit,
    aa_overrides=aa_overrides,
    batch_multiple=batch_multiple,
  )

  results: dict[str, dict] = {}
  points: dict[str, np.ndarray] = {}
  aa_entry = None
  for name in attacks:
    t0 = time.perf_counter()
    out = evaluation.evaluate(
      logits_fn, images, labels, attacks=(name,), eps=eps, step_size=step_size, per_point=True, **common
    )
    ((key, entry),) = out.items()
    entry["seconds"] = round(time.perf_counter() - t0, 2)
    log(f"{key}: {100 * entry['accuracy']:.2f}% ({entry['correct']}/{n}) in {entry['seconds']:.0f} s")
    points[key] = entry["per_point"]
    if name == "autoattack":
      aa_entry = entry
      order = ["clean", *entry["params"]["attacks"]]
      for k, stage in enumerate(order[1:], start=1):
        points[stage] = (entry["broken_by"] == -1) | (entry["broken_by"] > k)
    results[key] = _strip(entry)

  stages = []
  if aa_entry is not None:
    for stage, robust in aa_entry["robust_after"].items():
      stages.append(
        {
          "attack": stage,
          "attacked": aa_entry["attacked"].get(stage),
          "flips": aa_entry["flips"].get(stage),
          "robust": robust,
          "accuracy": robust / n if n else 0.0,
        }
      )

  # ε sweep
  sweep_out = None
  if sweep:
    rows = []
    for e in sweep:
      t0 = time.perf_counter()
      if e == 0.0:
        if "clean" in results:
          entry = results["clean"]
        else:
          entry = evaluation.evaluate(
            logits_fn, images, labels, attacks=("clean",), eps=eps, step_size=step_size, **common
          )["clean"]
      else:
        e_step = step_size * e / eps
        same = math.isclose(e, eps, rel_tol=1e-9)
        reuse = [
          v
          for k, v in results.items()
          if same and (k == sweep_attack or (sweep_attack == "autoattack" and k.startswith("autoattack")))
        ]
        if reuse:
          entry = reuse[0]
        else:
          log(f"eps sweep: {sweep_attack} at eps = {e:.5g}")
          out = evaluation.evaluate(
            logits_fn, images, labels, attacks=(sweep_attack,), eps=e, step_size=e_step, **common
          )
          ((_, entry),) = out.items()
      p = entry.get("params") or {}
      rows.append(
        {
          "eps": e,
          "step_size": p.get("step_size", 0.0 if e == 0 else None),
          "accuracy": entry["accuracy"],
          "correct": entry["correct"],
          "n": entry["n"],
          "label": entry["label"],
          "seconds": round(time.perf_counter() - t0, 2),
        }
      )
    sweep_out = {"attack": sweep_attack, "points": rows}

  # Square alone on the first points: the black-box reference for check (a).
  square_out = None
  k = min(square_examples, n)
  if k > 0:
    t0 = time.perf_counter()
    over = {"square": {"n_queries": int(square_queries)}}
    res = aa.autoattack(
      logits_fn,
      images[:k],
      labels[:k],
      eps=eps,
      version="standard",
      seed=seed,
      batch_size=batch_size,
      progress=progress,
      jit=jit,
      only=("square",),
      overrides=over,
      batch_multiple=batch_multiple,
    )
    square_correct = res.robust
    compare = {}
    for name in gradient_masking.WHITE_BOX:
      if name in points:
        wb = points[name][:k]
        compare[name] = {
          "accuracy": float(wb.mean()),
          "correct": int(wb.sum()),
          "square_broke_white_box_survivors": int((wb & ~square_correct).sum()),
          "white_box_broke_square_survivors": int((~wb & square_correct).sum()),
        }
    square_out = {
      "n": k,
      "label": res.label,
      "params": res.params,
      "accuracy": res.robust_accuracy,
      "correct": int(square_correct.sum()),
      "clean_correct": int(res.clean_correct.sum()),
      "white_box_on_same_points": compare,
      "seconds": round(time.perf_counter() - t0, 2),
    }
    log(f"square alone on {k} points: {100 * res.robust_accuracy:.2f}% in {square_out['seconds']:.0f} s")

  report = {
    "eps": float(eps),
    "step_size": float(step_size),
    "cw_kappa": float(cw_kappa),
    "seed": int(seed),
    "num_examples": n,
    "batch_size": int(batch_size),
    "aa_version": aa_version,
    "attacks": results,
    "autoattack_stages": stages,
    "eps_sweep": sweep_out,
    "square_alone": square_out,
  }
  flags = gradient_masking.masking_flags(report, tolerance=tolerance, aa_gap=aa_gap, significance=significance)
  report["masking_check"] = {
    "tolerance": tolerance,
    "aa_gap": aa_gap,
    "significance": significance,
    "flagged": bool(flags),
    "flags": flags,
  }
  return report


# ---------------------------------------------------------------------------------------------
# The job.
# ---------------------------------------------------------------------------------------------
def parse_overrides(text: str) -> dict[str, dict[str, Any]]:
  """``'square.n_queries=1000,apgd-ce.n_iter=20'`` -> ``{'square': {'n_queries': 1000}, ...}``."""
  out: dict[str, dict[str, Any]] = {}
  for part in (text or "").split(","):
    part = part.strip()
    if not part:
      continue
    if "=" not in part or "." not in part.split("=", 1)[0]:
      raise UserError(f"evaluate.aa_overrides: expected 'attack.param=value' items, got {part!r}")
    lhs, value = part.split("=", 1)
    attack, param = lhs.split(".", 1)
    try:
      v: Any = int(value)
    except ValueError:
      try:
        v = float(value)
      except ValueError:
        raise UserError(f"evaluate.aa_overrides: {lhs} must be a number, got {value!r}") from None
    out.setdefault(attack.strip(), {})[param.strip()] = v
  return out


def _run_value(run_cfg: dict, *keys, default=None):
  d: Any = run_cfg
  for k in keys:
    if not isinstance(d, dict) or k not in d:
      return default
    d = d[k]
  return d


def run(config, workdir: str) -> dict:
  """Evaluates ``config.evaluate.checkpoint`` ('' = ``workdir`` itself) and writes the report to ``workdir``."""
  t_start = time.perf_counter()
  e = config.evaluate
  validation.validate(config)  # also when called directly (study stages), not only from main.py
  parallel.initialize_distributed(config.distributed)
  which = e.which
  ckpt_path = e.checkpoint or workdir
  step_dir, step, run_cfg = runs.resolve_checkpoint(ckpt_path, which, what="evaluate.checkpoint")
  if not run_cfg or "model" not in run_cfg:
    raise MissingFileError(
      f"evaluate.checkpoint: no config.json with the model next to {step_dir}; cannot tell which network to build"
    )

  dataset = config.data.name or _run_value(run_cfg, "data", "name")
  if not dataset:
    raise UserError("data.name: empty and the run's config.json names no dataset")
  data_kw = dict(
    data_dir=config.data.data_dir or _run_value(run_cfg, "data", "data_dir") or None,
    source_dir=config.data.source_dir or _run_value(run_cfg, "data", "source_dir") or None,
  )
  info = data_lib.dataset_info(dataset, **data_kw)
  run_classes = run_cfg.get("num_classes")
  if run_classes is not None and int(run_classes) != info.num_classes:
    raise UserError(f"dataset {dataset!r} has {info.num_classes} classes, the checkpoint's run has {run_classes}")
  split = e.split or info.test_split
  if split not in info.split_sizes:
    raise UserError(f"evaluate.split: {dataset} has no split {split!r}; available: {sorted(info.split_sizes)}")
  if e.num_examples == 0 or e.num_examples < -1:
    raise UserError(f"evaluate.num_examples must be a positive number or -1 (whole split), got {e.num_examples}")

  defaults = config_lib.DATASET_DEFAULTS.get(dataset, {})
  run_eps = float(_run_value(run_cfg, "attack", "eps", default=defaults.get("eps", 8 / 255)))
  run_step = float(_run_value(run_cfg, "attack", "step_size", default=defaults.get("step_size", run_eps / 4)))
  eps = float(e.eps) if e.eps > 0 else run_eps
  step_size = float(e.step_size)
  if step_size <= 0:
    step_size = run_step * eps / run_eps
  sweep = [float(v) for v in e.eps_sweep] + [float(v) * eps for v in e.eps_sweep_multiples]
  attacks = tuple(e.attacks)

  mesh = parallel.create_mesh(jax.local_devices())
  hook = ShardedJit(mesh)
  if e.batch_size < 1 or e.batch_size % hook.num_devices:
    raise UserError(
      f"evaluate.batch_size={e.batch_size} must be a positive multiple of the number of devices ({hook.num_devices})"
    )

  trained = runs.load_trained(
    step_dir, num_classes=info.num_classes, image_shape=info.image_shape, what="evaluate.checkpoint"
  )
  variables = parallel.replicate(trained.variables, mesh)
  logits_fn = evaluation.logits_fn_from_model(trained.module, variables)

  images, labels = data_lib.load_arrays(
    dataset, split, num_examples=e.num_examples if e.num_examples > 0 else None, **data_kw
  )
  log(
    f"evaluating {run_cfg['model'].get('name')} (step {step}, {which}) on {dataset}/{split}: {len(labels)} "
    f"examples, eps = {eps:.5g}, attacks {', '.join(attacks)}, {hook.num_devices} device(s)"
  )
  report = robustness_report(
    logits_fn,
    images,
    labels,
    attacks=attacks,
    eps=eps,
    step_size=step_size,
    seed=int(e.seed),
    batch_size=int(e.batch_size),
    aa_version=e.aa_version,
    aa_overrides=parse_overrides(e.aa_overrides),
    eps_sweep=sweep,
    sweep_attack=e.sweep_attack,
    square_examples=int(e.masking_square_examples),
    square_queries=int(e.masking_square_queries),
    tolerance=float(e.masking_tolerance),
    aa_gap=float(e.masking_aa_gap),
    significance=float(e.masking_significance),
    progress=progress_enabled(),
    jit=hook,
    batch_multiple=hook.num_devices,
  )
  report["meta"] = {
    "dataset": dataset,
    "split": split,
    "num_examples": int(len(labels)),
    "num_classes": info.num_classes,
    "image_shape": list(info.image_shape),
    "checkpoint": {"path": os.path.abspath(ckpt_path), "step_dir": step_dir, "step": step, "which": which},
    "model": run_cfg["model"],
    "method": _run_value(run_cfg, "method", "name"),
    "run_attack": {"eps": run_eps, "step_size": run_step},
    "autoattack_label": next((v["label"] for k, v in report["attacks"].items() if k.startswith("autoattack")), None),
    "num_devices": hook.num_devices,
    "platform": jax.devices()[0].platform,
    "devices": [str(d) for d in mesh.devices.flat],
    "process_count": jax.process_count(),
    "host": runtime.host_description(),
    "seconds": round(time.perf_counter() - t_start, 1),
    "evaluate_config": e.to_dict(),
  }
  if is_main_process():
    written = evaluation_report.write_report(report, workdir)
    print(evaluation_report.format_markdown(report))
    log("wrote " + ", ".join(os.path.relpath(p, workdir) for p in written) + f" in {workdir}")
  return report
