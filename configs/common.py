"""What the method config files share: their arguments, the student's setting, and fitting a recipe to a run.

Not a config itself: each ``configs/<method>.py`` reads

    c, a = common.student_config("rslad", arg)   # data, student, teachers, in-training PGD-10 evaluation
    c.num_epochs = 300                           # ... the method's recipe, as explicit assignments ...
    return common.fit_recipe(c, a)               # small / epochs= / faithful_lr

Arguments of every method config (``configs/<method>.py:ARGS``): ``dataset`` (``DATASETS``), ``student`` (a
model name; default resnet18), ``teachers`` (training workdirs or checkpoint directories joined by ``+``),
``epochs`` (-1 = the recipe's), ``small`` (CPU-sized: small_cnn student, 5 epochs on 10,000 examples),
``faithful_lr`` (the lr schedule ARD's and IAD's code actually runs, which never reaches 0.001; any method
accepts it) and ``source_dir`` (where the dataset's official files are; '' = its default).  Config files import
this module as ``configs.common`` (the repository root is on ``sys.path`` when ``main.py`` runs, as in flax's
examples).
"""

import ml_collections

from mdrad_jax import config_lib

# The CIFAR-10 JPEG copy of this checkout's data folder, read as an image folder (``dataset=cifar10_jpeg``):
# a location on this machine, so it lives here and not in the library; ``source_dir=`` overrides it.
CIFAR10_JPEG_ARCHIVE = "../shared/data/cifar10-jpeg.tar.gz"
DATASETS = ("cifar10", "cifar100", "tiny_imagenet", "fashion_mnist", "cifar10_jpeg", "image_folder", "digits")

STUDENT_ARGS = dict(
  dataset="cifar10", student="resnet18", teachers="", epochs=-1, small=False, faithful_lr=False, source_dir=""
)


def set_dataset(c: ml_collections.ConfigDict, dataset: str, source_dir: str = "") -> None:
  """``config_lib.set_dataset`` plus ``cifar10_jpeg``: the CIFAR-10 JPEG copy read as an image folder."""
  if dataset == "cifar10_jpeg":
    config_lib.set_dataset(c, "image_folder", source_dir or CIFAR10_JPEG_ARCHIVE)
  else:
    config_lib.set_dataset(c, dataset, source_dir)


def student_config(
  method: str, arg: str | None, **extra_args
) -> tuple[ml_collections.ConfigDict, ml_collections.ConfigDict]:
  """The base config of a student trained with ``method``, and the parsed arguments.

  Sets the data (``dataset``, ``source_dir``), the student, the teachers, the method's hyper-parameters at their
  defaults, the in-training evaluation (clean and PGD-10 accuracy on the first 1,000 test examples; the best
  checkpoint is the one with the highest PGD accuracy, as AdaAD's model selection) and, with ``small``, the
  CPU-sized setting.  ``extra_args`` are further arguments of one config file with their defaults.
  """
  a = config_lib.parse_arg(arg, dict(STUDENT_ARGS, **extra_args))
  c = config_lib.base_config()
  set_dataset(c, a.dataset, a.source_dir)
  c.method = config_lib.method_config(method)
  c.model.name = a.student
  c.teachers = tuple(t for t in a.teachers.split("+") if t)
  c.eval.pgd_steps = 10
  c.eval.num_examples = 1000
  c.checkpoint.best_metric = "test/pgd_accuracy"
  if a.small:
    if a.student == "resnet18":
      c.model.name = "small_cnn"
    c.num_train_examples = 10000
    c.eval.num_examples = 500
    c.log_every_steps = 20
  return c, a


def fit_recipe(c: ml_collections.ConfigDict, a: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Fits the recipe set in ``c`` to the run's arguments and returns ``c``.

  ``faithful_lr`` selects the ``ard_faithful`` schedule.  A run of another length than the recipe's
  ``c.num_epochs`` (``epochs=E``, or 5 epochs with ``small``) keeps the recipe's shape: the lr-decay boundaries
  and a method's ``begin_epoch`` are scaled by E / the recipe's epochs (rounded to 3 decimals).
  """
  if a.faithful_lr:
    c.optim.schedule = "ard_faithful"
  recipe_epochs = c.num_epochs
  epochs = a.epochs if a.epochs > 0 else 5 if a.small else recipe_epochs
  if epochs != recipe_epochs:
    scale = epochs / recipe_epochs
    c.optim.boundaries = tuple(round(b * scale, 3) for b in c.optim.boundaries)
    if "begin_epoch" in c.method:
      c.method.begin_epoch = round(c.method.begin_epoch * scale, 3)
    c.num_epochs = epochs
  return c
