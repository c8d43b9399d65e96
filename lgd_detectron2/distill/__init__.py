from .meta_arch import DISTILLER_REGISTRY, DistillGeneralizedRCNN, DistillMixin, build_distiller, unwrap
from .schedule import DistillSchedule, current_iteration
