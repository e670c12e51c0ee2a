"""The GPU block-mask generator against the reference generator's distribution."""
import random

import numpy as np
import torch

from fastibot.data.masking import MaskGenerator
from fastibot.kernels.block_mask import DRAW_FIELDS, block_masks, sample_ratios
from mask_geometry import check_geometry, check_union

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# the interpreter pays per scalar step: fewer masks on the CPU, the full statistics on a GPU
N_MASKS = 600 if DEVICE == "cuda" else 120


def test_ratio_distribution_matches_reference():
    n = N_MASKS
    g = torch.Generator(device=DEVICE).manual_seed(0)
    ratios = sample_ratios(n, [0.0, 0.3], [0.0, 0.2], generator=g, device=DEVICE)
    gpu = block_masks(ratios, 14, 14, seed=1).float().mean((1, 2)).cpu().numpy()
    ref_gen = MaskGenerator([0.0, 0.3], [0.0, 0.2])
    rng = random.Random(0)
    ref = np.array([ref_gen(14, 14, rng).mean() for _ in range(4000)])  # the reference is cheap
    tol = 3.0 / np.sqrt(n)  # ~3 standard errors of the means compared
    assert abs((gpu == 0).mean() - (ref == 0).mean()) < 0.5 * tol + 0.02
    gm, rm = gpu[gpu > 0], ref[ref > 0]
    assert abs(gm.mean() - rm.mean()) < 0.12 * tol + 0.01
    assert abs(np.quantile(gm, 0.25) - np.quantile(rm, 0.25)) < 0.2 * tol + 0.02
    assert abs(np.quantile(gm, 0.75) - np.quantile(rm, 0.75)) < 0.2 * tol + 0.02
    assert gm.max() <= 0.5 + 1e-9


def test_never_exceeds_target_and_blocks_are_rectangles():
    ratios = torch.full((N_MASKS // 3,), 0.12, device=DEVICE)
    masks = block_masks(ratios, 14, 14, seed=3).cpu()
    assert (masks.float().mean((1, 2)) <= 0.12 + 1e-6).all()
    assert masks.float().mean() > 0.09
    single = 0
    for m in masks.numpy():
        ys, xs = np.nonzero(m)
        h, w = ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
        single += int(m.sum() == h * w)
    assert single >= N_MASKS // 15  # many masks are one rectangle (the first block already reaches the target)


def test_zero_ratio_odd_grid_and_determinism():
    ratios = torch.tensor([0.0, 0.4, 0.4], device=DEVICE)
    a = block_masks(ratios, 6, 10, seed=7)
    b = block_masks(ratios, 6, 10, seed=7)
    c = block_masks(ratios, 6, 10, seed=8)
    assert a.shape == (3, 6, 10) and not a[0].any() and a[1].any()
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_block_geometry_area_and_aspect():
    """The checks of the CPU generator's test_block_geometry_area_and_aspect, on the kernel's recorded draws
    (ratio 1 on a 24 x 24 grid: many draws per mask keep the interpreter to a few seconds)."""
    n = 48 if DEVICE == "cuda" else 5
    masks, draws = block_masks(torch.full((n,), 1.0, device=DEVICE), 24, 24, seed=5, record=True)
    assert draws.shape == (n, 256, len(DRAW_FIELDS))
    masks, draws = masks.cpu().numpy(), draws.cpu().numpy()
    rows = []
    for m, d in zip(masks, draws):
        d = d[d[:, 2] >= 0]  # rows past the last draw are -1
        check_union(d, m)
        rows.append(d)
    check_geometry(np.concatenate(rows), 24, 24)
    # recording changes nothing (each mask is its own program: the first two suffice)
    assert np.array_equal(block_masks(torch.full((2,), 1.0, device=DEVICE), 24, 24, seed=5).cpu().numpy(), masks[:2])
