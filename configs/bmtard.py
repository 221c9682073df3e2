"""Train a student with B-MTARD (Zhao et al., TPAMI 2024; docs/methods.md §7.11).

Recipe of the official code (zhaoshiji123/MTARD-extension resnet18_mtard_cifar10.py), MTARD's: SGD lr 0.1,
momentum 0.9, 300 epochs, lr ×0.1 at epochs 215, 260 and 285, weight decay 2e-4, batch 128, KL ×10 on CIFAR-100;
the checkpoint kept as best is the one with the highest (clean + PGD) / 2.

Usage: ``python main.py --config=configs/bmtard.py:dataset=cifar10,teachers=runs/t_adv+runs/t_clean --workdir=runs/bmtard``.
Arguments: those of every method config (configs/common.py: dataset, student, teachers, epochs, small,
faithful_lr, source_dir).  Every field can then be overridden, e.g. ``--config.optim.lr=0.05``.
"""

from configs import common


def get_config(arg=None):
  c, a = common.student_config("bmtard", arg)
  c.optim.name, c.optim.lr, c.optim.momentum = "sgd", 0.1, 0.9
  c.num_epochs = 300
  c.optim.schedule = "piecewise"
  c.optim.boundaries = (215, 260, 285)
  c.optim.weight_decay = 2e-4
  c.batch_size = 128
  if a.dataset == "cifar100":
    c.method.kl_scale = 10.0
  c.checkpoint.best_metric = "test/clean_pgd_mean"
  return common.fit_recipe(c, a)
