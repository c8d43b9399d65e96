"""``Trainer``: Detectron2's DefaultTrainer with what distillation (and torch 2.x) needs.

* Training step with a gradient filter: parameters the model names in
  ``parameters_without_update(iteration)`` (LGD's backbone freeze) get ``grad = None`` after
  backward, so SGD skips them entirely (no weight decay, no momentum).
* Gradient clipping that skips parameters without a gradient (v0.6's value clipping raises on them
  under torch 2.x).
* A non-finite loss stops training with the loss term and iteration named; checkpoints already
  written are untouched.
* The checkpoint also holds the optimizer (and AMP scaler) state, which v0.6 does not save.
* COCO evaluation with pycocotools when Detectron2 has no compiled extension (for LGD plus
  class-agnostic AP: ``bbox/AP_agnostic``, ``bbox/AP50_agnostic``); VOC evaluation.
* LGD: at every evaluation of a training run the self-teacher oracle is evaluated too
  (``teacher_bbox/...``, MODEL.LGD.REPORT_TEACHER), and the teacher guard (``lgd.guard``) compares
  the teacher's detection losses with the student's every period.
* Fails before training when the model's class count differs from the training set's.
* Training-time motion blur (``INPUT.BLUR``: augment, or paired views) through ``BlurDatasetMapper``.
* Test sets named ``<dataset>_adv`` / ``<dataset>_pgd`` are evaluated on images attacked against
  the model under test (``udfa.attack``; attacks TEST.ADV / TEST.PGD).
* Weakly supervised detectors: their training and test sets and proposal files are checked before
  use (``wsod.datasets``); evaluation is VOC mAP@0.5 + CorLoc (``WSODEvaluator``).
"""
import itertools
import logging
import math
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
from detectron2.engine import DefaultTrainer, SimpleTrainer, TrainerBase, hooks
from detectron2.evaluation import COCOEvaluator, PascalVOCDetectionEvaluator
from detectron2.solver import build_optimizer as d2_build_optimizer
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from .. import compat
from ..blur.mapper import BlurDatasetMapper
from ..config import num_classes_key
from ..data.register import CheckedDatasetMapper
from ..distill.meta_arch import unwrap
from ..lgd.config import guard_period, is_lgd_config
from ..lgd.diagnostics import (
    ClassAgnosticCOCOEvaluator, is_lgd_model, teacher_inference, teacher_results_beside,
)
from ..lgd.guard import TeacherGuard
from ..udfa.attack import ATTACK_FLAG, AttackingEvaluationModel, is_adversarial_name
from ..wsod.config import ARCH as WSOD_ARCH
from ..wsod.datasets import check_wsod_dataset
from ..wsod.evaluation import WSODEvaluator

logger = logging.getLogger(__name__)


class NonFiniteLossError(FloatingPointError):
    pass


def losses_to_host(loss_dict, iteration):
    """The loss values as CPU scalars, with one host synchronisation for all of them.

    Raise NonFiniteLossError naming the bad loss terms. Under DDP every process raises (a
    non-finite flag is all-reduced before the single copy to the host), so no process is left
    waiting in the next gradient all-reduce.
    """
    names = list(loss_dict)
    values = torch.stack([loss_dict[k].detach().float().reshape(()) for k in names])
    flag = (~torch.isfinite(values)).any().float().reshape(1)
    if comm.get_world_size() > 1:
        torch.distributed.all_reduce(flag)
    host = torch.cat([values, flag]).cpu()  # the step's one host synchronisation
    bad = [f"{k}={v}" for k, v in zip(names, host[:-1].tolist()) if not math.isfinite(v)]
    if host[-1] > 0:
        detail = ", ".join(bad) or "on another process"
        raise NonFiniteLossError(
            f"Loss became non-finite at iteration {iteration}: {detail}. Training stopped; "
            "checkpoints written so far are intact (resume with --resume, e.g. with a lower "
            "SOLVER.BASE_LR or gradient clipping)."
        )
    return dict(zip(names, host[:-1].unbind()))


class _ClippedOptimizerMixin:
    """Per-parameter gradient clipping with Detectron2's 'value' / 'norm' semantics (each
    parameter's gradient clamped, or scaled to norm <= CLIP_VALUE on its own), for all parameters
    in a few fused ``torch._foreach_*`` kernels, skipping parameters whose .grad is None."""

    clip_type = "value"
    clip_value = 1.0
    norm_type = 2.0

    def step(self, closure=None):
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        if grads:
            clip_gradients_(grads, self.clip_type, self.clip_value, self.norm_type)
        return super().step(closure)


def clip_gradients_(grads, clip_type, clip_value, norm_type=2.0):
    """In place; per tensor, as ``clamp_(-v, v)`` or ``torch.nn.utils.clip_grad_norm_([g], v)``."""
    if clip_type == "value":
        torch._foreach_clamp_min_(grads, -clip_value)
        torch._foreach_clamp_max_(grads, clip_value)
        return
    norms = torch._foreach_norm(grads, norm_type)
    # clip_grad_norm_'s factor: max_norm / (norm + 1e-6), at most 1
    scale = torch._foreach_add(norms, 1e-6)
    torch._foreach_reciprocal_(scale)
    torch._foreach_mul_(scale, clip_value)
    torch._foreach_clamp_max_(scale, 1.0)
    torch._foreach_mul_(grads, scale)


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
    """SimpleTrainer step with AMP (fp16 with a gradient scaler, or bf16), the schedule's frozen
    parameters and the non-finite guard, one host synchronisation per step (the loss values).

    Frozen parameters (``parameters_without_update(iteration)``, e.g. LGD's bottom-up backbone
    before PRE_FREEZE_STUDENT_BACKBONE_ITERS) get ``requires_grad = False`` for those iterations,
    so autograd skips their backward entirely (no weight gradients, and no input gradients for a
    module that nothing trainable feeds) and SGD skips them (no update, no weight decay, no
    momentum). The set is re-evaluated every iteration from ``self.iter``, so it switches exactly at
    the boundary, also after ``--resume``. Under DDP the model is re-wrapped when the set changes
    (``rewrap``), because DDP registers its gradient hooks for the parameters that require grad at
    construction; without ``rewrap`` a DDP model keeps full backward and drops the gradients.
    """

    def __init__(self, model, data_loader, optimizer, amp=False, seed=None, amp_dtype="float16",
                 rewrap=None):
        super().__init__(model, data_loader, optimizer)
        self.amp = amp
        self.amp_dtype = getattr(torch, amp_dtype)
        self.device_type = "cuda" if next(model.parameters()).is_cuda else "cpu"  # for autocast
        # bf16 has fp32's exponent range: no loss scaling needed
        use_scaler = amp and self.amp_dtype == torch.float16
        self.grad_scaler = torch.cuda.amp.GradScaler() if use_scaler else None
        self.seed = seed
        self.rewrap = rewrap
        self._frozen = []  # parameters this loop set requires_grad=False on

    def _apply_frozen_set(self):
        """requires_grad=False on this iteration's frozen parameters; True again on the ones
        that left the set (only those this loop froze). Returns the parameters whose gradients
        must still be dropped after backward (DDP without ``rewrap``)."""
        model = unwrap(self.model)
        listed = getattr(model, "parameters_without_update", None)
        if listed is None:
            return []
        wanted = list(listed(self.iter))
        if self.model is not model and self.rewrap is None:
            return wanted
        # parameters frozen for other reasons (e.g. BACKBONE.FREEZE_AT) are left alone
        ours = {id(p) for p in self._frozen}
        wanted = [p for p in wanted if p.requires_grad or id(p) in ours]
        wanted_ids = {id(p) for p in wanted}
        if wanted_ids == ours:
            return []
        for p in self._frozen:
            if id(p) not in wanted_ids:
                p.requires_grad_(True)
        self._frozen = wanted
        for p in self._frozen:
            p.requires_grad_(False)
        if self.model is not model:
            self.model = self.rewrap(model)
        return []

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
        drop_grads = self._apply_frozen_set()

        with torch.autocast(self.device_type, dtype=self.amp_dtype, enabled=self.amp):
            loss_dict = self.model(data)
            losses = sum(loss_dict.values())
        loss_values = losses_to_host(loss_dict, self.iter)

        self.optimizer.zero_grad(set_to_none=True)
        if self.grad_scaler is not None:
            self.grad_scaler.scale(losses).backward()
        else:
            losses.backward()
        for p in drop_grads:
            p.grad = None
        self._write_metrics(loss_values, data_time)
        if self.grad_scaler is not None:
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
        if cfg.MODEL.META_ARCHITECTURE == WSOD_ARCH:
            for name, proposals in zip(cfg.DATASETS.TRAIN, cfg.DATASETS.PROPOSAL_FILES_TRAIN):
                check_wsod_dataset(name, proposals, training=True)
        cfg = DefaultTrainer.auto_scale_workers(cfg, comm.get_world_size())
        model = self.build_model(cfg)
        optimizer = self.build_optimizer(cfg, model)
        self._sampler_seed = cfg.SEED if cfg.SEED >= 0 else comm.shared_random_seed()
        data_loader = self.build_train_loader(cfg, sampler_seed=self._sampler_seed)
        model = wrap_ddp(model, cfg)
        self._trainer = DistillTrainLoop(
            model, data_loader, optimizer, amp=cfg.SOLVER.AMP.ENABLED,
            seed=cfg.SEED if cfg.SEED >= 0 else None, amp_dtype=cfg.SOLVER.AMP.DTYPE,
            rewrap=lambda m: wrap_ddp(m, cfg),
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
            if hasattr(self._trainer, "reset_data_loader"):  # Detectron2 after v0.6
                self._trainer.reset_data_loader(lambda: loader)
            else:
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
        if cfg.MODEL.META_ARCHITECTURE == WSOD_ARCH:
            index = list(cfg.DATASETS.TEST).index(dataset_name)
            check_wsod_dataset(dataset_name, cfg.DATASETS.PROPOSAL_FILES_TEST[index], training=False)
        if is_adversarial_name(dataset_name):  # the attack needs the ground truth (its loss)
            mapper = _TestMapperWithAnnotations(cfg, is_train=False, flag=ATTACK_FLAG)
            return build_detection_test_loader(cfg, dataset_name, mapper=mapper)
        if cfg.MODEL.LGD.EVAL_TEACHER and "Distill" in cfg.MODEL.META_ARCHITECTURE:
            mapper = _TestMapperWithAnnotations(cfg, is_train=False)
            return build_detection_test_loader(cfg, dataset_name, mapper=mapper)
        return build_detection_test_loader(cfg, dataset_name)

    def build_hooks(self):
        """Detectron2's hooks; for LGD the periodic evaluation also reports the self-teacher
        oracle (MODEL.LGD.REPORT_TEACHER), and the teacher guard runs."""
        ret = super().build_hooks()
        if not is_lgd_model(unwrap(self.model)):
            return ret
        for hook in ret:
            if isinstance(hook, hooks.EvalHook) and self.cfg.MODEL.LGD.REPORT_TEACHER:
                def test_student_and_teacher():
                    self._last_eval_results = self.test(self.cfg, self.model, report_teacher=True)
                    return self._last_eval_results
                hook._func = test_student_and_teacher
        guard = TeacherGuard(guard_period(self.cfg), self.cfg.MODEL.LGD.TEACHER_GUARD.SWITCH_OFF_DISTILL)
        # before the checkpointer and the evaluation: a checkpoint written at the end of a period
        # holds that period's decision (exact --resume), and every process reaches the guard's
        # all_gather before the evaluation's collectives
        first = next(i for i, h in enumerate(ret) if isinstance(h, (hooks.PeriodicCheckpointer, hooks.EvalHook)))
        ret.insert(first, guard)
        return ret

    @classmethod
    def test(cls, cfg, model, evaluators=None, report_teacher=False):
        """Detectron2's evaluation; with a ``<dataset>_adv`` / ``_pgd`` test set, the model is wrapped so that
        that set's images are attacked against it first (other sets are evaluated as usual).
        ``report_teacher`` (LGD): the self-teacher oracle is evaluated on the same test sets (not
        the attacked ones) and its results are added as ``teacher_<key>``."""
        plain_model = model
        if any(is_adversarial_name(n) for n in cfg.DATASETS.TEST):
            model = AttackingEvaluationModel(model, cfg)
        results = super().test(cfg, model, evaluators)
        lgd = unwrap(plain_model)
        if not (report_teacher and is_lgd_model(lgd) and not lgd.distiller.eval_teacher):
            return results
        teacher_cfg = cfg.clone()
        teacher_cfg.defrost()
        teacher_cfg.MODEL.LGD.EVAL_TEACHER = True
        teacher_cfg.DATASETS.TEST = tuple(n for n in cfg.DATASETS.TEST if not is_adversarial_name(n))
        teacher_cfg.OUTPUT_DIR = os.path.join(cfg.OUTPUT_DIR, "teacher_oracle")
        with teacher_inference(lgd):
            teacher = super().test(teacher_cfg, plain_model)
        return teacher_results_beside(results, teacher)

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        output_folder = output_folder or os.path.join(cfg.OUTPUT_DIR, "inference")
        if cfg.MODEL.META_ARCHITECTURE == WSOD_ARCH:
            return WSODEvaluator(dataset_name, use_07_metric=cfg.TEST.WSOD.VOC07_METRIC)
        evaluator_type = MetadataCatalog.get(dataset_name).get("evaluator_type", "coco")
        if evaluator_type == "pascal_voc":
            return PascalVOCDetectionEvaluator(dataset_name)
        # explicit tasks: the default derives them from the predictions, so a Mask R-CNN with no
        # detection yet would report no segm row at all
        tasks = ("bbox", "segm") if cfg.MODEL.MASK_ON else ("bbox",)
        # LGD runs also report class-agnostic AP (lgd.diagnostics), for student and teacher
        evaluator = ClassAgnosticCOCOEvaluator if is_lgd_config(cfg) else COCOEvaluator
        return evaluator(
            dataset_name, tasks=tasks, output_dir=output_folder,
            use_fast_impl=compat.has_native_ops(),
        )


class _TestMapperWithAnnotations(DatasetMapper):
    """Test-time mapper (test resizing, no flip) that keeps ground truth (LGD's teacher-oracle
    evaluation, the adversarial test sets); ``flag``: a key set True on every output."""

    def __init__(self, cfg, is_train=False, flag=None):
        super().__init__(cfg, is_train=is_train)
        self.flag = flag

    def __call__(self, dataset_dict):
        self.is_train = True
        try:
            ret = super().__call__(dataset_dict)
        finally:
            self.is_train = False
        if self.flag:
            ret[self.flag] = True
        return ret
