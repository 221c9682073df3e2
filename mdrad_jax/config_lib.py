"""The shared blocks of the ml_collections configs in ``configs/``, each field defined once with its default.

Every config file calls ``base_config()`` and changes what it needs; every field exists in the base so that
any value can be overridden on the command line (``--config.optim.lr=0.05``) and a misspelt field is an error.
Defined here too: the evaluation job's own fields (``evaluate_config(job=True)``) and each method's
hyper-parameters (``method_config``, from the ``Method`` registry); a job's block that no other config has is
defined by its config file (``configs/quickstart.py``, ``configs/study.py``, ``configs/import_teacher.py``).  The
jobs read their config's fields as attributes, with no default of their own.  Config files take an argument
string ``key=value,key=value`` (``configs/teacher.py:model=vgg16_bn,dataset=cifar10``) parsed by ``parse_arg``; a
word alone (``small``) sets a boolean argument.  The recipes (epochs, schedule, weight decay, batch, per-dataset
changes) are written out in the config files (``configs/<method>.py``); what those share is ``configs/common.py``.
"""

from __future__ import annotations

import importlib.util
import os

import ml_collections
from ml_collections import config_dict

# Per-dataset defaults: threat model, augmentation, batch sizes.  ε for 1-channel data follows the usual
# MNIST-family choice for L∞ (0.1 on Fashion-MNIST); colour data uses 8/255.
DATASET_DEFAULTS = {
  "cifar10": dict(augment="crop_flip", eps=8 / 255, step_size=2 / 255),
  "cifar100": dict(augment="crop_flip", eps=8 / 255, step_size=2 / 255),
  "tiny_imagenet": dict(augment="crop_flip", eps=8 / 255, step_size=2 / 255),
  "image_folder": dict(augment="crop_flip", eps=8 / 255, step_size=2 / 255),
  "fashion_mnist": dict(augment="none", eps=0.1, step_size=0.01),
  "digits": dict(augment="none", eps=0.1, step_size=0.02),
}


TRUE_WORDS = ("1", "true", "yes")
FALSE_WORDS = ("0", "false", "no")


def parse_arg(arg: str | None, defaults: dict) -> ml_collections.ConfigDict:
  """Parses ``"a=1,b=x,small"`` into a ConfigDict over ``defaults``; each value takes its default's type.

  A key alone (``small``) is ``small=true``.  Booleans are ``1/true/yes`` or ``0/false/no`` (any case); an
  unknown key or a value that does not fit its default's type is a ``ValueError`` naming the key.
  """
  out = dict(defaults)
  if arg:
    for part in arg.split(","):
      part = part.strip()
      if not part:
        continue
      if "=" not in part:
        key, value = part, "true"
      else:
        key, value = part.split("=", 1)
      if key not in defaults:
        raise ValueError(f"unknown config argument {key!r}; known: {sorted(defaults)}")
      out[key] = _typed(key, value, defaults[key])
  return ml_collections.ConfigDict(out)


def _typed(key: str, value: str, default):
  try:
    if isinstance(default, bool):
      if value.lower() not in TRUE_WORDS + FALSE_WORDS:
        raise ValueError
      return value.lower() in TRUE_WORDS
    if isinstance(default, int):
      return int(value)
    if isinstance(default, float):
      return float(value)
  except ValueError:
    kind = "true or false" if isinstance(default, bool) else "an integer" if isinstance(default, int) else "a number"
    raise ValueError(f"config argument {key}={value!r}: expected {kind}") from None
  return value


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.job = "train"  # 'train' | 'evaluate' | 'quickstart' | 'import_teacher'
  c.seed = 0

  c.data = ml_collections.ConfigDict()
  c.data.name = "digits"
  c.data.data_dir = ""  # '' = $MDRAD_DATA_DIR or ~/tensorflow_datasets
  c.data.source_dir = ""  # where the official archives are; '' = the dataset's default
  c.data.augment = "none"  # 'none' | 'crop_flip'
  c.data.crop_padding = 4
  c.data.worker_count = 0
  c.num_train_examples = -1  # > 0: use only the first N training examples (the whole split if it is smaller)

  c.model = ml_collections.ConfigDict()
  c.model.name = "tiny_cnn"
  c.model.dtype = "float32"  # student compute dtype: 'float32' | 'bfloat16' (parameters stay float32)
  c.model.kwargs = ml_collections.ConfigDict()

  # Teachers: training workdirs (or checkpoint directories) of standard-trained models.
  c.teachers = ()
  c.teacher_dtype = "float32"  # teachers' compute dtype: 'float32' | 'bfloat16'
  c.teacher_sharding = "replicated"  # 'replicated' | 'fsdp' (large teacher arrays split over the devices)

  c.method = method_config("natural")

  c.attack = ml_collections.ConfigDict()
  c.attack.eps = 8 / 255
  c.attack.step_size = 2 / 255
  c.attack.num_steps = 10
  c.attack.init = ""  # '' = the method's default ('uniform' | 'normal' | 'none')
  c.attack.bn_mode = ""  # '' = the method's default ('eval' | 'train_no_update' | 'train_update')
  c.attack.unroll = True
  c.attack.clip_start = ""  # tri-state: '' = the method's default; 'true' | 'false': project the random start first
  c.attack.dtype = ""  # student compute dtype inside the attack: '' = config.model.dtype | 'bfloat16'

  c.optim = ml_collections.ConfigDict()
  c.optim.name = "sgd"
  c.optim.lr = 0.1
  c.optim.momentum = 0.9
  c.optim.nesterov = False
  c.optim.weight_decay = 5e-4
  c.optim.schedule = "piecewise"  # 'piecewise' | 'ard_faithful' | 'cosine' | 'constant'
  c.optim.boundaries = (100, 150)  # epochs
  c.optim.factor = 0.1
  c.optim.warmup_epochs = 0.0
  c.optim.grad_clip_norm = 0.0

  c.num_epochs = 200
  c.batch_size = 128
  c.eval_batch_size = 256
  c.log_every_steps = 50

  # ``eval``: the training loop's own evaluation (clean and PGD accuracy every few epochs, model selection).
  # ``evaluate`` (below): the evaluation job (mdrad_jax.evaluation_job) run on a trained checkpoint.
  c.eval = ml_collections.ConfigDict()
  c.eval.every_epochs = 1
  c.eval.num_examples = -1  # examples of the test split used by the in-training evaluation (-1 = all; at most all)
  c.eval.pgd_steps = 0  # > 0: also report PGD accuracy during training
  c.eval.pgd_step_size = 2 / 255

  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.keep = 2
  c.checkpoint.best_metric = "test/accuracy"
  c.checkpoint.best_mode = "max"
  c.checkpoint.every_epochs = 1

  c.evaluate = evaluate_config()

  c.distributed = ml_collections.ConfigDict()
  c.distributed.enabled = "auto"  # tri-state: 'auto' | 'true' | 'false' (see parallel.initialize_distributed)
  c.distributed.coordinator_address = ""  # 'host:port' of process 0 ('' = from the cluster / environment)
  c.distributed.num_processes = config_dict.placeholder(int)
  c.distributed.process_id = config_dict.placeholder(int)
  c.distributed.local_device_ids = ""  # '' = JAX's default, else e.g. '0,1,2,3'
  c.distributed.cluster_detection_method = ""  # '' = automatic; 'slurm' | 'ompi' | 'gcetpu' | 'mpi4py' ...
  c.distributed.initialization_timeout = 300  # seconds to wait for every process to join
  return c


def evaluate_config(*, job: bool = False) -> ml_collections.ConfigDict:
  """The ``evaluate`` block: the evaluation job's settings (docs/evaluation.md).

  Every config carries the first fields (what to evaluate: checkpoint, split, attacks, ε, examples, batch,
  seed), so the configs that earlier runs and studies recorded still compare equal; ``job=True`` (the
  evaluation job's config, ``configs/evaluate.py``) adds the fields only that job reads: the attack step size,
  the ε sweep in multiples of ε, AutoAttack overrides and the gradient-masking check.
  """
  e = ml_collections.ConfigDict()
  e.checkpoint = ""  # training workdir or checkpoint directory ('' = the workdir itself)
  e.which = "best"  # 'best' | 'latest'
  e.split = ""  # '' = the dataset's test split
  e.attacks = ("clean", "fgsm", "pgd20", "cw", "autoattack")
  e.eps = -1.0  # -1 = config.attack.eps
  e.num_examples = -1  # -1 = the whole split
  e.batch_size = 256
  e.aa_version = "standard"  # 'standard' | 'apgd'
  e.eps_sweep = ()  # e.g. (0, 2/255, 4/255, 8/255, 16/255)
  e.sweep_attack = "pgd20"
  e.seed = 0
  if job:
    e.step_size = -1.0  # -1 = the run's attack step size, scaled with ε when ε is overridden
    e.eps_sweep_multiples = ()  # ε sweep as multiples of the evaluation ε (added to evaluate.eps_sweep)
    e.aa_overrides = ""  # e.g. 'square.n_queries=1000,apgd-ce.n_iter=50' (labelled non-standard)
    e.masking_square_examples = 500  # Square alone on the first N points for the masking check (0 = skip)
    e.masking_square_queries = 5000
    e.masking_tolerance = 0.01  # accuracy margin (fraction) a masking comparison must exceed
    e.masking_aa_gap = 0.10  # flag AutoAttack more than this far below PGD-20
    e.masking_significance = 0.05  # check (a) also needs a paired sign test below this level
  return e


EVALUATE_JOB_FIELDS = tuple(sorted(set(evaluate_config(job=True)) - set(evaluate_config())))


def method_config(name: str, **overrides) -> ml_collections.ConfigDict:
  """The ``method`` block: its name plus every hyper-parameter of that method at its default."""
  from mdrad_jax import methods  # local import: configs stay cheap to import

  m = methods.get_method(name)
  d = {"name": name, **m.defaults}
  for k, v in overrides.items():
    if k not in d:
      raise ValueError(f"method {name!r} has no hyper-parameter {k!r}; known: {sorted(d)}")
    d[k] = v
  return ml_collections.ConfigDict(d)


def set_dataset(c: ml_collections.ConfigDict, dataset: str, source_dir: str = "") -> None:
  """``apply_dataset_defaults`` plus ``c.data.source_dir`` (where the official files are; '' = the default)."""
  apply_dataset_defaults(c, dataset)
  c.data.source_dir = source_dir


def apply_dataset_defaults(c: ml_collections.ConfigDict, dataset: str) -> None:
  """Sets ``c.data.name`` and the dataset's augmentation, attack ε and step (``DATASET_DEFAULTS``)."""
  if dataset not in DATASET_DEFAULTS:
    raise ValueError(f"unknown dataset {dataset!r}; known: {sorted(DATASET_DEFAULTS)}")
  d = DATASET_DEFAULTS[dataset]
  c.data.name = dataset
  c.data.augment = d["augment"]
  c.attack.eps = d["eps"]
  c.attack.step_size = d["step_size"]
  c.eval.pgd_step_size = d["step_size"]


# ---------------------------------------------------------------------------------------------
# Config files.
# ---------------------------------------------------------------------------------------------
CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


def load_config_file(name: str, arg: str | None = None) -> ml_collections.ConfigDict:
  """``configs/<name>.py``'s ``get_config(arg)`` (``name`` may also be a path to a config file)."""
  from mdrad_jax.errors import UserError

  path = name if name.endswith(".py") else os.path.join(CONFIG_DIR, f"{name}.py")
  if not os.path.isfile(path):
    raise UserError(f"no config file {path}")
  spec = importlib.util.spec_from_file_location(f"_config_{os.path.basename(path)[:-3]}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def distill_config(method: str, arg: str | None = None) -> ml_collections.ConfigDict:
  """Kept for compatibility: the config of ``configs/<method>.py`` with argument string ``arg``."""
  return load_config_file(method, arg)
