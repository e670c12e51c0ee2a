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
each row is read once: S and T in, dS out (``PREFETCH``: the next tile's S and
T loads are issued before this tile's math, so one row's latency hides behind
the other's work). For larger K a first pass keeps online statistics (running
max and rescaled sums); a second pass, last chunk first, writes dS. The teacher
temperature is read from a device scalar (a schedule moves it every step
without a host sync or a new launch). The [CLS] term's teacher softmax kernel
also sums the teacher rows, which is the [CLS] center's statistic; the patch
center's comes from the teacher forward (``fastibot.models.ibot``).

Bytes (single block, bf16 inputs): reads S and T once, writes dS once:
6·M·K bytes. The gradient is computed in forward and saved; backward scales it
in place by grad_output, and skips even that pass when grad_output == 1
(checked on the device).
"""
from __future__ import annotations

from typing import Tuple

import torch
import triton
import triton.language as tl

from . import interpreting

LOG2E = tl.constexpr(1.4426950408889634)  # exp(x) = exp2(x · log2 e)
MAX_SINGLE_BLOCK = 16384
MULTI_BLOCK = 4096


@triton.jit
def _max2(a1, b1, a2, b2):
    return tl.maximum(a1, a2), tl.maximum(b1, b2)


@triton.jit
def _sum3(a1, b1, c1, a2, b2, c2):
    return a1 + a2, b1 + b2, c1 + c2


@triton.jit
def _rowmax2(u, s, TUPLE: tl.constexpr):
    """Maxima along the last axis of two tiles."""
    AXIS: tl.constexpr = len(u.shape) - 1
    if TUPLE:  # one reduction pass for both maxima
        return tl.reduce((u, s), AXIS, _max2)
    return tl.max(u, AXIS), tl.max(s, AXIS)


@triton.jit
def _rowsum3(a, e, d, TUPLE: tl.constexpr):
    """Sums along the last axis of three tiles."""
    AXIS: tl.constexpr = len(a.shape) - 1
    if TUPLE:
        return tl.reduce((a, e, d), AXIS, _sum3)
    return tl.sum(a, AXIS), tl.sum(e, AXIS), tl.sum(d, AXIS)


@triton.jit
def _load_tile(s_ptr, t_ptr, self_ptr, rows, M, ko, kmask, B, G, s_stride, t_stride, self_stride,
               MIX: tl.constexpr, EVICT: tl.constexpr):
    """One (rows × K-chunk) tile: student logits in their stored dtype, and the target: teacher logits (stored
    dtype) or, for [CLS] rows, the partners' probability sum (fp32). Rows past M read as 0."""
    r64 = tl.cast(rows, tl.int64)
    m2 = (rows < M)[:, None] & kmask[None, :]
    s = tl.load(s_ptr + r64[:, None] * s_stride + ko[None, :], mask=m2, other=0.0, eviction_policy=EVICT)
    if MIX:
        # row = v * B + b: partners are all globals of image b except v itself
        b64 = tl.cast(rows % B, tl.int64)
        t = tl.load(t_ptr + b64[:, None] * t_stride + ko[None, :], mask=m2, other=0.0).to(tl.float32)
        own = m2 & ((rows // B) < G)[:, None]
        t -= tl.load(self_ptr + r64[:, None] * self_stride + ko[None, :], mask=own, other=0.0).to(tl.float32)
    else:
        t = tl.load(t_ptr + r64[:, None] * t_stride + ko[None, :], mask=m2, other=0.0, eviction_policy=EVICT)
    return s, t


@triton.jit
def _distill_ce_kernel(
    loss_ptr, partial_ptr, count_ptr, grad_ptr,
    s_ptr, t_ptr, self_ptr, c_ptr, w_ptr,
    M, K, B, G,
    s_stride, t_stride, self_stride, g_stride,
    inv_ts, tt_ptr,
    ROW_IS_LOGITS: tl.constexpr, MIX: tl.constexpr,
    SINGLE: tl.constexpr, BLOCK_K: tl.constexpr, NUM_STAGES: tl.constexpr, TUPLE_REDUCE: tl.constexpr,
    ROWS: tl.constexpr, PREFETCH: tl.constexpr, EVEN_K: tl.constexpr, C_REGS: tl.constexpr,
    REVERSE: tl.constexpr, EVICT: tl.constexpr, NPROG_P2: tl.constexpr,
):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    offs = tl.arange(0, BLOCK_K)
    ridx = tl.arange(0, ROWS)
    inv_tt = 1.0 / tl.load(tt_ptr).to(tl.float32)  # the teacher temperature lives on the device (a schedule)
    loss_acc = 0.0  # this program's Σ w_m CE_m
    if SINGLE:
        # whole rows in registers, ROWS at a time: S and T read once, dS written once
        if EVEN_K:  # K == BLOCK_K: no padding columns, the masks fold away
            kmask = tl.full([BLOCK_K], 1, tl.int1)
        else:
            kmask = offs < K
        if ROW_IS_LOGITS and C_REGS:
            c = tl.load(c_ptr + offs, mask=kmask, other=0.0).to(tl.float32)
        if PREFETCH:  # the next tile's loads are issued before this tile's math
            s_next, t_next = _load_tile(s_ptr, t_ptr, self_ptr, pid * ROWS + ridx, M, offs, kmask, B, G,
                                        s_stride, t_stride, self_stride, MIX, EVICT)
        for base in tl.range(pid * ROWS, M, nprog * ROWS, num_stages=NUM_STAGES):
            rows = base + ridx  # (ROWS,)
            rmask = rows < M
            r64 = tl.cast(rows, tl.int64)
            m2 = rmask[:, None] & kmask[None, :]
            if PREFETCH:
                s_raw, t_raw = s_next, t_next
                s_next, t_next = _load_tile(s_ptr, t_ptr, self_ptr, rows + nprog * ROWS, M, offs, kmask, B, G,
                                            s_stride, t_stride, self_stride, MIX, EVICT)
            else:
                s_raw, t_raw = _load_tile(s_ptr, t_ptr, self_ptr, rows, M, offs, kmask, B, G,
                                          s_stride, t_stride, self_stride, MIX, EVICT)
            t = t_raw.to(tl.float32)
            s = s_raw.to(tl.float32) * inv_ts
            # padding columns get -inf; rows past M stay finite and are never stored
            s_m = tl.where(kmask[None, :], s, -float("inf"))
            if ROW_IS_LOGITS:
                if not C_REGS:  # re-read per tile (an L1/L2 hit) instead of holding BLOCK_K/threads registers
                    c = tl.load(c_ptr + offs, mask=kmask, other=0.0, eviction_policy="evict_last")
                u = tl.where(kmask[None, :], (t - c[None, :]) * inv_tt, -float("inf"))
                t_max, s_max = _rowmax2(u, s_m, TUPLE_REDUCE)
                a = tl.exp2((u - t_max[:, None]) * LOG2E)
            else:
                s_max = tl.max(s_m, 1)
                a = tl.where(kmask[None, :], t, 0.0)
            e = tl.exp2((s_m - s_max[:, None]) * LOG2E)
            z, s_sum, dot = _rowsum3(a, e, a * tl.where(kmask[None, :], s, 0.0), TUPLE_REDUCE)
            if ROW_IS_LOGITS:
                inv_z = 1.0 / z
                mass_z = tl.full([ROWS], 1.0, tl.float32)
            else:
                inv_z = tl.full([ROWS], 1.0, tl.float32)
                mass_z = z
            w = tl.load(w_ptr + rows, mask=rmask, other=0.0).to(tl.float32)
            lse = s_max + tl.log(s_sum)
            loss_acc += tl.sum(tl.where(rmask, w * (mass_z * lse - dot * inv_z), 0.0), 0)
            p_scale = mass_z / s_sum  # per-row factors: one multiply per element, no division
            grad = (w * inv_ts)[:, None] * (e * p_scale[:, None] - a * inv_z[:, None])
            tl.store(grad_ptr + r64[:, None] * g_stride + offs[None, :], grad.to(grad_ptr.dtype.element_ty), mask=m2)
    else:
        # K too large for registers: ROWS rows at a time, pass 1 keeps online statistics per row (running
        # maxima, rescaled sums) and adds the tile's column sums (one atomic per column per tile); pass 2
        # re-reads the rows, last chunk first (the chunks pass 1 read last are the likeliest still in L2),
        # and writes dS
        n_chunks = tl.cdiv(K, BLOCK_K)
        for base in tl.range(pid * ROWS, M, nprog * ROWS):
            rows = base + ridx
            rmask = rows < M
            r64 = tl.cast(rows, tl.int64)
            s_max = tl.full([ROWS], -float("inf"), tl.float32)
            if ROW_IS_LOGITS:
                t_max = tl.full([ROWS], -float("inf"), tl.float32)
            else:
                t_max = tl.zeros([ROWS], tl.float32)
            s_sum = tl.zeros([ROWS], tl.float32)
            z = tl.zeros([ROWS], tl.float32)
            dot = tl.zeros([ROWS], tl.float32)
            for k0 in range(0, K, BLOCK_K):
                ko = k0 + offs
                kmask = ko < K
                s_raw, t_raw = _load_tile(s_ptr, t_ptr, self_ptr, rows, M, ko, kmask, B, G,
                                          s_stride, t_stride, self_stride, MIX, EVICT)
                s = s_raw.to(tl.float32) * inv_ts
                t = t_raw.to(tl.float32)
                s_m = tl.where(kmask[None, :], s, -float("inf"))
                if ROW_IS_LOGITS:
                    c = tl.load(c_ptr + ko, mask=kmask, other=0.0).to(tl.float32)
                    u = tl.where(kmask[None, :], (t - c[None, :]) * inv_tt, -float("inf"))
                    cu, cs = _rowmax2(u, s_m, TUPLE_REDUCE)
                    new_t = tl.maximum(t_max, cu)
                    scale_t = tl.exp2((t_max - new_t) * LOG2E)
                    a = tl.exp2((u - new_t[:, None]) * LOG2E)
                    t_max = new_t
                else:
                    cs = tl.max(s_m, 1)
                    scale_t = tl.full([ROWS], 1.0, tl.float32)
                    a = tl.where(kmask[None, :], t, 0.0)
                new_s = tl.maximum(s_max, cs)
                ca, ce, cd = _rowsum3(a, tl.exp2((s_m - new_s[:, None]) * LOG2E), a * tl.where(kmask[None, :], s, 0.0),
                                      TUPLE_REDUCE)
                s_sum = s_sum * tl.exp2((s_max - new_s) * LOG2E) + ce
                s_max = new_s
                z = z * scale_t + ca
                dot = dot * scale_t + cd
            if ROW_IS_LOGITS:
                inv_z = 1.0 / z
                mass_z = tl.full([ROWS], 1.0, tl.float32)
            else:
                inv_z = tl.full([ROWS], 1.0, tl.float32)
                mass_z = z
            lse = s_max + tl.log(s_sum)
            w = tl.load(w_ptr + rows, mask=rmask, other=0.0).to(tl.float32)
            loss_acc += tl.sum(tl.where(rmask, w * (mass_z * lse - dot * inv_z), 0.0), 0)
            g_p = (w * inv_ts * mass_z)[:, None]
            g_a = (w * inv_ts * inv_z)[:, None]
            for i in range(0, n_chunks):
                if REVERSE:
                    k0 = (n_chunks - 1 - i) * BLOCK_K
                else:
                    k0 = i * BLOCK_K
                ko = k0 + offs
                kmask = ko < K
                s_raw, t_raw = _load_tile(s_ptr, t_ptr, self_ptr, rows, M, ko, kmask, B, G,
                                          s_stride, t_stride, self_stride, MIX, EVICT)
                s = s_raw.to(tl.float32) * inv_ts
                t = t_raw.to(tl.float32)
                if ROW_IS_LOGITS:
                    c = tl.load(c_ptr + ko, mask=kmask, other=0.0).to(tl.float32)
                    a = tl.exp2(((t - c[None, :]) * inv_tt - t_max[:, None]) * LOG2E)
                else:
                    a = t
                p = tl.exp2((s - lse[:, None]) * LOG2E)
                grad = g_p * p - g_a * a
                m2 = rmask[:, None] & kmask[None, :]
                tl.store(grad_ptr + r64[:, None] * g_stride + ko[None, :], grad.to(grad_ptr.dtype.element_ty),
                         mask=m2)
    # the loss: each program leaves its partial sum; the last to finish (a ticket from a zeroed counter)
    # adds them in program order, so the result does not depend on which program finished when
    tl.store(partial_ptr + pid, loss_acc)
    tl.debug_barrier()
    ticket = tl.atomic_add(count_ptr, 1, sem="acq_rel")
    if ticket == nprog - 1:
        tl.debug_barrier()
        pidx = tl.arange(0, NPROG_P2)
        parts = tl.load(partial_ptr + pidx, mask=pidx < nprog, other=0.0, cache_modifier=".cg")
        tl.store(loss_ptr, tl.sum(parts, 0))


@triton.jit
def _softmax_rows_kernel(out_ptr, colsum_ptr, t_ptr, c_ptr, K, t_stride, o_stride, tt_ptr,
                         SINGLE: tl.constexpr, BLOCK_K: tl.constexpr):
    """q = softmax((T - c)/τt) per row (fp32 out) and Σ_m T_m (atomics; few rows)."""
    row = tl.cast(tl.program_id(0), tl.int64)
    inv_tt = 1.0 / tl.load(tt_ptr).to(tl.float32)
    offs = tl.arange(0, BLOCK_K)
    if SINGLE:
        kmask = offs < K
        t = tl.load(t_ptr + row * t_stride + offs, mask=kmask, other=0.0).to(tl.float32)
        c = tl.load(c_ptr + offs, mask=kmask, other=0.0).to(tl.float32)
        u = tl.where(kmask, (t - c) * inv_tt, -float("inf"))
        e = tl.exp2((u - tl.max(u, 0)) * LOG2E)
        tl.store(out_ptr + row * o_stride + offs, e / tl.sum(e, 0), mask=kmask)
        tl.atomic_add(colsum_ptr + offs, t, mask=kmask, sem="relaxed")
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
            z = z * tl.exp2((m - new_m) * LOG2E) + tl.sum(
                tl.exp2((u - new_m) * LOG2E), 0)
            m = new_m
            tl.atomic_add(colsum_ptr + ko, t, mask=kmask, sem="relaxed")
        for k0 in range(0, K, BLOCK_K):
            ko = k0 + offs
            kmask = ko < K
            t = tl.load(t_ptr + row * t_stride + ko, mask=kmask, other=0.0).to(tl.float32)
            c = tl.load(c_ptr + ko, mask=kmask, other=0.0).to(tl.float32)
            u = (t - c) * inv_tt
            tl.store(out_ptr + row * o_stride + ko, tl.exp2((u - m) * LOG2E) / z, mask=kmask)


@triton.jit
def _scale_inplace_kernel(x_ptr, g_ptr, N, BLOCK: tl.constexpr):
    """x *= g over a grid-stride loop, skipped entirely when g == 1 (the usual grad_output): then the
    launch is a few hundred programs that read one scalar and exit."""
    g = tl.load(g_ptr).to(tl.float32)
    if g != 1.0:
        for start in range(tl.program_id(0) * BLOCK, N, tl.num_programs(0) * BLOCK):
            offs = tl.cast(start, tl.int64) + tl.arange(0, BLOCK)
            mask = offs < N
            x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            tl.store(x_ptr + offs, (x * g).to(x_ptr.dtype.element_ty), mask=mask)


# ------------------------------------------------------------------------- launchers


# Launch configurations per K range, measured on an H100 (benchmarks/kernels.py --sweep; benchmarks/RESULTS.md):
# warps, stages (software pipelining of the row loop), programs per SM, tuple reductions, rows per tile,
# register prefetch of the next tile, center held in registers (else re-read per tile)
CONFIGS = [
    (2048, dict(warps=8, stages=1, per_sm=2, tuple=True, rows=4, prefetch=True, c_regs=True, evict_first=False)),
    (8192, dict(warps=16, stages=1, per_sm=1, tuple=True, rows=1, prefetch=True, c_regs=True, evict_first=True)),
    # K = 16384: a prefetched row would not fit the registers (unmeasured: no recipe uses this K)
    (MAX_SINGLE_BLOCK, dict(warps=16, stages=1, per_sm=1, tuple=True, rows=1, prefetch=False, c_regs=True,
                            evict_first=False)),
]
# K > MAX_SINGLE_BLOCK: two passes over chunks of MULTI_BLOCK columns, the second one last chunk first
MULTI_CONFIG = dict(warps=16, stages=1, per_sm=2, tuple=True, rows=4, prefetch=False, c_regs=False, reverse=True,
                    evict_first=False)


def launch_config(K: int, override=None):
    """dict(single, block, warps, stages, per_sm, tuple, rows, prefetch, c_regs, reverse, evict_first) for K;
    ``override`` entries replace them."""
    if K <= MAX_SINGLE_BLOCK:
        entry = next(c for k, c in CONFIGS if K <= k)
        cfg = {"evict_first": False, **entry, "reverse": False, "single": True,
               "block": max(16, triton.next_power_of_2(K))}
    else:
        cfg = dict(MULTI_CONFIG, single=False, block=MULTI_BLOCK)
    if interpreting():  # the interpreter runs tuple reductions element by element in Python
        cfg["tuple"] = False
    cfg.update(override or {})
    return cfg


def _programs(M: int, device: torch.device, per_sm: int) -> int:
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 2
    return max(1, min(M, sms * per_sm))


def _launch_ce(student, target, self_probs, center, weight, B, G, inv_ts, teacher_temp, row_is_logits,
               config=None, count=None):
    """-> (Σ_m w_m CE_m as a 0-d fp32 tensor, dS). ``teacher_temp``: a 1-element device tensor (read by
    the kernel, so a schedule changes it without a new launch configuration or a host sync); ``count``: a
    zeroed int32 slot (allocated when None)."""
    M, K = student.shape
    dev = student.device
    grad = torch.empty_like(student, dtype=_grad_dtype(student.dtype))
    cfg = launch_config(K, config)
    programs = min(_programs(M, dev, cfg["per_sm"]), triton.cdiv(max(M, 1), cfg["rows"]))
    loss = torch.empty((), dtype=torch.float32, device=dev)
    partial = torch.empty(programs, dtype=torch.float32, device=dev)
    if count is None:
        count = torch.zeros(1, dtype=torch.int32, device=dev)
    own = self_probs if self_probs is not None else target
    _distill_ce_kernel[(programs,)](
        loss, partial, count, grad,
        student, target, own, center if center is not None else partial, weight,
        M, K, B, G,
        student.stride(0), target.stride(0), own.stride(0), grad.stride(0), inv_ts, teacher_temp,
        ROW_IS_LOGITS=row_is_logits, MIX=not row_is_logits,
        SINGLE=cfg["single"], BLOCK_K=cfg["block"], NUM_STAGES=cfg["stages"], TUPLE_REDUCE=cfg["tuple"],
        ROWS=cfg["rows"], PREFETCH=cfg["prefetch"] and cfg["single"], EVEN_K=cfg["single"] and K == cfg["block"],
        C_REGS=cfg["c_regs"], REVERSE=cfg["reverse"], EVICT="evict_first" if cfg["evict_first"] else "",
        NPROG_P2=triton.next_power_of_2(programs), num_warps=cfg["warps"],
    )
    return loss, grad


def _grad_dtype(dtype: torch.dtype) -> torch.dtype:
    """dS is saved in forward and scaled in backward; under fp16 loss scaling an unscaled fp16 dS would
    underflow (|dS| ~ w/τs·|p - q| is often below fp16's 6e-8), so fp16 logits get an fp32 dS (autograd
    casts the scaled result back to fp16)."""
    return torch.float32 if dtype == torch.float16 else dtype


def _zeroed(K: int, device):
    """(colsum (K,) fp32, counter (1,) int32): both zero, from one memset."""
    buf = torch.zeros(K + 1, dtype=torch.float32, device=device)
    return buf[:K], buf[K:].view(torch.int32)


def _rowmajor(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


# ------------------------------------------------------------------ torch.library ops
# Registered as custom ops so torch.compile treats them as opaque calls with known
# output shapes (no graph break); the autograd formula is the saved gradient, scaled.


def _temp(teacher_temp: torch.Tensor) -> torch.Tensor:
    return teacher_temp.reshape(1).float()


@torch.library.custom_op("fastibot::distill_ce_rows", mutates_args=())
def _rows_op(student: torch.Tensor, teacher: torch.Tensor, weight: torch.Tensor, center: torch.Tensor,
             teacher_temp: torch.Tensor, student_temp: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """-> (Σ_m w_m CE_m, dLoss/dS (M, K)). ``teacher_temp``: a 0-d tensor on the logits' device."""
    M, K = student.shape
    if M == 0:
        return student.new_zeros((), dtype=torch.float32), torch.zeros_like(student, dtype=_grad_dtype(student.dtype))
    count = torch.zeros(1, dtype=torch.int32, device=student.device)
    return _launch_ce(_rowmajor(student), _rowmajor(teacher), None, center.reshape(-1).float().contiguous(),
                      weight.float().contiguous(), 1, 0, 1.0 / student_temp, _temp(teacher_temp), True, count=count)


@_rows_op.register_fake
def _(student, teacher, weight, center, teacher_temp, student_temp):
    return student.new_empty((), dtype=torch.float32), torch.empty_like(student, dtype=_grad_dtype(student.dtype))


@torch.library.custom_op("fastibot::distill_ce_cls", mutates_args=())
def _cls_op(student_cls: torch.Tensor, teacher_cls: torch.Tensor, center: torch.Tensor, n_global: int,
            teacher_temp: torch.Tensor, student_temp: float) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> ([CLS] loss, Σ over teacher rows (K,) for the [CLS] center, dLoss/dS (V*B, K))."""
    GB, K = teacher_cls.shape
    B = GB // n_global
    V = student_cls.shape[0] // B
    teacher_cls = _rowmajor(teacher_cls)
    probs = torch.empty(GB, K, dtype=torch.float32, device=teacher_cls.device)
    colsum, count = _zeroed(K, teacher_cls.device)
    cfg = launch_config(K)
    tt = _temp(teacher_temp)
    _softmax_rows_kernel[(GB,)](probs, colsum, teacher_cls, center.reshape(-1).float().contiguous(), K,
                                teacher_cls.stride(0), probs.stride(0), tt,
                                SINGLE=cfg["single"], BLOCK_K=cfg["block"], num_warps=cfg["warps"])
    qsum = probs.view(n_global, B, K).sum(0)  # (B, K): all globals' targets per image
    pairs = n_global * V - n_global
    weight = torch.full((V * B,), 1.0 / (max(pairs, 1) * B), dtype=torch.float32, device=student_cls.device)
    loss, grad = _launch_ce(_rowmajor(student_cls), qsum, probs, None, weight, B, n_global,
                            1.0 / student_temp, tt, False, count=count)
    return loss, colsum, grad


@_cls_op.register_fake
def _(student_cls, teacher_cls, center, n_global, teacher_temp, student_temp):
    return (student_cls.new_empty((), dtype=torch.float32),
            student_cls.new_empty(teacher_cls.shape[1], dtype=torch.float32),
            torch.empty_like(student_cls, dtype=_grad_dtype(student_cls.dtype)))


@torch.library.custom_op("fastibot::scale_grad_", mutates_args=("grad",))
def _scale_op(grad: torch.Tensor, grad_output: torch.Tensor) -> None:
    """grad *= grad_output in place; the kernel skips the pass when grad_output == 1 (read on the device)."""
    n = grad.numel()
    if n:
        block = 4096
        programs = _programs(triton.cdiv(n, block), grad.device, 4)
        _scale_inplace_kernel[(programs,)](grad, grad_output.reshape(1).float(), n, BLOCK=block)


@_scale_op.register_fake
def _(grad, grad_output):
    return None


def _save_grad(ctx, inputs, output):
    ctx.save_for_backward(output[-1])
    # the column sums and dS outputs never receive gradients: without this, autograd would fill an (M, K)
    # tensor of zeros for dS's unused gradient on every backward
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_loss, *unused):
    if grad_loss is None:
        return None, None, None, None, None, None
    (grad,) = ctx.saved_tensors
    _scale_op(grad, grad_loss)
    return grad, None, None, None, None, None


_rows_op.register_autograd(_backward, setup_context=_save_grad)
_cls_op.register_autograd(_backward, setup_context=_save_grad)


def _as_tensor(temp, like: torch.Tensor) -> torch.Tensor:
    """A temperature as a 0-d fp32 tensor on the logits' device (a fill, not a host-to-device copy)."""
    if torch.is_tensor(temp):
        return temp.detach().reshape(())
    return torch.full((), float(temp), dtype=torch.float32, device=like.device)


def distill_ce(student, teacher, weight, center, *, teacher_temp, student_temp: float = 0.1):
    """Weighted distillation CE over rows; see the module docstring. ``student`` gets the gradient;
    ``teacher_temp`` is a float or a 0-d tensor."""
    loss, _ = _rows_op(student, teacher.detach(), weight.detach(), center.detach(),
                       _as_tensor(teacher_temp, student), float(student_temp))
    return loss


def cls_distill_loss(student_cls, teacher_cls, center_cls, *, n_global: int, teacher_temp,
                     student_temp: float = 0.1, return_colsum: bool = False):
    """The iBOT [CLS] loss (mean over the 2·V - 2 cross-view pairs) in two launches; ``return_colsum`` also
    returns Σ over the teacher rows (K,), the [CLS] center's statistic."""
    loss, colsum, _ = _cls_op(student_cls, teacher_cls.detach(), center_cls.detach(), int(n_global),
                              _as_tensor(teacher_temp, student_cls), float(student_temp))
    return (loss, colsum) if return_colsum else loss
