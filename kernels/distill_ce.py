"""Fused distillation cross-entropy: centering, sharpening, loss and gradient in one pass.

Rows m of student logits S (M, K) are matched with targets. For the masked-patch
term the target is the teacher row T_m: q_m = softmax((T_m - c) / τt). For the
[CLS] term a student crop (v, b) is matched with every other-view teacher
global of image b; its target is the sum of those partners' probabilities,
Q̃ = Σ_g q_{g,b} - [v < G] q_{v,b}, of mass A = G - [v < G].

Per row, with s' = S_m / τs, LSE = logsumexp(s'), target weights a (sum A) over
normaliser Z (Z = Σ exp((T - c)/τt - max) for teacher logits, 1 for Q̃):

    CE_m   = (A/Z)·LSE - (Σ_k a_k s'_k) / Z
    loss   = Σ_m w_m · CE_m
    dS_m   = w_m / τs · ((A/Z)·softmax(s') - a/Z)

One program owns a contiguous run of rows. When K fits one block (K <= 16384)
each row is read once: S and T in, dS out, and the teacher column sums Σ_m T_m
(for the center update) accumulate in registers and leave with one atomic add
per column per program. For larger K a first pass keeps online statistics
(running max and rescaled sums) and a second pass writes dS.

Bytes (single block, bf16 inputs): reads S and T once, writes dS once:
6·M·K bytes, plus 4·K per program for the column sums. The gradient is
computed in forward and saved; backward scales it in place by grad_output,
and skips even that pass when grad_output == 1 (checked on the device).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634
MAX_SINGLE_BLOCK = 16384
MULTI_BLOCK = 4096


@triton.jit
def _target_weights(t, c, mask, ROW_IS_LOGITS: tl.constexpr, inv_tt, t_max):
    """Un-normalised target weights of one K-chunk: exp((t - c)/τt - max) or the mixture itself."""
    if ROW_IS_LOGITS:
        u = (t - c) * inv_tt
        return tl.where(mask, tl.exp2((u - t_max) * 1.4426950408889634), 0.0)
    return tl.where(mask, t, 0.0)


@triton.jit
def _distill_ce_kernel(
    loss_ptr, grad_ptr, colsum_ptr, stats_ptr,
    s_ptr, t_ptr, self_ptr, c_ptr, w_ptr,
    M, K, B, G, rows_per_prog,
    s_stride, t_stride, self_stride, g_stride,
    inv_ts, inv_tt,
    ROW_IS_LOGITS: tl.constexpr, MIX: tl.constexpr, COLSUM: tl.constexpr,
    SINGLE: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    row_start = pid * rows_per_prog
    row_end = tl.minimum(row_start + rows_per_prog, M)
    offs = tl.arange(0, BLOCK_K)
    if SINGLE:
        kmask = offs < K
        if ROW_IS_LOGITS:
            c = tl.load(c_ptr + offs, mask=kmask, other=0.0).to(tl.float32)
        col_acc = tl.zeros([BLOCK_K], dtype=tl.float32)
        for row in range(row_start, row_end):
            r64 = tl.cast(row, tl.int64)
            s = tl.load(s_ptr + r64 * s_stride + offs, mask=kmask, other=0.0).to(tl.float32) * inv_ts
            if MIX:
                # row = v * B + b: partners are all globals of image b except v itself
                b = row % B
                v = row // B
                t = tl.load(t_ptr + tl.cast(b, tl.int64) * t_stride + offs, mask=kmask, other=0.0).to(tl.float32)
                if v < G:
                    own = tl.load(self_ptr + r64 * self_stride + offs, mask=kmask, other=0.0).to(tl.float32)
                    t = t - own
            else:
                t = tl.load(t_ptr + r64 * t_stride + offs, mask=kmask, other=0.0).to(tl.float32)
            if COLSUM:
                col_acc += t
            if ROW_IS_LOGITS:
                t_max = tl.max(tl.where(kmask, (t - c) * inv_tt, -float("inf")), 0)
                a = _target_weights(t, c, kmask, True, inv_tt, t_max)
                z = tl.sum(a, 0)
                mass = z
            else:
                a = tl.where(kmask, t, 0.0)
                z = 1.0
                mass = tl.sum(a, 0)
            s_max = tl.max(tl.where(kmask, s, -float("inf")), 0)
            e = tl.where(kmask, tl.exp2((s - s_max) * 1.4426950408889634), 0.0)
            s_sum = tl.sum(e, 0)
            lse = s_max + tl.log(s_sum)
            dot = tl.sum(a * tl.where(kmask, s, 0.0), 0)
            w = tl.load(w_ptr + row).to(tl.float32)
            tl.store(loss_ptr + row, w * ((mass / z) * lse - dot / z))
            grad = (w * inv_ts) * ((mass / z) * (e / s_sum) - a / z)
            tl.store(grad_ptr + r64 * g_stride + offs, grad.to(grad_ptr.dtype.element_ty), mask=kmask)
        if COLSUM:
            tl.atomic_add(colsum_ptr + offs, col_acc, mask=kmask)
    else:
        # pass 1, row by row: online statistics over K-chunks
        for row in range(row_start, row_end):
            r64 = tl.cast(row, tl.int64)
            b = row % B
            v = row // B
            s_max = -float("inf")
            s_sum = 0.0
            t_max = 0.0
            if ROW_IS_LOGITS:
                t_max = -float("inf")
            z = 0.0
            mass = 0.0
            dot = 0.0
            for k0 in range(0, K, BLOCK_K):
                ko = k0 + offs
                kmask = ko < K
                s = tl.load(s_ptr + r64 * s_stride + ko, mask=kmask, other=0.0).to(tl.float32) * inv_ts
                if MIX:
                    t = tl.load(t_ptr + tl.cast(b, tl.int64) * t_stride + ko, mask=kmask, other=0.0).to(tl.float32)
                    if v < G:
                        t -= tl.load(self_ptr + r64 * self_stride + ko, mask=kmask, other=0.0).to(tl.float32)
                else:
                    t = tl.load(t_ptr + r64 * t_stride + ko, mask=kmask, other=0.0).to(tl.float32)
                new_s_max = tl.maximum(s_max, tl.max(tl.where(kmask, s, -float("inf")), 0))
                s_sum = s_sum * tl.exp2((s_max - new_s_max) * 1.4426950408889634) + tl.sum(
                    tl.where(kmask, tl.exp2((s - new_s_max) * 1.4426950408889634), 0.0), 0)
                s_max = new_s_max
                if ROW_IS_LOGITS:
                    c = tl.load(c_ptr + ko, mask=kmask, other=0.0).to(tl.float32)
                    new_t_max = tl.maximum(t_max, tl.max(tl.where(kmask, (t - c) * inv_tt, -float("inf")), 0))
                    scale = tl.exp2((t_max - new_t_max) * 1.4426950408889634)
                    a = _target_weights(t, c, kmask, True, inv_tt, new_t_max)
                    z = z * scale + tl.sum(a, 0)
                    dot = dot * scale + tl.sum(a * tl.where(kmask, s, 0.0), 0)
                    t_max = new_t_max
                else:
                    a = tl.where(kmask, t, 0.0)
                    mass += tl.sum(a, 0)
                    dot += tl.sum(a * tl.where(kmask, s, 0.0), 0)
            if ROW_IS_LOGITS:
                mass = z
            else:
                z = 1.0
            lse = s_max + tl.log(s_sum)
            w = tl.load(w_ptr + row).to(tl.float32)
            tl.store(loss_ptr + row, w * ((mass / z) * lse - dot / z))
            tl.store(stats_ptr + r64 * 4 + 0, lse)
            tl.store(stats_ptr + r64 * 4 + 1, t_max)
            tl.store(stats_ptr + r64 * 4 + 2, z)
            tl.store(stats_ptr + r64 * 4 + 3, mass)
        # pass 2, chunk by chunk over this program's rows: gradients and column sums
        for k0 in range(0, K, BLOCK_K):
            ko = k0 + offs
            kmask = ko < K
            col_acc = tl.zeros([BLOCK_K], dtype=tl.float32)
            c = tl.zeros([BLOCK_K], dtype=tl.float32)
            if ROW_IS_LOGITS:
                c = tl.load(c_ptr + ko, mask=kmask, other=0.0).to(tl.float32)
            for row in range(row_start, row_end):
                r64 = tl.cast(row, tl.int64)
                b = row % B
                v = row // B
                lse = tl.load(stats_ptr + r64 * 4 + 0)
                t_max = tl.load(stats_ptr + r64 * 4 + 1)
                z = tl.load(stats_ptr + r64 * 4 + 2)
                mass = tl.load(stats_ptr + r64 * 4 + 3)
                s = tl.load(s_ptr + r64 * s_stride + ko, mask=kmask, other=0.0).to(tl.float32) * inv_ts
                if MIX:
                    t = tl.load(t_ptr + tl.cast(b, tl.int64) * t_stride + ko, mask=kmask, other=0.0).to(tl.float32)
                    if v < G:
                        t -= tl.load(self_ptr + r64 * self_stride + ko, mask=kmask, other=0.0).to(tl.float32)
                else:
                    t = tl.load(t_ptr + r64 * t_stride + ko, mask=kmask, other=0.0).to(tl.float32)
                if COLSUM:
                    col_acc += t
                a = _target_weights(t, c, kmask, ROW_IS_LOGITS, inv_tt, t_max)
                w = tl.load(w_ptr + row).to(tl.float32)
                p = tl.exp2((s - lse) * 1.4426950408889634)
                grad = (w * inv_ts) * ((mass / z) * p - a / z)
                tl.store(grad_ptr + r64 * g_stride + ko, grad.to(grad_ptr.dtype.element_ty), mask=kmask)
            if COLSUM:
                tl.atomic_add(colsum_ptr + ko, col_acc, mask=kmask)


@triton.jit
def _softmax_rows_kernel(out_ptr, colsum_ptr, t_ptr, c_ptr, K, t_stride, o_stride, inv_tt,
                         SINGLE: tl.constexpr, BLOCK_K: tl.constexpr):
    """q = softmax((T - c)/τt) per row (fp32 out) and Σ_m T_m (atomics; few rows)."""
    row = tl.cast(tl.program_id(0), tl.int64)
    offs = tl.arange(0, BLOCK_K)
    if SINGLE:
        kmask = offs < K
        t = tl.load(t_ptr + row * t_stride + offs, mask=kmask, other=0.0).to(tl.float32)
        c = tl.load(c_ptr + offs, mask=kmask, other=0.0).to(tl.float32)
        u = tl.where(kmask, (t - c) * inv_tt, -float("inf"))
        e = tl.exp2((u - tl.max(u, 0)) * 1.4426950408889634)
        tl.store(out_ptr + row * o_stride + offs, e / tl.sum(e, 0), mask=kmask)
        tl.atomic_add(colsum_ptr + offs, t, mask=kmask)
    else:
        m = -float("inf")
        z = 0.0
        for k0 in range(0, K, BLOCK_K):
            ko = k0 + offs
            kmask = ko < K
            t = tl.load(t_ptr + row * t_stride + ko, mask=kmask, other=0.0).to(tl.float32)
            c = tl.load(c_ptr + ko, mask=kmask, other=0.0).to(tl.float32)
            u = tl.where(kmask, (t - c) * inv_tt, -float("inf"))
            new_m = tl.maximum(m, tl.max(u, 0))
            z = z * tl.exp2((m - new_m) * 1.4426950408889634) + tl.sum(
                tl.exp2((u - new_m) * 1.4426950408889634), 0)
            m = new_m
            tl.atomic_add(colsum_ptr + ko, t, mask=kmask)
        for k0 in range(0, K, BLOCK_K):
            ko = k0 + offs
            kmask = ko < K
            t = tl.load(t_ptr + row * t_stride + ko, mask=kmask, other=0.0).to(tl.float32)
            c = tl.load(c_ptr + ko, mask=kmask, other=0.0).to(tl.float32)
            u = (t - c) * inv_tt
            tl.store(out_ptr + row * o_stride + ko, tl.exp2((u - m) * 1.4426950408889634) / z, mask=kmask)


@triton.jit
def _scale_inplace_kernel(x_ptr, g_ptr, N, BLOCK: tl.constexpr):
    """x *= g, skipped entirely when g == 1 (the usual grad_output)."""
    g = tl.load(g_ptr).to(tl.float32)
    if g != 1.0:
        offs = tl.cast(tl.program_id(0), tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < N
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(x_ptr + offs, (x * g).to(x_ptr.dtype.element_ty), mask=mask)


# ------------------------------------------------------------------------- launchers


def _block(K: int):
    if K <= MAX_SINGLE_BLOCK:
        block = max(16, triton.next_power_of_2(K))
        return True, block, 4 if block <= 2048 else (8 if block <= 8192 else 16)
    return False, MULTI_BLOCK, 8


def _grid_rows(M: int, device: torch.device) -> int:
    """Rows per program: enough programs to fill the GPU a few times over, at most 32 rows each."""
    if device.type == "cuda":
        programs = torch.cuda.get_device_properties(device).multi_processor_count * 8
    else:
        programs = 4
    return max(1, min(32, triton.cdiv(M, programs)))


def _launch_ce(student, target, self_probs, center, weight, B, G, inv_ts, inv_tt, row_is_logits, colsum):
    M, K = student.shape
    grad = torch.empty_like(student)
    loss_rows = torch.empty(M, dtype=torch.float32, device=student.device)
    single, block, warps = _block(K)
    rows = _grid_rows(M, student.device)
    stats = loss_rows if single else torch.empty(M, 4, dtype=torch.float32, device=student.device)
    dummy = target
    _distill_ce_kernel[(triton.cdiv(M, rows),)](
        loss_rows, grad, colsum if colsum is not None else loss_rows, stats,
        student, target, self_probs if self_probs is not None else dummy,
        center if center is not None else loss_rows, weight,
        M, K, B, G, rows,
        student.stride(0), target.stride(0), (self_probs if self_probs is not None else dummy).stride(0),
        grad.stride(0), inv_ts, inv_tt,
        ROW_IS_LOGITS=row_is_logits, MIX=not row_is_logits, COLSUM=colsum is not None,
        SINGLE=single, BLOCK_K=block, num_warps=warps,
    )
    return loss_rows, grad


def _scale_grad(grad: torch.Tensor, grad_output: torch.Tensor) -> torch.Tensor:
    n = grad.numel()
    if n:
        block = 4096
        _scale_inplace_kernel[(triton.cdiv(n, block),)](grad, grad_output.reshape(1).float(), n, BLOCK=block)
    return grad


def _rowmajor(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


class DistillCE(torch.autograd.Function):
    """Σ_m w_m CE(softmax((T_m - c)/τt), log_softmax(S_m/τs)); also returns Σ_m T_m (no grad)."""

    @staticmethod
    def forward(ctx, student, teacher, weight, center, teacher_temp, student_temp):
        M, K = student.shape
        colsum = torch.zeros(K, dtype=torch.float32, device=student.device)
        if M == 0:
            ctx.save_for_backward(torch.zeros_like(student))
            return student.new_zeros((), dtype=torch.float32), colsum
        loss_rows, grad = _launch_ce(_rowmajor(student), _rowmajor(teacher), None,
                                     center.reshape(-1).float().contiguous(), weight.float().contiguous(), 1, 0,
                                     1.0 / student_temp, 1.0 / teacher_temp, True, colsum)
        ctx.save_for_backward(grad)
        ctx.mark_non_differentiable(colsum)
        return loss_rows.sum(), colsum

    @staticmethod
    def backward(ctx, grad_loss, grad_colsum):
        (grad,) = ctx.saved_tensors
        return _scale_grad(grad, grad_loss), None, None, None, None, None


class ClsDistillCE(torch.autograd.Function):
    """The [CLS] term: mean over (g, v != g) pairs of the batch-mean CE; also Σ over teacher rows."""

    @staticmethod
    def forward(ctx, student_cls, teacher_cls, center, n_global, teacher_temp, student_temp):
        GB, K = teacher_cls.shape
        B = GB // n_global
        V = student_cls.shape[0] // B
        teacher_cls = _rowmajor(teacher_cls)
        probs = torch.empty(GB, K, dtype=torch.float32, device=teacher_cls.device)
        colsum = torch.zeros(K, dtype=torch.float32, device=teacher_cls.device)
        single, block, warps = _block(K)
        _softmax_rows_kernel[(GB,)](probs, colsum, teacher_cls, center.reshape(-1).float().contiguous(), K,
                                    teacher_cls.stride(0), probs.stride(0), 1.0 / teacher_temp,
                                    SINGLE=single, BLOCK_K=block, num_warps=warps)
        qsum = probs.view(n_global, B, K).sum(0)  # (B, K): all globals' targets per image
        pairs = n_global * V - n_global
        weight = torch.full((V * B,), 1.0 / (max(pairs, 1) * B), dtype=torch.float32, device=student_cls.device)
        loss_rows, grad = _launch_ce(_rowmajor(student_cls), qsum, probs, None, weight, B, n_global,
                                     1.0 / student_temp, 1.0, False, None)
        ctx.save_for_backward(grad)
        ctx.mark_non_differentiable(colsum)
        return loss_rows.sum(), colsum

    @staticmethod
    def backward(ctx, grad_loss, grad_colsum):
        (grad,) = ctx.saved_tensors
        return _scale_grad(grad, grad_loss), None, None, None, None, None


def distill_ce(student, teacher, weight, center, *, teacher_temp: float, student_temp: float = 0.1,
               return_colsum: bool = False):
    """Weighted distillation CE over rows; see the module docstring. ``student`` gets the gradient."""
    loss, colsum = DistillCE.apply(student, teacher.detach(), weight.detach(), center.detach(),
                                   float(teacher_temp), float(student_temp))
    return (loss, colsum) if return_colsum else loss


def cls_distill_loss(student_cls, teacher_cls, center_cls, *, n_global: int, teacher_temp: float,
                     student_temp: float = 0.1, return_colsum: bool = False):
    """The iBOT [CLS] loss (mean over the 2·V - 2 cross-view pairs) in two launches."""
    loss, colsum = ClsDistillCE.apply(student_cls, teacher_cls.detach(), center_cls.detach(), int(n_global),
                                      float(teacher_temp), float(student_temp))
    return (loss, colsum) if return_colsum else loss
