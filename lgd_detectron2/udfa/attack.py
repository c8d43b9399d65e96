"""The signed-gradient attack on raw images and the adversarial evaluation datasets.

The attack works on the 0-255 image tensors a Detectron2 model receives (``batched_inputs[i]
["image"]``, before the model's pixel normalisation), with the detector's own total training loss
as the target:

  x_0 = image (+ U(-eps/2, eps/2) with RANDOM_START)
  x_{k+1} = clip_[0,255]( clip_[image-eps, image+eps]( x_k + STEP_SIZE * sign(d loss / d x_k) ) )

Input gradients come from ``torch.autograd.grad``, so no parameter's ``.grad`` is touched and each
step's graph is freed with the step.

``<name>_adv`` and ``<name>_pgd`` (``register_adversarial_names``): the records and metadata of a
registered dataset; ``Trainer.test`` evaluates them on images attacked against the model under
test, one batch at a time (in memory: nothing is written to disk), with the evaluation attacks
TEST.ADV and TEST.PGD respectively (``EVALUATION_ATTACKS``; never the training attack
MODEL.UDFA.ATTACK). The attack's loss runs the model in training mode (RPN/RoI sampling, losses)
with every BatchNorm in eval mode (running statistics used, never updated), with a fixed random
seed per batch (``losses_at_test_time``).
"""
import contextlib
import re

import torch
import torch.nn.functional as F
from torch import nn

from detectron2.structures import ImageList

from ..data.register import register_derived_dataset
from ..distill.meta_arch import head_losses, unwrap

# dataset suffix -> the config node (under TEST) of its attack
EVALUATION_ATTACKS = {"adv": "ADV", "pgd": "PGD"}
_NAME = re.compile(r"^(?P<base>.+)_(?P<suffix>%s)$" % "|".join(EVALUATION_ATTACKS))
ATTACK_FLAG = "attack"  # set on test inputs of the attacked datasets by the test mapper
ATTACK_SUFFIX = "attack_suffix"  # in the records of an attacked dataset: which attack ("adv", "pgd")


def with_images(batched_inputs, images):
    """Copies of the input dicts with ``image`` replaced."""
    return [{**x, "image": im} for x, im in zip(batched_inputs, images)]


def project(x, original, epsilon):
    """Into the L-inf ball of radius ``epsilon`` around ``original`` and into [0, 255]."""
    return torch.min(torch.max(x, original - epsilon), original + epsilon).clamp_(0, 255)


def signed_gradient_attack(loss_of, originals, epsilon, step_size, steps=1, random_start=False,
                           first_step=None, keep_first_graph=True):
    """Adversarial copies (detached float tensors) of ``originals`` (list of 0-255 image tensors).

    ``loss_of(images) -> scalar`` is the loss to increase. ``first_step = (leaves, loss)`` reuses a
    loss already computed from ``leaves`` (tensors equal to ``originals`` that require grad) for the
    first step, keeping its graph for the caller's backward (UDFA's clean pass) if
    ``keep_first_graph``; ignored with a random start.
    """
    originals = [o.detach().float() for o in originals]
    x = originals
    if random_start:
        x = [project(o + torch.empty_like(o).uniform_(-epsilon / 2, epsilon / 2), o, epsilon)
             for o in originals]
        first_step = None
    for k in range(steps):
        if k == 0 and first_step is not None:
            leaves, loss = first_step
            grads = torch.autograd.grad(loss, leaves, retain_graph=keep_first_graph)
        else:
            leaves = [t.detach().requires_grad_(True) for t in x]
            grads = torch.autograd.grad(loss_of(leaves), leaves)
        x = [project(t.detach() + step_size * g.sign(), o, epsilon) for t, g, o in zip(leaves, grads, originals)]
    return x


def attack_settings(node):
    """``signed_gradient_attack`` keywords from an attack config node (MODEL.UDFA.ATTACK, TEST.ADV,
    TEST.PGD)."""
    return dict(epsilon=float(node.EPSILON), step_size=float(node.STEP_SIZE), steps=int(node.STEPS),
                random_start=bool(node.RANDOM_START))


def preprocess_differentiable(detector, batched_inputs):
    """``detector.preprocess_image`` (normalise, pad, batch), differentiable in the images:
    Detectron2 pads by writing into views of a new tensor, which autograd refuses. The padded size
    comes from Detectron2's own padding of the detached images, so it follows the detector's rule."""
    if not any(x["image"].requires_grad for x in batched_inputs):
        return detector.preprocess_image(batched_inputs)
    reference = detector.preprocess_image([{**x, "image": x["image"].detach()} for x in batched_inputs])
    height, width = reference.tensor.shape[-2:]
    normalised = [(x["image"].to(detector.device) - detector.pixel_mean) / detector.pixel_std
                  for x in batched_inputs]
    padded = [F.pad(t, (0, width - t.shape[-1], 0, height - t.shape[-2])) for t in normalised]
    return ImageList(torch.stack(padded), reference.image_sizes)


def features_and_losses(detector, batched_inputs, gt_instances=None):
    """(backbone features, training losses) of the detector on ``batched_inputs`` (images may be
    float tensors that require grad: normalisation and padding keep the graph); ``gt_instances``
    default to the inputs' "instances" on the detector's device."""
    if gt_instances is None:
        gt_instances = [x["instances"].to(detector.device) for x in batched_inputs]
    images = preprocess_differentiable(detector, batched_inputs)
    features = detector.backbone(images.tensor)
    return features, head_losses(detector, images, features, gt_instances)


def detection_losses(detector, batched_inputs):
    """The detector's training losses on ``batched_inputs`` (see ``features_and_losses``)."""
    return features_and_losses(detector, batched_inputs)[1]


@contextlib.contextmanager
def losses_at_test_time(model):
    """Training mode (so the model computes its losses) with every BatchNorm in eval mode, and a
    throw-away event storage (the heads log sampling statistics; ``--eval-only`` has no storage,
    and during training the evaluation must not write into the training's); restores the mode."""
    from detectron2.utils.events import EventStorage

    was_training = model.training
    model.train()
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()
    try:
        with EventStorage():
            yield
    finally:
        model.train(was_training)


class AttackingEvaluationModel(nn.Module):
    """Wraps the model under test: inputs flagged ``attack`` (the ``<name>_adv`` / ``<name>_pgd``
    test sets) are attacked against the model with TEST.ADV / TEST.PGD (the suffix their records
    carry), then passed to it; other inputs pass unchanged."""

    def __init__(self, model, cfg):
        super().__init__()
        self.model = model
        self.attacks, self.seeds = {}, {}
        for suffix, node_name in EVALUATION_ATTACKS.items():
            node = cfg.TEST[node_name]
            self.attacks[suffix] = attack_settings(node)
            self.seeds[suffix] = int(node.SEED)
        self.batches = dict.fromkeys(EVALUATION_ATTACKS, 0)  # attacked batches so far, per suffix
        self.train(model.training)  # inference_context restores the mode it found: the model's

    def forward(self, batched_inputs):
        if not any(x.get(ATTACK_FLAG) for x in batched_inputs):
            return self.model(batched_inputs)
        detector = unwrap(self.model)
        if any("instances" not in x for x in batched_inputs):
            raise ValueError("the adversarial evaluation needs ground truth in every test input")
        suffixes = {x.get(ATTACK_SUFFIX, "adv") for x in batched_inputs}
        if len(suffixes) != 1 or not suffixes <= set(EVALUATION_ATTACKS):
            raise ValueError(f"an attacked batch mixes attacks or names an unknown one: "
                             f"{sorted(suffixes)} (known: {sorted(EVALUATION_ATTACKS)})")
        suffix = suffixes.pop()

        def loss_of(images):
            return sum(detection_losses(detector, with_images(batched_inputs, images)).values())

        cuda = detector.device.type == "cuda"
        devices = [detector.device.index or 0] if cuda else []
        with torch.enable_grad(), torch.random.fork_rng(devices=devices), \
                losses_at_test_time(detector):
            torch.manual_seed(self.seeds[suffix] + self.batches[suffix])
            adversarial = signed_gradient_attack(
                loss_of, [x["image"].to(detector.device) for x in batched_inputs], **self.attacks[suffix])
        self.batches[suffix] += 1
        return self.model(with_images(batched_inputs, adversarial))


def is_adversarial_name(name):
    return _NAME.match(name) is not None


def register_adversarial(base, suffix="adv"):
    """Register ``<base>_<suffix>``: the records (each tagged with ``suffix``, so the evaluation
    knows which attack to run) and metadata of ``base``."""
    if suffix not in EVALUATION_ATTACKS:
        raise ValueError(f"unknown attacked-dataset suffix {suffix!r}; known: {sorted(EVALUATION_ATTACKS)}")
    return register_derived_dataset(f"{base}_{suffix}", base,
                                    lambda records: [{**r, ATTACK_SUFFIX: suffix} for r in records],
                                    "attack")


def register_adversarial_names(names):
    """Register every ``<registered name>_adv`` / ``_pgd`` in ``names`` (after the blurred copies,
    so ``X_blur3_adv`` works); returns the ones registered."""
    from detectron2.data import DatasetCatalog

    from ..blur.datasets import register_blurred_names

    matches = [_NAME.match(n) for n in names if _NAME.match(n)]
    register_blurred_names([m["base"] for m in matches if m["base"] not in DatasetCatalog.list()])
    return [register_adversarial(m["base"], m["suffix"]) for m in matches]
