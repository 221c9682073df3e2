#!/usr/bin/env bash
# SA-MDRAD vs PGD-AT on Fashion-MNIST with the same student, budget and data (CPU-sized).
# Three heterogeneous standard teachers first, then both students, then clean / FGSM / PGD-20 / CW evaluation
# on 1000 test points (with the Square masking check on the first 100, 1000 queries).
# Usage: bash studies/fashion_mnist_sa_mdrad_vs_pgd_at.sh [RUN_DIR]   (about 30-60 min on 2 CPU cores)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
R=${1:-runs/fmnist}
EPOCHS=${EPOCHS:-5}
for t in small_cnn mlp tiny_cnn; do
  $PY main.py --config=configs/teacher.py:model=$t,dataset=fashion_mnist,epochs=3 --workdir=$R/teachers/$t \
    --config.batch_size=128 --config.optim.lr=0.05
done
T=$R/teachers/small_cnn+$R/teachers/mlp+$R/teachers/tiny_cnn
$PY main.py --config=configs/sa_mdrad.py:dataset=fashion_mnist,small,epochs=$EPOCHS,teachers=$T --workdir=$R/sa_mdrad
$PY main.py --config=configs/pgd_at.py:dataset=fashion_mnist,small,epochs=$EPOCHS --workdir=$R/pgd_at
for m in sa_mdrad pgd_at; do
  $PY main.py --config=configs/evaluate.py:attacks=clean+fgsm+pgd20+cw,num_examples=1000,small --workdir=$R/$m
done
