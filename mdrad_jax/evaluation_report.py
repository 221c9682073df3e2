"""The files of a robustness report: ``eval.json``, ``eval.md`` (also printed by the job) and the plots.

:func:`write_report` writes them all into a directory, each to a temporary name and then renamed
(:func:`atomic_write_text`, :func:`save_figure`), so an interrupted job never leaves a broken report in place
of a good one; the study writes its own files with the same helpers.  Attacks are named as in
``evaluation.TITLES``.
"""

from __future__ import annotations

import json
import os

import numpy as np

from mdrad_jax import evaluation

NAMES = evaluation.TITLES


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
  """``eval.md``: the report as Markdown tables (run, attacks, AutoAttack stages, ε sweep, Square alone) and the
  gradient-masking check's flags."""
  m = report.get("meta", {})
  lines = ["# Robustness evaluation", ""]
  if m:
    ck = m.get("checkpoint", {})
    lines += [
      f"- model: `{m.get('model', {}).get('name', '?')}` trained with `{m.get('method', '?')}`; "
      f"checkpoint step {ck.get('step')} ({ck.get('which')}) of `{ck.get('path')}`",
      f"- data: `{m.get('dataset')}`, split `{m.get('split')}`, {report['num_examples']} examples",
      f"- devices: {m.get('num_devices')} × {m.get('platform')}; seconds: {m.get('seconds', 0):.0f}"
      + (f"; CPU: {m['host']['cpu']} ({m['host']['cores']} cores)" if m.get("host") else ""),
    ]
  lines += [
    f"- threat model: L∞, eps = {report['eps']:.5g}; PGD step {report['step_size']:.5g}; seed {report['seed']}",
    "",
    "| attack | accuracy (%) | correct / n | parameters |",
    "|---|---:|---:|---|",
  ]
  for key, e in report["attacks"].items():
    lines.append(
      f"| {NAMES.get(key, key)} | {100 * e['accuracy']:.2f} | {e['correct']} / {e['n']} | {_param_text(e)} |"
    )
  aa_key = next((k for k in report["attacks"] if k.startswith("autoattack")), None)
  if report.get("autoattack_stages"):
    lines += [
      "",
      f"{report['attacks'][aa_key]['label']}: each attack runs only on the points still robust.",
      "",
      "| after | attacked | flips | robust | accuracy (%) |",
      "|---|---:|---:|---:|---:|",
    ]
    for s in report["autoattack_stages"]:
      lines.append(
        f"| {NAMES.get(s['attack'], s['attack'])} | {'' if s['attacked'] is None else s['attacked']} | "
        f"{'' if s['flips'] is None else s['flips']} | {s['robust']} | {100 * s['accuracy']:.2f} |"
      )
  sw = report.get("eps_sweep")
  if sw:
    lines += [
      "",
      f"Accuracy against {NAMES.get(sw['attack'], sw['attack'])} as eps grows (PGD step size scaled with eps):",
      "",
      "| eps | step | accuracy (%) | correct / n |",
      "|---:|---:|---:|---:|",
    ]
    for p in sw["points"]:
      step = "" if p["step_size"] is None else f"{p['step_size']:.4g}"
      lines.append(f"| {p['eps']:.5g} | {step} | {100 * p['accuracy']:.2f} | {p['correct']} / {p['n']} |")
  sq = report.get("square_alone")
  if sq:
    lines += [
      "",
      f"Square alone ({sq['params']['square']['n_queries']} queries) on the first {sq['n']} points: "
      f"{100 * sq['accuracy']:.2f}% ({sq['correct']} / {sq['n']}); white-box attacks on the same points: "
      + ", ".join(f"{NAMES[k]} {100 * v['accuracy']:.2f}%" for k, v in sq["white_box_on_same_points"].items())
      + ".",
    ]
  mc = report["masking_check"]
  lines += ["", "## Gradient-masking check", ""]
  if mc["flags"]:
    lines += [f"- **({f['check']})** {f['reason']}." for f in mc["flags"]]
  else:
    ran = [
      "(a) white-box vs Square"
      if (sq or "square" in {s["attack"] for s in report.get("autoattack_stages", [])})
      else None,
      "(b) PGD-20 vs FGSM" if {"pgd20", "fgsm"} <= set(report["attacks"]) else None,
      "(c) accuracy vs eps" if sw else None,
      "(d) AutoAttack vs PGD-20" if aa_key and "pgd20" in report["attacks"] else None,
    ]
    ran = [r for r in ran if r]
    lines.append(
      f"No flag raised (checks run: {', '.join(ran) or 'none'}; margin {100 * mc['tolerance']:g} "
      f"points, sign-test level {mc.get('significance', 0.05):g} for (a), AutoAttack gap "
      f"{100 * mc['aa_gap']:g} points)."
    )
  return "\n".join(lines) + "\n"


def atomic_write_text(path: str, text: str) -> None:
  """Writes ``text`` to ``path`` through a temporary file renamed into place."""
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "w") as f:
    f.write(text)
  os.replace(tmp, path)


def save_figure(fig, path: str) -> None:
  """Saves a matplotlib figure as PNG to ``path`` (through a temporary file renamed into place) and closes it."""
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
  """``eval_accuracy.png``: a bar per attack, and per intermediate AutoAttack stage."""
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
  ax.set_title(
    f"{m.get('model', {}).get('name', 'model')} on {m.get('dataset', '')}: "
    f"L∞ eps = {report['eps']:.4g}, n = {report['num_examples']}",
    fontsize=9,
  )
  fig.tight_layout()
  save_figure(fig, path)


def plot_sweep(report: dict, path: str) -> None:
  """``eval_eps_sweep.png``: the sweep attack's accuracy against ε, the evaluation's ε marked."""
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
  save_figure(fig, path)


def write_report(report: dict, workdir: str) -> list[str]:
  """Writes eval.json, eval.md and the plots into ``workdir`` (each to a temporary name, then renamed)."""
  os.makedirs(workdir, exist_ok=True)
  written = []
  path = os.path.join(workdir, "eval.json")
  atomic_write_text(path, json.dumps(report, indent=2, default=json_default) + "\n")
  written.append(path)
  path = os.path.join(workdir, "eval.md")
  atomic_write_text(path, format_markdown(report))
  written.append(path)
  path = os.path.join(workdir, "eval_accuracy.png")
  plot_accuracy(report, path)
  written.append(path)
  if report.get("eps_sweep"):
    path = os.path.join(workdir, "eval_eps_sweep.png")
    plot_sweep(report, path)
    written.append(path)
  return written


def json_default(v):
  """``json.dump``'s ``default`` for reports: numpy scalars and arrays as Python numbers and lists, else ``str``."""
  if isinstance(v, (np.integer,)):
    return int(v)
  if isinstance(v, (np.floating,)):
    return float(v)
  if isinstance(v, np.ndarray):
    return v.tolist()
  return str(v)
