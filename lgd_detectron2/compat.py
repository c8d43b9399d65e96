"""Run on a Detectron2 that was installed without its C++/CUDA extension (``detectron2._C``).

The PyPI package ``pb1-detectron2==0.6`` carries Detectron2 v0.6's Python code but not its C++
sources, so ``detectron2._C`` does not exist and ``import detectron2.layers`` fails (v0.6 imports
``_C`` at module level for deformable convolution and rotated boxes). Faster R-CNN, RetinaNet and
FCOS need none of those ops: ROIAlign and NMS come from torchvision.

``apply()`` (called when ``lgd_detectron2`` is imported) does nothing if a real ``_C`` exists.
Otherwise it:

* registers a stand-in module ``detectron2._C`` whose ops raise :class:`MissingNativeOpError`
  naming the op and how to get it, so the modules that import ``_C`` load;
* replaces ``nms_rotated`` (a ``torch.ops.detectron2`` op) by one that raises the same error;
* makes ``COCOEvaluator`` use pycocotools' ``COCOeval`` (the fast C++ evaluator needs ``_C``).
"""
import importlib.util
import logging
import sys
import types

__all__ = ["apply", "has_native_ops", "MissingNativeOpError"]

logger = logging.getLogger(__name__)

_STUB_MARKER = "_lgd_detectron2_fallback"
_HOW_TO_FIX = (
    "This Detectron2 was installed without its C++/CUDA extension (detectron2._C), for example "
    "from the PyPI sdist pb1-detectron2. Build Detectron2 from source with its C++ ops "
    "(`DETECTRON2_SRC=/path/to/detectron2 make setup` on a machine with a compiler, "
    "and CUDA for GPU ops) to use rotated boxes, deformable convolution or the fast COCO "
    "evaluator; see 'Installing with upstream Detectron2' in README.md."
)


class MissingNativeOpError(RuntimeError):
    """A Detectron2 op that needs the compiled extension ``detectron2._C`` was called."""


def _missing_op(name):
    def op(*args, **kwargs):
        raise MissingNativeOpError(
            f"detectron2._C.{name} is not available (needed by rotated-box and "
            f"deformable-convolution ops). {_HOW_TO_FIX}"
        )

    op.__name__ = name
    return op


class _FallbackC(types.ModuleType):
    """Stand-in for ``detectron2._C``: importable, every op raises a clear error when called."""

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _missing_op(name)

    # Read by detectron2.utils.collect_env (called from default_setup).
    @staticmethod
    def get_compiler_version():
        return "none: detectron2._C not built (lgd_detectron2 fallback in use)"

    @staticmethod
    def get_cuda_version():
        return "none: detectron2._C not built"

    @staticmethod
    def has_cuda():
        return False


def has_native_ops():
    """True if the installed Detectron2 has its compiled extension."""
    module = sys.modules.get("detectron2._C")
    if module is not None:
        return not getattr(module, _STUB_MARKER, False)
    try:
        return importlib.util.find_spec("detectron2._C") is not None
    except (ImportError, ValueError):
        return False


def _pillow_shim():
    """Detectron2 v0.6 reads ``PIL.Image.LINEAR`` (removed in Pillow 10) when detectron2.data is
    imported; alias it to BILINEAR, as upstream did later (ff53992b). No-op on Pillow < 10."""
    from PIL import Image

    if not hasattr(Image, "LINEAR"):
        Image.LINEAR = Image.BILINEAR


def group_norm_32(channels):
    """GroupNorm(32, C), as Detectron2's "GN"; accepts C < 32 (then one group per channel)."""
    from torch import nn

    return nn.GroupNorm(min(32, channels), channels)


def _retinanet_gn_shim():
    """Detectron2 v0.6's RetinaNetHead probes its norm with ``get_norm(norm, 1)``, which fails for
    ``MODEL.RETINANET.NORM "GN"`` (GroupNorm(32, 1)); pass the same layers as a callable instead.
    The built head (layer types, names, shapes) is what "GN" builds. Idempotent."""
    from detectron2.modeling.meta_arch.retinanet import RetinaNetHead

    original = RetinaNetHead.from_config
    if getattr(original, "_lgd_gn_shim", False):
        return

    def from_config(cls, cfg, *args, **kwargs):  # Detectron2's @configurable wants 'cfg' first
        ret = original.__func__(cls, cfg, *args, **kwargs)
        if ret.get("norm") == "GN":
            ret["norm"] = group_norm_32
        return ret

    from_config._lgd_gn_shim = True
    RetinaNetHead.from_config = classmethod(from_config)


def apply():
    """Install the fallback if (and only if) ``detectron2._C`` is missing; returns whether it did.
    Idempotent. The Pillow and RetinaNet-GN shims apply to any Detectron2 v0.6 (harmless on later
    versions)."""
    _pillow_shim()
    installed = _install_fallback()
    _retinanet_gn_shim()
    return installed


def _install_fallback():
    if has_native_ops():
        return False
    import detectron2

    if not isinstance(sys.modules.get("detectron2._C"), _FallbackC):
        stub = _FallbackC("detectron2._C", "lgd_detectron2 fallback: " + _HOW_TO_FIX)
        setattr(stub, _STUB_MARKER, True)
        sys.modules["detectron2._C"] = stub
        detectron2._C = stub

    # Rotated NMS is looked up in torch.ops.detectron2, which only the compiled extension fills.
    import detectron2.layers as layers
    import detectron2.layers.nms as nms

    nms.nms_rotated = layers.nms_rotated = _missing_op("nms_rotated")

    # The fast COCOeval (COCOeval_opt) is a C++ class; use pycocotools' reference one.
    from pycocotools.cocoeval import COCOeval

    import detectron2.evaluation.coco_evaluation as coco_evaluation
    import detectron2.evaluation.fast_eval_api as fast_eval_api

    fast_eval_api.COCOeval_opt = COCOeval
    coco_evaluation.COCOeval_opt = COCOeval
    logger.debug("detectron2._C missing: using lgd_detectron2's CPU fallback")
    return True
