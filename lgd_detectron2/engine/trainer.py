"""``Trainer``: Detectron2's DefaultTrainer with what distillation (and torch 2.x) needs.

* Training step with a gradient filter: parameters the model names in
  ``parameters_without_update(iteration)`` (LGD's backbone freeze) get ``grad = None`` after
  backward, so SGD skips them entirely (no weight decay, no momentum).
* Gradient clipping that skips parameters without a gradient (v0.6's value clipping raises on them
  under torch 2.x).
* A non-finite loss stops training with the loss term and iteration named; checkpoints already
  written are untouched.
* The checkpoint also holds the optimizer (and AMP scaler) state, which v0.6 does not save.
* COCO evaluation with pycocotools when Detectron2 has no compiled extension; VOC evaluation.
* Fails before training when the model's class count differs from the training set's.
* Training-time motion blur (``INPUT.BLUR``: augment, or paired views) through ``BlurDatasetMapper``.
"""
import itertools
import logging
import os
import random
import time
import weakref

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel

from detectron2.data import (
    DatasetMapper, MetadataCatalog, build_detection_test_loader, build_detection_train_loader,
)
from detectron2.data.build import _train_loader_from_config
from detectron2.data.samplers import TrainingSampler
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.engine import DefaultTrainer, SimpleTrainer, TrainerBase
from detectron2.evaluation import COCOEvaluator, PascalVOCDetectionEvaluator
from detectron2.solver import build_optimizer as d2_build_optimizer
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from .. import compat
from ..blur.mapper import BlurDatasetMapper
from ..config import num_classes_key
from ..data.register import CheckedDatasetMapper
from ..distill.meta_arch import unwrap

logger = logging.getLogger(__name__)


class NonFiniteLossError(FloatingPointError):
    pass


def check_losses_finite(loss_dict, iteration):
    """Raise NonFiniteLossError naming the bad loss terms. Under DDP every process raises (the
    flag is all-reduced), so no process is left waiting in the next gradient all-reduce."""
    bad = [k for k, v in loss_dict.items() if not torch.isfinite(v).all()]
    any_bad = bool(bad)
    if comm.get_world_size() > 1:
        flag = torch.tensor([float(any_bad)], device=next(iter(loss_dict.values())).device)
        torch.distributed.all_reduce(flag)
        any_bad = flag.item() > 0
    if any_bad:
        values = ", ".join(f"{k}={loss_dict[k].item()}" for k in bad) or "on another process"
        raise NonFiniteLossError(
            f"Loss became non-finite at iteration {iteration}: {values}. Training stopped; "
            "checkpoints written so far are intact (resume with --resume, e.g. with a lower "
            "SOLVER.BASE_LR or gradient clipping)."
        )


class _ClippedOptimizerMixin:
    """Per-parameter gradient clipping (Detectron2's 'value' / 'norm' semantics) that skips
    parameters whose .grad is None."""

    clip_type = "value"
    clip_value = 1.0
    norm_type = 2.0

    def step(self, closure=None):
        grads = [p for g in self.param_groups for p in g["params"] if p.grad is not None]
        for p in grads:
            if self.clip_type == "value":
                p.grad.clamp_(-self.clip_value, self.clip_value)
            else:
                torch.nn.utils.clip_grad_norm_([p], self.clip_value, self.norm_type)
        return super().step(closure)


def build_optimizer(cfg, model):
    """Detectron2's SGD parameter groups, with None-safe gradient clipping."""
    clip = cfg.SOLVER.CLIP_GRADIENTS
    if not clip.ENABLED:
        return d2_build_optimizer(cfg, model)
    plain_cfg = cfg.clone()
    plain_cfg.defrost()
    plain_cfg.SOLVER.CLIP_GRADIENTS.ENABLED = False
    optimizer = d2_build_optimizer(plain_cfg, model)
    if clip.CLIP_TYPE not in ("value", "norm"):
        raise ValueError(f"SOLVER.CLIP_GRADIENTS.CLIP_TYPE = {clip.CLIP_TYPE!r}; use 'value' or 'norm'")
    cls = type(
        type(optimizer).__name__ + "WithGradientClip",
        (_ClippedOptimizerMixin, type(optimizer)),
        {"clip_type": clip.CLIP_TYPE, "clip_value": clip.CLIP_VALUE, "norm_type": clip.NORM_TYPE},
    )
    optimizer.__class__ = cls
    return optimizer


class SkipSampler(torch.utils.data.Sampler):
    """The index stream of ``sampler`` without its first ``skip`` indices (cheap: no image loaded)."""

    def __init__(self, sampler, skip):
        self.sampler, self.skip = sampler, skip

    def __iter__(self):
        return itertools.islice(iter(self.sampler), self.skip, None)


class DistillTrainLoop(SimpleTrainer):
    """SimpleTrainer (optionally AMP) step with the gradient filter and the non-finite guard."""

    def __init__(self, model, data_loader, optimizer, amp=False, seed=None):
        super().__init__(model, data_loader, optimizer)
        self.amp = amp
        self.grad_scaler = torch.cuda.amp.GradScaler() if amp else None
        self.seed = seed

    def run_step(self):
        assert self.model.training, "[DistillTrainLoop] model was changed to eval mode!"
        # With a fixed seed, each iteration's random draws (in-process augmentation, RPN/ROI
        # sampling) depend only on (seed, iteration, rank): a resumed run repeats them exactly.
        if self.seed is not None:
            iteration_seed = (self.seed * 1_000_003 + self.iter * 101 + comm.get_rank()) % 2**31
            np.random.seed(iteration_seed)
            random.seed(iteration_seed)
        start = time.perf_counter()
        data = next(self._data_loader_iter)
        data_time = time.perf_counter() - start
        if self.seed is not None:
            torch.manual_seed(iteration_seed)

        with torch.autocast("cuda", enabled=self.amp):
            loss_dict = self.model(data)
            losses = sum(loss_dict.values())
        check_losses_finite(loss_dict, self.iter)

        self.optimizer.zero_grad()
        if self.amp:
            self.grad_scaler.scale(losses).backward()
        else:
            losses.backward()
        frozen = getattr(unwrap(self.model), "parameters_without_update", None)
        if frozen is not None:
            for p in frozen(self.iter):
                p.grad = None
        self._write_metrics(loss_dict, data_time)
        if self.amp:
            self.grad_scaler.step(self.optimizer)
            self.grad_scaler.update()
        else:
            self.optimizer.step()

    def state_dict(self):
        ret = super().state_dict()
        if self.grad_scaler is not None:
            ret["grad_scaler"] = self.grad_scaler.state_dict()
        return ret

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        if self.grad_scaler is not None and "grad_scaler" in state_dict:
            self.grad_scaler.load_state_dict(state_dict["grad_scaler"])


def check_num_classes(cfg):
    """Stop before training if the model's class count differs from the training set's."""
    from detectron2.data import DatasetCatalog

    key, model_classes = num_classes_key(cfg)
    for name in cfg.DATASETS.TRAIN:
        meta = MetadataCatalog.get(name)
        if not hasattr(meta, "thing_classes"):
            DatasetCatalog.get(name)  # COCO loaders set thing_classes when loading
        classes = getattr(MetadataCatalog.get(name), "thing_classes", None)
        if classes is not None and len(classes) != model_classes:
            raise ValueError(
                f"{key} = {model_classes} but the training set '{name}' has {len(classes)} "
                f"classes ({', '.join(classes[:10])}{', ...' if len(classes) > 10 else ''}). "
                f"Set {key} {len(classes)}."
            )


def wrap_ddp(model, cfg):
    """DistributedDataParallel when there are several processes (CPU/gloo or GPU/nccl)."""
    if comm.get_world_size() == 1:
        return model
    return DistributedDataParallel(
        model,
        device_ids=None if cfg.MODEL.DEVICE == "cpu" else [comm.get_local_rank()],
        broadcast_buffers=False,
        find_unused_parameters=cfg.MODEL.DISTILL.FIND_UNUSED_PARAMETERS,
    )


class Trainer(DefaultTrainer):
    def __init__(self, cfg):
        # DefaultTrainer.__init__ of Detectron2 v0.6, with our training loop and DDP wrapping
        # (find_unused_parameters configurable, CPU processes allowed).
        TrainerBase.__init__(self)
        if not logging.getLogger("detectron2").isEnabledFor(logging.INFO):
            setup_logger()
        check_num_classes(cfg)
        cfg = DefaultTrainer.auto_scale_workers(cfg, comm.get_world_size())
        model = self.build_model(cfg)
        optimizer = self.build_optimizer(cfg, model)
        self._sampler_seed = cfg.SEED if cfg.SEED >= 0 else comm.shared_random_seed()
        data_loader = self.build_train_loader(cfg, sampler_seed=self._sampler_seed)
        model = wrap_ddp(model, cfg)
        self._trainer = DistillTrainLoop(
            model, data_loader, optimizer, amp=cfg.SOLVER.AMP.ENABLED,
            seed=cfg.SEED if cfg.SEED >= 0 else None,
        )
        self.scheduler = self.build_lr_scheduler(cfg, optimizer)
        self.checkpointer = DetectionCheckpointer(model, cfg.OUTPUT_DIR, trainer=weakref.proxy(self))
        self.start_iter = 0
        self.max_iter = cfg.SOLVER.MAX_ITER
        self.cfg = cfg
        self.register_hooks(self.build_hooks())

    # Detectron2 v0.6 saves only the iteration and hook states (LR scheduler). For an exact
    # --resume we also save the optimizer (momentum) and the AMP scaler; the data stream
    # continues where it stopped and, with SEED >= 0, random draws are seeded per iteration.
    def state_dict(self):
        ret = super().state_dict()
        ret["_trainer"] = self._trainer.state_dict()
        ret["sampler_seed"] = self._sampler_seed
        return ret

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        if "_trainer" in state_dict:
            self._trainer.load_state_dict(state_dict["_trainer"])
        self._sampler_seed = state_dict.get("sampler_seed", self._sampler_seed)

    def resume_or_load(self, resume=True):
        super().resume_or_load(resume=resume)
        if self.start_iter > 0:
            # Skip the samples the interrupted run already consumed, so iteration k sees the
            # same batch as in an uninterrupted run.
            loader = self.build_train_loader(self.cfg, self.start_iter, self._sampler_seed)
            self._trainer.data_loader = loader
            self._trainer._data_loader_iter = iter(loader)

    @classmethod
    def build_train_loader(cls, cfg, start_iter=0, sampler_seed=None):
        """Detectron2's train loader; the default TrainingSampler gets an explicit seed (saved in
        checkpoints) and skips the first ``start_iter`` batches of its stream."""
        args = _train_loader_from_config(cfg)
        if cfg.INPUT.BLUR.MODE != "off":  # training-time motion blur (augment or paired views)
            args["mapper"] = BlurDatasetMapper(cfg, is_train=True)
        args["mapper"] = CheckedDatasetMapper(args["mapper"])
        if cfg.DATALOADER.SAMPLER_TRAIN == "TrainingSampler" and sampler_seed is not None:
            args["sampler"] = TrainingSampler(len(args["dataset"]), seed=sampler_seed)
        if start_iter:
            per_process = cfg.SOLVER.IMS_PER_BATCH // comm.get_world_size()
            args["sampler"] = SkipSampler(args["sampler"], start_iter * per_process)
        return build_detection_train_loader(**args)

    @classmethod
    def build_optimizer(cls, cfg, model):
        return build_optimizer(cfg, model)

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        if cfg.MODEL.LGD.EVAL_TEACHER and "Distill" in cfg.MODEL.META_ARCHITECTURE:
            mapper = _TestMapperWithAnnotations(cfg, is_train=False)
            return build_detection_test_loader(cfg, dataset_name, mapper=mapper)
        return build_detection_test_loader(cfg, dataset_name)

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        output_folder = output_folder or os.path.join(cfg.OUTPUT_DIR, "inference")
        evaluator_type = MetadataCatalog.get(dataset_name).get("evaluator_type", "coco")
        if evaluator_type == "pascal_voc":
            return PascalVOCDetectionEvaluator(dataset_name)
        # explicit tasks: the default derives them from the predictions, so a Mask R-CNN with no
        # detection yet would report no segm row at all
        tasks = ("bbox", "segm") if cfg.MODEL.MASK_ON else ("bbox",)
        return COCOEvaluator(
            dataset_name, tasks=tasks, output_dir=output_folder,
            use_fast_impl=compat.has_native_ops(),
        )


class _TestMapperWithAnnotations(DatasetMapper):
    """Test-time mapper that keeps ground truth (for LGD's teacher-oracle evaluation)."""

    def __call__(self, dataset_dict):
        self.is_train = True
        try:
            ret = super().__call__(dataset_dict)
        finally:
            self.is_train = False
        return ret
