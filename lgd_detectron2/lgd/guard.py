"""The teacher guard: does LGD's self-teacher detect better than its student?

A self-teacher is handed the ground truth, so its detection losses (the student's head on its maps,
``*_tea``) should be below the student's own. Every period the hook compares the two over that
period (mean over iterations of the summed detection losses), logs a warning when the teacher is
not ahead, and, with MODEL.LGD.TEACHER_GUARD.SWITCH_OFF_DISTILL, switches distillation off (the
distillation loss trains only the adapter) for the next period; the decision is made again at the
end of every period. A teacher behind by this measure can still help: on the pretrained protocol of
docs/LGD.md it was behind in every period after the first, and switching distillation off made the
student worse, so the switch is off by default.
"""
import logging

from detectron2.engine import HookBase
from detectron2.utils import comm

from ..distill.meta_arch import unwrap

logger = logging.getLogger(__name__)


def detection_loss_sums(storage, window):
    """(student, teacher) mean summed detection losses over the last ``window`` iterations, from
    the loss terms the trainer logged: ``loss_*`` (student, without ``loss_distill``) and
    ``loss_*_tea`` (teacher). None when the terms are missing (e.g. not the main process)."""
    histories = storage.histories()
    student = [k for k in histories if k.startswith("loss_") and not k.endswith("_tea") and k != "loss_distill"]
    teacher = [k for k in histories if k.startswith("loss_") and k.endswith("_tea")]
    if not student or not teacher:
        return None
    mean = lambda keys: sum(histories[k].avg(window) for k in keys)  # noqa: E731
    return mean(student), mean(teacher)


class TeacherGuard(HookBase):
    def __init__(self, period, switch_off):
        self.period, self.switch_off = period, switch_off

    def before_train(self):
        distiller = unwrap(self.trainer.model).distiller
        if not self.switch_off and distiller.guard_switched_off:
            # a checkpoint of a run with SWITCH_OFF_DISTILL, loaded into one without it
            logger.info("LGD teacher guard: SWITCH_OFF_DISTILL is off; distillation switched on again")
            distiller.guard_switched_off = False

    def after_step(self):
        it = self.trainer.iter + 1
        if it % self.period or it >= self.trainer.max_iter:
            return
        sums = detection_loss_sums(self.trainer.storage, self.period) if comm.is_main_process() else None
        sums = comm.all_gather(sums)[0]  # the main process decides for every process
        if sums is None:
            return
        student, teacher = sums
        behind = bool(teacher >= student)
        if behind:
            logger.warning(
                f"LGD teacher guard, iterations {it - self.period}-{it}: the self-teacher's detection "
                f"loss {teacher:.4f} is not below the student's {student:.4f}" + (
                    " - distillation switched off for the next period" if self.switch_off else
                    "; distillation stays on (such a teacher still helped its student in docs/LGD.md's "
                    "measurements; MODEL.LGD.TEACHER_GUARD.SWITCH_OFF_DISTILL True switches it off then)"
                )
            )
        distiller = unwrap(self.trainer.model).distiller
        if self.switch_off and distiller.guard_switched_off != behind:
            if not behind:
                logger.info(f"LGD teacher guard, iteration {it}: teacher ahead again "
                            f"({teacher:.4f} < {student:.4f}); distillation on")
            distiller.guard_switched_off = behind
        self.trainer.storage.put_scalars(guard_teacher_minus_student=teacher - student,
                                         guard_distill_off=float(distiller.guard_switched_off),
                                         smoothing_hint=False)
