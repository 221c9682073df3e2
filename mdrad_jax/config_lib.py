"""Shared pieces of the ml_collections configs in ``configs/``.

Every config file calls ``base_config()`` and changes what it needs; every field exists in the base so that
any value can be overridden on the command line (``--config.optim.lr=0.05``) and a misspelt field is an error.
Config files take an argument string ``key=value,key=value`` (``configs/teacher.py:model=vgg16_bn,dataset=cifar10``)
parsed by ``parse_arg``; the word ``small`` alone selects the CPU-sized variant.
"""
from __future__ import annotations

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


def parse_arg(arg: str | None, defaults: dict) -> ml_collections.ConfigDict:
  """Parses ``"a=1,b=x,small"`` into a ConfigDict over ``defaults`` (unknown keys are an error)."""
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
      default = defaults[key]
      if isinstance(default, bool):
        out[key] = value.lower() in ("1", "true", "yes")
      elif isinstance(default, int):
        out[key] = int(value)
      elif isinstance(default, float):
        out[key] = float(value)
      else:
        out[key] = value
  return ml_collections.ConfigDict(out)


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.job = "train"  # 'train' | 'evaluate' | 'quickstart' | 'import_teacher'
  c.seed = 0

  c.data = ml_collections.ConfigDict()
  c.data.name = "digits"
  c.data.data_dir = ""     # '' = $MDRAD_DATA_DIR or ~/tensorflow_datasets
  c.data.source_dir = ""   # where the official archives are; '' = the dataset's default
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
  c.teacher_dtype = "float32"        # teachers' compute dtype: 'float32' | 'bfloat16'
  c.teacher_sharding = "replicated"  # 'replicated' | 'fsdp' (large teacher arrays split over the devices)

  c.method = method_config("natural")

  c.attack = ml_collections.ConfigDict()
  c.attack.eps = 8 / 255
  c.attack.step_size = 2 / 255
  c.attack.num_steps = 10
  c.attack.init = ""      # '' = the method's default ('uniform' | 'normal' | 'none')
  c.attack.bn_mode = ""   # '' = the method's default ('eval' | 'train_no_update' | 'train_update')
  c.attack.unroll = True
  c.attack.clip_start = ""  # '' = the method's default; 'true' | 'false': project the random start first
  c.attack.dtype = ""     # student compute dtype inside the attack: '' = config.model.dtype | 'bfloat16'

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

  c.eval = ml_collections.ConfigDict()
  c.eval.every_epochs = 1
  c.eval.num_examples = -1   # examples of the test split used by the in-training evaluation (-1 = all; at most all)
  c.eval.pgd_steps = 0       # > 0: also report PGD accuracy during training
  c.eval.pgd_step_size = 2 / 255

  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.keep = 2
  c.checkpoint.best_metric = "test/accuracy"
  c.checkpoint.best_mode = "max"
  c.checkpoint.every_epochs = 1

  c.evaluate = evaluate_config()

  c.distributed = ml_collections.ConfigDict()
  c.distributed.enabled = "auto"  # 'auto' | 'true' | 'false' (see parallel.initialize_distributed)
  c.distributed.coordinator_address = ""  # 'host:port' of process 0 ('' = from the cluster / environment)
  c.distributed.num_processes = config_dict.placeholder(int)
  c.distributed.process_id = config_dict.placeholder(int)
  c.distributed.local_device_ids = ""  # '' = JAX's default, else e.g. '0,1,2,3'
  c.distributed.cluster_detection_method = ""  # '' = automatic; 'slurm' | 'ompi' | 'gcetpu' | 'mpi4py' ...
  c.distributed.initialization_timeout = 300  # seconds to wait for every process to join
  return c


def evaluate_config() -> ml_collections.ConfigDict:
  e = ml_collections.ConfigDict()
  e.checkpoint = ""          # training workdir or checkpoint directory ('' = the workdir itself)
  e.which = "best"           # 'best' | 'latest'
  e.split = ""               # '' = the dataset's test split
  e.attacks = ("clean", "fgsm", "pgd20", "cw", "autoattack")
  e.eps = -1.0               # -1 = config.attack.eps
  e.num_examples = -1        # -1 = the whole split
  e.batch_size = 256
  e.aa_version = "standard"  # 'standard' | 'apgd'
  e.eps_sweep = ()           # e.g. (0, 2/255, 4/255, 8/255, 16/255)
  e.sweep_attack = "pgd20"
  e.seed = 0
  return e


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


CIFAR10_JPEG_ARCHIVE = "../shared/data/cifar10-jpeg.tar.gz"


def set_dataset(c: ml_collections.ConfigDict, dataset: str, source_dir: str = "") -> None:
  """Sets ``c.data`` for ``dataset``; ``cifar10_jpeg`` is the CIFAR-10 JPEG copy read as an image folder."""
  if dataset == "cifar10_jpeg":
    apply_dataset_defaults(c, "image_folder")
    c.data.source_dir = source_dir or CIFAR10_JPEG_ARCHIVE
  else:
    apply_dataset_defaults(c, dataset)
    c.data.source_dir = source_dir


def apply_dataset_defaults(c: ml_collections.ConfigDict, dataset: str) -> None:
  if dataset not in DATASET_DEFAULTS:
    raise ValueError(f"unknown dataset {dataset!r}; known: {sorted(DATASET_DEFAULTS)}")
  d = DATASET_DEFAULTS[dataset]
  c.data.name = dataset
  c.data.augment = d["augment"]
  c.attack.eps = d["eps"]
  c.attack.step_size = d["step_size"]
  c.eval.pgd_step_size = d["step_size"]


# ---------------------------------------------------------------------------------------------
# Method configs: the papers' recipes on CIFAR-10 / CIFAR-100 / Tiny-ImageNet plus CPU-sized variants.
# ---------------------------------------------------------------------------------------------
# epochs, lr-decay boundaries (epochs), weight decay, batch size: from each official code (spec §2–§4).
RECIPES = {
    "sa_mdrad": dict(epochs=200, boundaries=(100, 150), weight_decay=5e-4, batch_size=128),  # INFERRED
    "adaad": dict(epochs=200, boundaries=(100, 150), weight_decay=5e-4, batch_size=128),
    "iad1": dict(epochs=200, boundaries=(100, 150), weight_decay=2e-4, batch_size=128),
    "iad2": dict(epochs=200, boundaries=(100, 150), weight_decay=2e-4, batch_size=128),
    "ard": dict(epochs=200, boundaries=(100, 150), weight_decay=2e-4, batch_size=128),
    "rslad": dict(epochs=300, boundaries=(215, 260, 285), weight_decay=2e-4, batch_size=128),
    "mtard": dict(epochs=300, boundaries=(215, 260, 285), weight_decay=2e-4, batch_size=128),
    "bmtard": dict(epochs=300, boundaries=(215, 260, 285), weight_decay=2e-4, batch_size=128),
    "pgd_at": dict(epochs=110, boundaries=(100, 105), weight_decay=5e-4, batch_size=128),
    "trades": dict(epochs=110, boundaries=(100, 105), weight_decay=5e-4, batch_size=128),
    "kd": dict(epochs=200, boundaries=(100, 150), weight_decay=5e-4, batch_size=128),
}

# Per-dataset hyper-parameter changes that the official codes make (KL reductions and scales).
DATASET_METHOD_OVERRIDES = {
    ("adaad", "cifar100"): dict(reduction="batchmean"),
    ("adaad", "tiny_imagenet"): dict(reduction="batchmean"),
    ("rslad", "cifar100"): dict(kl_scale=10.0),
    ("mtard", "cifar100"): dict(kl_scale=10.0),
    ("bmtard", "cifar100"): dict(kl_scale=10.0),
}
DATASET_BATCH = {("ard", "cifar100"): 256}

def distill_config(method: str, arg: str | None) -> ml_collections.ConfigDict:
  """Config for training a student with ``method``.

  Argument string keys: ``dataset`` (cifar10 | cifar100 | tiny_imagenet | fashion_mnist | cifar10_jpeg |
  digits), ``student`` (a model name; default resnet18), ``teachers`` (teacher workdirs separated by ``+``),
  ``epochs`` (-1 = the recipe's), ``small`` (CPU-sized: small_cnn student, few epochs on a subset), and
  ``faithful_lr`` (the lr schedule of ARD's and IAD's code, which never reaches 0.001; any method accepts it).
  """
  a = parse_arg(arg, dict(dataset="cifar10", student="resnet18", teachers="", epochs=-1, small=False,
                          faithful_lr=False, source_dir=""))
  c = base_config()
  dataset = a.dataset
  set_dataset(c, dataset, a.source_dir)
  recipe = RECIPES[method]
  c.method = method_config(method, **DATASET_METHOD_OVERRIDES.get((method, dataset), {}))
  c.model.name = a.student
  c.teachers = tuple(t for t in a.teachers.split("+") if t)
  c.num_epochs = recipe["epochs"]
  c.optim.boundaries = recipe["boundaries"]
  c.optim.weight_decay = recipe["weight_decay"]
  c.optim.schedule = "piecewise"
  if a.faithful_lr:
    c.optim.schedule = "ard_faithful"
  c.batch_size = DATASET_BATCH.get((method, dataset), recipe["batch_size"])
  c.eval.pgd_steps = 10            # in-training robust accuracy (PGD-10, as AdaAD's model selection)
  c.eval.num_examples = 1000
  c.checkpoint.best_metric = "test/pgd_accuracy"
  if method == "bmtard":  # B-MTARD selects its checkpoint by (clean + PGD) / 2
    c.checkpoint.best_metric = "test/clean_pgd_mean"
  epochs = recipe["epochs"]
  if a.small:
    if a.student == "resnet18":
      c.model.name = "small_cnn"
    epochs = 5
    c.num_train_examples = 10000
    c.eval.num_examples = 500
    c.log_every_steps = 20
  if a.epochs > 0:
    epochs = a.epochs
  if epochs != recipe["epochs"]:  # shorter runs keep the recipe's shape: decays and warm-ups scale with it
    scale = epochs / recipe["epochs"]
    c.optim.boundaries = tuple(round(b * scale, 3) for b in recipe["boundaries"])
    if "begin_epoch" in c.method:
      c.method.begin_epoch = round(c.method.begin_epoch * scale, 3)
    c.num_epochs = epochs
  return c
