"""Train a model with TRADES (Zhang et al., ICML 2019; docs/methods.md §7.3): a floor.

Recipe: by default the PGD-AT recipe (a choice, so the two floors share a budget): SGD lr 0.1, momentum 0.9,
110 epochs, lr ×0.1 at epochs 100 and 105, weight decay 5e-4, batch 128.  ``faithful``: the official TRADES
CIFAR-10 script's recipe instead -- 76 epochs with one ×0.1 decay at epoch 75, weight decay 2e-4, ε = 0.031 and
PGD step 0.007 (10 steps).  No teachers.

Usage: ``python main.py --config=configs/trades.py:dataset=cifar10 --workdir=runs/trades``.
Arguments: those of every method config (configs/common.py: dataset, student, teachers, epochs, small,
faithful_lr, source_dir), plus ``faithful``.  Every field can then be overridden, e.g. ``--config.optim.lr=0.05``.
"""

from configs import common


def get_config(arg=None):
  c, a = common.student_config("trades", arg, faithful=False)
  c.optim.name, c.optim.lr, c.optim.momentum = "sgd", 0.1, 0.9
  c.batch_size = 128
  if a.faithful:
    c.num_epochs = 76
    c.optim.schedule = "piecewise"
    c.optim.boundaries = (75.0,)
    c.optim.weight_decay = 2e-4
    c.attack.eps = 0.031
    c.attack.step_size = 0.007
    c.attack.num_steps = 10
  else:
    c.num_epochs = 110
    c.optim.schedule = "piecewise"
    c.optim.boundaries = (100, 105)
    c.optim.weight_decay = 5e-4
  return common.fit_recipe(c, a)
