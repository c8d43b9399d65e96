#!/usr/bin/env bash
# GPU cost check (docs/BENCHMARKS.md): R-50 student at 2x3x800x1333, baseline / FGFI / LGD (+ the
# R-101 teacher step for the extra-cost metric), fp32 and AMP, one table each. Under 5 minutes on
# one modern GPU.
#   bash tools/gpu_check.sh [PYTHON]      (default: .venv/bin/python, else python3)
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${1:-}"
if [ -z "$PY" ]; then [ -x .venv/bin/python ] && PY=.venv/bin/python || PY=python3; fi
OUT="${GPU_CHECK_OUT:-results}"
mkdir -p "$OUT"
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))"
for amp in False True; do
    echo "== SOLVER.AMP.ENABLED $amp"
    "$PY" tools/benchmark_cost.py --methods baseline fgfi lgd teacher --device cuda \
        --input-size 800 1333 --batch 2 --iters 10 --warmup 3 \
        --json "$OUT/cost_cuda_amp_${amp}.json" SOLVER.AMP.ENABLED "$amp"
done
