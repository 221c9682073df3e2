"""Datasets: preparation of the official files into tfds ArrayRecord, and grain loaders.

See docs/datasets.md for the supported datasets, where their files come from and the prepare command.
"""
from mdrad_jax.data.builders import DATASETS, default_data_dir, prepare
from mdrad_jax.data.pipeline import (AUGMENTATIONS, DatasetInfo, RandomCropFlip, create_loader, crop_flip,
                                     dataset_info, load_arrays)
from mdrad_jax.data.sources import SourceError

__all__ = [
    "AUGMENTATIONS", "DATASETS", "DatasetInfo", "RandomCropFlip", "SourceError", "create_loader", "crop_flip",
    "dataset_info", "default_data_dir", "load_arrays", "prepare",
]
