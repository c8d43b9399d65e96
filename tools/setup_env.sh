#!/usr/bin/env bash
# Idempotent environment setup used by `make demo` and `make test`.
#
# Creates .venv (Python 3.11), installs torch 2.14.1 / torchvision 0.29.1, the pinned
# dependencies (constraints.txt), Detectron2 v0.6 from the PyPI sdist `pb1-detectron2==0.6`
# built without its C++ extension, and this project in editable mode.
# A second run with nothing changed returns in about a second (a stamp file records the
# hash of the inputs). If .venv already holds a Detectron2 (for example one built from
# upstream source with its C++ ops), it is used unchanged.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3
VENV=.venv
STAMP="$VENV/.lgd_setup_stamp"
HASH=$(cat constraints.txt setup.py tools/setup_env.sh | sha256sum | cut -d' ' -f1)

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$HASH" ] && [ -x "$VENV/bin/python" ]; then
    exit 0
fi

echo "[setup] creating or updating $VENV (this takes a few minutes the first time)"
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
export PIP_CONSTRAINT="$PWD/constraints.txt"

"${PIP[@]}" install "setuptools<81" wheel torch==2.14.1 torchvision==0.29.1

# OpenCV with the contrib modules (Selective Search, tools/selective_search.py). The plain
# opencv-python(-headless) wheels install the same cv2 package: one of them beside contrib
# would overwrite its files, so they are removed first.
OPENCV="opencv-contrib-python-headless==4.8.1.78"
for other in opencv-python-headless opencv-python; do
    if "$VENV/bin/python" -m pip show "$other" >/dev/null 2>&1; then
        "${PIP[@]}" uninstall -y "$other"
        "${PIP[@]}" install --force-reinstall --no-deps "$OPENCV"
    fi
done

if "$VENV/bin/python" -c "import detectron2" >/dev/null 2>&1; then
    echo "[setup] detectron2 already installed in $VENV; keeping it"
    "${PIP[@]}" install pytest pytest-xdist psutil pycocotools "$OPENCV"
else
    # pb1-detectron2 0.6 is Detectron2 v0.6's Python code; its sdist lacks the C++ sources,
    # so build it with the extension list emptied. lgd_detectron2.compat supplies the rest.
    "${PIP[@]}" install "numpy<1.24" "Pillow<10" "matplotlib<3.9" "$OPENCV" \
        "iopath<0.1.10" "fvcore<0.1.6" pycocotools "omegaconf<2.4" "hydra-core<1.4" \
        termcolor yacs tabulate cloudpickle tqdm tensorboard future pydot "black==21.4b2" \
        pytest pytest-xdist psutil
    SRC=$(mktemp -d)
    "${PIP[@]}" download --no-deps --no-binary :all: --no-build-isolation pb1-detectron2==0.6 -d "$SRC"
    tar -xzf "$SRC"/pb1-detectron2-0.6.tar.gz -C "$SRC"
    sed -i 's/^    ext_modules=get_extensions(),/    ext_modules=[],/' "$SRC/pb1-detectron2-0.6/setup.py"
    grep -q '^    ext_modules=\[\],' "$SRC/pb1-detectron2-0.6/setup.py" \
        || { echo "[setup] could not disable the C++ extension in pb1-detectron2's setup.py" >&2; exit 1; }
    "${PIP[@]}" install --no-build-isolation "$SRC/pb1-detectron2-0.6"
    rm -rf "$SRC"
fi

"${PIP[@]}" install --no-build-isolation --no-deps -e .
"$VENV/bin/python" -c "import lgd_detectron2, detectron2.modeling, detectron2.evaluation" \
    || { echo "[setup] the environment does not import; see the messages above" >&2; exit 1; }
echo "$HASH" > "$STAMP"
echo "[setup] done"
