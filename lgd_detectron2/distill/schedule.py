"""Iteration-driven switches of the distillation schedule.

The iteration is read from Detectron2's EventStorage (``get_event_storage().iter``), which the
trainer sets from the checkpoint on ``--resume``, so a resumed run continues in the right phase.
"""
from dataclasses import dataclass

from detectron2.utils.events import get_event_storage


def current_iteration():
    try:
        return get_event_storage().iter
    except AssertionError:
        raise RuntimeError(
            "Distillation training reads the iteration from Detectron2's EventStorage; call the "
            "model in training mode inside `with EventStorage(iteration):` (the trainer does)."
        ) from None


@dataclass(frozen=True)
class DistillSchedule:
    """Phases of one run of ``max_iter`` iterations (0-based iteration ``it``).

    * distillation reaches the student only for ``pre_nondistill <= it < max_iter - post_nondistill``
      (outside that window the distillation loss still trains the adapter alone);
    * the bottom-up backbone gets no update while ``it < freeze_backbone``;
    * the imitation/distillation weight is zero while ``it < warmup`` (FGFI).
    """

    max_iter: int
    pre_nondistill: int = 0
    post_nondistill: int = 0
    freeze_backbone: int = 0
    warmup: int = 0

    def __post_init__(self):
        for name in ("pre_nondistill", "post_nondistill", "freeze_backbone", "warmup"):
            if getattr(self, name) < 0:
                raise ValueError(f"distillation schedule: {name} = {getattr(self, name)} < 0")

    def distill_on(self, it):
        return self.pre_nondistill <= it < self.max_iter - self.post_nondistill

    def backbone_frozen(self, it):
        return it < self.freeze_backbone

    def warmed_up(self, it):
        return it >= self.warmup
