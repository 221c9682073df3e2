"""The evaluation job (``configs/evaluate.py``): robustness report of a trained checkpoint.

``run(config, workdir)`` loads a trained network (the best checkpoint by default) and the test split of its
dataset, runs the attacks of ``mdrad_jax.evaluation`` with the network in evaluation mode and the batch
sharded over the devices, checks the numbers for signs of gradient masking, and writes into ``workdir``:

* ``eval.json``: every number with the attack's parameters, dataset, split, sample count, seed, checkpoint
  step, AutoAttack version label, per-attack robust counts and flips, the ε sweep and the masking flags;
* ``eval.md``: the same as Markdown tables (also printed);
* ``eval_accuracy.png`` (accuracy per attack) and, with an ε sweep, ``eval_eps_sweep.png``.

Every file is written to a temporary name and renamed, so an interrupted job never leaves a broken report in
place of a good one.  :func:`robustness_report` is the same evaluation for any ``logits_fn(x)``.

Gradient-masking check (:func:`masking_flags`), each flag with its reason:

* (a) a multi-step white-box attack (PGD-20, CW∞, APGD-CE) is weaker than the black-box Square attack run alone
  on the same points (by more than the margin, and significantly by a paired sign test), or Square inside
  AutoAttack flips many points that survived APGD-CE, APGD-T and FAB-T;
* (b) PGD-20 accuracy above FGSM accuracy;
* (c) accuracy that does not fall as ε grows in the sweep (rises between two ε, or is flat over the sweep);
* (d) AutoAttack accuracy far (``aa_gap``, 10 points by default) below PGD-20 accuracy.
"""
from __future__ import annotations

import inspect
import json
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
from mdrad_jax import parallel
from mdrad_jax import runs
from mdrad_jax import validation
from mdrad_jax.errors import MissingFileError, UserError
from mdrad_jax.progress import is_main_process, log, progress_enabled

WHITE_BOX = ("fgsm", "pgd20", "cw", "apgd-ce")
# Check (a) compares these with Square.  Single-step FGSM is not among them: on an ordinary network it is often
# weaker than 5000 Square queries, which says that one step is a weak attack, not that gradients are masked.
MULTI_STEP_WHITE_BOX = ("pgd20", "cw", "apgd-ce")
NAMES = {"clean": "clean", "fgsm": "FGSM", "pgd20": "PGD-20", "cw": "CW∞ (PGD-30, κ = 50)",
         "autoattack": "AutoAttack (standard)", "autoattack_apgd_subset": "AutoAttack (APGD-CE + APGD-T subset)",
         "apgd-ce": "APGD-CE", "apgd-t": "APGD-T", "fab-t": "FAB-T", "square": "Square"}
OUTPUTS = ("eval.json", "eval.md", "eval_accuracy.png", "eval_eps_sweep.png")


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
    params = [p for p in inspect.signature(fn).parameters.values()
              if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty]
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


def robustness_report(logits_fn, images, labels, *, attacks: Sequence[str] = evaluation.ATTACKS, eps: float,
                      step_size: float, cw_kappa: float = 50.0, seed: int = 0, batch_size: int = 256,
                      aa_version: str = "standard", aa_overrides: dict | None = None,
                      eps_sweep: Sequence[float] = (), sweep_attack: str = "pgd20",
                      square_examples: int = 500, square_queries: int = 5000, tolerance: float = 0.01,
                      aa_gap: float = 0.10, significance: float = 0.05, progress: bool = False, jit: Callable = jax.jit,
                      batch_multiple: int = 1) -> dict[str, Any]:
  """Accuracies under ``attacks``, the ε sweep, Square alone on a subset, and the gradient-masking flags.

  Returns a JSON-ready dict: ``attacks`` (``evaluation.evaluate``'s entries, in order, with ``seconds``),
  ``autoattack_stages`` (robust count and flips after each AutoAttack attack), ``eps_sweep`` (``sweep_attack``
  at each ε; the PGD step size scales with ε as ``step_size · ε_i / ε``; ε = 0 is the clean accuracy),
  ``square_alone`` (Square with ``square_queries`` queries on the first ``square_examples`` points, 0 = skip)
  and ``masking_check`` (see :func:`masking_flags`).
  """
  attacks = tuple(attacks)
  unknown = [a for a in attacks if a not in evaluation.ATTACKS]
  if unknown or not attacks:
    raise UserError(f"evaluate.attacks: unknown or no attacks {unknown or list(attacks)}; "
                     f"valid: {evaluation.ATTACKS}")
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
  common = dict(cw_kappa=cw_kappa, seed=seed, batch_size=batch_size, aa_version=aa_version, progress=progress,
                jit=jit, aa_overrides=aa_overrides, batch_multiple=batch_multiple)

  results: dict[str, dict] = {}
  points: dict[str, np.ndarray] = {}
  aa_entry = None
  for name in attacks:
    t0 = time.perf_counter()
    out = evaluation.evaluate(logits_fn, images, labels, attacks=(name,), eps=eps, step_size=step_size,
                              per_point=True, **common)
    (key, entry), = out.items()
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
      stages.append({"attack": stage, "attacked": aa_entry["attacked"].get(stage),
                     "flips": aa_entry["flips"].get(stage), "robust": robust,
                     "accuracy": robust / n if n else 0.0})

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
          entry = evaluation.evaluate(logits_fn, images, labels, attacks=("clean",), eps=eps,
                                      step_size=step_size, **common)["clean"]
      else:
        e_step = step_size * e / eps
        same = math.isclose(e, eps, rel_tol=1e-9)
        reuse = [v for k, v in results.items() if same and (k == sweep_attack or
                 (sweep_attack == "autoattack" and k.startswith("autoattack")))]
        if reuse:
          entry = reuse[0]
        else:
          log(f"eps sweep: {sweep_attack} at eps = {e:.5g}")
          out = evaluation.evaluate(logits_fn, images, labels, attacks=(sweep_attack,), eps=e,
                                    step_size=e_step, **common)
          (_, entry), = out.items()
      p = entry.get("params") or {}
      rows.append({"eps": e, "step_size": p.get("step_size", 0.0 if e == 0 else None), "accuracy": entry["accuracy"],
                   "correct": entry["correct"], "n": entry["n"], "label": entry["label"],
                   "seconds": round(time.perf_counter() - t0, 2)})
    sweep_out = {"attack": sweep_attack, "points": rows}

  # Square alone on the first points: the black-box reference for check (a).
  square_out = None
  k = min(square_examples, n)
  if k > 0:
    t0 = time.perf_counter()
    over = {"square": {"n_queries": int(square_queries)}}
    res = aa.autoattack(logits_fn, images[:k], labels[:k], eps=eps, version="standard", seed=seed,
                        batch_size=batch_size, progress=progress, jit=jit, only=("square",), overrides=over,
                        batch_multiple=batch_multiple)
    square_correct = res.robust
    compare = {}
    for name in WHITE_BOX:
      if name in points:
        wb = points[name][:k]
        compare[name] = {"accuracy": float(wb.mean()), "correct": int(wb.sum()),
                         "square_broke_white_box_survivors": int((wb & ~square_correct).sum()),
                         "white_box_broke_square_survivors": int((~wb & square_correct).sum())}
    square_out = {"n": k, "label": res.label, "params": res.params, "accuracy": res.robust_accuracy,
                  "correct": int(square_correct.sum()), "clean_correct": int(res.clean_correct.sum()),
                  "white_box_on_same_points": compare, "seconds": round(time.perf_counter() - t0, 2)}
    log(f"square alone on {k} points: {100 * res.robust_accuracy:.2f}% in {square_out['seconds']:.0f} s")

  report = {"eps": float(eps), "step_size": float(step_size), "cw_kappa": float(cw_kappa), "seed": int(seed),
            "num_examples": n, "batch_size": int(batch_size), "aa_version": aa_version,
            "attacks": results, "autoattack_stages": stages, "eps_sweep": sweep_out, "square_alone": square_out}
  flags = masking_flags(report, tolerance=tolerance, aa_gap=aa_gap, significance=significance)
  report["masking_check"] = {"tolerance": tolerance, "aa_gap": aa_gap, "significance": significance,
                             "flagged": bool(flags), "flags": flags}
  return report


def sign_test_p(b: int, c: int) -> float:
  """One-sided exact sign test (McNemar): P(X >= b) for X ~ Binomial(b + c, 1/2); 1.0 when b = c = 0."""
  m = b + c
  return float(sum(math.comb(m, k) for k in range(b, m + 1)) / 2 ** m) if m else 1.0


def masking_flags(report: dict, *, tolerance: float = 0.01, aa_gap: float = 0.10,
                  significance: float = 0.05) -> list[dict]:
  """Signs of gradient masking in a :func:`robustness_report`: a list of ``{'check', 'attack', 'reason'}``.

  ``tolerance`` (a fraction, 0.01 = one point of accuracy) is the margin a comparison must exceed, so that
  sampling noise between attacks with random starts does not raise a flag.  The comparison with Square alone
  (a), made on the same points, also needs the paired difference to be significant: among the points exactly
  one of the two attacks broke, Square's share must pass a one-sided sign test at ``significance``
  (on 100 points a 2-point gap with no point the other way is not evidence; 5 or more points are).
  """
  flags = []
  res = report["attacks"]
  acc = {k: v["accuracy"] for k, v in res.items()}
  pct = lambda v: f"{100 * v:.2f}%"  # noqa: E731

  # (a) multi-step white-box weaker than black-box Square on the same points.
  sq = report.get("square_alone")
  if sq:
    for name, wb in sq["white_box_on_same_points"].items():
      if name not in MULTI_STEP_WHITE_BOX:
        continue
      b = wb["square_broke_white_box_survivors"]
      c = wb.get("white_box_broke_square_survivors", sq["correct"] - (wb["correct"] - b))
      p = sign_test_p(b, c)
      if wb["accuracy"] - sq["accuracy"] > tolerance and p < significance:
        flags.append({"check": "a", "attack": name, "accuracy": wb["accuracy"], "square_accuracy": sq["accuracy"],
                      "p_value": p,
                      "reason": f"{NAMES[name]} accuracy {pct(wb['accuracy'])} is above the black-box Square "
                                f"attack's {pct(sq['accuracy'])} on the same {sq['n']} points (Square broke "
                                f"{b} points {NAMES[name]} left correct, {NAMES[name]} {c} the other way; sign "
                                f"test p = {p:.2g}): the gradients may not point to adversarial examples"})
  stages = {s["attack"]: s for s in report.get("autoattack_stages", [])}
  n = report["num_examples"]
  if "square" in stages and n:
    flips = stages["square"]["flips"] or 0
    if flips / n > tolerance:
      before = [NAMES[s] for s in stages if s not in ("clean", "square")]
      flags.append({"check": "a", "attack": "square", "flips": flips,
                    "reason": f"Square flipped {flips} of {n} points ({pct(flips / n)}) that survived "
                              f"{', '.join(before)} inside AutoAttack: a gradient-free attack finds what the "
                              f"gradient-based ones miss"})
  # (b) more iterations, weaker attack.
  if "pgd20" in acc and "fgsm" in acc and acc["pgd20"] - acc["fgsm"] > tolerance:
    flags.append({"check": "b", "attack": "pgd20",
                  "reason": f"PGD-20 accuracy {pct(acc['pgd20'])} is above FGSM accuracy {pct(acc['fgsm'])}: "
                            f"iterating the attack makes it weaker"})
  # (c) accuracy that does not fall with ε.
  sw = report.get("eps_sweep")
  if sw and len(sw["points"]) >= 2:
    pts = sw["points"]
    for a, b in zip(pts, pts[1:]):
      if b["accuracy"] - a["accuracy"] > tolerance:
        flags.append({"check": "c", "attack": sw["attack"],
                      "reason": f"{NAMES.get(sw['attack'], sw['attack'])} accuracy rises from {pct(a['accuracy'])} "
                                f"at eps = {a['eps']:.4g} to {pct(b['accuracy'])} at eps = {b['eps']:.4g}"})
    positive = [p for p in pts if p["eps"] > 0]
    first, last = pts[0], pts[-1]
    if len(positive) >= 2 and last["accuracy"] >= first["accuracy"] - tolerance:
      flags.append({"check": "c", "attack": sw["attack"],
                    "reason": f"{NAMES.get(sw['attack'], sw['attack'])} accuracy does not fall as eps grows: "
                              f"{pct(first['accuracy'])} at eps = {first['eps']:.4g}, {pct(last['accuracy'])} at "
                              f"eps = {last['eps']:.4g}"})
  # (d) AutoAttack far below PGD-20.
  for key in ("autoattack", "autoattack_apgd_subset"):
    if key in acc and "pgd20" in acc and acc["pgd20"] - acc[key] > aa_gap:
      flags.append({"check": "d", "attack": key,
                    "reason": f"{NAMES[key]} accuracy {pct(acc[key])} is {100 * (acc['pgd20'] - acc[key]):.1f} "
                              f"points below PGD-20's {pct(acc['pgd20'])} (more than {100 * aa_gap:g}): PGD "
                              f"overestimates robustness"})
  return flags


# ---------------------------------------------------------------------------------------------
# Report files.
# ---------------------------------------------------------------------------------------------
def _param_text(entry: dict) -> str:
  p = entry.get("params") or {}
  if not p or "attacks" in p:
    return entry.get("label", "")
  text = f"{p['loss'].upper()}, {p['steps']} step{'s' if p['steps'] > 1 else ''} of {p['step_size']:.4g}"
  text += ", no random start" if p["init"] == "none" else f", {p['init']} start"
  if "kappa" in p:
    text += f", κ = {p['kappa']:g}"
  return text


def format_markdown(report: dict) -> str:
  m = report.get("meta", {})
  lines = ["# Robustness evaluation", ""]
  if m:
    ck = m.get("checkpoint", {})
    lines += [f"- model: `{m.get('model', {}).get('name', '?')}` trained with `{m.get('method', '?')}`; "
              f"checkpoint step {ck.get('step')} ({ck.get('which')}) of `{ck.get('path')}`",
              f"- data: `{m.get('dataset')}`, split `{m.get('split')}`, {report['num_examples']} examples",
              f"- devices: {m.get('num_devices')} × {m.get('platform')}; seconds: {m.get('seconds', 0):.0f}"]
  lines += [f"- threat model: L∞, eps = {report['eps']:.5g}; PGD step {report['step_size']:.5g}; seed "
            f"{report['seed']}", "",
            "| attack | accuracy (%) | correct / n | parameters |", "|---|---:|---:|---|"]
  for key, e in report["attacks"].items():
    lines.append(f"| {NAMES.get(key, key)} | {100 * e['accuracy']:.2f} | {e['correct']} / {e['n']} | "
                 f"{_param_text(e)} |")
  aa_key = next((k for k in report["attacks"] if k.startswith("autoattack")), None)
  if report.get("autoattack_stages"):
    lines += ["", f"{report['attacks'][aa_key]['label']}: each attack runs only on the points still robust.", "",
              "| after | attacked | flips | robust | accuracy (%) |", "|---|---:|---:|---:|---:|"]
    for s in report["autoattack_stages"]:
      lines.append(f"| {NAMES.get(s['attack'], s['attack'])} | {'' if s['attacked'] is None else s['attacked']} | "
                   f"{'' if s['flips'] is None else s['flips']} | {s['robust']} | {100 * s['accuracy']:.2f} |")
  sw = report.get("eps_sweep")
  if sw:
    lines += ["", f"Accuracy against {NAMES.get(sw['attack'], sw['attack'])} as eps grows (PGD step size scaled with eps):",
              "", "| eps | step | accuracy (%) | correct / n |", "|---:|---:|---:|---:|"]
    for p in sw["points"]:
      step = "" if p["step_size"] is None else f"{p['step_size']:.4g}"
      lines.append(f"| {p['eps']:.5g} | {step} | {100 * p['accuracy']:.2f} | {p['correct']} / {p['n']} |")
  sq = report.get("square_alone")
  if sq:
    lines += ["", f"Square alone ({sq['params']['square']['n_queries']} queries) on the first {sq['n']} points: "
              f"{100 * sq['accuracy']:.2f}% ({sq['correct']} / {sq['n']}); white-box attacks on the same points: "
              + ", ".join(f"{NAMES[k]} {100 * v['accuracy']:.2f}%" for k, v in sq["white_box_on_same_points"].items())
              + "."]
  mc = report["masking_check"]
  lines += ["", "## Gradient-masking check", ""]
  if mc["flags"]:
    lines += [f"- **({f['check']})** {f['reason']}." for f in mc["flags"]]
  else:
    ran = ["(a) white-box vs Square" if (sq or "square" in {s["attack"] for s in report.get("autoattack_stages", [])})
           else None, "(b) PGD-20 vs FGSM" if {"pgd20", "fgsm"} <= set(report["attacks"]) else None,
           "(c) accuracy vs eps" if sw else None, "(d) AutoAttack vs PGD-20"
           if aa_key and "pgd20" in report["attacks"] else None]
    ran = [r for r in ran if r]
    lines.append(f"No flag raised (checks run: {', '.join(ran) or 'none'}; margin {100 * mc['tolerance']:g} "
                 f"points, sign-test level {mc.get('significance', 0.05):g} for (a), AutoAttack gap "
                 f"{100 * mc['aa_gap']:g} points).")
  return "\n".join(lines) + "\n"


def _atomic_write_text(path: str, text: str) -> None:
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "w") as f:
    f.write(text)
  os.replace(tmp, path)


def _save_figure(fig, path: str) -> None:
  import matplotlib.pyplot as plt
  tmp = f"{path}.tmp{os.getpid()}"
  try:
    fig.savefig(tmp, dpi=120, format="png")
    os.replace(tmp, path)
  finally:
    plt.close(fig)
    if os.path.exists(tmp):
      os.remove(tmp)


def plot_accuracy(report: dict, path: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  rows = [(NAMES.get(k, k), e["accuracy"]) for k, e in report["attacks"].items()]
  for s in report.get("autoattack_stages", [])[1:-1]:  # intermediate AutoAttack stages
    rows.append((f"AA after\n{NAMES.get(s['attack'], s['attack'])}", s["accuracy"]))
  fig, ax = plt.subplots(figsize=(1.3 * len(rows) + 2, 4))
  x = np.arange(len(rows))
  bars = ax.bar(x, [100 * a for _, a in rows], 0.6, color="tab:blue")
  for b, (_, a) in zip(bars, rows):
    ax.text(b.get_x() + b.get_width() / 2, 100 * a + 1, f"{100 * a:.1f}", ha="center", fontsize=8)
  ax.set_xticks(x, [r.replace(" (", "\n(") for r, _ in rows], fontsize=7)
  ax.set_ylabel("accuracy (%)")
  ax.set_ylim(0, 110)
  m = report.get("meta", {})
  ax.set_title(f"{m.get('model', {}).get('name', 'model')} on {m.get('dataset', '')}: "
               f"L∞ eps = {report['eps']:.4g}, n = {report['num_examples']}", fontsize=9)
  fig.tight_layout()
  _save_figure(fig, path)


def plot_sweep(report: dict, path: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  sw = report["eps_sweep"]
  fig, ax = plt.subplots(figsize=(5, 3.5))
  ax.plot([p["eps"] for p in sw["points"]], [100 * p["accuracy"] for p in sw["points"]], "o-")
  ax.axvline(report["eps"], color="gray", ls=":", lw=1)
  ax.set_xlabel("eps (L∞)")
  ax.set_ylabel("robust accuracy (%)")
  ax.set_ylim(0, 105)
  ax.set_title(f"{NAMES.get(sw['attack'], sw['attack'])} accuracy vs eps", fontsize=9)
  fig.tight_layout()
  _save_figure(fig, path)


def write_report(report: dict, workdir: str) -> list[str]:
  """Writes eval.json, eval.md and the plots into ``workdir`` (each to a temporary name, then renamed)."""
  os.makedirs(workdir, exist_ok=True)
  written = []
  path = os.path.join(workdir, "eval.json")
  _atomic_write_text(path, json.dumps(report, indent=2, default=_json_default) + "\n")
  written.append(path)
  path = os.path.join(workdir, "eval.md")
  _atomic_write_text(path, format_markdown(report))
  written.append(path)
  path = os.path.join(workdir, "eval_accuracy.png")
  plot_accuracy(report, path)
  written.append(path)
  if report.get("eps_sweep"):
    path = os.path.join(workdir, "eval_eps_sweep.png")
    plot_sweep(report, path)
    written.append(path)
  return written


def _json_default(v):
  if isinstance(v, (np.integer,)):
    return int(v)
  if isinstance(v, (np.floating,)):
    return float(v)
  if isinstance(v, np.ndarray):
    return v.tolist()
  return str(v)


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
    raise MissingFileError(f"evaluate.checkpoint: no config.json with the model next to {step_dir}; "
                            f"cannot tell which network to build")

  dataset = config.data.name or _run_value(run_cfg, "data", "name")
  if not dataset:
    raise UserError("data.name: empty and the run's config.json names no dataset")
  data_kw = dict(data_dir=config.data.data_dir or _run_value(run_cfg, "data", "data_dir") or None,
                 source_dir=config.data.source_dir or _run_value(run_cfg, "data", "source_dir") or None)
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
    raise UserError(f"evaluate.batch_size={e.batch_size} must be a positive multiple of the number of "
                     f"devices ({hook.num_devices})")

  trained = runs.load_trained(step_dir, num_classes=info.num_classes, image_shape=info.image_shape,
                               what="evaluate.checkpoint")
  variables = parallel.replicate(trained.variables, mesh)
  logits_fn = evaluation.logits_fn_from_model(trained.module, variables)

  images, labels = data_lib.load_arrays(dataset, split, num_examples=e.num_examples if e.num_examples > 0 else None,
                                        **data_kw)
  log(f"evaluating {run_cfg['model'].get('name')} (step {step}, {which}) on {dataset}/{split}: {len(labels)} "
      f"examples, eps = {eps:.5g}, attacks {', '.join(attacks)}, {hook.num_devices} device(s)")
  report = robustness_report(
      logits_fn, images, labels, attacks=attacks, eps=eps, step_size=step_size, seed=int(e.seed),
      batch_size=int(e.batch_size), aa_version=e.aa_version, aa_overrides=parse_overrides(e.aa_overrides),
      eps_sweep=sweep, sweep_attack=e.sweep_attack,
      square_examples=int(e.masking_square_examples), square_queries=int(e.masking_square_queries),
      tolerance=float(e.masking_tolerance), aa_gap=float(e.masking_aa_gap),
      significance=float(e.masking_significance),
      progress=progress_enabled(), jit=hook, batch_multiple=hook.num_devices)
  report["meta"] = {
      "dataset": dataset, "split": split, "num_examples": int(len(labels)), "num_classes": info.num_classes,
      "image_shape": list(info.image_shape),
      "checkpoint": {"path": os.path.abspath(ckpt_path), "step_dir": step_dir, "step": step, "which": which},
      "model": run_cfg["model"], "method": _run_value(run_cfg, "method", "name"),
      "run_attack": {"eps": run_eps, "step_size": run_step},
      "autoattack_label": next((v["label"] for k, v in report["attacks"].items() if k.startswith("autoattack")),
                               None),
      "num_devices": hook.num_devices, "platform": jax.devices()[0].platform,
      "devices": [str(d) for d in mesh.devices.flat], "process_count": jax.process_count(),
      "seconds": round(time.perf_counter() - t_start, 1), "evaluate_config": e.to_dict(),
  }
  if is_main_process():
    written = write_report(report, workdir)
    print(format_markdown(report))
    log("wrote " + ", ".join(os.path.relpath(p, workdir) for p in written) + f" in {workdir}")
  return report
