"""Train a student with MTARD (Zhao et al., ECCV 2022; docs/methods.md §7.10).

Recipe of the official code (zhaoshiji123/MTARD mtard_resnet18_cifar10.py / _cifar100.py): SGD lr 0.1,
momentum 0.9, 300 epochs, lr ×0.1 at epochs 215, 260 and 285, weight decay 2e-4, batch 128; on CIFAR-100 the KL
terms are multiplied by 10, as RSLAD's.  Teachers: the adversarially trained one first, then the clean one.

Usage: ``python main.py --config=configs/mtard.py:dataset=cifar10,teachers=runs/t_adv+runs/t_clean --workdir=runs/mtard``.
Arguments: those of every method config (configs/common.py: dataset, student, teachers, epochs, small,
faithful_lr, source_dir).  Every field can then be overridden, e.g. ``--config.optim.lr=0.05``.
"""

from configs import common


def get_config(arg=None):
  c, a = common.student_config("mtard", arg)
  c.optim.name, c.optim.lr, c.optim.momentum = "sgd", 0.1, 0.9
  c.num_epochs = 300
  c.optim.schedule = "piecewise"
  c.optim.boundaries = (215, 260, 285)
  c.optim.weight_decay = 2e-4
  c.batch_size = 128
  if a.dataset == "cifar100":
    c.method.kl_scale = 10.0
  return common.fit_recipe(c, a)
