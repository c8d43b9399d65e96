from .distiller import LGD, normalized_mse, sequential_convs
from .self_teacher import LabelEncoder, SelfTeacher, build_object_table, cell_masks
