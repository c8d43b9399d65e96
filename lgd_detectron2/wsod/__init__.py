"""Weakly supervised detection: WSDDN + OICR, SLV and SLV-SD (``WeaklySupervisedRCNN``)."""
from .datasets import register_weak_names  # noqa: F401
