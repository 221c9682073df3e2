"""Per-layer convolution kernels: XLA (through JAX) against PyTorch eager (oneDNN) on the same shapes.

The train step's time is mostly 3x3 convolutions: their forward and their gradient with respect to the input
(every attack step), plus the weight gradient (the outer step).  This script times those three kernels alone,
for the stride-1 3x3 layers of the benchmarked students (``small_cnn`` at batch 128, CIFAR ResNet-18 at batch
32; ``--layer-set dense``, the default) and for the 3x3 depthwise layers of the CIFAR MobileNetV2 teacher at
batch 32 and 128 (``--layer-set depthwise``), in float32 and bfloat16, so that a gap in
``bench_train_step.py`` can be traced to the kernel that causes it.

Depthwise layers run in XLA with each lowering of ``--depthwise`` (``conv``: the grouped convolution the models
use by default; ``shifted``: ``mdrad_jax.models.depthwise_conv_shifted``, nine shifted elementwise products),
and a per-network total (each layer's time times the number of times MobileNetV2 has it) is printed per batch.

Each framework (and lowering) runs in its own child process (their thread pools never share the cores).  Per
layer and kernel: the median of ``--reps`` timed calls after ``--warmup`` calls, and GFLOP/s =
2 * N*Ho*Wo*Cout*(Cin/groups)*9 / time (the textbook count, the same for both).

  .venv/bin/python benchmarks/bench_conv.py --json benchmarks/results/conv_kernels.json
  .venv/bin/python benchmarks/bench_conv.py --layer-set depthwise --depthwise conv,shifted \
      --json benchmarks/results/conv_depthwise.json
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
from typing import NamedTuple

HERE = os.path.dirname(os.path.abspath(__file__))


class Layer(NamedTuple):
  """A 3x3 convolution with padding 1 (the models' PyTorch-style padding): ``groups == cin == cout`` is a
  depthwise one; ``count``: how many layers of that shape the network has (for per-network totals)."""

  name: str
  batch: int
  hw: int  # input height = width
  cin: int
  cout: int
  stride: int = 1
  groups: int = 1
  count: int = 1
  network: str = ""

  @property
  def out_hw(self) -> int:
    return (self.hw + 2 - 3) // self.stride + 1

  @property
  def depthwise(self) -> bool:
    return self.groups > 1 and self.groups == self.cin == self.cout


# The stride-1 3x3 convolutions of the students.
DENSE_LAYERS = (
  Layer("small_cnn conv1", 128, 32, 3, 32),
  Layer("small_cnn conv2", 128, 16, 32, 64),
  Layer("small_cnn conv3", 128, 8, 64, 128),
  Layer("resnet18 stem", 32, 32, 3, 64),
  Layer("resnet18 stage1", 32, 32, 64, 64),
  Layer("resnet18 stage2", 32, 16, 128, 128),
  Layer("resnet18 stage3", 32, 8, 256, 256),
  Layer("resnet18 stage4", 32, 4, 512, 512),
)
LAYERS = DENSE_LAYERS  # the default set

# The 3x3 depthwise convolutions of the CIFAR MobileNetV2 (``mdrad_jax.models.MobileNetV2``, 32x32 inputs):
# (input size, channels = expansion x block input channels, stride, how many blocks have it), block by block
# from MOBILENETV2_CIFAR_CFG; tests/test_benchmark_smoke.py checks the list against the model.
MOBILENETV2_DEPTHWISE = (
  (32, 32, 1, 1),  # stage 1 (expansion 1)
  (32, 96, 1, 1),  # stage 2, block 1
  (32, 144, 1, 1),  # stage 2, block 2
  (32, 144, 2, 1),  # stage 3, block 1
  (16, 192, 1, 2),  # stage 3, blocks 2-3
  (16, 192, 2, 1),  # stage 4, block 1
  (8, 384, 1, 4),  # stage 4, blocks 2-4, and stage 5, block 1
  (8, 576, 1, 2),  # stage 5, blocks 2-3
  (8, 576, 2, 1),  # stage 6, block 1
  (4, 960, 1, 3),  # stage 6, blocks 2-3, and stage 7
)
DEPTHWISE_LAYERS = tuple(
  Layer(f"mobilenet_v2 dw {hw}x{hw} c{c} s{s} b{n}", n, hw, c, c, s, c, count, "mobilenet_v2")
  for n in (32, 128)
  for hw, c, s, count in MOBILENETV2_DEPTHWISE
)
LAYER_SETS = {"dense": DENSE_LAYERS, "depthwise": DEPTHWISE_LAYERS, "all": DENSE_LAYERS + DEPTHWISE_LAYERS}
KERNELS = ("forward", "input_grad", "weight_grad")
DEPTHWISE_IMPLS = ("conv", "shifted")  # mdrad_jax.models.DEPTHWISE_IMPLS (not imported: the parent starts no JAX)


def flops(layer: Layer) -> float:
  o = layer.out_hw
  return 2.0 * layer.batch * o * o * layer.cout * (layer.cin // layer.groups) * 9


def _time(fn, warmup, reps) -> float:
  for _ in range(warmup):
    fn()
  ts = []
  for _ in range(reps):
    t = time.perf_counter()
    fn()
    ts.append(time.perf_counter() - t)
  return statistics.median(ts)


def _layers(names: str, layer_set: str = "dense"):
  if not names:
    return LAYER_SETS[layer_set]
  wanted = [n.strip() for n in names.split(",")]
  known = {layer.name for layer in LAYER_SETS["all"]}
  bad = [n for n in wanted if n not in known]
  if bad:
    raise SystemExit(f"error: unknown layer(s) {bad}; known: {sorted(known)}")
  return tuple(layer for layer in LAYER_SETS["all"] if layer.name in wanted)


def child_jax(dtype: str, warmup: int, reps: int, layers, depthwise: str = "conv") -> dict:
  """XLA's kernels; with ``depthwise='shifted'`` only the depthwise layers, in the shifted lowering."""
  sys.path.insert(0, os.path.dirname(HERE))
  from mdrad_jax import xla_flags

  xla_flags.apply_defaults()  # the library's defaults, as in the train step
  import jax
  import jax.numpy as jnp
  import numpy as np
  from mdrad_jax import models

  dt = jnp.dtype(dtype)
  out = {}
  rng = np.random.default_rng(0)
  pad = ((1, 1), (1, 1))

  for layer in layers:
    if depthwise != "conv" and not layer.depthwise:
      continue
    s = (layer.stride, layer.stride)
    if depthwise == "shifted":

      def conv(x, w, s=s):
        return models.depthwise_conv_shifted(x, w, s, pad)

    else:

      def conv(x, w, s=s, g=layer.groups):
        return jax.lax.conv_general_dilated(
          x, w, s, pad, dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=g
        )

    n, hw, o = layer.batch, layer.hw, layer.out_hw
    x = jnp.asarray(rng.uniform(0, 1, (n, hw, hw, layer.cin)), dt)
    w = jnp.asarray(rng.standard_normal((3, 3, layer.cin // layer.groups, layer.cout)) * 0.1, dt)
    g = jnp.asarray(rng.standard_normal((n, o, o, layer.cout)), dt)
    fwd = jax.jit(conv)
    dx = jax.jit(lambda w, g, x=x, conv=conv: jax.vjp(lambda xx: conv(xx, w), x)[1](g)[0])
    dw = jax.jit(lambda x, g, w=w, conv=conv: jax.vjp(lambda ww: conv(x, ww), w)[1](g)[0])
    res = {}
    for k, f, args in (("forward", fwd, (x, w)), ("input_grad", dx, (w, g)), ("weight_grad", dw, (x, g))):
      c = f.lower(*args).compile()
      res[k] = _time(lambda c=c, args=args: jax.block_until_ready(c(*args)), warmup, reps)
    out[layer.name] = res
  return {
    "framework": "jax",
    "version": jax.__version__,
    "flags": os.environ.get("XLA_FLAGS", ""),
    "depthwise": depthwise,
    "results": out,
  }


def child_torch(dtype: str, warmup: int, reps: int, channels_last: bool, layers) -> dict:
  import torch

  dt = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
  torch.manual_seed(0)
  out = {}
  fmt = torch.channels_last if channels_last else torch.contiguous_format
  F = torch.nn.functional
  with torch.no_grad():
    for layer in layers:
      n, hw, o, s, gr = layer.batch, layer.hw, layer.out_hw, layer.stride, layer.groups
      x = torch.rand(n, layer.cin, hw, hw, dtype=dt).contiguous(memory_format=fmt)
      w = (torch.randn(layer.cout, layer.cin // gr, 3, 3) * 0.1).to(dt).contiguous(memory_format=fmt)
      g = torch.randn(n, layer.cout, o, o, dtype=dt).contiguous(memory_format=fmt)
      kw = dict(stride=s, padding=1, groups=gr)
      res = {
        "forward": _time(lambda: F.conv2d(x, w, **kw), warmup, reps),
        "input_grad": _time(lambda: torch.nn.grad.conv2d_input(x.shape, w, g, **kw), warmup, reps),
        "weight_grad": _time(lambda: torch.nn.grad.conv2d_weight(x, w.shape, g, **kw), warmup, reps),
      }
      out[layer.name] = res
  return {
    "framework": "torch",
    "version": torch.__version__,
    "threads": torch.get_num_threads(),
    "channels_last": channels_last,
    "results": out,
  }


def _print_head(cols, left):
  """A markdown table head: the first ``left`` columns left-aligned, the others (numbers) right-aligned."""
  print("| " + " | ".join(cols) + " |")
  print("|" + "---|" * left + "---:|" * (len(cols) - left))


def _ms(t):
  return f"{t * 1e3:.2f}" if t else "-"


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--dtypes", default="float32,bfloat16")
  p.add_argument("--warmup", type=int, default=3)
  p.add_argument("--reps", type=int, default=15)
  p.add_argument(
    "--layer-set",
    choices=sorted(LAYER_SETS),
    default="dense",
    help="dense: the students' 3x3 layers; depthwise: MobileNetV2's depthwise layers at batch 32 and 128; all",
  )
  p.add_argument("--layers", default="", help="comma-separated layer names (any set; default: all of --layer-set)")
  p.add_argument("--frameworks", default="jax,torch", help="jax,torch (torch needs the bench extra)")
  p.add_argument(
    "--depthwise",
    default="conv",
    help="XLA lowerings of the depthwise layers, comma-separated: conv (always run), shifted",
  )
  p.add_argument("--torch-channels-last", action="store_true")
  p.add_argument("--json", default="")
  p.add_argument("--child", default="", help=argparse.SUPPRESS)
  p.add_argument("--dtype", default="float32", help=argparse.SUPPRESS)
  p.add_argument("--child-depthwise", default="conv", help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  layers = _layers(args.layers, args.layer_set)
  if args.child:
    res = (
      child_jax(args.dtype, args.warmup, args.reps, layers, args.child_depthwise)
      if args.child == "jax"
      else child_torch(args.dtype, args.warmup, args.reps, args.torch_channels_last, layers)
    )
    print(json.dumps(res))
    return 0

  cmd = " ".join([os.path.relpath(sys.executable), os.path.relpath(__file__), *sys.argv[1:]])
  print(f"command: {cmd}")
  print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; {platform.platform()}")
  print(f"load average at start: {[round(v, 2) for v in os.getloadavg()]}")
  frameworks = [f for f in args.frameworks.split(",") if f]
  if not set(frameworks) <= {"jax", "torch"} or not frameworks:
    print(f"error: --frameworks takes jax and/or torch, got {args.frameworks!r}", file=sys.stderr)
    return 2
  impls = ["conv"] + [d for d in dict.fromkeys(x.strip() for x in args.depthwise.split(",")) if d and d != "conv"]
  if not set(impls) <= set(DEPTHWISE_IMPLS):
    print(f"error: --depthwise takes {','.join(DEPTHWISE_IMPLS)}, got {args.depthwise!r}", file=sys.stderr)
    return 2
  if not any(layer.depthwise for layer in layers):
    impls = ["conv"]  # no depthwise layer: the other lowerings have nothing to run
  dtypes = args.dtypes.split(",")
  runs = {}
  loads = {}
  for dtype in dtypes:
    for fw in frameworks:
      for impl in impls if fw == "jax" else [""]:
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
          "--layer-set",
          args.layer_set,
          "--layers",
          args.layers,
          "--child-depthwise",
          impl or "conv",
        ] + (["--torch-channels-last"] if args.torch_channels_last else [])
        before = [round(v, 2) for v in os.getloadavg()]
        proc = subprocess.run(c, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        loads[f"{fw}:{dtype}:{impl}"] = [before, [round(v, 2) for v in os.getloadavg()]]
        if proc.returncode != 0:
          print(f"error: {fw} {impl} {dtype} child failed: {proc.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
          return 1
        runs[(fw, dtype, impl)] = json.loads(proc.stdout.strip().splitlines()[-1])
  print(f"load average at end: {[round(v, 2) for v in os.getloadavg()]}")
  print("versions: " + ", ".join(sorted({f"{k[0]} {v['version']}" for k, v in runs.items()})))
  print()

  def xla_time(layer, dtype, impl, k):
    res = runs.get(("jax", dtype, impl))
    return (res["results"].get(layer.name) or {}).get(k) if res else None

  def torch_time(layer, dtype, k):
    res = runs.get(("torch", dtype, ""))
    return res["results"][layer.name][k] if res else None

  alt = impls[1:]
  head = (
    ["layer", "N", "HxW", "Cin->Cout", "stride", "groups", "dtype", "kernel", "XLA ms"]
    + [f"XLA {i} ms" for i in alt]
    + ["torch ms", "XLA GFLOP/s", "torch GFLOP/s", "torch time / XLA time"]
    + [f"torch time / XLA {i} time" for i in alt]
  )
  _print_head(head, left=8)
  rows = []
  for dtype in dtypes:
    for layer in layers:
      f = flops(layer)
      for k in KERNELS:
        by_impl = {i: xla_time(layer, dtype, i, k) for i in impls}
        tj, tt = by_impl["conv"], torch_time(layer, dtype, k)
        gj = f / tj / 1e9 if tj else None
        gt = f / tt / 1e9 if tt else None
        rows.append(
          {
            "layer": layer.name,
            "batch": layer.batch,
            "hw": layer.hw,
            "cin": layer.cin,
            "cout": layer.cout,
            "stride": layer.stride,
            "groups": layer.groups,
            "count": layer.count,
            "network": layer.network,
            "dtype": dtype,
            "kernel": k,
            "flops": f,
            "xla_s": tj,
            "xla_s_by_impl": by_impl,
            "torch_s": tt,
            "xla_gflops": gj,
            "torch_gflops": gt,
          }
        )
        cells = (
          [_ms(tj)]
          + [_ms(by_impl[i]) for i in alt]
          + [_ms(tt), f"{gj:.3g}" if gj else "-", f"{gt:.3g}" if gt else "-"]
          + [f"{tt / t:.2f}" if t and tt else "-" for t in [tj] + [by_impl[i] for i in alt]]
        )
        print(
          f"| {layer.name} | {layer.batch} | {layer.hw}x{layer.hw} | {layer.cin}->{layer.cout} | {layer.stride} | "
          f"{layer.groups} | {dtype} | {k} | " + " | ".join(cells) + " |"
        )

  totals = network_totals(rows, impls)
  if totals:
    print()
    print("Depthwise layers per network (each layer's time x the number of layers of that shape):")
    print()
    head = (
      ["network", "N", "dtype", "kernel", "layers", "XLA ms"]
      + [f"XLA {i} ms" for i in alt]
      + ["torch ms", "torch time / XLA time"]
      + [f"torch time / XLA {i} time" for i in alt]
    )
    _print_head(head, left=4)
    for t in totals:
      xs = [t["xla_s_by_impl"][i] for i in impls]
      cells = (
        [_ms(x) for x in xs]
        + [_ms(t["torch_s"])]
        + [f"{t['torch_s'] / x:.2f}" if x and t["torch_s"] else "-" for x in xs]
      )
      print(
        f"| {t['network']} | {t['batch']} | {t['dtype']} | {t['kernel']} | {t['layers']} | " + " | ".join(cells) + " |"
      )
  if args.json:
    with open(args.json, "w") as fh:
      json.dump(
        {
          "command": cmd,
          "machine": platform.processor(),
          "depthwise_impls": impls,
          "rows": rows,
          "network_totals": totals,
          "load_average": loads,
          "children": {f"{k[0]}:{k[1]}" + (f":{k[2]}" if k[2] else ""): v for k, v in runs.items()},
        },
        fh,
        indent=1,
      )
  return 0


def network_totals(rows, impls) -> list[dict]:
  """Per (network, batch, dtype, kernel): the sum over its depthwise layers of count x time, for every XLA
  lowering and torch (None where a layer has no time)."""
  groups: dict = {}
  for r in rows:
    if not r["network"]:
      continue
    groups.setdefault((r["network"], r["batch"], r["dtype"], r["kernel"]), []).append(r)

  def total(rs, get):
    vals = [get(r) for r in rs]
    return None if any(v is None for v in vals) else sum(r["count"] * v for r, v in zip(rs, vals))

  return [
    {
      "network": net,
      "batch": n,
      "dtype": dtype,
      "kernel": k,
      "layers": sum(r["count"] for r in rs),
      "xla_s_by_impl": {i: total(rs, lambda r, i=i: r["xla_s_by_impl"][i]) for i in impls},
      "torch_s": total(rs, lambda r: r["torch_s"]),
    }
    for (net, n, dtype, k), rs in groups.items()
  ]


if __name__ == "__main__":
  sys.exit(main())
