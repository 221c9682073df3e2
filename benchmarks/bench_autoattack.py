#!/usr/bin/env python
"""Times the library's AutoAttack against the reference implementation on the same model, points and CPU.

    .venv/bin/python benchmarks/bench_autoattack.py --checkpoint runs/pgd_at_digits --num-examples 355
    .venv/bin/python benchmarks/bench_autoattack.py --model tiny_cnn --image-size 8 --channels 1 \
        --num-examples 8 --overrides 'apgd-ce.n_iter=2,apgd-t.n_iter=2,fab-t.n_iter=2,square.n_queries=5'  # tiny

The reference is ``pyautoattack`` 0.2.0 (the packaging of fra31/auto-attack, ``version='standard'``), run on a
PyTorch copy of the network: the same architecture from ``benchmarks/torch_reference.py`` with the JAX
weights copied in (HWIO kernels to OIHW, NHWC images to NCHW).  The logits of both networks are compared on
the points before anything is timed.  Both sides run the standard ensemble (APGD-CE, APGD-T, FAB-T, Square)
with the same parameters and batch size; ``--overrides`` (the evaluation job's syntax) changes them on both.

Per repeat, the two implementations run one after the other (the order alternates between repeats), so their
ratio comes from the same invocation and the same machine load; the load average is recorded before and after
each run.  The library's first run includes its compilations (reported separately, with the in-process cache
of compiled attacks cleared first); later runs reuse them.  Per-point outcomes (robust or not after the whole
ensemble) are compared: the algorithms are the same but the random draws (APGD's start, Square's squares) are
not, so a few points near the boundary may differ; their number is reported.  Every repeat uses the same
seed, so the library's later repeats find every batch size compiled.

Needs the benchmark extras (``pip install -e '.[bench]'``: torch 2.13.0 and pyautoattack 0.2.0, which declares no
dependencies of its own); ``--reference off`` runs the library alone without them.  Without a checkpoint (``--model``) the network has
random weights and the images are random: enough to exercise the code, not a robustness measurement.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import re
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, REPO)
sys.path.insert(0, HERE)

from mdrad_jax import runtime  # noqa: E402

runtime.configure_xla()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from mdrad_jax import autoattack as aa  # noqa: E402
from mdrad_jax import evaluation  # noqa: E402
from mdrad_jax import models as models_lib  # noqa: E402
from mdrad_jax.errors import UserError  # noqa: E402

REFERENCE = "pyautoattack"
# the reference's names for the stages it reports
STAGES = ("apgd-ce", "apgd-t", "fab-t", "square")


def load_average() -> list[float]:
  return [round(v, 2) for v in os.getloadavg()]


# ---------------------------------------------------------------------------------------------
# The network on both sides.
# ---------------------------------------------------------------------------------------------
def torch_copy(model_name: str, model_kwargs: dict, variables, num_classes: int, image_shape):
  """The PyTorch version of a Flax network with the same weights (eval mode), taking NCHW images."""
  import torch
  import torch_reference as tr

  supported = ("tiny_cnn", "small_cnn")
  if model_name not in supported:  # the library side alone runs any model (--reference off)
    raise UserError(f"--model/--checkpoint: the weight copy to PyTorch knows {supported}, got {model_name!r}")
  if model_kwargs.get("mean") is not None or model_kwargs.get("dtype", "float32") != "float32":
    raise UserError("the weight copy to PyTorch supports float32 networks without in-model normalisation")
  net = tr.build_model(model_name, model_kwargs, num_classes, image_shape)
  params = variables["params"]
  stats = variables.get("batch_stats", {})
  if model_name == "tiny_cnn":
    names = [(f"conv{i + 1}", f"bn{i + 1}") for i in range(len([k for k in params if k.startswith("conv")]))]
  else:
    convs = sorted((k for k in params if k.startswith("conv")), key=lambda k: tuple(map(int, k[4:].split("_"))))
    names = [(c, "bn" + c[4:]) for c in convs]
  torch_convs = [m for m in net.features if isinstance(m, torch.nn.Conv2d)]
  torch_bns = [m for m in net.features if isinstance(m, torch.nn.BatchNorm2d)]
  if len(torch_convs) != len(names):
    raise ValueError(f"{len(names)} JAX convolutions against {len(torch_convs)} in the PyTorch copy")
  t = lambda a: torch.from_numpy(np.array(a, np.float32))
  with torch.no_grad():
    for (c, b), tc, tb in zip(names, torch_convs, torch_bns):
      tc.weight.copy_(t(params[c]["kernel"]).permute(3, 2, 0, 1))
      tb.weight.copy_(t(params[b]["scale"]))
      tb.bias.copy_(t(params[b]["bias"]))
      tb.running_mean.copy_(t(stats[b]["mean"]))
      tb.running_var.copy_(t(stats[b]["var"]))
    net.linear.weight.copy_(t(params["linear"]["kernel"]).T)
    net.linear.bias.copy_(t(params["linear"]["bias"]))
  return net.eval()


def build_networks(args):
  """(Flax module, variables, images NHWC, labels, eps, description) from a checkpoint or random weights."""
  from mdrad_jax import data as data_lib
  from mdrad_jax import runs

  if args.checkpoint:
    trained = runs.load_trained(args.checkpoint, "best", what="--checkpoint")
    model, variables, run_cfg, step = trained.module, trained.variables, trained.run_config, trained.step
    dataset = run_cfg["data"]["name"]
    info = data_lib.dataset_info(dataset)
    x, y = data_lib.load_arrays(dataset, info.test_split, num_examples=args.num_examples)
    eps = args.eps or float(run_cfg["attack"]["eps"])
    desc = dict(
      checkpoint=os.path.abspath(args.checkpoint),
      step=step,
      dataset=dataset,
      split=info.test_split,
      model=run_cfg["model"],
    )
    return model, variables, dict(run_cfg["model"].get("kwargs", {}) or {}), info.num_classes, x, y, eps, desc
  shape = (args.image_size, args.image_size, args.channels)
  model = models_lib.get_model(args.model, num_classes=args.num_classes)
  variables = models_lib.init_model(model, jax.random.key(args.seed), shape)
  rng = np.random.default_rng(args.seed)
  x = rng.uniform(0, 1, (args.num_examples,) + shape).astype(np.float32)
  logits = np.asarray(model.apply(variables, jnp.asarray(x), train=False))
  y = np.argmax(logits, 1).astype(np.int32)  # every point correct: the attacks have work to do
  desc = dict(random_weights=True, model=dict(name=args.model), image_shape=list(shape))
  return model, variables, {}, args.num_classes, x, y, args.eps or 0.1, desc


# ---------------------------------------------------------------------------------------------
# The two runs.
# ---------------------------------------------------------------------------------------------
def load_module(path: str):
  """Another version of ``mdrad_jax/autoattack.py`` (e.g. ``git show REV:mdrad_jax/autoattack.py > old.py``)."""
  import importlib.util

  spec = importlib.util.spec_from_file_location("autoattack_other", path)
  mod = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = mod
  spec.loader.exec_module(mod)
  return mod


def run_library(logits_fn, x, y, *, eps, batch_size, overrides, seed, module=aa):
  t0 = time.perf_counter()
  res = module.autoattack(
    logits_fn, x, y, eps=eps, version="standard", seed=seed, batch_size=batch_size, progress=False, overrides=overrides
  )
  total = time.perf_counter() - t0
  return dict(
    seconds=total,
    stage_seconds=dict(getattr(res, "seconds", {})),
    robust=res.robust.copy(),
    robust_after=dict(res.robust_after),
    attacked=dict(res.attacked),
    broken_by=res.broken_by.copy(),
    x_adv_rows=res.x_adv.reshape(len(res.x_adv), -1),
  )


class _StageLog(logging.Handler):
  """Collects the reference's 'robust accuracy after X: ... (total time T s)' lines."""

  def __init__(self):
    super().__init__(logging.DEBUG)
    self.cumulative = {}

  def emit(self, record):
    m = re.match(r"robust accuracy after ([A-Z-]+): .*\(total time ([0-9.]+) s\)", record.getMessage())
    if m:
      self.cumulative[m.group(1).lower()] = float(m.group(2))


def run_reference(net, x, y, *, eps, batch_size, overrides, seed, device="cpu"):
  import torch
  from pyautoattack import AutoAttack

  adversary = AutoAttack(net, norm="Linf", eps=eps, version="standard", device=device, seed=seed)
  for name, upd in overrides.items():
    attack = {
      "apgd-ce": adversary.apgd,
      "apgd-t": adversary.apgd_targeted,
      "fab-t": adversary.fab,
      "square": adversary.square,
    }[name]
    for k, v in upd.items():
      setattr(attack, k, v)
  handler = _StageLog()
  logger = logging.getLogger("auto-attack")
  logger.addHandler(handler)
  logger.setLevel(logging.DEBUG)
  logger.propagate = False
  xt = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
  yt = torch.from_numpy(y.astype(np.int64))
  try:
    t0 = time.perf_counter()
    _, y_adv = adversary.run_standard_evaluation(xt, yt, batch_size=batch_size)
    if device != "cpu":
      torch.cuda.synchronize()
    total = time.perf_counter() - t0
  finally:
    logger.removeHandler(handler)
  cum = [handler.cumulative.get(s) for s in STAGES]
  stage = {}
  prev = 0.0
  for s, c in zip(STAGES, cum):
    if c is not None:
      stage[s] = c - prev
      prev = c
  robust = y_adv.cpu().numpy() == y
  return dict(seconds=total, stage_seconds=stage, robust=robust)


def _parse_overrides(text: str) -> dict:
  from mdrad_jax import evaluation_job

  return evaluation_job.parse_overrides(text)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(
    description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
  )
  p.add_argument("--checkpoint", default="", help="a training workdir (tiny_cnn or small_cnn)")
  p.add_argument("--model", default="tiny_cnn", help="without --checkpoint: random weights of this model")
  p.add_argument("--image-size", type=int, default=8)
  p.add_argument("--channels", type=int, default=1)
  p.add_argument("--num-classes", type=int, default=10)
  p.add_argument("--num-examples", type=int, default=355)
  p.add_argument(
    "--eps",
    type=float,
    default=0.0,
    help="0 = the trained run's (0.1 with random weights); a tiny eps (1e-4) breaks no point, so "
    "every attack runs all its iterations: the cost of points that stay robust",
  )
  p.add_argument("--batch-size", type=int, default=500)
  p.add_argument("--repeats", type=int, default=1)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--overrides", default="", help="e.g. 'square.n_queries=1000' (both implementations)")
  p.add_argument("--reference", choices=("on", "off"), default="on")
  p.add_argument(
    "--against-module",
    default="",
    help="instead of the reference: another version of mdrad_jax/autoattack.py (a file), to time a "
    "change; per-point outcomes (broken_by) and bit-identical x_adv rows are compared",
  )
  p.add_argument(
    "--torch-threads", type=int, default=0, help="torch.set_num_threads (0 = one per core this process may run on)"
  )
  p.add_argument("--json", default="")
  args = p.parse_args(argv)

  model, variables, kwargs, num_classes, x, y, eps, desc = build_networks(args)
  x = np.asarray(x, np.float32)
  y = np.asarray(y, np.int32)
  logits_fn = evaluation.logits_fn_from_model(model, variables)
  overrides = _parse_overrides(args.overrides)
  print(f"command: {' '.join(sys.argv)}")
  print(
    f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs "
    f"({len(os.sched_getaffinity(0))} usable by this process), JAX on "
    f"{jax.devices()[0].platform}; jax {jax.__version__}; {len(y)} points, eps {eps:.5g}, "
    f"batch {args.batch_size}"
  )
  versions = dict(jax=jax.__version__, python=platform.python_version())
  logit_diff = None
  other = load_module(args.against_module) if args.against_module else None
  if other is not None:
    args.reference = "off"
  if args.reference == "on":
    import torch

    torch.set_num_threads(args.torch_threads or len(os.sched_getaffinity(0)))
    versions["torch"] = torch.__version__
    device = "cuda" if torch.cuda.is_available() else "cpu"
    net = torch_copy(desc["model"]["name"], kwargs, variables, num_classes, x.shape[1:]).to(device)
    with torch.no_grad():
      zt = net(torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))).to(device)).cpu().numpy()
    zj = np.asarray(jax.jit(logits_fn)(jnp.asarray(x)))
    logit_diff = float(np.max(np.abs(zt - zj)))
    same_pred = int(np.sum(np.argmax(zt, 1) == np.argmax(zj, 1)))
    print(
      f"PyTorch copy: torch {torch.__version__} ({torch.get_num_threads()} threads), max |logit difference| "
      f"{logit_diff:.2e}, same prediction on {same_pred}/{len(y)} points"
    )
    if same_pred != len(y) or logit_diff > 1e-3 * max(1.0, float(np.max(np.abs(zj)))):
      raise ValueError(f"the PyTorch copy does not compute the JAX network (max logit difference {logit_diff})")

  runs = []
  for r in range(args.repeats):
    order = ["library", "reference"] if r % 2 == 0 else ["reference", "library"]
    if other is not None:
      order = ["library", "other"] if r % 2 == 0 else ["other", "library"]
    elif args.reference == "off":
      order = ["library"]
    for impl in order:
      if impl in ("library", "other") and r == 0:  # the first run compiles
        mod = aa if impl == "library" else other
        mod._cached_kernel.cache_clear()
        mod._predict_kernel.cache_clear()
      before = load_average()
      if impl in ("library", "other"):
        out = run_library(
          logits_fn,
          x,
          y,
          eps=eps,
          batch_size=args.batch_size,
          overrides=overrides,
          seed=args.seed,
          module=aa if impl == "library" else other,
        )
      else:
        out = run_reference(
          net, x, y, eps=eps, batch_size=args.batch_size, overrides=overrides, seed=args.seed, device=device
        )
      out.update(
        attacked=out.get("attacked", {}),
        impl=impl,
        repeat=r,
        load_before=before,
        load_after=load_average(),
        includes_compile=(impl in ("library", "other") and r == 0),
      )
      runs.append(out)
      stages = ", ".join(f"{k} {v:.1f}" for k, v in out["stage_seconds"].items())
      print(
        f"repeat {r} {impl:9s}: {out['seconds']:8.1f} s  robust {int(out['robust'].sum())}/{len(y)}  "
        f"[{stages}]  load {before} -> {out['load_after']}",
        flush=True,
      )

  summary = {}
  lib = [u for u in runs if u["impl"] == "library"]
  ref = [u for u in runs if u["impl"] == "reference"]
  oth = [u for u in runs if u["impl"] == "other"]
  if oth:
    ratios = [b["seconds"] / a["seconds"] for a, b in zip(lib, oth)]
    same = [int(np.sum(a["broken_by"] == b["broken_by"])) for a, b in zip(lib, oth)]
    bits = [int(np.sum(np.all(a["x_adv_rows"] == b["x_adv_rows"], axis=1))) for a, b in zip(lib, oth)]
    summary = dict(ratio_other_over_library=ratios, same_broken_by=same, bit_identical_x_adv_rows=bits, n=len(y))
    print(f"other version time / library time per repeat: {', '.join(f'{v:.2f}' for v in ratios)}")
    print(
      f"same broken_by: {', '.join(f'{v}/{len(y)}' for v in same)}; bit-identical x_adv rows: "
      f"{', '.join(f'{v}/{len(y)}' for v in bits)}"
    )
  if ref:
    ratios = [b["seconds"] / a["seconds"] for a, b in zip(lib, ref)]
    warm = [b["seconds"] / a["seconds"] for a, b in zip(lib, ref) if not a["includes_compile"]]
    agree = [int(np.sum(a["robust"] == b["robust"])) for a, b in zip(lib, ref)]
    summary = dict(
      ratio_reference_over_library=ratios,
      ratio_median=statistics.median(ratios),
      ratio_without_compile_median=statistics.median(warm) if warm else None,
      same_outcome_points=agree,
      n=len(y),
    )
    print(
      f"reference time / library time per repeat: {', '.join(f'{v:.2f}' for v in ratios)} "
      f"(first includes the library's compilation)"
    )
    print(f"same per-point outcome: {', '.join(f'{v}/{len(y)}' for v in agree)}")
  if args.json:
    out = dict(
      command=sys.argv,
      description=desc,
      eps=eps,
      batch_size=args.batch_size,
      overrides=overrides,
      logit_max_diff=logit_diff,
      versions=versions,
      platform=jax.devices()[0].platform,
      runs=[
        {
          **{k: v for k, v in u.items() if k != "x_adv_rows"},
          "robust": u["robust"].astype(int).tolist(),
          **({"broken_by": u["broken_by"].tolist()} if "broken_by" in u else {}),
        }
        for u in runs
      ],
      summary=summary,
    )
    with open(args.json, "w") as f:
      json.dump(out, f, indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(main())
