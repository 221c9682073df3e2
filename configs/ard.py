"""Train a student with ARD (Goldblum et al., AAAI 2020; docs/methods.md §7.5).

Recipe of the official code (goldblum/AdversariallyRobustDistillation main.py): SGD lr 0.1, momentum 0.9,
200 epochs, lr ×0.1 at epochs 100 and 150, weight decay 2e-4, batch 128 on CIFAR-10 and 256 on CIFAR-100.  The
code's schedule actually stays at 0.01 after epoch 150 (its ``adjust_learning_rate``): ``faithful_lr`` runs that
one.

Usage: ``python main.py --config=configs/ard.py:dataset=cifar10,teachers=runs/t1 --workdir=runs/ard``.
Arguments: those of every method config (configs/common.py: dataset, student, teachers, epochs, small,
faithful_lr, source_dir).  Every field can then be overridden, e.g. ``--config.optim.lr=0.05``.
"""

from configs import common


def get_config(arg=None):
  c, a = common.student_config("ard", arg)
  c.optim.name, c.optim.lr, c.optim.momentum = "sgd", 0.1, 0.9
  c.num_epochs = 200
  c.optim.schedule = "piecewise"  # faithful_lr: 'ard_faithful', the schedule the code runs
  c.optim.boundaries = (100, 150)
  c.optim.weight_decay = 2e-4
  c.batch_size = 256 if a.dataset == "cifar100" else 128
  return common.fit_recipe(c, a)
