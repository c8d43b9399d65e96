#!/usr/bin/env bash
# Idempotent environment setup used by `make demo` and `make test`.
#
# Creates .venv (Python 3.11), installs torch 2.14.1 / torchvision 0.29.1 and one of two
# Detectron2 routes, then this project in editable mode:
#   default   Detectron2 v0.6 from the PyPI sdist `pb1-detectron2==0.6`, built without its C++
#             extension (lgd_detectron2.compat supplies the rest), with the pins of constraints.txt
#   upstream  DETECTRON2_SRC=<a Detectron2 source tree, or a pip URL such as
#             git+https://github.com/facebookresearch/detectron2.git>: built with its C++ ops
#             (MAX_JOBS parallel compiles, default 2) against current numpy, Pillow and matplotlib,
#             with the few pins of constraints-upstream.txt
# The route is remembered in the environment ($VENV/.lgd_detectron2_src), so a later `make test`
# keeps it; asking for another route rebuilds the environment. VENV=<dir> picks another
# environment folder (tools/check_upstream.sh uses .venv-upstream).
# A second run with nothing changed returns in about a second (a stamp file records the
# hash of the inputs). An environment made by hand that already imports a Detectron2 (and has
# no recorded route) keeps that Detectron2.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3
VENV="${VENV:-.venv}"
STAMP="$VENV/.lgd_setup_stamp"
ROUTE_FILE="$VENV/.lgd_detectron2_src"
RECORDED=$(cat "$ROUTE_FILE" 2>/dev/null || true)
ROUTE="${DETECTRON2_SRC:-${RECORDED:-pypi}}"
[ -d "$ROUTE" ] && ROUTE=$(cd "$ROUTE" && pwd)
if [ "$ROUTE" = pypi ]; then
    CONSTRAINTS=constraints.txt
    OPENCV="opencv-contrib-python-headless==4.8.1.78"
else
    CONSTRAINTS=constraints-upstream.txt
    OPENCV="opencv-contrib-python-headless>=4.10,<5"   # wheels built for numpy 2
fi
HASH=$( (cat "$CONSTRAINTS" setup.py tools/setup_env.sh; echo "$ROUTE") | sha256sum | cut -d' ' -f1)

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$HASH" ] && [ -x "$VENV/bin/python" ]; then
    exit 0
fi

# another route than the one recorded, or DETECTRON2_SRC for an environment without a record:
# start from an empty environment (no numpy 1 or Pillow 9 pins left behind)
if [ -d "$VENV" ] && [ "$RECORDED" != "$ROUTE" ] && { [ -n "$RECORDED" ] || [ "$ROUTE" != pypi ]; }; then
    echo "[setup] $VENV was built for Detectron2 '${RECORDED:-unknown}', now '$ROUTE' is asked for: rebuilding $VENV"
    rm -rf "$VENV"
fi
echo "[setup] creating or updating $VENV for Detectron2 '$ROUTE' (this takes a few minutes the first time)"
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
export PIP_CONSTRAINT="$PWD/$CONSTRAINTS"

"${PIP[@]}" install "setuptools<81" wheel torch==2.14.1 torchvision==0.29.1

# OpenCV with the contrib modules (Selective Search, tools/selective_search.py). The plain
# opencv-python(-headless) wheels install the same cv2 package: one of them beside contrib
# would overwrite its files, so they are removed first.
for other in opencv-python-headless opencv-python; do
    if "$VENV/bin/python" -m pip show "$other" >/dev/null 2>&1; then
        "${PIP[@]}" uninstall -y "$other"
        "${PIP[@]}" install --force-reinstall --no-deps "$OPENCV"
    fi
done

if [ "$ROUTE" != pypi ]; then
    # Upstream: its setup.py lists the Python dependencies (fvcore, iopath, omegaconf, ...); it
    # is built in place (not -e: setuptools' develop step runs pip in an environment without torch).
    "${PIP[@]}" install numpy Pillow matplotlib "$OPENCV" pycocotools pytest pytest-xdist pytest-timeout psutil
    if "$VENV/bin/python" -m pip show detectron2 >/dev/null 2>&1; then
        "${PIP[@]}" uninstall -y detectron2
    fi
    MAX_JOBS="${MAX_JOBS:-2}" "${PIP[@]}" install --no-build-isolation "$ROUTE"
    # from / so that a clone in the working directory does not shadow the installed package
    VPY="$(cd "$VENV" && pwd)/bin/python"
    (cd / && "$VPY" -c "import detectron2._C") \
        || { echo "[setup] Detectron2 from '$ROUTE' has no C++ ops (detectron2._C)" >&2; exit 1; }
elif "$VENV/bin/python" -c "import detectron2" >/dev/null 2>&1; then  # PyPI route, or made by hand
    echo "[setup] detectron2 already installed in $VENV; keeping it"
    "${PIP[@]}" install pytest pytest-xdist pytest-timeout psutil pycocotools "$OPENCV"
else
    # pb1-detectron2 0.6 is Detectron2 v0.6's Python code; its sdist lacks the C++ sources,
    # so build it with the extension list emptied. lgd_detectron2.compat supplies the rest.
    "${PIP[@]}" install "numpy<1.24" "Pillow<10" "matplotlib<3.9" "$OPENCV" \
        "iopath<0.1.10" "fvcore<0.1.6" pycocotools "omegaconf<2.4" "hydra-core<1.4" \
        termcolor yacs tabulate cloudpickle tqdm tensorboard future pydot "black==21.4b2" \
        pytest pytest-xdist pytest-timeout psutil
    SRC=$(mktemp -d)
    "${PIP[@]}" download --no-deps --no-binary :all: --no-build-isolation pb1-detectron2==0.6 -d "$SRC"
    tar -xzf "$SRC"/pb1-detectron2-0.6.tar.gz -C "$SRC"
    sed -i 's/^    ext_modules=get_extensions(),/    ext_modules=[],/' "$SRC/pb1-detectron2-0.6/setup.py"
    grep -q '^    ext_modules=\[\],' "$SRC/pb1-detectron2-0.6/setup.py" \
        || { echo "[setup] could not disable the C++ extension in pb1-detectron2's setup.py" >&2; exit 1; }
    "${PIP[@]}" install --no-build-isolation "$SRC/pb1-detectron2-0.6"
    rm -rf "$SRC"
fi
echo "$ROUTE" > "$ROUTE_FILE"

"${PIP[@]}" install --no-build-isolation --no-deps -e .
"$VENV/bin/python" -c "import lgd_detectron2, detectron2.modeling, detectron2.evaluation" \
    || { echo "[setup] the environment does not import; see the messages above" >&2; exit 1; }
echo "$HASH" > "$STAMP"
echo "[setup] done"
