"""Training-time motion blur in the data loader (blur issue, items 1-2).

``BlurDatasetMapper`` is Detectron2's ``DatasetMapper`` plus ``INPUT.BLUR``:
  * ``augment``: with probability PROB the image is replaced by a blurred copy (the "original
    trained with blur augmentation" row of the comparison);
  * ``paired``: every input carries ``image`` (sharp) and ``image_blurred``; the geometric
    augmentation (resize, flip, ...) is drawn once and applied to both, so they share the boxes.
The kernel is drawn per image on the fly (random severity from SEVERITIES, random kernel of a bank
seeded with KERNEL_SEED) and applied to the image as read from disk, before any resize, at the size
that EXTENTS and REFERENCE_SIZE give that image: the same scale and the same size rule as the
evaluation copies ``<dataset>_blur<N>`` (registered with the config's rule).
Random draws come from NumPy's global generator, like Detectron2's own augmentations, so they
follow the loader workers' seeding (and the trainer's per-iteration seed without workers).
"""
import copy
import functools

import numpy as np
import torch

from detectron2.config import configurable
from detectron2.data import DatasetMapper
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T

from .kernels import DEFAULT_EXTENTS, BlurKernelBank, apply_blur


@functools.lru_cache(maxsize=4)
def training_bank(seed, extents=DEFAULT_EXTENTS, reference_size=0):
    return BlurKernelBank(seed=seed, extents=tuple(extents), reference_size=reference_size)


class BlurDatasetMapper(DatasetMapper):
    @configurable
    def __init__(self, is_train, *, blur_mode, blur_prob=0.5, severities=(1, 2, 3, 4, 5),
                 kernel_seed=0, extents=DEFAULT_EXTENTS, reference_size=0, **kwargs):
        super().__init__(is_train, **kwargs)
        if blur_mode not in ("off", "augment", "paired"):
            raise ValueError(f"blur_mode = {blur_mode!r}; use 'off', 'augment' or 'paired'")
        self.blur_mode, self.blur_prob = blur_mode, blur_prob
        self.severities, self.kernel_seed = tuple(severities), kernel_seed
        self.extents, self.reference_size = tuple(extents), reference_size

    @classmethod
    def from_config(cls, cfg, is_train=True):
        ret = super().from_config(cfg, is_train)
        b = cfg.INPUT.BLUR
        ret.update(blur_mode=b.MODE, blur_prob=b.PROB, severities=b.SEVERITIES, kernel_seed=b.KERNEL_SEED,
                   extents=tuple(b.EXTENTS), reference_size=b.REFERENCE_SIZE)
        return ret

    def sample_kernel(self, image_shape=None):
        """A training kernel for an image of shape ``image_shape`` (H, W, ...; its size matters
        with a reference size)."""
        rng = np.random.default_rng(np.random.randint(2**31))
        severity = self.severities[int(rng.integers(len(self.severities)))]
        bank = training_bank(self.kernel_seed, self.extents, self.reference_size)
        return bank.sample(rng, severity, image_shape)

    def __call__(self, dataset_dict):
        if not self.is_train or self.blur_mode == "off":
            return super().__call__(dataset_dict)
        if "sem_seg_file_name" in dataset_dict:
            raise ValueError("INPUT.BLUR supports detection and instance segmentation, not sem_seg")
        dataset_dict = copy.deepcopy(dataset_dict)
        image = utils.read_image(dataset_dict["file_name"], format=self.image_format)
        utils.check_image_size(dataset_dict, image)
        blur_now = self.blur_mode == "paired" or np.random.rand() < self.blur_prob
        blurred = apply_blur(image, self.sample_kernel(image.shape)) if blur_now else None
        if self.blur_mode == "augment" and blurred is not None:
            image = blurred
        aug_input = T.AugInput(image)
        transforms = self.augmentations(aug_input)  # drawn once, shared by both views
        image = aug_input.image
        dataset_dict["image"] = _to_tensor(image)
        if self.blur_mode == "paired":
            dataset_dict["image_blurred"] = _to_tensor(transforms.apply_image(blurred))
        if self.proposal_topk is not None:
            utils.transform_proposals(dataset_dict, image.shape[:2], transforms, proposal_topk=self.proposal_topk)
        if "annotations" in dataset_dict:
            self._transform_annotations(dataset_dict, transforms, image.shape[:2])
        return dataset_dict


def _to_tensor(image):
    return torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)))
