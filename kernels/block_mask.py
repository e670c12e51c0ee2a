"""Block masks on the GPU: the BEiT generator, one program per mask, one launch per batch.

Each program keeps its (H·W)-patch mask in registers and runs the reference
algorithm (``fastibot.data.masking.MaskGenerator``): while fewer than
``ratio·H·W`` patches are covered, draw a block (area U(min_area, budget),
log-uniform aspect ratio, uniform position); keep it if it adds between 1 and
``budget`` new patches; stop after 10 failed draws in a row. Random numbers
come from Philox (``tl.rand4x``: one call gives a draw's four uniforms) keyed by (seed, mask, draw), so the masks are
reproducible. Bytes: one bool per patch written; the work is a few hundred
scalar steps per mask, negligible next to a training step.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import triton
import triton.language as tl

MAX_DRAWS = 256  # per mask; the reference needs far fewer (about 10 per block plus 10 to stop)
# what ``block_masks(..., record=True)`` and ``MaskGenerator(..., draws=[])`` report per draw; a block is
# rows [top, top + height) x columns [left, left + width); budget = patches still to cover when drawn
DRAW_FIELDS = ("top", "left", "height", "width", "budget", "accepted")


@triton.jit
def _block_mask_kernel(out_ptr, draws_ptr, ratio_ptr, seed, H, W, min_area, log_lo, log_hi,
                       BLOCK: tl.constexpr, MAX_DRAWS: tl.constexpr, RECORD: tl.constexpr):
    pid = tl.program_id(0)
    idx = tl.arange(0, BLOCK)
    valid = idx < H * W
    r = idx // W
    c = idx % W
    mask = tl.zeros([BLOCK], dtype=tl.int32)
    target = tl.load(ratio_ptr + pid) * H * W
    count = 0.0
    fails = 0
    draw = 0
    base = tl.cast(pid, tl.int64) * MAX_DRAWS
    while (count < target) & (fails < 10) & (draw < MAX_DRAWS):
        u0, u1, u2, u3 = tl.rand4x(seed, base + draw)  # one Philox call gives the draw's four uniforms
        budget = target - count
        area = min_area + (budget - min_area) * u0
        aspect = tl.exp(log_lo + (log_hi - log_lo) * u1)
        bh = tl.cast(tl.floor(tl.sqrt(area * aspect) + 0.5), tl.int32)
        bw = tl.cast(tl.floor(tl.sqrt(area / aspect) + 0.5), tl.int32)
        fits = (bw < W) & (bh < H) & (bw > 0) & (bh > 0)
        top = tl.cast(tl.floor(u2 * tl.cast(H - bh + 1, tl.float32)), tl.int32)
        left = tl.cast(tl.floor(u3 * tl.cast(W - bw + 1, tl.float32)), tl.int32)
        rect = valid & (r >= top) & (r < top + bh) & (c >= left) & (c < left + bw) & fits
        new = tl.sum(tl.where(rect & (mask == 0), 1, 0), 0)
        ok = (new > 0) & (tl.cast(new, tl.float32) <= budget)
        mask = tl.where(rect & ok, 1, mask)
        if RECORD:  # tests: the geometry of every draw, see DRAW_FIELDS
            rec = draws_ptr + (tl.cast(pid, tl.int64) * MAX_DRAWS + draw) * 6
            tl.store(rec, tl.cast(top, tl.float32))
            tl.store(rec + 1, tl.cast(left, tl.float32))
            tl.store(rec + 2, tl.cast(bh, tl.float32))
            tl.store(rec + 3, tl.cast(bw, tl.float32))
            tl.store(rec + 4, budget)
            tl.store(rec + 5, tl.where(ok, 1.0, 0.0))
        count += tl.where(ok, tl.cast(new, tl.float32), 0.0)
        fails = tl.where(ok, 0, fails + 1)
        draw += 1
    tl.store(out_ptr + tl.cast(pid, tl.int64) * H * W + idx, mask.to(tl.int8), mask=valid)


def sample_ratios(n: int, pred_ratio: Sequence[float], pred_ratio_var: Sequence[float], generator=None,
                  device="cpu") -> torch.Tensor:
    """Per-mask target ratios: pick one (ratio, var) pair, then U(ratio - var, ratio + var). The pairs may
    be lists or tensors already on ``device`` (no copy then)."""
    r = torch.as_tensor(pred_ratio, dtype=torch.float32, device=device)
    v = torch.as_tensor(pred_ratio_var, dtype=torch.float32, device=device)
    pick = torch.randint(len(pred_ratio), (n,), generator=generator, device=device)
    u = torch.rand(n, generator=generator, device=device)
    return r[pick] + v[pick] * (2 * u - 1)


def block_masks(ratios: torch.Tensor, h: int, w: int, seed: int, aspect_ratio=(0.3, 1 / 0.3),
                record: bool = False):
    """(n,) target ratios -> (n, h, w) bool block masks, made on ``ratios.device``.

    With ``record`` (for tests) also returns every draw: (n, MAX_DRAWS, 6) fp32 rows of
    ``DRAW_FIELDS``, -1 past each mask's last draw.
    """
    n = ratios.shape[0]
    out = torch.empty(n, h, w, dtype=torch.int8, device=ratios.device)
    draws = torch.full((n, MAX_DRAWS, len(DRAW_FIELDS)) if record else (1,), -1.0, device=ratios.device)
    if n:
        block = max(16, triton.next_power_of_2(h * w))
        _block_mask_kernel[(n,)](out, draws, ratios.float().contiguous(), seed, h, w,
                                 float((min(h, w) // 3) ** 2), math.log(aspect_ratio[0]), math.log(aspect_ratio[1]),
                                 BLOCK=block, MAX_DRAWS=MAX_DRAWS, RECORD=record, num_warps=1)
    return (out.bool(), draws) if record else out.bool()
