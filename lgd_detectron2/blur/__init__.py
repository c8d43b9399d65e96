from .datasets import register_blurred, register_blurred_names
from .kernels import BlurKernelBank, apply_blur, camera_shake_kernel, linear_motion_kernel
from .mapper import BlurDatasetMapper

__all__ = [
    "register_blurred", "register_blurred_names", "BlurKernelBank", "apply_blur",
    "camera_shake_kernel", "linear_motion_kernel", "BlurDatasetMapper",
]
