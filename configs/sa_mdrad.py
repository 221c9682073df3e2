"""Train a student with SA-MDRAD from several standard teachers (docs/methods.md §6).

Recipe: INFERRED (no official code): the AdaAD / IAD / ARD schedule with AdaAD's weight decay -- SGD lr 0.1,
momentum 0.9, 200 epochs, lr ×0.1 at epochs 100 and 150, weight decay 5e-4, batch 128.

Usage: ``python main.py --config=configs/sa_mdrad.py:dataset=cifar10,teachers=runs/t1+runs/t2+runs/t3 --workdir=runs/sa_mdrad``.
Arguments: those of every method config (configs/common.py: dataset, student, teachers, epochs, small,
faithful_lr, source_dir).  Every field can then be overridden, e.g. ``--config.optim.lr=0.05``.
"""

from configs import common


def get_config(arg=None):
  c, a = common.student_config("sa_mdrad", arg)
  c.optim.name, c.optim.lr, c.optim.momentum = "sgd", 0.1, 0.9
  c.num_epochs = 200
  c.optim.schedule = "piecewise"
  c.optim.boundaries = (100, 150)
  c.optim.weight_decay = 5e-4
  c.batch_size = 128
  return common.fit_recipe(c, a)
