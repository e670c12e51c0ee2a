"""The fused update pass (``kernels/fused_update.py``) against the separate PyTorch passes it replaces:
clipping, decoupled weight decay, AdamW, the teacher EMA; odd shapes, a parameter that does not train, the
frozen last layer, skipped steps, both clipping modes. On the CPU the kernel runs in Triton's interpreter."""
import pytest
import torch

from fastibot.kernels.ema import flatten_params_
from fastibot.kernels.fused_update import FusedUpdate
from fastibot.optim import clip_, clip_coefficients
from fastibot.teacher import ema_reference

BETAS, EPS = (0.9, 0.999), 1e-8
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# (shape, trains, decays, in the last layer)
LAYOUT = [((37, 5), True, True, False), ((7,), True, False, False), ((3, 11), False, False, False),
          ((1000,), True, False, False), ((13, 3), True, True, True), ((13,), True, False, True)]
# every size a multiple of 4: the kernel's 128-bit path (where the gradients' addresses allow it)
ALIGNED_LAYOUT = [((36, 8), True, True, False), ((8,), True, False, False), ((4, 12), False, False, False),
                  ((1000,), True, False, False), ((12, 4), True, True, True), ((12,), True, False, True)]


def _params(seed, layout=LAYOUT):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(shape, generator=g).to(DEVICE), requires_grad=trains)
            for shape, trains, _, _ in layout]


def _pairs(layout=LAYOUT):
    student, teacher = _params(0, layout), _params(1, layout)
    flat = (flatten_params_(student), flatten_params_(teacher))
    return student, teacher, flat


def _grad(shape, g, shifted):
    x = torch.randn(shape, generator=g) * 3
    if not shifted:
        return x.to(DEVICE)
    # the same values one element into a larger buffer: contiguous, not 16-byte aligned
    buf = torch.empty(x.numel() + 1, device=DEVICE)
    buf[1:] = x.reshape(-1).to(DEVICE)
    return buf[1:].view(shape)


@pytest.mark.parametrize("mode,layout,shifted,aligned", [
    ("per_param", LAYOUT, False, False), ("global", LAYOUT, False, False),
    ("per_param", ALIGNED_LAYOUT, False, True), ("global", ALIGNED_LAYOUT, True, False)],
    ids=["odd-per_param", "odd-global", "aligned-per_param", "aligned-shifted_grads-global"])
def test_four_steps_equal_clip_decay_adamw_and_ema_run_apart(mode, layout, shifted, aligned):
    block = 256  # several programs per larger parameter, one block partly used
    s_ref, t_ref = _params(0, layout), _params(1, layout)
    student, teacher, (s_flat, t_flat) = _pairs(layout)
    trainable = [p for p, (_, trains, _, _) in zip(student, layout) if trains]
    decay = [d for _, trains, d, _ in layout if trains]
    last = [la for _, trains, _, la in layout if trains]
    fused = FusedUpdate(s_flat, t_flat, student, trainable, decay, last, BETAS, EPS, block=block)
    ref_train = [p for p, (_, trains, _, _) in zip(s_ref, layout) if trains]
    ref_last = [p for p, la in zip(ref_train, last) if la]
    ref_main = [p for p, la in zip(ref_train, last) if not la]
    opts = {name: torch.optim.AdamW(ps, lr=0.0, betas=BETAS, eps=EPS, weight_decay=0.0, foreach=False)
            for name, ps in (("main", ref_main), ("last", ref_last))}
    g = torch.Generator().manual_seed(2)
    # (lr, wd, skip, frozen, momentum): a frozen last layer, then a skipped step, then all training
    steps = [(0.05, 0.04, 0.0, 1.0, 0.99), (0.04, 0.1, 1.0, 0.0, 0.98), (0.03, 0.2, 0.0, 0.0, 0.97),
             (0.02, 0.3, 0.0, 0.0, 0.96)]
    for lr, wd, skip, frozen, mom in steps:
        grads = [_grad(p.shape, g, shifted) for p in ref_train]
        # the separate passes, on copies of the same gradients
        ref_grads = [x.clone() for x in grads]
        clip_(ref_grads, 1.5, mode)
        for p, x in zip(ref_train, ref_grads):
            p.grad = x
        for p, d, la in zip(ref_train, decay, last):
            if d and not skip and not (frozen and la):
                p.data.mul_(torch.tensor(1.0 - lr * wd, device=DEVICE))
        if not skip:
            opts["main"].param_groups[0]["lr"] = lr
            opts["main"].step()
            if not frozen:
                opts["last"].param_groups[0]["lr"] = lr
                opts["last"].step()
        ema_reference(t_ref, s_ref, mom, 1.0 - mom)
        # the fused pass
        norms = list(torch._foreach_norm(grads))
        coef, _ = clip_coefficients(norms, 1.5, mode)
        fused.set_grads(grads)
        assert fused.aligned == aligned
        t = [torch.tensor(x, dtype=torch.float32, device=DEVICE) for x in (lr, wd, skip, frozen, mom, 1.0 - mom)]
        fused(coef, *t)
        for i, (a, b) in enumerate(zip(student, s_ref)):
            torch.testing.assert_close(a.detach(), b.detach(), rtol=2e-5, atol=1e-6, msg=f"student {i}")
        for i, (a, b) in enumerate(zip(teacher, t_ref)):
            torch.testing.assert_close(a.detach(), b.detach(), rtol=2e-5, atol=1e-6, msg=f"teacher {i}")
    # AdamW's state, as the checkpoint sees it: step counts (the last layer missed the frozen and skipped
    # steps) and the moments
    for k, p in enumerate(ref_train):
        opt = opts["last" if last[k] else "main"]
        step, exp_avg, exp_avg_sq = fused.state_views(k)
        assert step.item() == opt.state[p]["step"].item() == (2 if last[k] else 3)
        torch.testing.assert_close(exp_avg, opt.state[p]["exp_avg"], rtol=2e-5, atol=1e-7)
        torch.testing.assert_close(exp_avg_sq, opt.state[p]["exp_avg_sq"], rtol=2e-5, atol=1e-7)
    # the parameter that does not train kept its value and only its teacher moved
    assert torch.equal(student[2].detach(), s_ref[2].detach())


def test_bad_layouts_are_refused():
    student, teacher, (s_flat, t_flat) = _pairs()
    trainable = [p for p in student if p.requires_grad]
    flags = [False] * len(trainable)
    with pytest.raises(ValueError, match="cover the flat student buffer"):
        FusedUpdate(s_flat, t_flat, student[:-1], trainable[:-1], flags[:-1], flags[:-1])
    with pytest.raises(ValueError, match="view of the flat student buffer"):
        FusedUpdate(s_flat, t_flat, student, trainable + [torch.nn.Parameter(torch.zeros(3, device=DEVICE))],
                    flags + [False],
                    flags + [False])
    fused = FusedUpdate(s_flat, t_flat, student, trainable, flags, flags)
    with pytest.raises(ValueError, match="gradients for"):
        fused.set_grads([torch.zeros_like(p) for p in trainable[:-1]])
    with pytest.raises(ValueError, match="contiguous fp32"):
        fused.set_grads([torch.zeros_like(p, dtype=torch.float64) for p in trainable])
