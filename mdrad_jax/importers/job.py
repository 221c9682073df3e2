"""The ``import_teacher`` job (``configs/import_teacher.py``): a network trained elsewhere becomes a teacher workdir.

``run(config, workdir)`` reads ``config.source.file`` (:mod:`mdrad_jax.importers.files`), converts it for
``config.source.arch`` (:mod:`mdrad_jax.importers.archs`) into the zoo's network ``config.model`` with the
source's input normalisation inside the model, evaluates its clean accuracy on the dataset's test split, and
writes the layout of a trained run: ``config.json`` (with an ``import`` block: file, SHA-256, arch, source,
normalisation and where it came from, BatchNorm ε, clean accuracy), ``metrics.jsonl`` (and its TensorBoard
event file) and one orbax checkpoint (step 0, the best by ``test/accuracy``) through
:class:`mdrad_jax.checkpointing.Checkpointer`.  Any method then takes the workdir in ``teachers=`` like a
trained teacher's.

Nothing is written before the file has been read, matched key by key and evaluated; a workdir that already
holds a checkpoint is refused rather than overwritten.
"""

from __future__ import annotations

import hashlib
import json
import os

import jax
import ml_collections
import optax

from mdrad_jax import checkpointing
from mdrad_jax import data as data_lib
from mdrad_jax import evaluation
from mdrad_jax import models
from mdrad_jax import parallel
from mdrad_jax import train_step as step_lib
from mdrad_jax import workdir as workdir_lib
from mdrad_jax.errors import UserError
from mdrad_jax.importers import archs as archs_lib
from mdrad_jax.importers import files
from mdrad_jax import metric_writers
from mdrad_jax.progress import log
from mdrad_jax.train_state import TrainState


def parse_constants(text: str, field: str):
  """'' -> None (the source's), 'none' -> () (no normalisation), '0.5/0.5/0.5' -> a float tuple."""
  text = str(text).strip()
  if not text:
    return None
  if text.lower() == "none":
    return ()
  try:
    values = tuple(float(v) for v in text.split("/"))
  except ValueError:
    raise UserError(f"source.{field} must be '', 'none' or numbers joined by '/', got {text!r}") from None
  if field == "std" and any(v <= 0 for v in values):
    raise UserError(f"source.std must be positive, got {text!r}")
  return values


def resolve_normalisation(source_cfg, arch, dataset: str, state: dict, exported: dict | None = None):
  """(mean, std or None, where they come from): the config's values, the file's (buffers, or the model
  options of an exported file), or the source table's."""
  mean, std = parse_constants(source_cfg.mean, "mean"), parse_constants(source_cfg.std, "std")
  if (mean is None) != (std is None) or (mean == ()) != (std == ()):
    raise UserError("give source.mean and source.std together (both values, both 'none', or neither)")
  if mean is not None:
    return (mean, std, "config") if mean else (None, None, "config")
  if exported is not None:
    kw = exported.get("kwargs", {})
    if kw.get("mean") is None:
      return None, None, "file"
    return tuple(kw["mean"]), tuple(kw["std"]), "file"
  from_file = archs_lib.normalisation_from_file(state, arch)
  if from_file is not None:
    return from_file[0], from_file[1], "file"
  table = archs_lib.source_normalisation(arch, dataset)
  if table is None:
    return None, None, "source table"
  return tuple(table[0]), tuple(table[1]), "source table"


def _exported_model(path: str) -> dict:
  from mdrad_jax import export

  meta = export.read_metadata(path)
  if meta.get("format") != export.FORMAT or "model" not in meta:
    raise UserError(
      f"{path}: not a file written by python -m mdrad_jax.export (no {export.FORMAT!r} "
      f"metadata); give the arch it was trained as"
    )
  return json.loads(meta["model"])


def _sha256(path: str) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      h.update(chunk)
  return h.hexdigest()


def clean_accuracy(module, variables, config, info) -> dict:
  """Clean accuracy of ``module`` on the test split (``config.eval.num_examples``, -1 = all)."""
  mesh = parallel.create_mesh()
  parallel.check_batch_size(config.eval_batch_size, mesh, "eval_batch_size")
  ev = config.eval
  loader = data_lib.create_loader(
    config.data.name,
    info.test_split,
    batch_size=config.eval_batch_size,
    train=False,
    seed=0,
    drop_remainder=False,
    num_examples=(ev.num_examples if ev.num_examples > 0 else None),
    **data_lib.data_kwargs(config),
  )
  n = info.split_sizes[info.test_split]
  if ev.num_examples > 0:
    n = min(n, ev.num_examples)
  per_process = -(-n // jax.process_count())
  step = step_lib.jit_eval_step(step_lib.make_eval_step(module), mesh)
  return evaluation.evaluate_model(
    step,
    parallel.replicate(variables, mesh),
    loader,
    mesh,
    batch_size=config.eval_batch_size,
    key=jax.random.key(0),
    num_batches=-(-per_process // (config.eval_batch_size // jax.process_count())),
  )


def run(config, workdir: str) -> dict:
  src = config.source
  if not src.file:
    raise UserError(
      "source.file is empty: give the weights file (configs/import_teacher.py:source=FILE,arch=NAME,dataset=...)"
    )
  arch = archs_lib.get_arch(src.arch)
  if arch.layout != "flax" and config.model.name != arch.model:
    raise UserError(
      f"config.model.name is {config.model.name!r} but arch {src.arch} is model {arch.model!r}: "
      f"give the arch in the config argument (configs/import_teacher.py:arch=...), which sets "
      f"the model"
    )
  path = os.path.abspath(os.path.expanduser(src.file))
  state = files.read_state_dict(path)
  exported = _exported_model(path) if arch.layout == "flax" else None
  info = data_lib.dataset_info(config.data.name, **data_lib.data_kwargs(config))
  if arch.input_shape is not None and tuple(info.image_shape) != tuple(arch.input_shape):
    raise UserError(
      f"arch {src.arch} was built for {tuple(arch.input_shape)} inputs, dataset "
      f"{config.data.name!r} has {tuple(info.image_shape)}"
    )
  mean, std, norm_from = resolve_normalisation(src, arch, config.data.name, state, exported)
  if mean is not None and len(mean) not in (1, info.image_shape[-1]):
    raise UserError(
      f"normalisation mean has {len(mean)} values, dataset {config.data.name!r} has {info.image_shape[-1]} channels"
    )
  with config.unlocked():
    if exported is not None:
      config.model.name = exported["name"]
      config.model.kwargs = ml_collections.ConfigDict(dict(exported.get("kwargs", {})))
    for k, v in archs_lib.options_from_file(state, arch).items():
      config.model.kwargs[k] = v
    config.model.kwargs["mean"] = mean
    config.model.kwargs["std"] = std
  module = models.build_model(config.model, info.num_classes)
  variables = archs_lib.convert(state, module, arch, info.image_shape, label=path)

  ckpt_dir = os.path.join(workdir, checkpointing.CHECKPOINT_DIR)
  if os.path.isdir(ckpt_dir) and os.listdir(ckpt_dir):
    raise UserError(f"{workdir} already holds checkpoints; import into a new workdir (nothing was changed)")

  result = clean_accuracy(module, variables, config, info)
  accuracy, count = float(result["accuracy"]), int(result["num_examples"])
  record = {
    "file": path,
    "sha256": _sha256(path),
    "format": files.file_format(path),
    "arch": src.arch,
    "source": arch.source,
    "convention": arch.convention,
    "normalisation": {"mean": list(mean) if mean else None, "std": list(std) if std else None, "from": norm_from},
    "bn_epsilon": archs_lib.SOURCE_BN_EPSILON,
    "test_accuracy": accuracy,
    "test_examples": count,
    "test_split": info.test_split,
  }

  os.makedirs(workdir, exist_ok=True)
  # config.json first: a run interrupted before the checkpoint leaves no checkpoint, so importing again works
  workdir_lib.write_config(
    config, workdir, {"num_classes": info.num_classes, "image_shape": list(info.image_shape), "import": record}
  )
  params = {"model": variables["params"], "projectors": {}}
  stats = {"model": variables.get("batch_stats", {}), "projectors": {}}
  tstate = TrainState.create(
    params=params, batch_stats=stats, tx=optax.identity(), rng=jax.random.key_data(jax.random.key(config.seed))
  )
  ckpt = checkpointing.Checkpointer(workdir, keep=1, best_metric="test/accuracy", best_mode="max")
  try:
    ckpt.save(tstate, metrics={"test/accuracy": accuracy}, force=True)
  finally:
    ckpt.close()
  writer = metric_writers.create_writer(workdir)
  writer.write_scalars(0, {"epoch": 0, "test/accuracy": accuracy, "test/num_examples": count})
  writer.close()
  log(
    f"imported {src.arch} from {path}: clean accuracy {accuracy:.4f} on {count} examples of "
    f"{config.data.name}/{info.test_split}; teacher workdir {workdir}"
  )
  return {"test/accuracy": accuracy, "test/num_examples": count}
