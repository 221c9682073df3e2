#!/usr/bin/env bash
# Standard training of a small CNN on the CIFAR-10 JPEG copy (../shared/data/cifar10-jpeg.tar.gz, read as an
# image folder: 50,000 train / 10,000 test), crop+flip augmentation, SGD 0.05 cosine. CPU-sized.
# Usage: bash studies/cifar10_jpeg_standard_training.sh [WORKDIR] [EPOCHS]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
W=${1:-runs/cifar10_jpeg/small_cnn}
E=${2:-8}
$PY main.py --config=configs/teacher.py:model=small_cnn,dataset=cifar10_jpeg,epochs=$E --workdir=$W \
  --config.optim.lr=0.05 --config.eval.every_epochs=2
