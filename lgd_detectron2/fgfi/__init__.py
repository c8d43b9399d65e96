from .distiller import FGFI, TeacherLoadError, build_teacher, imitation_masks, masked_imitation_loss
