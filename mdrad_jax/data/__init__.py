"""Datasets: preparation of the official files into tfds ArrayRecord, and grain loaders.

See docs/datasets.md for the supported datasets, where their files come from and the prepare command.
"""

# The preparation function is ``prepare_dataset`` here: ``prepare`` is the command-line module
# (``python -m mdrad_jax.data.prepare``), which would replace a same-named attribute once imported.
from mdrad_jax.data.builders import DATASETS, default_data_dir
from mdrad_jax.data.builders import prepare as prepare_dataset
from mdrad_jax.data.pipeline import (
  AUGMENTATIONS,
  DatasetInfo,
  RandomCropFlip,
  create_loader,
  crop_flip,
  data_kwargs,
  dataset_info,
  load_arrays,
)
from mdrad_jax.data.sources import SourceError

__all__ = [
  "AUGMENTATIONS",
  "DATASETS",
  "DatasetInfo",
  "RandomCropFlip",
  "SourceError",
  "create_loader",
  "crop_flip",
  "data_kwargs",
  "dataset_info",
  "default_data_dir",
  "load_arrays",
  "prepare_dataset",
]
