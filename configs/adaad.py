"""Train a student with AdaAD (Huang et al., CVPR 2023; docs/methods.md §7.7).

Recipe of the official code (boyellow/AdaAD main.py and README): SGD lr 0.1, momentum 0.9, 200 epochs, lr ×0.1
at epochs 100 and 150, weight decay 5e-4, batch 128.  Its KL is ``nn.KLDivLoss()`` (elem_mean) in the CIFAR-10
branch and sum / N (batchmean) in the CIFAR-100 branch; Tiny-ImageNet takes the CIFAR-100 one (a choice: the
code has no Tiny-ImageNet branch).

Usage: ``python main.py --config=configs/adaad.py:dataset=cifar10,teachers=runs/t1 --workdir=runs/adaad``.
Arguments: those of every method config (configs/common.py: dataset, student, teachers, epochs, small,
faithful_lr, source_dir).  Every field can then be overridden, e.g. ``--config.optim.lr=0.05``.
"""

from configs import common


def get_config(arg=None):
  c, a = common.student_config("adaad", arg)
  c.optim.name, c.optim.lr, c.optim.momentum = "sgd", 0.1, 0.9
  c.num_epochs = 200
  c.optim.schedule = "piecewise"
  c.optim.boundaries = (100, 150)
  c.optim.weight_decay = 5e-4
  c.batch_size = 128
  if a.dataset in ("cifar100", "tiny_imagenet"):
    c.method.reduction = "batchmean"
  return common.fit_recipe(c, a)
