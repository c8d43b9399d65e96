#!/usr/bin/env bash
# The comparison protocol (tools/compare.py, the 400-iteration pretrained protocol, with the self-teacher oracle
# at every evaluation) on one CUDA GPU with bf16 autocast, 8 runs sharing the GPU at a time, the
# classification pretraining on the GPU too. Results go to $GPU_COMPARE_OUT (default results/gpu).
#  1. the quick rows (`--quick`: baseline and LGD, 2 seeds): compare_pretrained_quick.*
#  2. if GPU_COMPARE_BUDGET_S is set (seconds for the whole script): the main rows and the lambda-0
#     control, seeds 1-5 (step 1's runs reused), stopped where the budget ends; then the table of
#     the runs that finished: compare_pretrained.*
#   bash tools/gpu_compare.sh [PYTHON]    (default: .venv/bin/python, else python3)
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${1:-}"
if [ -z "$PY" ]; then [ -x .venv/bin/python ] && PY=.venv/bin/python || PY=python3; fi
OUT="${GPU_COMPARE_OUT:-results/gpu}"
ROOT=output/gpu_compare
PROTO=(--protocol pretrained)
GPU=(MODEL.DEVICE cuda SOLVER.AMP.ENABLED True SOLVER.AMP.DTYPE bfloat16 DATALOADER.NUM_WORKERS 2)
mkdir -p "$OUT"
"$PY" tools/compare.py "${PROTO[@]}" --quick --parallel 8 --results-dir "$OUT" --output-root "$ROOT" "${GPU[@]}"
LEFT=$(( ${GPU_COMPARE_BUDGET_S:-0} - SECONDS - 30 ))  # 30 s for the table
if [ -n "${GPU_COMPARE_BUDGET_S:-}" ] && [ "$LEFT" -gt 60 ]; then
    ROWS=(--rows baseline lgd lgd_class lgd_lambda0 --seeds 1 2 3 4 5)
    # compare.py runs seed by seed, so a cut-off leaves complete pairs of the earlier seeds
    # in a session of its own, so that stopping it stops its training processes too
    setsid "$PY" tools/compare.py "${PROTO[@]}" --reuse "${ROWS[@]}" --parallel 8 \
        --results-dir "$OUT" --output-root "$ROOT" "${GPU[@]}" &
    MAIN=$!
    ( sleep "$LEFT"; kill -TERM -- "-$MAIN" 2>/dev/null && echo "[gpu_compare] main rows stopped after $LEFT s" ) &
    TIMER=$!
    wait "$MAIN" || true
    kill "$TIMER" 2>/dev/null || true
    "$PY" tools/compare.py "${PROTO[@]}" --summarise-only "${ROWS[@]}" --results-dir "$OUT" --output-root "$ROOT" "${GPU[@]}"
fi
