"""Block masks: ratio distribution, block geometry, rand shape, determinism."""
import random

import numpy as np
import pytest
from scipy import ndimage

from fastibot.data.masking import MaskGenerator
from mask_geometry import check_geometry, check_union


def _ratios(gen, n, h=14, w=14, seed=0):
    rng = random.Random(seed)
    return np.array([gen(h, w, rng).mean() for _ in range(n)])


def test_recipe_ratio_distribution():
    gen = MaskGenerator([0.0, 0.3], [0.0, 0.2])
    r = _ratios(gen, 2000)
    unmasked = (r == 0).mean()
    assert 0.45 < unmasked < 0.55  # one of the two ratio choices is 0
    masked = r[r > 0]
    # r ~ U(0.1, 0.5); blocks never exceed the target and stop early when no block fits the rest
    assert masked.min() >= 12 / 196 and masked.max() <= 0.5  # first block: about (14 // 3) ** 2 = 16
    assert 0.25 < masked.mean() < 0.31
    # the covered count tracks the target: the lower and upper quarters differ
    assert np.quantile(masked, 0.25) < 0.25 < np.quantile(masked, 0.75)


def test_fixed_ratio_hits_target():
    gen = MaskGenerator([0.4], [0.0])
    r = _ratios(gen, 300)
    assert r.max() <= 0.4  # a block is only added if it fits in the remaining budget
    assert 0.37 < r.mean() <= 0.4


def test_blocks_are_rectangles_of_minimum_area_and_aspect():
    gen = MaskGenerator([0.12], [0.0], aspect_ratio=(0.3, 1 / 0.3))
    rng = random.Random(1)
    min_area = (14 // 3) ** 2
    sizes = []
    for _ in range(300):
        m = gen(14, 14, rng)
        labels, n = ndimage.label(m)
        ys, xs = np.nonzero(m)
        h, w = ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
        if n == 1 and m.sum() == h * w:  # one rectangle (overlapping blocks can merge into other shapes)
            sizes.append((h, w))
    assert len(sizes) > 50
    areas = np.array([h * w for h, w in sizes])
    # a first block covers at least about the minimum area (rounding of sqrt can shave a little)
    assert np.median(areas) >= min_area - 3
    aspects = np.array([h / w for h, w in sizes])
    assert aspects.min() >= 0.15 and aspects.max() <= 1 / 0.15  # (0.3, 3.3) up to rounding and merges
    assert (aspects > 1.2).any() and (aspects < 0.8).any()  # both orientations occur


def test_rand_shape_exact_count():
    gen = MaskGenerator([0.3], [0.0], shape="rand")
    m = gen(14, 14, random.Random(0))
    assert m.sum() == int(0.3 * 196)


def test_deterministic_given_rng():
    gen = MaskGenerator([0.0, 0.3], [0.0, 0.2])
    a = [gen(14, 14, random.Random(7)) for _ in range(3)]
    b = [gen(14, 14, random.Random(7)) for _ in range(3)]
    for x, y in zip(a, b):
        assert np.array_equal(x, y)


def test_non_square_grid_and_bad_args():
    gen = MaskGenerator([0.3], [0.1])
    m = gen(6, 10, random.Random(0))
    assert m.shape == (6, 10)
    with pytest.raises(ValueError):
        MaskGenerator([0.3], [0.1, 0.2])
    with pytest.raises(ValueError):
        MaskGenerator([0.3], [0.1], shape="circle")


@pytest.mark.parametrize("h,w,ratio", [(24, 24, 1.0), (12, 20, 0.5), (14, 14, 0.3)])
def test_block_geometry_area_and_aspect(h, w, ratio):
    """Blocks have area U((min(h, w) // 3) ** 2, budget) and a log-uniform aspect ratio in (0.3, 1 / 0.3),
    in both orientations; the mask is the union of the accepted blocks (the same checks as the GPU kernel's)."""
    gen = MaskGenerator([ratio], [0.0])
    rng = random.Random(0)
    draws = []
    for _ in range(150):
        mine = []
        mask = gen(h, w, rng, draws=mine)
        check_union(mine, mask)
        draws += mine
    check_geometry(draws, h, w)
