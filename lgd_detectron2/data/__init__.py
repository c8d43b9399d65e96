from .demo_shapes import ensure_demo_data, register_demo_objects, register_demo_shapes
from .register import keep_difficult_in_builtin_voc, register_coco_folder, register_voc_folder

register_demo_shapes()
register_demo_objects()
keep_difficult_in_builtin_voc()
