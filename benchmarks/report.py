#!/usr/bin/env python
"""Markdown tables from the JSON files of ``bench_train_step.py`` (the tables of docs/performance.md).

.venv/bin/python benchmarks/report.py benchmarks/results/main_*.json
"""

from __future__ import annotations

import json
import sys


def _f(v, spec):
  return "-" if v is None else spec.format(v)


def rows(path):
  with open(path) as f:
    d = json.load(f)
  for res in d["results"]:
    v = res["variants"]
    t32 = v.get("torch[fp32]", {}).get("step_median_s")
    t16 = v.get("torch[bf16]", {}).get("step_median_s")
    for name, s in v.items():
      if "error" in s:
        yield (res["method"], res["model"], res["batch"], name, "error", *[""] * 11)
        continue
      med = s["step_median_s"]
      loads = [x for x in (s.get("load_before") or []) + (s.get("load_after") or []) if x]
      load = f"{min(l[0] for l in loads):.1f}-{max(l[0] for l in loads):.1f}" if loads else "-"
      nec = (s.get("necessary_flops") or {}).get("total")
      useful = s.get("useful_flops_per_s")
      peak = s.get("peak_matmul_flops_per_s")
      rss = s.get("peak_rss_steps_bytes") or s.get("peak_rss_bytes")
      temp = (s.get("xla_memory") or {}).get("temp_size_in_bytes")
      jax_row = name.startswith("jax")
      yield (
        res["method"],
        res["model"],
        res["batch"],
        name,
        _f(s.get("compile_s"), "{:.0f}"),
        _f(med, "{:.2f}"),
        _f(min(s["step_times_s"]), "{:.2f}"),
        _f(res["batch"] / med, "{:.1f}"),
        _f(rss and rss / 2**20, "{:.0f}"),
        _f(temp and temp / 2**20, "{:.0f}"),
        _f(nec and nec / 1e9, "{:.1f}")
        if jax_row
        else _f((s.get("step_flops_counted") or 0) / 1e9 or None, "{:.1f} (torch count)"),
        _f(s.get("flops_ratio"), "{:.3f}"),
        _f(useful and peak and 100 * useful / peak, "{:.0f}%"),
        _f(t32 / med if (jax_row and t32) else None, "{:.2f}"),
        _f(t16 / med if (jax_row and t16) else None, "{:.2f}"),
        load,
      )


HEAD = (
  "method",
  "student",
  "batch",
  "variant",
  "compile s",
  "step s (median)",
  "min s",
  "img/s",
  "peak RSS MiB",
  "XLA temp MiB",
  "GFLOP needed",
  "FLOP ratio",
  "% of matmul peak",
  "x torch fp32",
  "x torch bf16",
  "load (1 min)",
)


def main(paths) -> int:
  print("| " + " | ".join(HEAD) + " |")
  print("|" + "|".join("---" for _ in HEAD) + "|")
  for p in paths:
    for r in rows(p):
      print("| " + " | ".join(str(c) for c in r) + " |")
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
