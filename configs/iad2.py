"""Train a student with IAD-II (Zhu et al., ICLR 2022; docs/methods.md §7.9).

Recipe of the official code (ZFancy/IAD IAD-II.py): SGD lr 0.1, momentum 0.9, 200 epochs, lr ×0.1 at epochs 100
and 150, weight decay 2e-4, batch 128.  The code's schedule actually stays at 0.01 after epoch 150 (the ARD
``adjust_learning_rate`` pattern): ``faithful_lr`` runs that one.

Usage: ``python main.py --config=configs/iad2.py:dataset=cifar10,teachers=runs/t_at+runs/t_st --workdir=runs/iad2``.
Arguments: those of every method config (configs/common.py: dataset, student, teachers, epochs, small,
faithful_lr, source_dir).  Every field can then be overridden, e.g. ``--config.optim.lr=0.05``.
"""

from configs import common


def get_config(arg=None):
  c, a = common.student_config("iad2", arg)
  c.optim.name, c.optim.lr, c.optim.momentum = "sgd", 0.1, 0.9
  c.num_epochs = 200
  c.optim.schedule = "piecewise"  # faithful_lr: 'ard_faithful', the schedule the code runs
  c.optim.boundaries = (100, 150)
  c.optim.weight_decay = 2e-4
  c.batch_size = 128
  return common.fit_recipe(c, a)
