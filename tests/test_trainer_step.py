"""The training step's mechanics: fused per-parameter clipping, the single host copy of the losses,
the backbone freeze as skipped backward (same result as computing and dropping the gradients),
bf16 autocast, denormal flushing in worker threads, and the self-teacher's painted convolution."""
import os
import subprocess
import sys

import pytest
import torch

from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

from common import REPO, tiny_batch, tiny_lgd_cfg
from lgd_detectron2.engine.trainer import (
    DistillTrainLoop, NonFiniteLossError, build_optimizer, clip_gradients_, losses_to_host,
)
from lgd_detectron2.lgd.self_teacher import _block_masks, conv3x3_of_painted


def random_grads(seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = [(3, 4), (7,), (2, 3, 3, 3), (1,)]
    return [torch.randn(s, generator=g) * 10 for s in shapes]


@pytest.mark.parametrize("clip_type", ["norm", "value"])
def test_fused_clipping_matches_per_parameter_clipping(clip_type):
    fused = random_grads()
    clip_gradients_(fused, clip_type, 5.0)
    params = [torch.nn.Parameter(torch.zeros_like(g)) for g in random_grads()]
    for p, g in zip(params, random_grads()):
        p.grad = g
        if clip_type == "value":
            p.grad.clamp_(-5.0, 5.0)
        else:
            torch.nn.utils.clip_grad_norm_([p], 5.0)
    for a, p in zip(fused, params):
        torch.testing.assert_close(a, p.grad, rtol=1e-6, atol=1e-6)
    if clip_type == "norm":  # every gradient was above 5 and now has norm 5
        assert all(abs(g.norm().item() - 5.0) < 1e-4 for g in fused)


def test_losses_to_host_copies_once_and_names_bad_terms():
    values = losses_to_host({"loss_a": torch.tensor(1.5), "loss_b": torch.tensor([2.0])}, 3)
    assert {k: v.item() for k, v in values.items()} == {"loss_a": 1.5, "loss_b": 2.0}
    assert all(v.device.type == "cpu" and v.dim() == 0 for v in values.values())
    with pytest.raises(NonFiniteLossError, match=r"iteration 7: loss_b=nan"):
        losses_to_host({"loss_a": torch.tensor(1.0), "loss_b": torch.tensor(float("nan"))}, 7)


def _steps(loop, model, iterations):
    for it in iterations:
        with EventStorage(it) as storage:
            loop.iter, loop.storage = it, storage
            loop.run_step()
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_backbone_freeze_skips_backward_with_the_same_result():
    """Iterations 0-1 frozen, 2 not: the loop's requires_grad switch gives the same parameters as
    computing the bottom-up gradients and dropping them (the original's way), and during the
    freeze no bottom-up gradient exists at all."""
    cfg = tiny_lgd_cfg("MODEL.LGD.PRE_FREEZE_STUDENT_BACKBONE_ITERS", 2, "SOLVER.WEIGHT_DECAY", 0.1,
                       "MODEL.BACKBONE.FREEZE_AT", 1)
    batch = tiny_batch()
    torch.manual_seed(0)
    model = build_model(cfg).train()
    stem = [p for n, p in model.named_parameters() if n.startswith("backbone.bottom_up.stem.")]
    assert stem and not any(p.requires_grad for p in stem)  # FREEZE_AT 1 froze the stem
    loop = DistillTrainLoop(model, [batch] * 3, build_optimizer(cfg, model), seed=5)
    with EventStorage(0) as storage:
        loop.iter, loop.storage = 0, storage
        loop.run_step()
    bottom_up = list(model.backbone.bottom_up.parameters())
    assert all(p.grad is None and not p.requires_grad for p in bottom_up)
    assert any(p.grad is not None for p in model.backbone.parameters())  # the FPN learns
    skipped = _steps(loop, model, [1, 2])
    assert any(p.requires_grad for p in bottom_up)
    assert not any(p.requires_grad for p in stem)  # FREEZE_AT is not undone at the boundary

    torch.manual_seed(0)
    reference_model = build_model(cfg).train()
    optimizer = build_optimizer(cfg, reference_model)
    for it in range(3):
        with EventStorage(it):
            torch.manual_seed((5 * 1_000_003 + it * 101) % 2**31)  # the loop's per-iteration seed
            losses = reference_model(batch)
            optimizer.zero_grad()
            sum(losses.values()).backward()
            for p in reference_model.parameters_without_update(it):
                p.grad = None
            optimizer.step()
    reference = dict(reference_model.named_parameters())
    for name, value in skipped.items():
        torch.testing.assert_close(value, reference[name].detach(), rtol=1e-5, atol=1e-6, msg=name)


def test_bf16_autocast_training_step_on_cpu():
    cfg = tiny_lgd_cfg("SOLVER.AMP.ENABLED", True, "SOLVER.AMP.DTYPE", "bfloat16")
    model = build_model(cfg).train()
    loop = DistillTrainLoop(model, [tiny_batch()] * 2, build_optimizer(cfg, model), amp=True,
                            amp_dtype="bfloat16")
    assert loop.grad_scaler is None  # bf16 needs no loss scaling
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    after = _steps(loop, model, [100])
    assert any(not torch.equal(before[n], after[n]) for n in before)
    assert all(torch.isfinite(v).all() for v in after.values())


@pytest.mark.parametrize("num_objects", [5, 40])  # 40 >= 32 channels: the plain convolution
def test_painted_convolution_equals_convolving_the_painted_map(num_objects):
    torch.manual_seed(0)
    b, h, w, c = 2, 11, 13, 32
    masks = torch.rand(num_objects, h, w) > 0.6
    batch_idx = torch.arange(num_objects) % b
    conv = torch.nn.Conv2d(c, c, 3, padding=1).double()
    vectors = torch.randn(num_objects, c, dtype=torch.float64, requires_grad=True)
    block = _block_masks(masks, batch_idx, b, torch.float64)
    out = conv3x3_of_painted(conv, masks, block, batch_idx, vectors, b)
    painted = (block.t() @ vectors).view(b, h, w, c).permute(0, 3, 1, 2)
    reference = conv(painted)
    torch.testing.assert_close(out, reference)
    weights = torch.randn_like(reference)
    grads = torch.autograd.grad((out * weights).sum(), [conv.weight, conv.bias, vectors])
    reference_grads = torch.autograd.grad((reference * weights).sum(), [conv.weight, conv.bias, vectors])
    for a, r in zip(grads, reference_grads):
        torch.testing.assert_close(a, r)


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="needs two CPU threads")
def test_flush_denormals_reaches_openmp_worker_threads():
    """torch.set_flush_denormal after the thread pool exists leaves the workers stalling on
    denormals (a 100x slower matmul); flush_denormals fixes every thread."""
    code = (
        "import torch; from lgd_detectron2.denormals import flush_denormals, denormal_slowdown\n"
        "torch.set_num_threads(2); x = torch.ones(2000, 2000); (x @ x[:, :8]).sum()\n"
        "torch.set_flush_denormal(True); before = denormal_slowdown()\n"
        "threads = flush_denormals(); print(before, denormal_slowdown(), threads)\n"
    )
    # Up to 3 measurements: another test process on the same cores (pytest-xdist) can inflate one
    # timing ratio; a missing flush in the workers (~100x) fails every one of them.
    for _ in range(3):
        out = subprocess.run([sys.executable, "-W", "ignore", "-c", code], cwd=REPO, check=True,
                             capture_output=True, text=True).stdout.split()
        before, after, threads = float(out[-3]), float(out[-2]), int(out[-1])
        if after < 3:
            break
    assert threads == 2
    if before <= 5:  # a property of the CPU and the torch build, not of this package
        pytest.skip(f"no denormal stall in the OpenMP workers here (slowdown {before:.1f}x before the "
                    f"fix, {after:.1f}x after): a timing ratio near 1 on both sides shows nothing")
    assert after < 3, after
