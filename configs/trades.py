"""Train a student with `trades` (see docs/methods.md §7.3 for the formulas and conventions).

Usage: ``python main.py --config=configs/trades.py:dataset=cifar10 --workdir=runs/trades``.
Arguments: as every method config (dataset, student, epochs, small, faithful_lr, source_dir), plus ``faithful``:
the official TRADES CIFAR-10 script's recipe instead of the default (the PGD-AT recipe): 76 epochs with one
×0.1 decay at epoch 75, weight decay 2e-4, ε = 0.031 and PGD step 0.007 (10 steps).
"""
from mdrad_jax import config_lib


def get_config(arg=None):
  parts = [p.strip() for p in (arg or "").split(",") if p.strip()]
  faithful = "faithful" in parts or "faithful=true" in parts
  c = config_lib.distill_config("trades", ",".join(p for p in parts if not p.startswith("faithful") or
                                                   p.startswith("faithful_lr")))
  if faithful:
    epochs = c.num_epochs if "epochs=" in (arg or "") else 76
    c.num_epochs = epochs
    c.optim.schedule = "piecewise"
    c.optim.boundaries = (round(75 * epochs / 76, 3),)
    c.optim.weight_decay = 2e-4
    c.attack.eps = 0.031
    c.attack.step_size = 0.007
    c.attack.num_steps = 10
  return c
