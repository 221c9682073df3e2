"""Prepares a dataset into tfds ArrayRecord files once (training also does it on first use).

  python -m mdrad_jax.data.prepare --dataset=cifar10 --source_dir=~/downloads --data_dir=~/tensorflow_datasets

``--data_dir`` defaults to $MDRAD_DATA_DIR or ~/tensorflow_datasets; ``--source_dir`` to the dataset's default
(``<data_dir>/downloads/manual`` for the archives, /usr/share/datasets/fashion-mnist for Fashion-MNIST).
See docs/datasets.md.
"""

from __future__ import annotations

import argparse
import sys

from mdrad_jax.data import builders, pipeline


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m mdrad_jax.data.prepare", description=__doc__.split("\n")[0])
  parser.add_argument("--dataset", required=True, choices=sorted(builders.DATASETS))
  parser.add_argument("--data_dir", default=None, help="where prepared datasets live")
  parser.add_argument("--source_dir", default=None, help="folder with the official files (or the archive)")
  args = parser.parse_args(argv)
  try:
    info = pipeline.dataset_info(args.dataset, data_dir=args.data_dir, source_dir=args.source_dir)
  except (FileNotFoundError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  sizes = ", ".join(f"{k}={v}" for k, v in sorted(info.split_sizes.items()))
  print(
    f"{info.name}: {info.num_classes} classes, images {info.image_shape}, {sizes}; "
    f"train split '{info.train_split}', test split '{info.test_split}'\n{info.data_path}"
  )
  return 0


if __name__ == "__main__":
  sys.exit(main())
