"""Fused teacher EMA over flat parameter buffers: one launch for all parameters.

    θt <- m·θt + (1 - m)·θs        (optionally also writes bf16(θt))

The teacher's and the student's parameters are re-pointed at views into one
contiguous buffer per side (per dtype), so the update is a single streaming
pass instead of one or two kernels per tensor. Bytes (fp32): read θt and θs,
write θt: 12 bytes per parameter (+2 with the bf16 copy). The products are
rounded separately, exactly as the eager ``θt.mul_(m).add_((1 - m)·θs)`` loop
rounds them (no fused multiply-add), so both give bit-identical teachers.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import numpy as np
import torch
import triton
import triton.language as tl

BLOCK = 4096
INTERPRETER_BLOCK = 1 << 20  # the CPU interpreter pays per program, not per element


@triton.jit
def _bf16_bits_rtne(x):
    """fp32 -> bf16 bit pattern, round to nearest even (the same on the GPU and in the interpreter)."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = bits + 0x7FFF + ((bits >> 16) & 1)
    return (bits >> 16).to(tl.uint16)


@triton.jit
def _ema_kernel(t_ptr, bf16_ptr, s_ptr, N, m, one_minus_m, WRITE_BF16: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.cast(tl.program_id(0), tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    t = tl.load(t_ptr + offs, mask=mask)
    s = tl.load(s_ptr + offs, mask=mask)
    a = t * m
    b = s * one_minus_m
    new = a + b
    tl.store(t_ptr + offs, new, mask=mask)
    if WRITE_BF16:
        tl.store(bf16_ptr + offs, _bf16_bits_rtne(new), mask=mask)


def ema_update_(teacher_flat: torch.Tensor, student_flat: torch.Tensor, m: float,
                out_bf16: Optional[torch.Tensor] = None) -> None:
    """In place on a contiguous 1-D buffer; ``out_bf16`` (same length) receives bf16(θt)."""
    if teacher_flat.shape != student_flat.shape or not teacher_flat.is_contiguous() or not student_flat.is_contiguous():
        raise ValueError("teacher and student buffers must be contiguous and of equal shape")
    n = teacher_flat.numel()
    if n == 0:
        return
    # the fp32 values the eager loop multiplies by
    mf, omf = float(np.float32(m)), float(np.float32(1.0 - m))
    block = BLOCK if teacher_flat.is_cuda else INTERPRETER_BLOCK
    _ema_kernel[(triton.cdiv(n, block),)](
        teacher_flat, out_bf16.view(torch.uint16) if out_bf16 is not None else teacher_flat, student_flat, n, mf, omf,
        WRITE_BF16=out_bf16 is not None, BLOCK=block, num_warps=8, enable_fp_fusion=False)


def flatten_params_(params: Sequence[torch.nn.Parameter]) -> torch.Tensor:
    """Move parameters into one contiguous buffer and make each parameter a view of it."""
    if not params:
        raise ValueError("no parameters to flatten")
    dtype, device = params[0].dtype, params[0].device
    if any(p.dtype != dtype or p.device != device for p in params):
        raise ValueError("flat buffers need parameters of one dtype and device")
    flat = torch.empty(sum(p.numel() for p in params), dtype=dtype, device=device)
    offset = 0
    for p in params:
        n = p.numel()
        flat[offset: offset + n].copy_(p.detach().reshape(-1))
        p.data = flat[offset: offset + n].view_as(p)
        offset += n
    return flat


class FlatEMA:
    """Owns the flat buffers of matching (teacher, student) parameters; call with the momentum."""

    def __init__(self, teacher_params: List[torch.nn.Parameter], student_params: List[torch.nn.Parameter],
                 bf16_copy: bool = False):
        groups = {}
        for pt, ps in zip(teacher_params, student_params):
            if pt.shape != ps.shape:
                raise ValueError(f"teacher/student parameter shapes differ: {tuple(pt.shape)} vs {tuple(ps.shape)}")
            groups.setdefault((pt.dtype, pt.device), ([], []))
            groups[(pt.dtype, pt.device)][0].append(pt)
            groups[(pt.dtype, pt.device)][1].append(ps)
        self.buffers = []
        for tp, sp in groups.values():
            t_flat, s_flat = flatten_params_(tp), flatten_params_(sp)
            bf16 = torch.empty_like(t_flat, dtype=torch.bfloat16) if bf16_copy else None
            self.buffers.append((t_flat, s_flat, bf16))

    @torch.no_grad()
    def __call__(self, m: float) -> None:
        for t_flat, s_flat, bf16 in self.buffers:
            ema_update_(t_flat, s_flat, m, bf16)
