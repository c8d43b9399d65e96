#!/usr/bin/env bash
# The quick comparison protocol (`make compare-quick`: tools/compare.py, the pretrained protocol,
# baseline and LGD, 2 seeds, with the self-teacher oracle at every evaluation) on one CUDA GPU with
# bf16 autocast, 8 runs sharing the GPU at a time; prints the same table (results go to
# $GPU_COMPARE_OUT, default results/gpu). Sized for a few minutes of one H200.
#   bash tools/gpu_compare.sh [PYTHON]    (default: .venv/bin/python, else python3)
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${1:-}"
if [ -z "$PY" ]; then [ -x .venv/bin/python ] && PY=.venv/bin/python || PY=python3; fi
OUT="${GPU_COMPARE_OUT:-results/gpu}"
mkdir -p "$OUT"
"$PY" tools/compare.py --quick --parallel 8 --results-dir "$OUT" --output-root output/gpu_compare \
    MODEL.DEVICE cuda SOLVER.AMP.ENABLED True SOLVER.AMP.DTYPE bfloat16 DATALOADER.NUM_WORKERS 2
