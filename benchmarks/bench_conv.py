"""Per-layer convolution kernels: XLA (through JAX) against PyTorch eager (oneDNN) on the same shapes.

The train step's time is mostly 3x3 convolutions: their forward and their gradient with respect to the input
(every attack step), plus the weight gradient (the outer step).  This script times those three kernels alone,
for the stride-1 3x3 layers of the benchmarked students (``small_cnn`` at batch 128, CIFAR ResNet-18 at batch
32), in float32 and bfloat16, so that a gap in ``bench_train_step.py`` can be traced to the kernel that
causes it.

Each framework runs in its own child process (their thread pools never share the cores).  Per layer and
kernel: the median of ``--reps`` timed calls after ``--warmup`` calls, and GFLOP/s = 2 * N*H*W*Cin*Cout*9 /
time (the textbook count, the same for both).

  .venv/bin/python benchmarks/bench_conv.py --json benchmarks/results/conv_kernels.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))

# (name, batch, height/width, in channels, out channels): the stride-1 3x3 convolutions of the students.
LAYERS = (
  ("small_cnn conv1", 128, 32, 3, 32),
  ("small_cnn conv2", 128, 16, 32, 64),
  ("small_cnn conv3", 128, 8, 64, 128),
  ("resnet18 stem", 32, 32, 3, 64),
  ("resnet18 stage1", 32, 32, 64, 64),
  ("resnet18 stage2", 32, 16, 128, 128),
  ("resnet18 stage3", 32, 8, 256, 256),
  ("resnet18 stage4", 32, 4, 512, 512),
)
KERNELS = ("forward", "input_grad", "weight_grad")


def flops(n, hw, cin, cout) -> float:
  return 2.0 * n * hw * hw * cin * cout * 9


def _time(fn, warmup, reps) -> float:
  for _ in range(warmup):
    fn()
  ts = []
  for _ in range(reps):
    t = time.perf_counter()
    fn()
    ts.append(time.perf_counter() - t)
  return statistics.median(ts)


def _layers(names: str):
  if not names:
    return LAYERS
  wanted = [n.strip() for n in names.split(",")]
  known = {layer[0] for layer in LAYERS}
  bad = [n for n in wanted if n not in known]
  if bad:
    raise SystemExit(f"error: unknown layer(s) {bad}; known: {sorted(known)}")
  return tuple(layer for layer in LAYERS if layer[0] in wanted)


def child_jax(dtype: str, warmup: int, reps: int, layers) -> dict:
  sys.path.insert(0, os.path.dirname(HERE))
  from mdrad_jax import xla_flags

  xla_flags.apply_defaults()  # the library's defaults, as in the train step
  import jax
  import jax.numpy as jnp
  import numpy as np

  dt = jnp.dtype(dtype)
  out = {}
  rng = np.random.default_rng(0)

  def conv(x, w):
    return jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))

  for name, n, hw, cin, cout in layers:
    x = jnp.asarray(rng.uniform(0, 1, (n, hw, hw, cin)), dt)
    w = jnp.asarray(rng.standard_normal((3, 3, cin, cout)) * 0.1, dt)
    g = jnp.asarray(rng.standard_normal((n, hw, hw, cout)), dt)
    fwd = jax.jit(conv)
    dx = jax.jit(lambda w, g, x=x: jax.vjp(lambda xx: conv(xx, w), x)[1](g)[0])
    dw = jax.jit(lambda x, g, w=w: jax.vjp(lambda ww: conv(x, ww), w)[1](g)[0])
    res = {}
    for k, f, args in (("forward", fwd, (x, w)), ("input_grad", dx, (w, g)), ("weight_grad", dw, (x, g))):
      c = f.lower(*args).compile()
      res[k] = _time(lambda c=c, args=args: jax.block_until_ready(c(*args)), warmup, reps)
    out[name] = res
  return {"framework": "jax", "version": jax.__version__, "flags": os.environ.get("XLA_FLAGS", ""), "results": out}


def child_torch(dtype: str, warmup: int, reps: int, channels_last: bool, layers) -> dict:
  import torch

  dt = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
  torch.manual_seed(0)
  out = {}
  fmt = torch.channels_last if channels_last else torch.contiguous_format
  with torch.no_grad():
    for name, n, hw, cin, cout in layers:
      x = torch.rand(n, cin, hw, hw, dtype=dt).contiguous(memory_format=fmt)
      w = (torch.randn(cout, cin, 3, 3) * 0.1).to(dt).contiguous(memory_format=fmt)
      g = torch.randn(n, cout, hw, hw, dtype=dt).contiguous(memory_format=fmt)
      res = {
        "forward": _time(lambda: torch.nn.functional.conv2d(x, w, padding=1), warmup, reps),
        "input_grad": _time(lambda: torch.nn.grad.conv2d_input(x.shape, w, g, padding=1), warmup, reps),
        "weight_grad": _time(lambda: torch.nn.grad.conv2d_weight(x, w.shape, g, padding=1), warmup, reps),
      }
      out[name] = res
  return {
    "framework": "torch",
    "version": torch.__version__,
    "threads": torch.get_num_threads(),
    "channels_last": channels_last,
    "results": out,
  }


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--dtypes", default="float32,bfloat16")
  p.add_argument("--warmup", type=int, default=3)
  p.add_argument("--reps", type=int, default=15)
  p.add_argument("--layers", default="", help="comma-separated layer names (default: all of LAYERS)")
  p.add_argument("--frameworks", default="jax,torch", help="jax,torch (torch needs the bench extra)")
  p.add_argument("--torch-channels-last", action="store_true")
  p.add_argument("--json", default="")
  p.add_argument("--child", default="", help=argparse.SUPPRESS)
  p.add_argument("--dtype", default="float32", help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if args.child:
    layers = _layers(args.layers)
    res = (
      child_jax(args.dtype, args.warmup, args.reps, layers)
      if args.child == "jax"
      else child_torch(args.dtype, args.warmup, args.reps, args.torch_channels_last, layers)
    )
    print(json.dumps(res))
    return 0

  cmd = " ".join([os.path.relpath(sys.executable), os.path.relpath(__file__), *sys.argv[1:]])
  print(f"command: {cmd}")
  print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; {platform.platform()}")
  print(f"load average at start: {[round(v, 2) for v in os.getloadavg()]}")
  layers = _layers(args.layers)
  frameworks = [f for f in args.frameworks.split(",") if f]
  if not set(frameworks) <= {"jax", "torch"} or not frameworks:
    print(f"error: --frameworks takes jax and/or torch, got {args.frameworks!r}", file=sys.stderr)
    return 2
  runs = {}
  for dtype in args.dtypes.split(","):
    for fw in frameworks:
      c = [
        sys.executable,
        __file__,
        "--child",
        fw,
        "--dtype",
        dtype,
        "--warmup",
        str(args.warmup),
        "--reps",
        str(args.reps),
        "--layers",
        args.layers,
      ] + (["--torch-channels-last"] if args.torch_channels_last else [])
      proc = subprocess.run(c, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
      if proc.returncode != 0:
        print(f"error: {fw} {dtype} child failed: {proc.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
        return 1
      runs[(fw, dtype)] = json.loads(proc.stdout.strip().splitlines()[-1])
  print(f"load average at end: {[round(v, 2) for v in os.getloadavg()]}")
  print("versions: " + ", ".join(sorted({f"{k[0]} {v['version']}" for k, v in runs.items()})))
  print()
  print(
    "| layer | N | HxW | Cin->Cout | dtype | kernel | XLA ms | torch ms | XLA GFLOP/s | torch GFLOP/s | "
    "torch time / XLA time |"
  )
  print("|---|---|---|---|---|---|---:|---:|---:|---:|---:|")
  rows = []
  for dtype in args.dtypes.split(","):
    for name, n, hw, cin, cout in layers:
      f = flops(n, hw, cin, cout)
      for k in KERNELS:
        tj = runs[("jax", dtype)]["results"][name][k] if ("jax", dtype) in runs else None
        tt = runs[("torch", dtype)]["results"][name][k] if ("torch", dtype) in runs else None
        gj = f / tj / 1e9 if tj else None
        gt = f / tt / 1e9 if tt else None
        rows.append(
          {
            "layer": name,
            "batch": n,
            "hw": hw,
            "cin": cin,
            "cout": cout,
            "dtype": dtype,
            "kernel": k,
            "xla_s": tj,
            "torch_s": tt,
            "xla_gflops": gj,
            "torch_gflops": gt,
          }
        )
        cells = [
          f"{tj * 1e3:.2f}" if tj else "-",
          f"{tt * 1e3:.2f}" if tt else "-",
          f"{gj:.0f}" if gj else "-",
          f"{gt:.0f}" if gt else "-",
          f"{tt / tj:.2f}" if tj and tt else "-",
        ]
        print(f"| {name} | {n} | {hw}x{hw} | {cin}->{cout} | {dtype} | {k} | " + " | ".join(cells) + " |")
  if args.json:
    with open(args.json, "w") as fh:
      json.dump(
        {
          "command": cmd,
          "machine": platform.processor(),
          "rows": rows,
          "children": {f"{k[0]}:{k[1]}": v for k, v in runs.items()},
        },
        fh,
        indent=1,
      )
  return 0


if __name__ == "__main__":
  sys.exit(main())
