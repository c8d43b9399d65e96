"""lgd-detectron2: knowledge distillation for Detectron2 detectors.

Importing the package applies the Detectron2 compatibility layer (see ``compat``), registers the
meta-architectures and the built-in demo datasets.
"""
from . import compat

compat.apply()

from .config import add_distill_config, get_distill_cfg  # noqa: E402
from . import data  # noqa: E402,F401  (registers the demo datasets)
from . import modeling  # noqa: E402,F401  (registers the meta-architectures)

__version__ = "0.1.0"
__all__ = ["add_distill_config", "get_distill_cfg", "compat"]
