#!/usr/bin/env python
"""Cost curves of the SA-MDRAD step: time and memory against the number of teachers, PGD steps and batch size.

    .venv/bin/python benchmarks/bench_curves.py --json benchmarks/results/curves_small_cnn.json
    .venv/bin/python benchmarks/bench_curves.py --student resnet18 --batches 32,64,128 --base-batch 32 ...
    .venv/bin/python benchmarks/bench_curves.py --student tiny_cnn --image-size 8 --teacher-counts 1,2 \
        --pgd-steps 1,2 --batches 2,4 --base-batch 4 --base-pgd-steps 1 --steps 1 --warmup 0 --torch off  # tiny

Three axes, each varied with the other two at their base values (``--base-teachers``, ``--base-pgd-steps``,
``--base-batch``): the number of teachers (``--teacher-counts``, teachers cycled from the student's teacher set
of ``bench_train_step.TEACHER_SETS``: 4 = the three of the set and its first again), PGD steps
(``--pgd-steps``) and batch size (``--batches``).  Every point is one ``bench_train_step.py`` JAX child and one
PyTorch reference child (the same invocation, one after the other, ``--repeats`` times interleaved; medians),
each a fresh process reporting its step time (median of ``--steps`` after ``--warmup``) and peak memory: JAX
peak RSS while running the steps, XLA's temporaries (``compiled.memory_analysis()``), PyTorch peak RSS.  A point
shared by two axes (the base values) is measured once.  The load average before and after each point is kept.

Summary per axis and quantity: a least-squares line over all points (slope = cost per extra teacher / PGD step
/ image, intercept, R²), and linearity: the line through the first ``--fit-points`` points extrapolated to the
others; ``linear through`` is the last value within ``--tolerance`` of it, ``departs at`` the first beyond.
Output: a markdown table (printed, and written next to ``--json`` as .md) and the JSON.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import bench_train_step as bts  # noqa: E402  (the case specs and the child runners)

AXES = ("teachers", "pgd_steps", "batch")
UNITS = {"teachers": "teacher", "pgd_steps": "PGD step", "batch": "image"}


def _ints(s: str) -> list[int]:
  return [int(v) for v in bts._csv(s)]


def parse_args(argv=None):
  p = argparse.ArgumentParser(
    description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
  )
  p.add_argument("--method", default="sa_mdrad")
  p.add_argument("--student", default="small_cnn", help="student model (small_cnn, resnet18, ...)")
  p.add_argument("--teacher-set", default="", help=f"default: the student's; one of {sorted(bts.TEACHER_SETS)}")
  p.add_argument("--axes", type=bts._csv, default=list(AXES), help="which curves: teachers,pgd_steps,batch")
  p.add_argument("--teacher-counts", type=_ints, default=[1, 2, 4, 8])
  p.add_argument("--pgd-steps", type=_ints, default=[1, 5, 10, 20])
  p.add_argument("--batches", type=_ints, default=[32, 64, 128, 256, 512])
  p.add_argument("--base-teachers", type=int, default=3)
  p.add_argument("--base-pgd-steps", type=int, default=10)
  p.add_argument("--base-batch", type=int, default=128)
  p.add_argument("--image-size", type=int, default=32)
  p.add_argument("--channels", type=int, default=3)
  p.add_argument("--num-classes", type=int, default=10)
  p.add_argument("--steps", type=int, default=5, help="timed steps per child (the median is reported)")
  p.add_argument("--warmup", type=int, default=1)
  p.add_argument("--repeats", type=int, default=1, help="children per point and framework, interleaved")
  p.add_argument("--jax-dtype", default="float32", choices=("float32", "bfloat16"))
  p.add_argument("--depthwise", default="conv", choices=bts.DEPTHWISE_IMPLS)
  p.add_argument("--matmul-size", type=int, default=256, help="the JAX child's peak-matmul probe (unused here)")
  p.add_argument("--torch", choices=("auto", "on", "off"), default="auto")
  p.add_argument("--torch-dtype", default="fp32", help="reference variant: fp32 or bf16")
  p.add_argument("--torch-channels-last", action="store_true")
  p.add_argument("--torch-threads", type=int, default=0)
  p.add_argument("--fit-points", type=int, default=3, help="points the linearity line goes through")
  p.add_argument("--tolerance", type=float, default=0.15, help="relative deviation still counted as linear")
  p.add_argument("--json", default="")
  p.add_argument("--markdown", default="", help="default: the --json path with .md")
  p.add_argument("--child-timeout", type=float, default=3600.0)
  p.add_argument("--quiet", action="store_true")
  return p.parse_args(argv)


def cycled(teacher_set: list, n: int) -> list:
  """``n`` teachers taken in turn from ``teacher_set``."""
  return [list(teacher_set[i % len(teacher_set)]) for i in range(n)]


# ---------------------------------------------------------------------------------------------
# Fits.
# ---------------------------------------------------------------------------------------------
def linear_fit(xs, ys) -> dict | None:
  """Least-squares line y = slope * x + intercept, and R² (None with fewer than two distinct x)."""
  pts = [(float(x), float(y)) for x, y in zip(xs, ys) if y is not None]
  if len({x for x, _ in pts}) < 2:
    return None
  mx = statistics.fmean(x for x, _ in pts)
  my = statistics.fmean(y for _, y in pts)
  sxx = sum((x - mx) ** 2 for x, _ in pts)
  slope = sum((x - mx) * (y - my) for x, y in pts) / sxx
  intercept = my - slope * mx
  ss_tot = sum((y - my) ** 2 for _, y in pts)
  ss_res = sum((y - slope * x - intercept) ** 2 for x, y in pts)
  return {"slope": slope, "intercept": intercept, "r2": 1.0 - ss_res / ss_tot if ss_tot > 0 else 1.0}


def linearity(xs, ys, *, fit_points: int, tolerance: float) -> dict | None:
  """The line through the first ``fit_points`` points (by x) extrapolated to every point: each point's
  relative deviation from it, the last x up to which all points are within ``tolerance`` and the first beyond."""
  pts = sorted((float(x), float(y)) for x, y in zip(xs, ys) if y is not None)
  fit = linear_fit([x for x, _ in pts[:fit_points]], [y for _, y in pts[:fit_points]])
  if fit is None:
    return None
  dev = []
  for x, y in pts:
    pred = fit["slope"] * x + fit["intercept"]
    dev.append((x, (y / pred - 1.0) if pred > 0 else None))
  through, departs = None, None
  for x, d in dev:
    if d is None or abs(d) > tolerance:
      departs = x
      break
    through = x
  marginal = [(b[0], (b[1] - a[1]) / (b[0] - a[0])) for a, b in zip(pts, pts[1:]) if b[0] != a[0]]
  return {
    "fit_on": [x for x, _ in pts[:fit_points]],
    "slope": fit["slope"],
    "intercept": fit["intercept"],
    "deviation": dev,
    "linear_through": through,
    "departs_at": departs,
    "marginal_slopes": marginal,
  }


QUANTITIES = (  # (key, label, unit, scale from the stored value)
  ("jax_s", "JAX step", "ms", 1e3),
  ("torch_s", "torch step", "ms", 1e3),
  ("jax_rss", "JAX peak RSS", "MiB", 2.0**-20),
  ("xla_temp", "XLA temporaries", "MiB", 2.0**-20),
  ("torch_rss", "torch peak RSS", "MiB", 2.0**-20),
)


def summarise_axis(points: list[dict], axis: str, *, fit_points: int, tolerance: float) -> list[dict]:
  out = []
  xs = [p["value"] for p in points]
  for key, label, unit, scale in QUANTITIES:
    ys = [None if p.get(key) is None else p[key] * scale for p in points]
    if sum(y is not None for y in ys) < 2:
      continue
    fit = linear_fit(xs, ys)
    lin = linearity(xs, ys, fit_points=fit_points, tolerance=tolerance)
    out.append({"axis": axis, "quantity": label, "unit": f"{unit} per {UNITS[axis]}", "fit": fit, "linearity": lin})
  return out


# ---------------------------------------------------------------------------------------------
# Points.
# ---------------------------------------------------------------------------------------------
def _steps_rss(r):
  return r.get("peak_rss_steps_bytes") or r.get("peak_rss_bytes")


def _median(vals):
  vals = [v for v in vals if v is not None]
  return statistics.median(vals) if vals else None


def measure_point(args, *, teachers: int, pgd_steps: int, batch: int, tset: str, use_torch: bool) -> dict:
  base = bts.case_spec(
    args,
    method=args.method,
    model=args.student,
    batch=batch,
    teacher_set=tset,
    teachers=cycled(bts.TEACHER_SETS[tset], teachers),
    pgd_steps=pgd_steps,
  )
  spec = bts.jax_spec(base, dtype=args.jax_dtype, depthwise=args.depthwise)
  jax_runs, torch_runs = [], []
  load_before = bts.loadavg()
  for rep in range(args.repeats):
    label = f"[{args.method} {args.student}] teachers {teachers}, PGD-{pgd_steps}, batch {batch}"
    print(f"{label}: jax (repeat {rep + 1}/{args.repeats}) ...", flush=True)
    jax_runs.append(bts.run_jax_case(spec, args))
    _print_run("jax", jax_runs[-1])
    if use_torch:
      print(f"{label}: torch[{args.torch_dtype}] (repeat {rep + 1}/{args.repeats}) ...", flush=True)
      torch_runs.append(bts.run_torch_case(base, args.torch_dtype, args))
      _print_run(f"torch[{args.torch_dtype}]", torch_runs[-1])
  ok_j = [r for r in jax_runs if "error" not in r]
  ok_t = [r for r in torch_runs if "error" not in r]
  point = {
    "teachers": teachers,
    "pgd_steps": pgd_steps,
    "batch": batch,
    "teacher_list": base["teachers"],
    "jax_s": _median([r.get("step_median_s") for r in ok_j]),
    "jax_compile_s": _median([r.get("compile_s") for r in ok_j]),
    "jax_rss": _median([_steps_rss(r) for r in ok_j]),
    "xla_temp": _median([(r.get("xla_memory") or {}).get("temp_size_in_bytes") for r in ok_j]),
    "torch_s": _median([r.get("step_median_s") for r in ok_t]),
    "torch_rss": _median([_steps_rss(r) for r in ok_t]),
    "load_before": load_before,
    "load_after": bts.loadavg(),
    "errors": [r["error"] for r in jax_runs + torch_runs if "error" in r],
    "runs": {"jax": jax_runs, "torch": torch_runs},
  }
  point["ratio"] = point["torch_s"] / point["jax_s"] if (point["torch_s"] and point["jax_s"]) else None
  return point


def _print_run(name, r):
  if "error" in r:
    print(f"    {name}: ERROR {r['error']}")
    return
  print(
    f"    {name}: step {r['step_median_s']:.4f} s, peak RSS {(_steps_rss(r) or 0) / 2**20:.0f} MiB, "
    f"load {r['load_before']} -> {r['load_after']}"
  )


# ---------------------------------------------------------------------------------------------
# Report.
# ---------------------------------------------------------------------------------------------
def _f(v, spec="{:.3g}"):
  return "-" if v is None else spec.format(v)


def markdown(header: list[str], curves: dict, summary: list[dict], tolerance: float) -> str:
  lines = list(header)
  for axis, points in curves.items():
    lines += [
      "",
      f"### {axis}",
      "",
      f"| {axis} | teachers | PGD steps | batch | JAX ms | torch ms | torch / JAX | JAX peak RSS MiB | "
      "XLA temp MiB | torch peak RSS MiB | load before | load after |",
      "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for p in points:
      mib = [None if p.get(k) is None else p[k] / 2**20 for k in ("jax_rss", "xla_temp", "torch_rss")]
      lines.append(
        f"| {p['value']} | {p['teachers']} | {p['pgd_steps']} | {p['batch']} | "
        f"{_f(p['jax_s'] and p['jax_s'] * 1e3, '{:.1f}')} | {_f(p['torch_s'] and p['torch_s'] * 1e3, '{:.1f}')} | "
        f"{_f(p['ratio'], '{:.2f}')} | " + " | ".join(_f(m, "{:.0f}") for m in mib) + f" | {p['load_before']} | "
        f"{p['load_after']} |" + (f" ERROR: {'; '.join(p['errors'])}" if p["errors"] else "")
      )
  lines += [
    "",
    "### Linear fits",
    "",
    f"Slope and intercept: least squares over all points.  Linear through / departs at: against the line through "
    f"the first points (fit on), deviation within ±{tolerance:.0%}; the largest deviation is shown.",
    "",
    "| axis | quantity | slope | unit | intercept | R² | fit on | linear through | departs at | largest deviation |",
    "|---|---|---:|---|---:|---:|---|---:|---:|---:|",
  ]
  for s in summary:
    fit, lin = s["fit"] or {}, s["linearity"] or {}
    devs = [d for _, d in lin.get("deviation", []) if d is not None]
    worst = max(devs, key=abs) if devs else None
    lines.append(
      f"| {s['axis']} | {s['quantity']} | {_f(fit.get('slope'))} | {s['unit']} | {_f(fit.get('intercept'))} | "
      f"{_f(fit.get('r2'), '{:.3f}')} | {','.join(f'{v:g}' for v in lin.get('fit_on', []))} | "
      f"{_f(lin.get('linear_through'), '{:g}')} | {_f(lin.get('departs_at'), '{:g}')} | "
      f"{_f(worst and 100 * worst, '{:+.0f}%')} |"
    )
  return "\n".join(lines) + "\n"


def main(argv=None) -> int:
  args = parse_args(argv)
  bad = [a for a in args.axes if a not in AXES]
  if bad:
    raise SystemExit(f"--axes takes {','.join(AXES)}, got {bad}")
  tset = args.teacher_set or args.student
  if tset not in bts.TEACHER_SETS:
    raise SystemExit(f"no teacher set for {args.student!r}; give --teacher-set (one of {sorted(bts.TEACHER_SETS)})")
  have_torch = importlib.util.find_spec("torch") is not None
  use_torch = args.torch == "on" or (args.torch == "auto" and have_torch)
  if args.torch == "on" and not have_torch:
    print("error: --torch on but torch is not installed (pip install -e '.[bench]')", file=sys.stderr)
    return 2
  info = bts.machine_info()
  cmdline = " ".join([os.path.relpath(sys.executable), os.path.relpath(os.path.abspath(__file__)), *sys.argv[1:]])
  header = [
    f"command: `{cmdline}`",
    "",
    f"machine: {info['cpu']}, {info['cpu_count']} CPUs; "
    + ", ".join(f"{k} {v}" for k, v in info["versions"].items() if v),
    "",
    f"student {args.student}, teachers cycled from {tset}: {bts.TEACHER_SETS[tset]}; base: "
    f"{args.base_teachers} teachers, PGD-{args.base_pgd_steps}, batch {args.base_batch}; JAX {args.jax_dtype}"
    + (f", depthwise {args.depthwise}" if args.depthwise != "conv" else "")
    + (f"; PyTorch {args.torch_dtype}" if use_torch else "; PyTorch reference skipped"),
  ]
  print("\n".join(h for h in header if h))
  print(f"load average at start: {bts.loadavg()}")

  values = {"teachers": args.teacher_counts, "pgd_steps": args.pgd_steps, "batch": args.batches}
  base = {"teachers": args.base_teachers, "pgd_steps": args.base_pgd_steps, "batch": args.base_batch}
  measured: dict = {}  # (teachers, pgd_steps, batch) -> point
  curves: dict = {}
  summary: list = []
  out_json = {"command": cmdline, "machine": info, "args": vars(args), "curves": curves, "summary": summary}
  for axis in args.axes:
    curves[axis] = []
    for v in values[axis]:
      where = dict(base, **{axis: v})
      key = (where["teachers"], where["pgd_steps"], where["batch"])
      if key not in measured:
        measured[key] = measure_point(args, **where, tset=tset, use_torch=use_torch)
      curves[axis].append(dict(measured[key], axis=axis, value=v))
      if args.json:
        _write_json(args.json, out_json)
    summary += summarise_axis(curves[axis], axis, fit_points=args.fit_points, tolerance=args.tolerance)
  md = markdown(header, curves, summary, args.tolerance)
  print()
  print(md)
  print(f"load average at end: {bts.loadavg()}")
  if args.json:
    out_json["complete"] = True
    _write_json(args.json, out_json)
    md_path = args.markdown or os.path.splitext(args.json)[0] + ".md"
    with open(md_path, "w") as f:
      f.write(md)
    print(f"wrote {args.json} and {md_path}")
  elif args.markdown:
    with open(args.markdown, "w") as f:
      f.write(md)
  failed = [(p["axis"], p["value"]) for pts in curves.values() for p in pts if p["errors"]]
  if failed:
    print(f"FAILED: {failed}", file=sys.stderr)
    return 1
  return 0


def _write_json(path, obj):
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path + ".tmp", "w") as f:
    json.dump(obj, f, indent=1, default=str)
  os.replace(path + ".tmp", path)


if __name__ == "__main__":
  sys.exit(main())
