"""lgd-detectron2: knowledge distillation (LGD, FGFI) for Detectron2 detectors.

Install Detectron2 and PyTorch first (see README.md); `tools/setup_env.sh` does all of it.
"""
from setuptools import find_packages, setup

setup(
    name="lgd_detectron2",
    version="0.1.0",
    description="Label-guided self-distillation (LGD) and feature imitation (FGFI) for Detectron2",
    packages=find_packages(include=("lgd_detectron2", "lgd_detectron2.*")),
    python_requires=">=3.8",
    # torch and detectron2 are not listed: neither can be resolved from PyPI as a normal
    # dependency (detectron2 is not published there; torch builds are machine-specific).
    install_requires=["pycocotools", "fvcore", "numpy", "Pillow"],
    extras_require={"test": ["pytest", "pytest-xdist", "psutil"]},
)
