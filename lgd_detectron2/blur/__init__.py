from .kernels import BlurKernelBank, apply_blur, camera_shake_kernel, linear_motion_kernel

__all__ = ["BlurKernelBank", "apply_blur", "camera_shake_kernel", "linear_motion_kernel"]
