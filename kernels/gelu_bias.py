"""The MLP's first bias and its GELU, with the bias gradient summed inside the GELU backward's pass.

    forward  (PyTorch ops, compiled with their neighbours):  a = gelu(h0 + b), in fp32, rounded once
    backward (this kernel), per element:                      h = h0 + b,  dh = da · (Φ(h) + h·φ(h))
                            per column:                       db = Σ_rows dh

``h0 = x W1ᵀ`` is the first linear layer's product without its bias (the bias moves out of the GEMM's
epilogue, where it was free, into the GELU's pass, where it is too). Autograd's form writes dh and then
reads it again for the bias gradient, a column sum over every token; here each program adds up its block
of rows in fp32 and writes one row of partial sums, which a small sum over the blocks finishes (no
atomics: the same sum every run).

Bytes, bf16: read h0 and da, write dh: 6 bytes per element (ViT-B/16 fc1 at 64 images: 48,896 × 3,072,
0.9 GB, ≈ 0.22 ms at 4 TB/s), where autograd's two passes move 8 (and its bias sum ran at ≈ 2.3 TB/s).
The eager reference is ``reference_backward`` (autograd of ``gelu(h0 + b)``); ``tests/test_gelu_bias.py``
holds the kernel to it under ``TRITON_INTERPRET=1`` and on the GPU.
"""
from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from . import interpreting

BLOCK_R, BLOCK_C = 64, 128  # rows and columns per program
SQRT1_2 = tl.constexpr(0.7071067811865476)
INV_SQRT_2PI = tl.constexpr(0.3989422804014327)


@triton.jit
def _gelu_bias_bwd_kernel(dh_ptr, part_ptr, h0_ptr, b_ptr, da_ptr, R, C, h_stride, da_stride, dh_stride,
                          BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    rblk = tl.program_id(0)
    rows = (rblk * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    mask = (rows[:, None] < R) & cmask[None, :]
    b = tl.load(b_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    h = tl.load(h0_ptr + rows[:, None] * h_stride + cols[None, :], mask=mask, other=0.0).to(tl.float32) + b[None, :]
    da = tl.load(da_ptr + rows[:, None] * da_stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    cdf = 0.5 * (1.0 + tl.math.erf(h * SQRT1_2))
    pdf = tl.exp(-0.5 * h * h) * INV_SQRT_2PI
    dh = da * (cdf + h * pdf)  # rows and columns past the edge: da = 0, so dh = 0
    tl.store(dh_ptr + rows[:, None] * dh_stride + cols[None, :], dh.to(dh_ptr.dtype.element_ty), mask=mask)
    tl.store(part_ptr + rblk * C + cols, tl.sum(dh, 0), mask=cmask)


@torch.library.custom_op("fastibot::gelu_bias_backward", mutates_args=())
def _bwd_op(h0: torch.Tensor, b: torch.Tensor, da: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(R, C) h0 and da, (C,) b -> dh (R, C) in h0's dtype, db (C,) fp32."""
    R, C = h0.shape
    dh = torch.empty_like(h0)
    blocks = triton.cdiv(R, BLOCK_R)
    part = torch.empty((blocks, C), dtype=torch.float32, device=h0.device)
    if R:
        _gelu_bias_bwd_kernel[(blocks, triton.cdiv(C, BLOCK_C))](
            dh, part, h0, b, da, R, C, h0.stride(0), da.stride(0), dh.stride(0),
            BLOCK_R=BLOCK_R, BLOCK_C=BLOCK_C, num_warps=4)
    return dh, part.sum(0)


@_bwd_op.register_fake
def _(h0, b, da):
    return torch.empty_like(h0), b.new_empty(b.shape, dtype=torch.float32)


def _check(h0: torch.Tensor, b: torch.Tensor) -> None:
    if h0.shape[-1] != b.shape[0] or b.ndim != 1:
        raise ValueError(f"bias of shape {tuple(b.shape)} for a product of shape {tuple(h0.shape)}")
    if not (h0.is_cuda or interpreting()):
        raise RuntimeError("the GELU bias kernel runs on CUDA (or in Triton's interpreter, TRITON_INTERPRET=1)")


class _BiasGelu(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h0: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(h0, b)
        return F.gelu(h0.float() + b.float()).to(h0.dtype)

    @staticmethod
    def backward(ctx, da: torch.Tensor):
        h0, b = ctx.saved_tensors
        shape = h0.shape
        dh, db = _bwd_op(h0.reshape(-1, shape[-1]), b, da.reshape(-1, shape[-1]).contiguous())
        return dh.view(shape), db.to(b.dtype)


def bias_gelu(h0: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """gelu(h0 + b) (exact GELU, fp32 math, h0's dtype out); the backward is the kernel above. ``h0``
    (..., C) contiguous, ``b`` (C,)."""
    _check(h0, b)
    return _BiasGelu.apply(h0.contiguous(), b)


def reference_backward(h0: torch.Tensor, b: torch.Tensor, da: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Autograd of ``gelu(h0 + b)`` in fp32: (dh, db)."""
    h0 = h0.detach().float().requires_grad_()
    b = b.detach().float().requires_grad_()
    F.gelu(h0 + b).backward(da.float())
    return h0.grad, b.grad


__all__ = ["bias_gelu", "reference_backward"]
