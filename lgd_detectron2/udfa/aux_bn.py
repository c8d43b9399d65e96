"""Auxiliary BatchNorm for adversarial inputs (AdvProp, Xie et al. 2020; UDFA's "mixbn").

``add_auxiliary_bn(model)`` gives every trainable BatchNorm of ``model`` a second BatchNorm
``aux_bn`` (own statistics and affine parameters) used while ``adversarial_bn(model)`` is active.
The BatchNorm keeps its class, its stock parameter names and its clean behaviour (its class becomes a
subclass that adds the switch), so the student still loads a stock checkpoint and exports to the
stock model by dropping ``*.aux_bn.*``. A checkpoint without ``aux_bn`` entries (a trained clean
detector, the usual start of fine-tuning) initialises each auxiliary BatchNorm as a copy of its
clean one.
"""
import contextlib
import copy

from torch import nn

_STATE = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


class AuxiliaryBatchNormMixin:
    """Mixed in front of a BatchNorm class: ``forward`` uses ``aux_bn`` while ``adversarial``."""

    adversarial = False

    def forward(self, x):
        return self.aux_bn(x) if self.adversarial else super().forward(x)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for name in _STATE:  # a checkpoint of the clean model: the auxiliary BN starts as its copy
            aux_key, key = f"{prefix}aux_bn.{name}", prefix + name
            if aux_key not in state_dict and key in state_dict:
                state_dict[aux_key] = state_dict[key].clone()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def _with_auxiliary(cls):
    """The class ``Auxiliary<cls>``, defined once in this module (so instances still pickle)."""
    name = "Auxiliary" + cls.__name__
    existing = globals().get(name)
    if existing is None or existing.__mro__[2] is not cls:
        existing = type(name, (AuxiliaryBatchNormMixin, cls), {"__module__": __name__})
        globals()[name] = existing
    return existing


def add_auxiliary_bn(model):
    """In place; returns how many BatchNorm layers got an auxiliary copy (frozen BN has none)."""
    added = 0
    for module in list(model.modules()):
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, AuxiliaryBatchNormMixin):
            aux = copy.deepcopy(module)
            module.__class__ = _with_auxiliary(type(module))
            module.aux_bn = aux
            added += 1
    return added


@contextlib.contextmanager
def adversarial_bn(model, enabled=True):
    """Within the block, every auxiliary-BN layer of ``model`` uses its adversarial BatchNorm."""
    layers = [m for m in model.modules() if isinstance(m, AuxiliaryBatchNormMixin)] if enabled else []
    for m in layers:
        m.adversarial = True
    try:
        yield
    finally:
        for m in layers:
            m.adversarial = False
