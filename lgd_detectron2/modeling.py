"""Imports every module that registers a meta-architecture or a distiller."""
from .distill import meta_arch  # noqa: F401
from .fgfi import distiller as _fgfi  # noqa: F401
from .lgd import distiller as _lgd  # noqa: F401
from .udfa import distiller as _udfa  # noqa: F401
from .blur import deblur as _deblur, meta_arch as _blur_skd  # noqa: F401  (backbone, meta-arch)
from .wsod import meta_arch as _wsod, mil_head as _mil_head, pretrain as _pretrain  # noqa: F401
