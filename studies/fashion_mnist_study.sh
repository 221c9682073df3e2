#!/usr/bin/env bash
# The CPU-scale comparative study on Fashion-MNIST (configs/study.py:fashion_mnist; docs/results.md).
# Resumable: run it again on the same directory and it skips finished cells and resumes the interrupted one.
# Usage: bash studies/fashion_mnist_study.sh [RUN_DIR] [extra main.py flags, e.g. --config.study.only=table2]
# On a new machine it continues from the committed snapshot docs/study_fashion_mnist/study.json: the teachers are
# imported from docs/study_fashion_mnist/teachers/*.safetensors (or retrained where a file is missing) and the
# snapshot's finished cells taken over where config and teachers match (RESTORE='' to train everything again;
# RESTORE=A/study.json,B/study.json joins parts of the study run in other workdirs).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
R=${1:-runs/fmnist_study}
shift || true
mkdir -p "$R"
export MDRAD_PROGRESS=${MDRAD_PROGRESS:-0}
RESTORE=${RESTORE-docs/study_fashion_mnist/study.json}
if [ "$RESTORE" = docs/study_fashion_mnist/study.json ] && [ ! -f "$RESTORE" ]; then
  echo "note: no snapshot at $RESTORE; the study starts from nothing"
  RESTORE=
fi
CMD="bash studies/fashion_mnist_study.sh $R $*"
$PY main.py --config=configs/study.py:fashion_mnist --workdir="$R" --config.study.command="$CMD" \
  --config.study.restore="$RESTORE" "$@" 2>&1 \
  | grep --line-buffered -v "^[WI][0-9]\{4\} " | tee -a "$R/study.log"
