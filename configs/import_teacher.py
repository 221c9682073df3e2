"""Import a network trained elsewhere (PyTorch / safetensors / npz file) as a teacher workdir.

Usage: ``python main.py --config=configs/import_teacher.py:source=FILE,arch=NAME,dataset=cifar10 --workdir=DIR``.
Arguments: ``source`` (the weights file: .pt/.pth/.th/.tar/.bin need the torch extra; .safetensors, .npz),
``arch`` (``SOURCE:NAME``, e.g. chenyaofo:resnet56, huyvnphan:resnet18, robustbench:wrn34_10,
torchvision:resnet18; docs/teachers.md lists them), ``dataset``, ``mean`` / ``std`` (the input normalisation
the network expects, values joined by '/', or 'none'; '' = the source's documented constants), ``num_examples``
(test examples for the clean-accuracy check, -1 = all) and ``source_dir``.  The model and its options come from
the arch and can be overridden (``--config.model.kwargs.depth=...``).
"""

import ml_collections

from configs import common
from mdrad_jax import config_lib


def get_config(arg=None):
  a = config_lib.parse_arg(
    arg, dict(source="", arch="", dataset="cifar10", mean="", std="", num_examples=-1, source_dir="")
  )
  c = config_lib.base_config()
  c.job = "import_teacher"
  common.set_dataset(c, a.dataset, a.source_dir)
  c.source = ml_collections.ConfigDict(dict(file=a.source, arch=a.arch, mean=a.mean, std=a.std))
  if a.arch:
    from mdrad_jax.importers import archs

    arch = archs.get_arch(a.arch)
    c.model.name = arch.model
    c.model.kwargs = ml_collections.ConfigDict(dict(arch.kwargs))
  c.method = config_lib.method_config("natural")
  c.eval.num_examples = a.num_examples
  c.checkpoint.best_metric = "test/accuracy"
  c.checkpoint.best_mode = "max"
  return c
