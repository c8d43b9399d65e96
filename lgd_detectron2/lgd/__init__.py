"""LGD (Zhang et al., "LGD: Label-guided Self-distillation for Object Detection", AAAI 2022).
Modules: ``config`` (MODEL.LGD keys and their validation), ``self_teacher`` (the label-guided
self-teacher), ``distiller`` (the training step), ``guard`` (the teacher guard hook),
``diagnostics`` (teacher-oracle and class-agnostic evaluation). Imported by
``lgd_detectron2.modeling``."""
