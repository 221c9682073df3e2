"""Train a student with `adaad` (see docs/methods.md for the formulas and conventions).

Usage: ``python main.py --config=configs/adaad.py:dataset=cifar10,teachers=runs/t1+runs/t2 --workdir=runs/adaad``.
Arguments: dataset (cifar10 | cifar100 | tiny_imagenet | fashion_mnist | cifar10_jpeg | digits), student,
teachers (training workdirs joined by '+'), epochs, small (CPU-sized variant), faithful_lr (official ARD/IAD
schedule), source_dir.  Every field can then be overridden, e.g. ``--config.optim.lr=0.05``.
"""
from mdrad_jax import config_lib


def get_config(arg=None):
  return config_lib.distill_config("adaad", arg)
