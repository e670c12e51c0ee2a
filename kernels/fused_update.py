"""The update half of a step in one pass: clipping, decoupled weight decay, AdamW and the teacher EMA.

Per element of parameter i, in fp32 (c_i: its clip coefficient; k_i: its AdamW step count before this step):

    if i trains and the step is not skipped for it:        skipped: a non-finite step, or the frozen last layer
        g  = grad · c_i
        θ  = θ · (1 − lr·wd·decay_i)                        decay_i: 0 for biases and 1-D parameters
        m  = β1·m + (1 − β1)·g ;  v = β2·v + (1 − β2)·g²
        θ  = θ − lr / (1 − β1^(k_i+1)) · m / (√v / √(1 − β2^(k_i+1)) + ε)
    θt = μ·θt + (1 − μ)·θ                                   every parameter, every step

This is the arithmetic of ``torch._foreach_mul_`` (clip), ``torch._foreach_mul_`` (decay),
``torch.optim.AdamW(fused=True)`` and the EMA loop, in that order, with each product rounded once (no
fused multiply-add), so the pass agrees with the separate ones to fp32 rounding.

Student parameters, AdamW moments and teacher parameters live in flat fp32 buffers of one layout (the
EMA's, ``kernels.ema``); gradients stay wherever autograd put them and are read through a table of their
addresses. Bytes per trainable parameter: read g, θ, m, v, θt, write θ, m, v, θt: 36, against 56 for the
separate passes (clip 8, decay 8, AdamW 28, EMA 12); ViT-B/16 (94 M parameters): 3.4 GB, ≈ 1.1 ms at
3 TB/s. One program per block of ``BLOCK`` elements of one parameter (a table maps programs to blocks),
so no block spans two parameters. Where every size and offset is a multiple of 4 elements and every address
of 16 bytes (``ALIGNED``; every ViT layout), the loads and stores are 128 bits wide; otherwise 32.
"""
from __future__ import annotations

from typing import List, Sequence

import torch
import triton
import triton.language as tl

BLOCK = 4096
INTERPRETER_BLOCK = 1 << 16  # the CPU interpreter pays per program, not per element
# hyper: device fp32 values the kernel reads each step (a captured graph replays with the current ones), at
# these places (the kernel reads them by number)
LR, WD, SKIP, FROZEN, MU, ONE_MINUS_MU = range(6)


@triton.jit
def _fused_update_kernel(p_ptr, m_ptr, v_ptr, t_ptr, gaddr_ptr, off_ptr, numel_ptr, blk_param_ptr, blk_start_ptr,
                         coef_ptr, decay_ptr, last_ptr, bc_ptr, hyper_ptr, n_params, beta1, beta2, eps,
                         BLOCK: tl.constexpr, ALIGNED: tl.constexpr):
    blk = tl.program_id(0)
    i = tl.load(blk_param_ptr + blk)
    start = tl.multiple_of(tl.load(blk_start_ptr + blk), BLOCK)
    n = tl.load(numel_ptr + i)
    off = tl.load(off_ptr + i)
    gaddr = tl.load(gaddr_ptr + i)
    g_ptr = gaddr.to(tl.pointer_type(tl.float32))
    if ALIGNED:  # every size and offset a multiple of 4 elements, every address of 16 bytes: 128-bit accesses
        n = tl.multiple_of(n, 4)
        off = tl.multiple_of(off, 4)
        g_ptr = tl.multiple_of(g_ptr, 16)
    idx = start + tl.arange(0, BLOCK)
    mask = idx < n
    offs = off + idx  # int64 offsets into the flat buffers
    theta = tl.load(p_ptr + offs, mask=mask)
    skip = tl.maximum(tl.load(hyper_ptr + 2), tl.load(hyper_ptr + 3) * tl.load(last_ptr + i))
    if (gaddr != 0) & (skip == 0.0):  # a trainable parameter this step updates
        lr = tl.load(hyper_ptr + 0)
        g = tl.load(g_ptr + idx, mask=mask) * tl.load(coef_ptr + i)
        m = tl.load(m_ptr + offs, mask=mask)
        v = tl.load(v_ptr + offs, mask=mask)
        theta = theta * (1.0 - lr * tl.load(hyper_ptr + 1) * tl.load(decay_ptr + i))
        m = beta1 * m + (1.0 - beta1) * g
        v = beta2 * v + (1.0 - beta2) * (g * g)
        bc1 = tl.load(bc_ptr + i)
        bc2_sqrt = tl.load(bc_ptr + n_params + i)
        # IEEE square root and division (the GPU's defaults are approximate; PyTorch's AdamW rounds correctly)
        denom = tl.div_rn(tl.sqrt_rn(v), bc2_sqrt) + eps
        theta = theta - tl.div_rn(lr, bc1) * tl.div_rn(m, denom)
        tl.store(p_ptr + offs, theta, mask=mask)
        tl.store(m_ptr + offs, m, mask=mask)
        tl.store(v_ptr + offs, v, mask=mask)
    t = tl.load(t_ptr + offs, mask=mask)
    a = t * tl.load(hyper_ptr + 4)
    b = theta * tl.load(hyper_ptr + 5)
    tl.store(t_ptr + offs, a + b, mask=mask)


class FusedUpdate:
    """Clip + decay + AdamW + EMA over the flat student buffer ``s_flat`` and teacher buffer ``t_flat``.

    ``params``: every student parameter, each a view of ``s_flat`` (its order there is free);
    ``trainable``: those the optimizer updates, in the order of the gradients and clip coefficients the
    calls pass; ``decay``, ``last``: per trainable parameter, whether it takes weight decay and whether it is
    in the head's last layer (frozen early in training). The AdamW moments are flat buffers
    ``exp_avg``/``exp_avg_sq`` of ``s_flat``'s layout and ``steps`` holds each trainable parameter's step
    count; :meth:`state_views` hands out per-parameter views of them."""

    def __init__(self, s_flat: torch.Tensor, t_flat: torch.Tensor, params: Sequence[torch.nn.Parameter],
                 trainable: Sequence[torch.nn.Parameter], decay: Sequence[bool], last: Sequence[bool],
                 betas=(0.9, 0.999), eps: float = 1e-8, block: int = 0):
        if s_flat.dtype != torch.float32 or t_flat.shape != s_flat.shape:
            raise ValueError("the fused update takes fp32 flat student and teacher buffers of one shape")
        dev = s_flat.device
        self.s_flat, self.t_flat = s_flat, t_flat
        self.exp_avg = torch.zeros_like(s_flat)
        self.exp_avg_sq = torch.zeros_like(s_flat)
        self.params = list(params)
        if sum(p.numel() for p in self.params) != s_flat.numel():
            raise ValueError("the parameters must cover the flat student buffer (the EMA runs over all of it)")
        where = {id(p): j for j, p in enumerate(self.params)}
        if any(id(p) not in where for p in trainable):
            raise ValueError("every trainable parameter must be a view of the flat student buffer")
        self.train_index = [where[id(p)] for p in trainable]  # k-th trainable parameter -> its place in params
        self.train_index_dev = torch.tensor(self.train_index, dtype=torch.int64, device=dev)
        trains = torch.zeros(len(self.params), dtype=torch.float32)
        trains[self.train_index] = 1.0
        self.trainable = trains.to(dev)
        self.block = block or (BLOCK if s_flat.is_cuda else INTERPRETER_BLOCK)
        offsets = [self._offset(p) for p in self.params]
        self.offsets = offsets
        numels = [p.numel() for p in self.params]
        # 128-bit loads and stores need every size and offset a multiple of 4 and every buffer 16-byte aligned;
        # set_grads adds the gradients' addresses to the condition
        self._aligned_layout = (all(n % 4 == 0 for n in numels) and all(o % 4 == 0 for o in offsets)
                                and s_flat.data_ptr() % 16 == 0 and t_flat.data_ptr() % 16 == 0)
        self.aligned = False
        blk_param, blk_start = [], []
        for j, n in enumerate(numels):
            for start in range(0, n, self.block):
                blk_param.append(j)
                blk_start.append(start)
        P = len(self.params)
        self.off = torch.tensor(offsets, dtype=torch.int64, device=dev)
        self.numel = torch.tensor(numels, dtype=torch.int64, device=dev)
        self.blk_param = torch.tensor(blk_param, dtype=torch.int32, device=dev)
        self.blk_start = torch.tensor(blk_start, dtype=torch.int64, device=dev)
        self.decay = self._per_param(decay, dev)
        self.last = self._per_param(last, dev)
        self.steps = torch.zeros(P, dtype=torch.float32, device=dev)  # AdamW step count per parameter
        self.bc = torch.ones(2 * P, dtype=torch.float32, device=dev)  # this step's 1 - β1^k, then √(1 - β2^k)
        self._betas64 = torch.tensor([[float(betas[0])], [float(betas[1])]], dtype=torch.float64, device=dev)
        self.coef = torch.ones(P, dtype=torch.float32, device=dev)
        self.hyper = torch.zeros(6, dtype=torch.float32, device=dev)
        self.gaddr = torch.zeros(P, dtype=torch.int64, device=dev)  # 0: no gradient (a parameter that does not train)
        self._pending: List[int] = []
        self.betas, self.eps = (float(betas[0]), float(betas[1])), float(eps)

    def _offset(self, p: torch.Tensor) -> int:
        if p.dtype != torch.float32 or not p.is_contiguous():
            raise ValueError("the fused update takes contiguous fp32 parameters")
        base = self.s_flat.untyped_storage().data_ptr()
        if p.untyped_storage().data_ptr() != base:
            raise ValueError("every parameter must be a view of the flat student buffer (kernels.ema=triton)")
        return p.storage_offset() - self.s_flat.storage_offset()

    def _per_param(self, values: Sequence[bool], dev) -> torch.Tensor:
        out = torch.zeros(len(self.params), dtype=torch.float32)
        out[self.train_index] = torch.tensor([float(x) for x in values], dtype=torch.float32)
        return out.to(dev)

    def state_views(self, k: int):
        """AdamW's state of the ``k``-th trainable parameter as views: (step (0-d), exp_avg, exp_avg_sq)."""
        i = self.train_index[k]
        p, o = self.params[i], self.offsets[i]
        n = p.numel()
        return (self.steps[i], self.exp_avg[o: o + n].view_as(p), self.exp_avg_sq[o: o + n].view_as(p))

    def set_grads(self, grads: Sequence[torch.Tensor]) -> None:
        """The gradients of the trainable parameters (in ``trainable`` order), read by the next
        :meth:`__call__`. Under CUDA-graph capture the addresses are kept and written by :meth:`after_capture`
        (the captured backward allocates the gradients once, and every replay writes the same memory)."""
        if len(grads) != len(self.train_index):
            raise ValueError(f"{len(grads)} gradients for {len(self.train_index)} trainable parameters")
        addr = [0] * len(self.params)
        for j, g in zip(self.train_index, grads):
            if g.dtype != torch.float32 or not g.is_contiguous() or g.numel() != self.params[j].numel():
                raise ValueError("the fused update reads contiguous fp32 gradients shaped like their parameters")
            addr[j] = g.data_ptr()
        self.aligned = self._aligned_layout and all(a % 16 == 0 for a in addr)
        if self.s_flat.is_cuda and torch.cuda.is_current_stream_capturing():
            self._pending = addr  # a copy from host memory cannot be captured
        else:  # pageable source, non-blocking: staged before the call returns, no wait for the device
            self.gaddr.copy_(torch.tensor(addr, dtype=torch.int64), non_blocking=True)

    def after_capture(self) -> None:
        if self._pending:
            self.gaddr.copy_(torch.tensor(self._pending, dtype=torch.int64))
            self._pending = []

    @torch.no_grad()
    def __call__(self, coef: torch.Tensor, lr, wd, skip, frozen, mu, one_minus_mu) -> None:
        """``coef``: (trainable,) clip coefficients; the rest 0-d device values (skip, frozen: 1.0 = skip)."""
        self.coef.index_copy_(0, self.train_index_dev, coef.float())
        self.hyper.copy_(torch.stack([x.float().reshape(()) for x in (lr, wd, skip, frozen, mu, one_minus_mu)]))
        b1, b2 = self.betas
        # bias corrections 1 - β^(k+1) per parameter, in fp64 (as PyTorch's AdamW): early on 1 - 0.999^k cancels
        # most digits, so fp32 with the GPU's approximate exp2/log2 would miss it by up to ≈ 1e-4 of its value
        bc = 1.0 - self._betas64 ** (self.steps.double() + 1.0)  # (2, P): 1 - β1^k, 1 - β2^k
        bc[1].sqrt_()
        self.bc.copy_(bc.view(-1))
        _fused_update_kernel[(self.blk_param.numel(),)](
            self.s_flat, self.exp_avg, self.exp_avg_sq, self.t_flat, self.gaddr, self.off, self.numel,
            self.blk_param, self.blk_start, self.coef, self.decay, self.last, self.bc, self.hyper, len(self.params),
            b1, b2, self.eps, BLOCK=self.block, ALIGNED=self.aligned, num_warps=8, enable_fp_fusion=False)
        # the step counts move after the pass (its programs all read the count before this step)
        self.steps.add_((1.0 - torch.maximum(self.hyper[SKIP], self.hyper[FROZEN] * self.last)) * self.trainable)


__all__ = ["FusedUpdate"]
