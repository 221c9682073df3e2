"""What the standard AutoAttack costs on N CIFAR-sized points, on paper, for any machine.

Nothing is timed.  The model passes each attack makes per point come from the library's standard parameters
(``autoattack.standard_params``): APGD-CE and APGD-T make one forward + input gradient per iteration and one at
their start, FAB-T one per iteration, Square one forward per query.  The FLOPs of one forward and of one forward +
input gradient come from XLA's cost analysis of the model (eval mode, batch ``--batch``, per image).  The points
each attack runs on follow from the model's accuracies: APGD-CE attacks the clean-correct points (``--clean``),
the three later attacks the points still robust, taken as the final robust accuracy (``--robust``; a lower bound,
since APGD-T, FAB-T and Square also see the points they break).  The worst case runs every attack on every point.

Divide by what a machine sustains to get its time: ``--tflops`` lists sustained TFLOP/s to print hours for
(measure yours with benchmarks/gpu.sh; a peak figure from a data sheet gives a lower bound on the time).

Usage: ``python benchmarks/autoattack_cost.py [--models resnet18,wrn34_10] [--clean 0.85] [--robust 0.55]
[--points 10000] [--tflops 20,100,400]``
"""

from __future__ import annotations

import argparse
import functools
import os
import platform
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from mdrad_jax import autoattack  # noqa: E402
from mdrad_jax import losses  # noqa: E402
from mdrad_jax import models  # noqa: E402


def passes_per_point(n_classes: int) -> dict[str, tuple[str, int]]:
  """Per attack: the kind of pass ('grad' = forward + input gradient, 'fwd') and how many, per attacked point."""
  p = autoattack.standard_params(n_classes)
  ce, t, fab, sq = p["apgd-ce"], p["apgd-t"], p["fab-t"], p["square"]
  return {
    "apgd-ce": ("grad", ce["n_restarts"] * (ce["n_iter"] + 1)),
    "apgd-t": ("grad", t["n_target_classes"] * t["n_restarts"] * (t["n_iter"] + 1)),
    "fab-t": ("grad", fab["n_target_classes"] * fab["n_iter"]),
    "square": ("fwd", sq["n_queries"]),
  }


def _flops(fn, *args) -> float:
  cost = jax.jit(fn).lower(*args).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost["flops"])


def model_flops(name: str, *, num_classes: int, image_shape, batch: int) -> tuple[float, float]:
  """FLOPs per image of one eval-mode forward and of one forward + input gradient of the cross-entropy."""
  model = models.get_model(name, num_classes=num_classes)
  variables = models.init_model(model, jax.random.key(0), image_shape)
  x = jnp.zeros((batch, *image_shape), jnp.float32)
  y = jnp.zeros((batch,), jnp.int32)
  logits = functools.partial(model.apply, train=False)

  def fwd(v, x):
    return logits(v, x)

  def grad(v, x, y):
    return jax.grad(lambda xx: jnp.sum(losses.cross_entropy(logits(v, xx), y)))(x)

  return _flops(fwd, variables, x) / batch, _flops(grad, variables, x, y) / batch


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--models", default="resnet18,wrn34_10")
  ap.add_argument("--clean", type=float, default=0.85, help="clean accuracy of the model (0-1)")
  ap.add_argument("--robust", type=float, default=0.55, help="robust accuracy under AutoAttack (0-1)")
  ap.add_argument("--points", type=int, default=10000)
  ap.add_argument("--num-classes", type=int, default=10)
  ap.add_argument("--image-shape", default="32,32,3")
  ap.add_argument("--batch", type=int, default=8)
  ap.add_argument("--tflops", default="20,100,400", help="sustained TFLOP/s to print hours for")
  a = ap.parse_args(argv)
  if not 0 <= a.robust <= a.clean <= 1:
    ap.error(f"need 0 <= --robust <= --clean <= 1, got robust {a.robust}, clean {a.clean}")
  shape = tuple(int(s) for s in a.image_shape.split(","))
  rates = [float(t) for t in a.tflops.split(",")]
  passes = passes_per_point(a.num_classes)
  share = {"apgd-ce": a.clean, "apgd-t": a.robust, "fab-t": a.robust, "square": a.robust}
  print(f"# Standard AutoAttack on {a.points} points of shape {shape}, {a.num_classes} classes: cost on paper")
  print(f"command: python benchmarks/autoattack_cost.py {' '.join(argv if argv is not None else sys.argv[1:])}")
  print(
    f"FLOPs from XLA's cost analysis (jax {jax.__version__}, {jax.default_backend()}, {platform.machine()}); "
    f"accuracies assumed: clean {a.clean:.2f}, robust {a.robust:.2f}"
  )
  print("passes per attacked point: " + ", ".join(f"{k} {n} x {kind}" for k, (kind, n) in passes.items()))
  print()
  head = ["model", "fwd GFLOP/img", "fwd+grad GFLOP/img", "PFLOP (worst case)", "PFLOP (assumed accuracies)"]
  head += [f"hours at {t:g} TFLOP/s" for t in rates]
  print("| " + " | ".join(head) + " |")
  print("|" + "---|" * len(head))
  for name in [m for m in a.models.split(",") if m]:
    f, g = model_flops(name, num_classes=a.num_classes, image_shape=shape, batch=a.batch)
    per = {"grad": g, "fwd": f}
    worst = a.points * (f + sum(n * per[kind] for kind, n in passes.values()))
    typical = a.points * (f + sum(share[k] * n * per[kind] for k, (kind, n) in passes.items()))
    row = [name, f"{f / 1e9:.3g}", f"{g / 1e9:.3g}", f"{worst / 1e15:.3g}", f"{typical / 1e15:.3g}"]
    row += [f"{typical / (t * 1e12) / 3600:.2g}" for t in rates]
    print("| " + " | ".join(row) + " |")
  return 0


if __name__ == "__main__":
  sys.exit(main())
