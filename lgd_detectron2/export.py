"""Student-only checkpoints: what a stock Detectron2 model of the matching baseline config loads."""
import torch

from .distill.meta_arch import STUDENT_PARTS_DROPPED_ON_EXPORT, STUDENT_PREFIXES_DROPPED_ON_EXPORT


def student_weights(model_state):
    """Drop training-only parts (``distiller.*``: self-teacher, adapters, FGFI teacher;
    ``self_teacher.*``: the blur self-guided KD's moving teacher; ``*.aux_bn.*``: UDFA's BatchNorm
    for adversarial inputs)."""
    return {k: v for k, v in model_state.items()
            if not k.startswith(STUDENT_PREFIXES_DROPPED_ON_EXPORT)
            and not any(part in k for part in STUDENT_PARTS_DROPPED_ON_EXPORT)}


def export_student(checkpoint_path, output_path):
    """Write ``{"model": student weights}`` (plain tensors: loads with ``weights_only=True``)."""
    ckpt = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
    state = ckpt.get("model", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise ValueError(f"{checkpoint_path} does not hold a model state dict (expected key 'model')")
    student = student_weights(state)
    dropped = len(state) - len(student)
    torch.save({"model": student}, output_path)
    return len(student), dropped
