"""Train a model with PGD-AT (Madry et al.; docs/methods.md §7.2): the adversarial-training floor.

Recipe of the AdaAD code's ``Plain_Madry`` baseline (its "early stopping" schedule): SGD lr 0.1, momentum 0.9,
110 epochs, lr ×0.1 at epochs 100 and 105, weight decay 5e-4, batch 128.  No teachers.

Usage: ``python main.py --config=configs/pgd_at.py:dataset=cifar10 --workdir=runs/pgd_at``.
Arguments: those of every method config (configs/common.py: dataset, student, teachers, epochs, small,
faithful_lr, source_dir).  Every field can then be overridden, e.g. ``--config.optim.lr=0.05``.
"""

from configs import common


def get_config(arg=None):
  c, a = common.student_config("pgd_at", arg)
  c.optim.name, c.optim.lr, c.optim.momentum = "sgd", 0.1, 0.9
  c.num_epochs = 110
  c.optim.schedule = "piecewise"
  c.optim.boundaries = (100, 105)
  c.optim.weight_decay = 5e-4
  c.batch_size = 128
  return common.fit_recipe(c, a)
