"""Train a student with RSLAD (Zi et al., ICCV 2021; docs/methods.md §7.6).

Recipe of the official code (zibojia/RSLAD resnet18_rslad_cifar10.py / _cifar100.py): SGD lr 0.1, momentum
0.9, 300 epochs, lr ×0.1 at epochs 215, 260 and 285, weight decay 2e-4, batch 128; on CIFAR-100 the KL terms
are multiplied by 10 ("to keep consistent with CIFAR-10", its README).

Usage: ``python main.py --config=configs/rslad.py:dataset=cifar10,teachers=runs/t1 --workdir=runs/rslad``.
Arguments: those of every method config (configs/common.py: dataset, student, teachers, epochs, small,
faithful_lr, source_dir).  Every field can then be overridden, e.g. ``--config.optim.lr=0.05``.
"""

from configs import common


def get_config(arg=None):
  c, a = common.student_config("rslad", arg)
  c.optim.name, c.optim.lr, c.optim.momentum = "sgd", 0.1, 0.9
  c.num_epochs = 300
  c.optim.schedule = "piecewise"
  c.optim.boundaries = (215, 260, 285)
  c.optim.weight_decay = 2e-4
  c.batch_size = 128
  if a.dataset == "cifar100":
    c.method.kl_scale = 10.0
  return common.fit_recipe(c, a)
