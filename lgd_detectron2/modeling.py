"""Imports every module that registers a meta-architecture or a distiller."""
from .distill import meta_arch  # noqa: F401
from .lgd import distiller  # noqa: F401
