#!/usr/bin/env bash
# The GPU benchmark: the train step of PGD-AT and SA-MDRAD (ResNet-18 student; SA-MDRAD with a WRN-34-10, a
# ResNet-18 and a MobileNetV2 teacher) at batch 128 and 512 in float32 and bfloat16, JAX against PyTorch eager
# and torch.compile in the same run, with model FLOP utilisation against the chip's bfloat16 peak; then
# AutoAttack on 1,000 CIFAR-sized points (library alone on ResNet-18, and library against the reference on the
# small CNN).  Meant for one H200 whose image has JAX with CUDA, flax, optax, orbax, chex and PyTorch; each part
# runs under a time limit so the whole stays within about 8 minutes, and each writes its JSON as it goes.
#
#   bash benchmarks/gpu.sh OUT_DIR [WHEEL_DIR]
#
# WHEEL_DIR: wheels of what the image lacks, installed without an index (pip download them elsewhere):
#   ml-collections, grain, array-record, tensorflow-datasets (and their pure-Python dependencies), and
#   pyautoattack==0.2.0 (no dependencies of its own) for the reference AutoAttack.
# Environment: PEAK_TFLOPS (default 989, the H200's dense bfloat16 peak from NVIDIA's data sheet),
#   TRAIN_LIMIT_S / AA_LIMIT_S (time limits of the two parts, default 330 / 120 s),
#   TINY=1: a configuration that runs in a minute or two on a CPU (to check the script, no meaningful numbers).
set -euo pipefail
OUT=${1:?usage: bash benchmarks/gpu.sh OUT_DIR [WHEEL_DIR]}
WHEELS=${2:-}
HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(dirname "$HERE")
PY=${PYTHON:-python}
mkdir -p "$OUT"
cd "$REPO"

if [[ -n "$WHEELS" ]]; then
  "$PY" -m pip install --no-index --find-links "$WHEELS" ml-collections grain array-record tensorflow-datasets
  "$PY" -m pip install --no-index --find-links "$WHEELS" --no-deps pyautoattack==0.2.0 \
    || echo "pyautoattack not in $WHEELS: the reference AutoAttack will be skipped"
fi
{
  date -u; uptime; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || true
  "$PY" -c "import jax, torch; print('jax', jax.__version__, jax.devices()); print('torch', torch.__version__, torch.cuda.is_available())"
} 2>&1 | tee "$OUT/machine.txt"

PEAK=${PEAK_TFLOPS:-989}
if [[ "${TINY:-0}" == 1 ]]; then
  TRAIN=(--methods pgd_at,sa_mdrad --configs tiny_cnn:4 --teacher-set tiny_cnn --image-size 8 --steps 1
         --warmup 1 --pgd-steps 1 --matmul-size 128 --jax-dtypes float32,bfloat16
         --torch-dtypes fp32,bf16,fp32+compile --torch-count-flops false)
  AA_LIB=(--model tiny_cnn --image-size 8 --channels 1 --num-examples 16 --batch-size 8 --reference off
          --overrides 'apgd-ce.n_iter=2,apgd-t.n_iter=2,fab-t.n_iter=2,square.n_queries=10')
  AA_REF=(--model tiny_cnn --image-size 8 --channels 1 --num-examples 16 --batch-size 8
          --overrides 'apgd-ce.n_iter=2,apgd-t.n_iter=2,fab-t.n_iter=2,square.n_queries=10')
else
  TRAIN=(--methods pgd_at,sa_mdrad --configs resnet18:128,resnet18:512 --teacher-set wrn34_10 --steps 5
         --warmup 2 --pgd-steps 10 --unroll false --jax-dtypes float32,bfloat16
         --torch-dtypes fp32,bf16,fp32+compile,bf16+compile --torch-count-flops false)
  # eps = 1e-4 breaks no point, so every attack runs all its iterations on all 1,000 points: the cost of
  # points that stay robust, from which the cost of a full evaluation follows (docs/performance.md).
  AA_LIB=(--model resnet18 --image-size 32 --channels 3 --num-examples 1000 --batch-size 500 --eps 1e-4
          --reference off)
  AA_REF=(--model small_cnn --image-size 32 --channels 3 --num-examples 1000 --batch-size 500 --eps 1e-4)
fi

status=0
timeout "${TRAIN_LIMIT_S:-330}" "$PY" benchmarks/bench_train_step.py "${TRAIN[@]}" --peak-tflops "$PEAK" \
  --json "$OUT/train_step.json" 2>&1 | tee "$OUT/train_step.txt" || status=$?
timeout "${AA_LIMIT_S:-120}" "$PY" benchmarks/bench_autoattack.py "${AA_LIB[@]}" --json "$OUT/autoattack_resnet18.json" \
  2>&1 | tee "$OUT/autoattack_resnet18.txt" || status=$?
if "$PY" -c "import pyautoattack" 2>/dev/null; then
  timeout "${AA_LIMIT_S:-120}" "$PY" benchmarks/bench_autoattack.py "${AA_REF[@]}" \
    --json "$OUT/autoattack_vs_reference.json" 2>&1 | tee "$OUT/autoattack_vs_reference.txt" || status=$?
else
  echo "reference AutoAttack skipped: pyautoattack is not installed" | tee "$OUT/autoattack_vs_reference.txt"
fi
uptime | tee -a "$OUT/machine.txt"
exit $status
