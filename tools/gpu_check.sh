#!/usr/bin/env bash
# GPU cost check (docs/BENCHMARKS.md): R-50 student at 2x3x800x1333, baseline / FGFI / LGD (+ the
# R-101 teacher step for the paper's extra-cost metric), fp32 and AMP (bf16 autocast), one table
# each with the LGD/FGFI extra-cost ratio; the AMP run also profiles one step per method (CUDA time
# by op kind, top ops in the JSON). Under 5 minutes on one H200.
#   bash tools/gpu_check.sh [PYTHON]      (default: .venv/bin/python, else python3)
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${1:-}"
if [ -z "$PY" ]; then [ -x .venv/bin/python ] && PY=.venv/bin/python || PY=python3; fi
OUT="${GPU_CHECK_OUT:-results}"
mkdir -p "$OUT"
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))"
echo "== fp32"
"$PY" tools/benchmark_cost.py --methods baseline fgfi lgd teacher --device cuda \
    --input-size 800 1333 --batch 2 --iters 10 --warmup 3 --json "$OUT/cost_cuda_fp32.json"
echo "== AMP (bf16 autocast)"
"$PY" tools/benchmark_cost.py --methods baseline fgfi lgd teacher --device cuda \
    --input-size 800 1333 --batch 2 --iters 10 --warmup 3 --profile --json "$OUT/cost_cuda_bf16.json" \
    SOLVER.AMP.ENABLED True SOLVER.AMP.DTYPE bfloat16
