"""Motion-blur kernels for blur-robust detection (issue: self-guided distillation, sharp view
teaches blurred view; spec: shared/specs/other-skd.md section 1, "Blur synthesis").

Two kinds, as in the spec's reconstruction (the paper only says "a diverse set of motion blur
kernels"):
  * linear motion: a segment of a given length and angle;
  * camera shake: a random trajectory in the manner of Boracchi & Foi (2012): a particle whose
    velocity takes random Gaussian kicks, with occasional larger jerks, sampled over the exposure
    and rasterised with bilinear splatting.
Each kernel is non-negative and sums to 1. Severity 1-5 sets the kernel's extent: its side in
pixels of the image as stored (blur is applied before any resize), 7, 13, 19, 25, 31 px by default
(INPUT.BLUR.EXTENTS; the spec's 7-31 px at COCO scale). With a reference size (INPUT.BLUR.REFERENCE_SIZE
> 0) the extents are those of an image whose shorter side is the reference size, and an image of
shorter side s gets the same kernels drawn at ``kernel_size(extent, s, reference)`` px: extent *
s / reference rounded to the nearest odd integer, at least ``MIN_SCALED_SIZE`` (3). So severity is
an absolute pixel extent by default (31 px is 4% of an 800-px side, 16% of the 192-px demo
images) and a fraction of the image side with a reference size.

``BlurKernelBank`` precomputes, with a fixed seed, a number of kernels per severity (half linear,
half shake) at the extents, and keeps each kernel's shape (segment length as a fraction of the
kernel side and angle; shake trajectory) to redraw it at a scaled size. Training samples one on
the fly; evaluation takes ``kernel_for_image(image_id, severity, image_shape)``, a deterministic
function of (seed, image id, severity) and, with a reference size, the image's shorter side, so
every run blurs a given test image the same way.
"""
import cv2
import numpy as np

DEFAULT_EXTENTS = (7, 13, 19, 25, 31)  # kernel size in px for severity 1..5 (INPUT.BLUR.EXTENTS)
MIN_SCALED_SIZE = 3  # a scaled kernel is never smaller (1 px would be no blur at all)


def odd_extent(extent):
    """The kernel side of an unscaled extent: the extent itself, made odd (8 -> 9)."""
    return int(extent) | 1


def kernel_size(extent, shorter_side=None, reference_size=0):
    """The kernel side (odd, px) of severity extent ``extent`` on an image of shorter side
    ``shorter_side``: ``extent`` itself (made odd) when ``reference_size`` is 0, else
    extent * shorter_side / reference_size rounded to the nearest odd integer, at least
    MIN_SCALED_SIZE. Example: extent 31, reference 800, a 192-px image: 7.44 -> 7 px."""
    if not reference_size:
        return odd_extent(extent)
    if shorter_side is None:
        raise ValueError("blur kernels scaled to the image (INPUT.BLUR.REFERENCE_SIZE > 0) need the image size")
    scaled = extent * shorter_side / reference_size
    return max(MIN_SCALED_SIZE, 2 * int(np.floor(scaled / 2)) + 1)


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


def camera_shake_trajectory(rng, size, steps=512, anxiety=0.005, jerk_prob=0.01):
    """The (steps, 2) points of a random camera-shake trajectory (Boracchi & Foi 2012 style),
    drawn for a size x size kernel (``trajectory_kernel`` rasterises it at any size)."""
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
    return np.array(points)


def trajectory_kernel(points, size):
    """A trajectory centred and scaled to fit a size x size kernel, rasterised, normalised."""
    return _normalised(_splat(_fit(points, size), size))


def camera_shake_kernel(rng, size, steps=512, anxiety=0.005, jerk_prob=0.01):
    """A random camera-shake trajectory (Boracchi & Foi 2012 style) rasterised to size x size."""
    return trajectory_kernel(camera_shake_trajectory(rng, size, steps, anxiety, jerk_prob), size)


def apply_blur(image, kernel):
    """Convolve an HxWxC (or HxW) uint8 image with ``kernel``; borders reflect; uint8 out."""
    blurred = cv2.filter2D(image.astype(np.float32), -1, kernel, borderType=cv2.BORDER_REFLECT)
    return np.clip(np.rint(blurred), 0, 255).astype(np.uint8)


class BlurKernelBank:
    """``kernels_per_severity`` seeded kernels for each severity 1..len(extents), at the extents
    (made odd). ``reference_size`` 0: every image gets those kernels; > 0: the extents are for an
    image of shorter side ``reference_size`` and the kernels are redrawn at ``kernel_size`` for the
    image's shorter side (``image_shape`` (H, W, ...) is then required by ``sample`` and
    ``kernel_for_image``). The draws (which kernel, which severity) do not depend on the size."""

    def __init__(self, seed=0, kernels_per_severity=64, extents=DEFAULT_EXTENTS, reference_size=0):
        if kernels_per_severity < 2:
            raise ValueError("kernels_per_severity must be >= 2 (linear and shake kernels)")
        if not extents or any(e <= 0 for e in extents):
            raise ValueError(f"blur extents {list(extents)} must be positive")
        if reference_size < 0:
            raise ValueError(f"blur reference size {reference_size} must be >= 0")
        self.seed, self.extents = seed, tuple(odd_extent(e) for e in extents)
        self.reference_size = reference_size
        rng = np.random.default_rng(seed)
        self.kernels, self.shapes, self._scaled = {}, {}, {}
        for severity, size in enumerate(self.extents, start=1):
            bank, shapes = [], []
            for i in range(kernels_per_severity):
                if i % 2 == 0:
                    length = rng.uniform(0.6, 1.0) * size
                    angle = rng.uniform(0, np.pi)
                    bank.append(linear_motion_kernel(length, angle, size))
                    shapes.append(("linear", length / size, angle))
                else:
                    points = camera_shake_trajectory(rng, size)
                    bank.append(trajectory_kernel(points, size))
                    shapes.append(("shake", points))
            self.kernels[severity], self.shapes[severity] = bank, shapes

    def _check(self, severity):
        if severity not in self.kernels:
            raise ValueError(f"blur severity {severity} not in 1..{len(self.extents)}")

    def size_for(self, severity, image_shape=None):
        """The kernel side (px) of ``severity`` on an image of shape ``image_shape`` (H, W, ...)."""
        self._check(severity)
        shorter = min(image_shape[:2]) if image_shape is not None else None
        return kernel_size(self.extents[severity - 1], shorter, self.reference_size)

    def kernel(self, severity, index, image_shape=None):
        """Kernel ``index`` of ``severity``, at the size for ``image_shape`` (the bank's own
        kernel when that size is the extent)."""
        size = self.size_for(severity, image_shape)
        if size == self.extents[severity - 1]:
            return self.kernels[severity][index]
        key = (severity, index, size)
        if key not in self._scaled:
            shape = self.shapes[severity][index]
            if shape[0] == "linear":
                self._scaled[key] = linear_motion_kernel(shape[1] * size, shape[2], size)
            else:
                self._scaled[key] = trajectory_kernel(shape[1], size)
        return self._scaled[key]

    def sample(self, rng, severity=None, image_shape=None):
        """A kernel for training: random severity (unless given), random kernel of the bank, at the
        size for ``image_shape`` (needed with a reference size)."""
        severity = severity or int(rng.integers(1, len(self.extents) + 1))
        self._check(severity)
        return self.kernel(severity, int(rng.integers(len(self.kernels[severity]))), image_shape)

    def kernel_for_image(self, image_id, severity, image_shape=None):
        """The evaluation kernel of an image: a fixed function of (seed, image id, severity) and,
        with a reference size, of the image's shorter side."""
        self._check(severity)
        index = np.random.default_rng([self.seed, int(image_id), severity]).integers(len(self.kernels[severity]))
        return self.kernel(severity, int(index), image_shape)
