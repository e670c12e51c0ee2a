"""What the BEiT block generator promises about its blocks, checked the same way for the CPU
generator (``MaskGenerator``) and the GPU kernel (``block_masks``) from their recorded draws.

Each draw is a row of ``DRAW_FIELDS``: (top, left, height, width, budget, accepted). A draw with
``budget >= min_area`` has area ~ U(min_area, budget) and aspect ratio height / width log-uniform
on ``aspect``; both sides are then rounded to integers (each moves by at most 0.5).
"""
import math

import numpy as np


def check_union(draws, mask):
    """The mask is exactly the union of its accepted blocks, each inside the grid."""
    h, w = mask.shape
    union = np.zeros((h, w), dtype=bool)
    for top, left, bh, bw, _, accepted in np.asarray(draws, dtype=np.float64).reshape(-1, 6):
        if accepted:
            top, left, bh, bw = int(top), int(left), int(bh), int(bw)
            assert bh >= 1 and bw >= 1 and 0 <= top <= h - bh and 0 <= left <= w - bw, (top, left, bh, bw)
            union[top: top + bh, left: left + bw] = True
    assert np.array_equal(union, mask)


def check_geometry(draws, h, w, aspect=(0.3, 1 / 0.3)):
    """Area and aspect-ratio rules over all draws made with a budget of at least the minimum area.
    Statistical tolerances are four standard errors for the number of draws, plus rounding slack."""
    d = np.asarray(draws, dtype=np.float64).reshape(-1, 6)
    min_area = (min(h, w) // 3) ** 2
    d = d[d[:, 4] >= min_area]
    bh, bw, budget = d[:, 2], d[:, 3], d[:, 4]
    n = len(d)
    assert n >= 50, f"only {n} draws with a budget of at least the minimum area"
    assert (bh >= 1).all() and (bw >= 1).all()
    # area: at least the minimum, at most the budget (up to rounding), uniform in between
    assert ((bh + 0.5) * (bw + 0.5) >= min_area).all()
    assert ((bh - 0.5) * (bw - 0.5) <= budget).all()
    wide = budget >= 2 * min_area
    u = (bh * bw - min_area)[wide] / (budget - min_area)[wide]  # ~ U(0, 1) up to rounding
    assert wide.sum() >= 20 and abs(u.mean() - 0.5) < 4 * 0.29 / math.sqrt(wide.sum()) + 0.08, u.mean()
    # aspect: every block is consistent with a ratio in range, and log(height / width) is uniform on it
    lo, hi = math.log(aspect[0]), math.log(aspect[1])
    assert (np.log((bh + 0.5) / (bw - 0.5).clip(min=1e-9)) >= lo).all()
    assert (np.log((bh - 0.5) / (bw + 0.5)) <= hi).all()
    la = np.log(bh / bw)
    mid, span = (lo + hi) / 2, hi - lo
    se = span / math.sqrt(12 * n)
    assert abs(la.mean() - mid) < 4 * se + 0.05, la.mean()
    assert abs(la.std() - span / math.sqrt(12)) < 4 * 0.13 * span / math.sqrt(n) + 0.1 * span / math.sqrt(12), la.std()
    inner = (np.abs(la - mid) < span / 4).mean()  # the middle half of the range holds half the draws
    assert abs(inner - 0.5) < 4 * 0.5 / math.sqrt(n) + 0.05, inner
    # both orientations, out to the ends of the range
    tall, flat = (bh > bw).mean(), (bh < bw).mean()
    assert min(tall, flat) > 0.5 - 4 * 0.5 / math.sqrt(n) - 0.1, (tall, flat)
    assert (la > mid + 0.35 * span).any() and (la < mid - 0.35 * span).any()
