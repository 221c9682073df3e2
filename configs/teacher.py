"""Standard (non-adversarial) training of a teacher.

Usage: ``python main.py --config=configs/teacher.py:model=resnet18,dataset=cifar10 --workdir=runs/t_r18``.
Arguments: ``model`` (registry name), ``dataset`` (cifar10 | cifar100 | tiny_imagenet | fashion_mnist |
cifar10_jpeg | image_folder | digits), ``source_dir``, ``epochs`` (-1 = default), ``small`` (quick CPU variant:
few epochs on a subset, small eval).  Recipe (a choice): SGD lr 0.1, momentum 0.9, weight decay 5e-4, cosine
schedule, batch 128, 200 epochs, the dataset's augmentation.
"""

from configs import common
from mdrad_jax import config_lib


def get_config(arg=None):
  a = config_lib.parse_arg(arg, dict(model="resnet18", dataset="cifar10", epochs=-1, small=False, source_dir=""))
  c = config_lib.base_config()
  common.set_dataset(c, a.dataset, a.source_dir)
  c.model.name = a.model
  c.method = config_lib.method_config("natural")
  c.optim.name, c.optim.lr, c.optim.momentum = "sgd", 0.1, 0.9
  c.optim.schedule = "cosine"
  c.optim.weight_decay = 5e-4
  c.batch_size = 128
  c.num_epochs = 200
  if a.small:
    c.num_epochs = 2
    c.batch_size = 64
    c.num_train_examples = 2048
    c.eval.num_examples = 512
    c.log_every_steps = 8
    c.optim.lr = 0.05
  if a.epochs > 0:
    c.num_epochs = a.epochs
  return c
