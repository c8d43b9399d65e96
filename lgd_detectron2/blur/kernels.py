"""Motion-blur kernels for blur-robust detection (issue: self-guided distillation, sharp view
teaches blurred view; spec: shared/specs/other-skd.md section 1, "Blur synthesis").

Two kinds, as in the spec's reconstruction (the paper only says "a diverse set of motion blur
kernels"):
  * linear motion: a segment of a given length and angle;
  * camera shake: a random trajectory in the manner of Boracchi & Foi (2012): a particle whose
    velocity takes random Gaussian kicks, with occasional larger jerks, sampled over the exposure
    and rasterised with bilinear splatting.
Each kernel is non-negative and sums to 1. Severity 1-5 sets the kernel's extent (the spec's
7-31 px at COCO scale: 7, 13, 19, 25, 31 px by default; scale it with the image size).

``BlurKernelBank`` precomputes, with a fixed seed, a number of kernels per severity (half linear,
half shake). Training samples one on the fly; evaluation takes ``kernel_for_image(image_id,
severity)``, a deterministic function of (seed, image id, severity), so every run blurs a given
test image the same way.
"""
import cv2
import numpy as np

DEFAULT_EXTENTS = (7, 13, 19, 25, 31)  # kernel size in px for severity 1..5


def _normalised(kernel):
    total = kernel.sum()
    if total <= 0:
        raise ValueError("blur kernel has no mass")
    return (kernel / total).astype(np.float32)


def _splat(points, size):
    """Rasterise sub-pixel points (x, y in [0, size-1]) into a size x size map, bilinearly."""
    kernel = np.zeros((size, size), dtype=np.float64)
    x0, y0 = np.floor(points[:, 0]).astype(int), np.floor(points[:, 1]).astype(int)
    fx, fy = points[:, 0] - x0, points[:, 1] - y0
    for dx, dy, w in ((0, 0, (1 - fx) * (1 - fy)), (1, 0, fx * (1 - fy)),
                      (0, 1, (1 - fx) * fy), (1, 1, fx * fy)):
        xs, ys = np.clip(x0 + dx, 0, size - 1), np.clip(y0 + dy, 0, size - 1)
        np.add.at(kernel, (ys, xs), w)
    return kernel


def _fit(points, size):
    """Centre the trajectory and scale it to fit a size x size kernel."""
    points = points - (points.max(0) + points.min(0)) / 2
    extent = np.abs(points).max()
    if extent > 0:
        points = points * min(1.0, (size - 1) / 2 / extent)
    return points + (size - 1) / 2


def linear_motion_kernel(length, angle, size=None):
    """A segment covering ``length`` px (first to last pixel centre: length - 1) at ``angle``
    (radians) through the kernel centre."""
    size = size or int(np.ceil(length)) | 1
    span = max(length - 1, 0.0)
    t = np.linspace(-0.5, 0.5, max(2, int(4 * length)))
    points = np.stack([t * span * np.cos(angle), t * span * np.sin(angle)], axis=1)
    return _normalised(_splat(_fit(points, size), size))


def camera_shake_kernel(rng, size, steps=512, anxiety=0.005, jerk_prob=0.01):
    """A random camera-shake trajectory (Boracchi & Foi 2012 style) rasterised to size x size."""
    velocity = rng.normal(size=2)
    velocity /= np.linalg.norm(velocity) + 1e-12
    position, points = np.zeros(2), []
    for _ in range(steps):
        kick = rng.normal(size=2) * anxiety * size
        if rng.random() < jerk_prob:
            kick += rng.normal(size=2) * 0.2 * size  # occasional abrupt shake
        velocity = velocity + kick - 0.02 * position / size  # weak pull back to the centre
        position = position + velocity * size / steps
        points.append(position.copy())
    return _normalised(_splat(_fit(np.array(points), size), size))


def apply_blur(image, kernel):
    """Convolve an HxWxC (or HxW) uint8 image with ``kernel``; borders reflect; uint8 out."""
    blurred = cv2.filter2D(image.astype(np.float32), -1, kernel, borderType=cv2.BORDER_REFLECT)
    return np.clip(np.rint(blurred), 0, 255).astype(np.uint8)


class BlurKernelBank:
    """``kernels_per_severity`` seeded kernels for each severity 1..len(extents)."""

    def __init__(self, seed=0, kernels_per_severity=64, extents=DEFAULT_EXTENTS):
        if kernels_per_severity < 2:
            raise ValueError("kernels_per_severity must be >= 2 (linear and shake kernels)")
        self.seed, self.extents = seed, tuple(int(e) | 1 for e in extents)  # odd sizes
        rng = np.random.default_rng(seed)
        self.kernels = {}
        for severity, size in enumerate(self.extents, start=1):
            bank = []
            for i in range(kernels_per_severity):
                if i % 2 == 0:
                    length = rng.uniform(0.6, 1.0) * size
                    bank.append(linear_motion_kernel(length, rng.uniform(0, np.pi), size))
                else:
                    bank.append(camera_shake_kernel(rng, size))
            self.kernels[severity] = bank

    def _check(self, severity):
        if severity not in self.kernels:
            raise ValueError(f"blur severity {severity} not in 1..{len(self.extents)}")

    def sample(self, rng, severity=None):
        """A kernel for training: random severity (unless given), random kernel of the bank."""
        severity = severity or int(rng.integers(1, len(self.extents) + 1))
        self._check(severity)
        bank = self.kernels[severity]
        return bank[int(rng.integers(len(bank)))]

    def kernel_for_image(self, image_id, severity):
        """The evaluation kernel of an image: a fixed function of (seed, image id, severity)."""
        self._check(severity)
        bank = self.kernels[severity]
        index = np.random.default_rng([self.seed, int(image_id), severity]).integers(len(bank))
        return bank[int(index)]
