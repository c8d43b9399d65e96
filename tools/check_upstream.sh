#!/usr/bin/env bash
# The upstream route end to end (`make test-upstream`): builds Detectron2 from DETECTRON2_SRC
# (a source tree or a pip URL; default: upstream main from GitHub) with its C++ ops into
# .venv-upstream, with current numpy / Pillow / matplotlib (constraints-upstream.txt), prints the
# versions it got, then runs the whole test suite there. .venv (the default route) is untouched.
#
#   DETECTRON2_SRC=~/src/detectron2 bash tools/check_upstream.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export DETECTRON2_SRC="${DETECTRON2_SRC:-git+https://github.com/facebookresearch/detectron2.git}"
export VENV="${VENV:-.venv-upstream}"
bash tools/setup_env.sh
VPY="$(cd "$VENV" && pwd)/bin/python"
(cd / && "$VPY" - <<'PY'
import cv2, detectron2, detectron2._C, matplotlib, numpy, PIL, torch
print(f"[upstream] detectron2 {detectron2.__version__} with C++ ops ({detectron2._C.__file__}); "
      f"torch {torch.__version__}, numpy {numpy.__version__}, Pillow {PIL.__version__}, "
      f"matplotlib {matplotlib.__version__}, OpenCV {cv2.__version__}")
assert int(numpy.__version__.split(".")[0]) >= 2, "the upstream route should run on numpy 2"
assert hasattr(cv2, "ximgproc"), "OpenCV without the contrib modules (Selective Search)"
PY
)
"$VPY" -m pytest -q -n auto -p no:cacheprovider tests
