"""Fused teacher EMA over flat parameter buffers: one launch for all parameters.

    θt <- m·θt + (1 - m)·θs

The teacher's and the student's parameters are re-pointed at views into one
contiguous buffer per side (per dtype), so the update is a single streaming
pass instead of one or two kernels per tensor. Bytes (fp32): read θt and θs,
write θt: 12 bytes per parameter. m and 1 - m are read from device scalars (the
momentum schedule), so a captured step replays with the current values. The
products are rounded separately, exactly as the eager
``θt.mul_(m).add_((1 - m)·θs)`` loop rounds them (no fused multiply-add), so
both give bit-identical teachers.
"""
from __future__ import annotations

from typing import List, Sequence

import numpy as np
import torch
import triton
import triton.language as tl

BLOCK = 4096
INTERPRETER_BLOCK = 1 << 20  # the CPU interpreter pays per program, not per element


@triton.jit
def _ema_kernel(t_ptr, s_ptr, m_ptr, omm_ptr, N, BLOCK: tl.constexpr):
    offs = tl.cast(tl.program_id(0), tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    m = tl.load(m_ptr).to(tl.float32)
    one_minus_m = tl.load(omm_ptr).to(tl.float32)
    t = tl.load(t_ptr + offs, mask=mask)
    s = tl.load(s_ptr + offs, mask=mask)
    a = t * m
    b = s * one_minus_m
    tl.store(t_ptr + offs, a + b, mask=mask)


def _scalar(x, device) -> torch.Tensor:
    if torch.is_tensor(x):
        return x.reshape(1)
    return torch.full((1,), float(np.float32(x)), dtype=torch.float32, device=device)  # the fp32 the loop uses


def ema_update_(teacher_flat: torch.Tensor, student_flat: torch.Tensor, m, one_minus_m=None,
                block: int = 0) -> None:
    """In place on a contiguous 1-D buffer. ``m``, ``one_minus_m``: floats or 0-d tensors on the buffers'
    device (``one_minus_m`` defaults to 1 - m formed in float64, as the eager loop forms it)."""
    if teacher_flat.shape != student_flat.shape or not teacher_flat.is_contiguous() or not student_flat.is_contiguous():
        raise ValueError("teacher and student buffers must be contiguous and of equal shape")
    n = teacher_flat.numel()
    if n == 0:
        return
    if one_minus_m is None:
        one_minus_m = 1.0 - float(m)
    block = block or (BLOCK if teacher_flat.is_cuda else INTERPRETER_BLOCK)
    _ema_kernel[(triton.cdiv(n, block),)](teacher_flat, student_flat, _scalar(m, teacher_flat.device),
                                          _scalar(one_minus_m, teacher_flat.device), n, BLOCK=block, num_warps=8,
                                          enable_fp_fusion=False)


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
    """Owns the flat buffers of matching (teacher, student) parameters; call with (m, 1 - m)."""

    def __init__(self, teacher_params: List[torch.nn.Parameter], student_params: List[torch.nn.Parameter]):
        groups = {}
        for pt, ps in zip(teacher_params, student_params):
            if pt.shape != ps.shape:
                raise ValueError(f"teacher/student parameter shapes differ: {tuple(pt.shape)} vs {tuple(ps.shape)}")
            groups.setdefault((pt.dtype, pt.device), ([], []))
            groups[(pt.dtype, pt.device)][0].append(pt)
            groups[(pt.dtype, pt.device)][1].append(ps)
        self.buffers = [(flatten_params_(tp), flatten_params_(sp)) for tp, sp in groups.values()]

    @torch.no_grad()
    def __call__(self, m, one_minus_m=None) -> None:
        for t_flat, s_flat in self.buffers:
            ema_update_(t_flat, s_flat, m, one_minus_m)
