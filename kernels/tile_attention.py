"""Attention over short sequences: a whole short sequence in one tile, longer ones in a few blocks.

iBOT's crops are short: 197 tokens for a 224-px global crop, 37 for a 96-px local
crop at patch 16. Flash-style kernels are built for long sequences: 64–128-row
tiles with an online softmax, mostly padding at 37 tokens. Here a sequence of up
to 64 tokens (the locals) sits in one tile of keys per program, so its softmax is
a plain row softmax and nothing loops; a longer one (up to ``MAX_SEQ``) loops over
a few blocks of ``BLOCK_N`` keys with an online softmax. ``SEQ`` is the length
rounded up to a power of two; a longer sequence's last block is partly padding.

- forward, one program per (block of ``BLOCK_M`` query rows, sequence, head):
  ``S = Q Kᵀ``, ``P = softmax(S·scale)``, ``O = P V``, over the key blocks with a
  running row max; the row log-sum-exp is kept for the backward.
- backward, one program per (block of ``BLOCK_N`` key rows, sequence, head),
  looping over blocks of ``BLOCK_M`` query rows: ``P`` is recomputed from the
  log-sum-exp, ``dV = Pᵀ dO``, ``dS = P ∘ (dO Vᵀ − rowsum(dO ∘ O))``,
  ``dK = dSᵀ Q·scale``. When one block of keys holds the whole sequence the same
  program also writes ``dQ = dS K·scale``; otherwise a kernel with one program
  per block of query rows looping over the key blocks does, and runs first: it
  also stores ``rowsum(dO ∘ O)``, which the dK/dV programs then read instead of
  re-reading ``O`` once per block of rows.

The op reads q, k and v straight from the packed ``(T, 3, H, Dh)`` buffer the
qkv projection writes and returns the gradient as one ``(T, 3, H, Dh)`` tensor,
so neither the forward's per-size outputs nor the backward's three gradients are
copied into place afterwards. Every group of equal-length sequences in a packed
batch runs in the same op (one launch per group), writing into one output.

Bytes, with ``T·D`` = tokens × heads × head size in the input dtype: the forward reads q, k and v and writes
the output (4·T·D, plus 4 bytes of log-sum-exp per row and head), the backward reads q, k, v, the output and
its gradient and writes dq, dk, dv (8·T·D): 12·T·D in all, 0.44 GB for a ViT-B layer's 640 local crops at
64 images (≈ 0.15 ms at 3 TB/s); a longer sequence's programs re-read their blocks from L2 once per step
of their loop.

Products run on the tensor cores in the input dtype (bf16/fp16) with fp32
accumulation; ``P`` and ``dS`` are rounded to the input dtype before their
products, as in flash attention. The eager reference is
``models.attention._reference_dense``; ``tests/test_tile_attention.py`` holds the
kernels to it under ``TRITON_INTERPRET=1`` and on the GPU.
"""
from __future__ import annotations

from typing import List, Sequence, Tuple

import torch
import triton
import triton.language as tl

from . import interpreting

MAX_SEQ = 256  # longest sequence the kernels take (measured up to the 197-token global crops)
LOG2E = 1.4426950408889634


def seq_tile(length: int) -> int:
    """The key tile for sequences of ``length`` tokens: the next power of two, at least 16 (tl.dot's minimum)."""
    return max(16, triton.next_power_of_2(length))


def fits(length: int, head_dim: int) -> bool:
    """Whether the kernels take sequences of ``length`` tokens with heads of ``head_dim`` features."""
    return 0 < length <= MAX_SEQ and head_dim in (16, 32, 64, 128)


# key tile -> (BLOCK_M, BLOCK_N, warps) for both passes, or a pair of them, the forward's then the backward's:
# query rows per forward and dQ program and per step of the dK/dV programs' loop, key rows per dK/dV program and
# per step of the forward and dQ programs' loop, warps per program. Unlisted tiles take min(SEQ, 64) rows both
# ways and 4 warps in both passes. Measured for the 197-token global crops (one layer, 64 images, H100,
# benchmarks/attention.py --groups): the forward at 64/32/4 with the backward at 64/64/4 ran fwd+bwd in
# 0.591 ms (ViT-B) and 0.313 (ViT-S), both passes at 64/64/4 0.602 and 0.323, cuDNN 0.687 and 0.355; the
# backward at 64/32/4 ran 60% slower (0.874 ms in all, ViT-B), and at 64/64/8 47% slower (0.860 ms against 0.587
# in a later call); the locals at 64/64/8 ran 0.398 ms against 0.355 at 4 warps.
TUNING = {256: ((64, 32, 4), (64, 64, 4))}


def blocks(length: int, backward: bool = False) -> Tuple[int, int, int, int]:
    """(SEQ, BLOCK_M, BLOCK_N, warps) of the forward (or the backward) for sequences of ``length`` tokens. Up to
    64 tokens one program holds the whole sequence in both passes."""
    seq = seq_tile(length)
    shapes = TUNING.get(seq, (min(seq, 64), min(seq, 64), 4))
    if isinstance(shapes[0], tuple):
        shapes = shapes[1 if backward else 0]
    bm, bn, warps = shapes
    return seq, min(bm, seq), min(bn, seq), warps


@triton.jit
def _dot(a, b, F32: tl.constexpr):
    # Triton's CPU interpreter mis-multiplies bf16 operands; upcast there. The products of bf16 or fp16 values
    # are exact in fp32, so both forms sum the same terms in fp32 (the GPU form on the tensor cores).
    if F32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32))
    return tl.dot(a, b)


@triton.jit
def _rows(ptr, idx, stride, d, L):
    """Rows ``idx`` of a (tokens, D) view with row stride ``stride``; rows past ``L`` read as zeros."""
    return tl.load(ptr + idx[:, None] * stride + d[None, :], mask=idx[:, None] < L, other=0.0)


@triton.jit
def _sequence(qkv_ptr, L, H, s_tok, s_head):
    """(sequence-and-head index, head, first token of the sequence, the head's q pointer) of this program."""
    bh = tl.program_id(1)
    h = bh % H
    tok0 = tl.cast(bh // H, tl.int64) * L
    return bh, h, tok0, qkv_ptr + tok0 * s_tok + h * s_head


@triton.jit
def _fwd_keys(q, kbase, vbase, start, L, s_tok, d, m, den, acc, scale_log2,
              BLOCK_N: tl.constexpr, F32: tl.constexpr):
    """One block of keys into the running row max ``m``, denominator ``den`` and output ``acc``."""
    keys = start + tl.arange(0, BLOCK_N)
    k = _rows(kbase, keys, s_tok, d, L)
    v = _rows(vbase, keys, s_tok, d, L)
    s = _dot(q, tl.trans(k), F32) * scale_log2  # base-2 logits, fp32
    s = tl.where(keys[None, :] < L, s, float("-inf"))
    m_new = tl.maximum(m, tl.max(s, 1))
    alpha = tl.exp2(m - m_new)  # 0 on the first block
    p = tl.exp2(s - m_new[:, None])
    den = den * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, F32)
    return m_new, den, acc


@triton.jit
def _tile_attn_fwd(qkv_ptr, out_ptr, lse_ptr, L, H, scale_log2,
                s_tok, s_which, s_head, o_tok, o_head,
                SEQ: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, LOOP_N: tl.constexpr,
                D: tl.constexpr, F32: tl.constexpr):
    mblk = tl.program_id(0)
    bh, h, tok0, base = _sequence(qkv_ptr, L, H, s_tok, s_head)
    rows = mblk * BLOCK_M + tl.arange(0, BLOCK_M)
    d = tl.arange(0, D)
    q = _rows(base, rows, s_tok, d, L)
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running row max of the base-2 logits
    den = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    if LOOP_N:  # blocks of keys
        for start in range(0, L, BLOCK_N):
            m, den, acc = _fwd_keys(q, base + s_which, base + 2 * s_which, start, L, s_tok, d, m, den, acc,
                                    scale_log2, BLOCK_N, F32)
    else:  # one block holds the sequence: no loop (~5% faster for the locals)
        m, den, acc = _fwd_keys(q, base + s_which, base + 2 * s_which, 0, L, s_tok, d, m, den, acc,
                                scale_log2, BLOCK_N, F32)
    out = out_ptr + tok0 * o_tok + h * o_head
    tl.store(out + rows[:, None] * o_tok + d[None, :], (acc / den[:, None]).to(out_ptr.dtype.element_ty),
             mask=rows[:, None] < L)
    tl.store(lse_ptr + tl.cast(bh, tl.int64) * SEQ + rows, m + tl.log2(den), mask=rows < L)


@triton.jit
def _bwd_rows(k, v, keys, base, obase, gbase, lse_row, delta_row, dq_base, start, L, s_tok, o_tok, g_tok, d_tok,
              d, dk, dv, scale_log2, scale, BLOCK_M: tl.constexpr, WITH_DQ: tl.constexpr, F32: tl.constexpr):
    """One block of query rows into a block of keys' ``dk`` (unscaled) and ``dv``; with ``WITH_DQ`` (the keys
    are the whole sequence) also these rows' dQ, stored; without, the rows' rowsum(dO ∘ O) comes from the dQ
    kernel, which ran first."""
    rows = start + tl.arange(0, BLOCK_M)
    q = _rows(base, rows, s_tok, d, L)
    do = _rows(gbase, rows, g_tok, d, L)
    # rows past L: zero q and dO, a log-sum-exp and a delta of 0, so they add nothing
    lse = tl.load(lse_row + rows, mask=rows < L, other=0.0)
    if WITH_DQ:
        o = _rows(obase, rows, o_tok, d, L)
        delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)  # rowsum(dO ∘ O) = rowsum(P ∘ dP)
    else:
        delta = tl.load(delta_row + rows, mask=rows < L, other=0.0)
    st = _dot(k, tl.trans(q), F32) * scale_log2  # (keys, rows)
    # padded keys (zero-filled k) score 0, which against a row's log-sum-exp far below 0 would overflow to
    # inf and turn dQ into NaN: zero them
    pt = tl.where(keys[:, None] < L, tl.exp2(st - lse[None, :]), 0.0)
    dv += _dot(pt.to(do.dtype), do, F32)
    dpt = _dot(v, tl.trans(do), F32)
    dst = pt * (dpt - delta[None, :])
    dk += _dot(dst.to(q.dtype), q, F32)
    if WITH_DQ:
        dq = _dot(tl.trans(dst).to(k.dtype), k, F32) * scale
        tl.store(dq_base + rows[:, None] * d_tok + d[None, :], dq.to(dq_base.dtype.element_ty),
                 mask=rows[:, None] < L)
    return dk, dv


@triton.jit
def _tile_attn_bwd_kv(qkv_ptr, out_ptr, dout_ptr, lse_ptr, delta_ptr, dqkv_ptr, L, H, scale_log2, scale,
                   s_tok, s_which, s_head, o_tok, o_head, g_tok, g_head, d_tok, d_which, d_head,
                   SEQ: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, LOOP_M: tl.constexpr,
                   D: tl.constexpr, WITH_DQ: tl.constexpr, F32: tl.constexpr):
    nblk = tl.program_id(0)
    bh, h, tok0, base = _sequence(qkv_ptr, L, H, s_tok, s_head)
    obase = out_ptr + tok0 * o_tok + h * o_head
    gbase = dout_ptr + tok0 * g_tok + h * g_head
    dbase = dqkv_ptr + tok0 * d_tok + h * d_head
    lse_row = lse_ptr + tl.cast(bh, tl.int64) * SEQ
    delta_row = delta_ptr + tl.cast(bh, tl.int64) * SEQ
    keys = nblk * BLOCK_N + tl.arange(0, BLOCK_N)
    d = tl.arange(0, D)
    k = _rows(base + s_which, keys, s_tok, d, L)
    v = _rows(base + 2 * s_which, keys, s_tok, d, L)
    dk = tl.zeros([BLOCK_N, D], tl.float32)
    dv = tl.zeros([BLOCK_N, D], tl.float32)
    if LOOP_M:  # blocks of query rows
        for start in range(0, L, BLOCK_M):
            dk, dv = _bwd_rows(k, v, keys, base, obase, gbase, lse_row, delta_row, dbase, start, L, s_tok, o_tok,
                               g_tok, d_tok, d, dk, dv, scale_log2, scale, BLOCK_M, WITH_DQ, F32)
    else:  # one block of rows, no loop, as in the forward
        dk, dv = _bwd_rows(k, v, keys, base, obase, gbase, lse_row, delta_row, dbase, 0, L, s_tok, o_tok, g_tok,
                           d_tok, d, dk, dv, scale_log2, scale, BLOCK_M, WITH_DQ, F32)
    ty = dqkv_ptr.dtype.element_ty
    kmask = keys[:, None] < L
    tl.store(dbase + d_which + keys[:, None] * d_tok + d[None, :], (dk * scale).to(ty), mask=kmask)
    tl.store(dbase + 2 * d_which + keys[:, None] * d_tok + d[None, :], dv.to(ty), mask=kmask)


@triton.jit
def _dq_keys(q, do, lse, delta, kbase, vbase, start, L, s_tok, d, dq, scale_log2,
             BLOCK_N: tl.constexpr, F32: tl.constexpr):
    """One block of keys into these rows' ``dq`` (unscaled)."""
    keys = start + tl.arange(0, BLOCK_N)
    k = _rows(kbase, keys, s_tok, d, L)
    v = _rows(vbase, keys, s_tok, d, L)
    s = _dot(q, tl.trans(k), F32) * scale_log2
    p = tl.where(keys[None, :] < L, tl.exp2(s - lse[:, None]), 0.0)  # padded keys: see _bwd_rows
    dp = _dot(do, tl.trans(v), F32)
    ds = p * (dp - delta[:, None])
    return dq + _dot(ds.to(k.dtype), k, F32)


@triton.jit
def _tile_attn_bwd_q(qkv_ptr, out_ptr, dout_ptr, lse_ptr, delta_ptr, dqkv_ptr, L, H, scale_log2, scale,
                  s_tok, s_which, s_head, o_tok, o_head, g_tok, g_head, d_tok, d_which, d_head,
                  SEQ: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr,
                  F32: tl.constexpr):
    mblk = tl.program_id(0)
    bh, h, tok0, base = _sequence(qkv_ptr, L, H, s_tok, s_head)
    rows = mblk * BLOCK_M + tl.arange(0, BLOCK_M)
    d = tl.arange(0, D)
    q = _rows(base, rows, s_tok, d, L)
    o = _rows(out_ptr + tok0 * o_tok + h * o_head, rows, o_tok, d, L)
    do = _rows(dout_ptr + tok0 * g_tok + h * g_head, rows, g_tok, d, L)
    lse = tl.load(lse_ptr + tl.cast(bh, tl.int64) * SEQ + rows, mask=rows < L, other=0.0)
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
    # kept for the dK/dV programs that run next: each of them would otherwise re-read O for every row block
    tl.store(delta_ptr + tl.cast(bh, tl.int64) * SEQ + rows, delta, mask=rows < L)
    dq = tl.zeros([BLOCK_M, D], tl.float32)
    for start in range(0, L, BLOCK_N):  # runs only for sequences of several key blocks
        dq = _dq_keys(q, do, lse, delta, base + s_which, base + 2 * s_which, start, L, s_tok, d, dq,
                      scale_log2, BLOCK_N, F32)
    tl.store(dqkv_ptr + tok0 * d_tok + h * d_head + rows[:, None] * d_tok + d[None, :],
             (dq * scale).to(dqkv_ptr.dtype.element_ty), mask=rows[:, None] < L)


def _plan(length: int, backward: bool = False):
    """The kernel launches of one pass over a group of ``length``-token sequences: (kernel, programs per sequence
    and head, constexprs, warps). Programs cover ``cdiv(length, block)`` blocks; a loop runs over the other
    dimension's blocks unless one block holds the sequence."""
    seq, bm, bn, warps = blocks(length, backward)
    if not backward:
        return [(_tile_attn_fwd, triton.cdiv(length, bm), dict(SEQ=seq, BLOCK_M=bm, BLOCK_N=bn, LOOP_N=length > bn),
                 warps)]
    whole = bn >= length  # one block of keys holds the sequence: its program writes dQ too
    plan = [(_tile_attn_bwd_kv, triton.cdiv(length, bn),
             dict(SEQ=seq, BLOCK_M=bm, BLOCK_N=bn, LOOP_M=length > bm, WITH_DQ=whole), warps)]
    if not whole:  # dQ first: it writes rowsum(dO ∘ O), which the dK/dV programs read
        plan.insert(0, (_tile_attn_bwd_q, triton.cdiv(length, bm), dict(SEQ=seq, BLOCK_M=bm, BLOCK_N=bn), warps))
    return plan


def _groups(lengths: Sequence[int], counts: Sequence[int]):
    """(length, count, first token, first log-sum-exp row) of each non-empty group."""
    tok = lse = 0
    for length, count in zip(lengths, counts):
        if count:
            yield length, count, tok, lse
        tok += length * count
        lse += count * seq_tile(length)


def _check(qkv: torch.Tensor, lengths: Sequence[int], counts: Sequence[int]) -> None:
    if qkv.ndim != 4 or qkv.shape[1] != 3:
        raise ValueError(f"tile attention takes a (T, 3, H, Dh) qkv buffer, got {tuple(qkv.shape)}")
    if qkv.stride(-1) != 1:
        raise ValueError("tile attention needs a unit stride along the head features")
    if len(lengths) != len(counts) or sum(n * c for n, c in zip(lengths, counts)) != qkv.shape[0]:
        raise ValueError(f"groups {list(zip(counts, lengths))} do not cover the {qkv.shape[0]} tokens")
    bad = [n for n, c in zip(lengths, counts) if c and not fits(n, qkv.shape[-1])]
    if bad:
        raise ValueError(f"tile attention takes sequences of 1..{MAX_SEQ} tokens and head sizes 16, 32, 64 "
                         f"or 128; got lengths {bad} with head size {qkv.shape[-1]}")


def _lse_rows(lengths: Sequence[int], counts: Sequence[int], heads: int) -> int:
    return sum(c * seq_tile(n) for n, c in zip(lengths, counts)) * heads


@torch.library.custom_op("fastibot::tile_attention", mutates_args=())
def _fwd_op(qkv: torch.Tensor, lengths: List[int], counts: List[int]) -> Tuple[torch.Tensor, torch.Tensor]:
    """(T, 3, H, Dh) -> out (T, H, Dh), base-2 log-sum-exp of the scaled logits per (sequence, head, row)."""
    _check(qkv, lengths, counts)
    T, _, H, D = qkv.shape
    out = torch.empty((T, H, D), dtype=qkv.dtype, device=qkv.device)
    lse = torch.empty(_lse_rows(lengths, counts, H), dtype=torch.float32, device=qkv.device)
    scale_log2 = D ** -0.5 * LOG2E
    for length, count, tok, row in _groups(lengths, counts):
        for kernel, programs, meta, warps in _plan(length):
            kernel[(programs, count * H)](
                qkv[tok:], out[tok:], lse[row * H:], length, H, scale_log2,
                qkv.stride(0), qkv.stride(1), qkv.stride(2), out.stride(0), out.stride(1),
                D=D, F32=interpreting(), num_warps=warps, **meta)
    return out, lse


@_fwd_op.register_fake
def _(qkv, lengths, counts):
    T, _, H, D = qkv.shape
    return qkv.new_empty((T, H, D)), qkv.new_empty(_lse_rows(lengths, counts, H), dtype=torch.float32)


@torch.library.custom_op("fastibot::tile_attention_backward", mutates_args=())
def _bwd_op(qkv: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, grad_out: torch.Tensor,
            lengths: List[int], counts: List[int]) -> torch.Tensor:
    """-> dLoss/dqkv, (T, 3, H, Dh) contiguous."""
    T, _, H, D = qkv.shape
    if grad_out.stride(-1) != 1:
        grad_out = grad_out.contiguous()
    dqkv = torch.empty((T, 3, H, D), dtype=qkv.dtype, device=qkv.device)
    delta = torch.empty_like(lse)  # rowsum(dO ∘ O) per (sequence, head, row), as the log-sum-exp is laid out
    scale = D ** -0.5
    strides = (qkv.stride(0), qkv.stride(1), qkv.stride(2), out.stride(0), out.stride(1),
               grad_out.stride(0), grad_out.stride(1), dqkv.stride(0), dqkv.stride(1), dqkv.stride(2))
    for length, count, tok, row in _groups(lengths, counts):
        args = (qkv[tok:], out[tok:], grad_out[tok:], lse[row * H:], delta[row * H:], dqkv[tok:], length, H,
                scale * LOG2E, scale)
        for kernel, programs, meta, warps in _plan(length, backward=True):  # dQ if apart, then dK/dV
            kernel[(programs, count * H)](*args, *strides, D=D, F32=interpreting(), num_warps=warps, **meta)
    return dqkv


@_bwd_op.register_fake
def _(qkv, out, lse, grad_out, lengths, counts):
    return qkv.new_empty(qkv.shape)


def _setup(ctx, inputs, output):
    qkv, lengths, counts = inputs
    out, lse = output
    ctx.save_for_backward(qkv, out, lse)
    ctx.groups = (lengths, counts)
    ctx.mark_non_differentiable(lse)
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_out, _grad_lse):
    if grad_out is None:
        return None, None, None
    qkv, out, lse = ctx.saved_tensors
    return _bwd_op(qkv, out, lse, grad_out, *ctx.groups), None, None


_fwd_op.register_autograd(_backward, setup_context=_setup)


def tile_attention(qkv: torch.Tensor, groups: Sequence[Tuple[int, int]]) -> torch.Tensor:
    """Block-diagonal attention over packed sequences: ``qkv`` (T, 3, H, Dh), ``groups`` the layout's
    ``(count, length)`` pairs in token order (every length ≤ ``MAX_SEQ``) -> (T, H, Dh)."""
    counts = [int(c) for c, _ in groups]
    lengths = [int(n) for _, n in groups]
    return _fwd_op(qkv, lengths, counts)[0]


__all__ = ["MAX_SEQ", "blocks", "fits", "seq_tile", "tile_attention"]
