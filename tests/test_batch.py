"""The batch contract: fixed-size masked rows, their weights, the capacity bound and trimming."""
import random

import numpy as np
import pytest
import torch

from fastibot.data.batch import masked_rows, row_capacity, row_capacity_for
from fastibot.data.loaders import build_data
from fastibot.data.masking import MaskGenerator
from conftest import tiny_config


def _dynamic_rows(masks, n_global):
    """The per-image weights written out directly: each masked patch of image i weighs 1 / (G·B·#masked_i)."""
    gb, n = masks.shape
    b = gb // n_global
    index = masks.reshape(-1).nonzero().squeeze(1)
    counts = masks.sum(1).clamp(min=1).double()
    return index, 1.0 / (n_global * b * counts[index // n])


def test_rows_weights_and_padding():
    masks = torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0], [1, 0, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    out, rows, weight, trimmed = masked_rows(masks, n_global=2, capacity=10)  # B = 2
    assert torch.equal(out, masks) and trimmed.item() == 0
    assert rows.tolist() == [0, 1, 8, 12, 13, 14, 15, 0, 0, 0]
    expected = [1 / 8] * 2 + [1 / 4] + [1 / 16] * 4 + [0.0] * 3
    assert weight.tolist() == pytest.approx(expected)


@pytest.mark.parametrize("seed", range(3))
def test_rows_equal_the_dynamic_index_on_random_masks(seed):
    g = torch.Generator().manual_seed(seed)
    masks = torch.rand(6, 16, generator=g) < 0.3
    masks[1] = False
    masks[2] = True
    index, w = _dynamic_rows(masks, 2)
    cap = index.numel() + 5
    out, rows, weight, trimmed = masked_rows(masks, 2, cap)
    k = index.numel()
    assert torch.equal(rows[:k], index) and torch.allclose(weight[:k].double(), w)
    assert (weight[k:] == 0).all() and (rows[k:] == 0).all() and trimmed.item() == 0


def test_overflow_trims_the_last_crops_and_counts_it():
    masks = torch.zeros(4, 9, dtype=torch.bool)
    masks[0, :5] = True
    masks[3, :6] = True  # 11 masked patches, capacity 8: the last crop keeps 3
    out, rows, weight, trimmed = masked_rows(masks, 2, capacity=8)
    assert trimmed.item() == 3
    assert out[0].sum() == 5 and out[3].sum() == 3 and out.sum() == 8
    # the weights follow the trimmed masks (the student sees exactly these masks)
    _, w = _dynamic_rows(out, 2)
    assert torch.allclose(weight.double(), w)


def test_capacity_bounds_real_masks():
    """The recipe's masks (ratio 0 or U(0.1, 0.5)) never reach the bound in many draws, and the bound is far
    below the worst case (every crop at its largest target)."""
    gen = MaskGenerator([0.0, 0.3], [0.0, 0.2])
    rng = random.Random(0)
    n_crops, n = 32, 196
    cap = row_capacity_for([0.0, 0.3], [0.0, 0.2], n_crops, n)
    totals = [sum(int(gen(14, 14, rng).sum()) for _ in range(n_crops)) for _ in range(150)]
    mean = n_crops * 0.5 * 0.3 * n
    assert max(totals) < cap < n_crops * 98
    assert abs(np.mean(totals) - mean) < 0.1 * mean  # blocks fill their targets on average
    assert cap % 128 == 0 or cap == n_crops * 98
    # the recipe at 64 images per process: 2 x 64 crops
    big = row_capacity_for([0.0, 0.3], [0.0, 0.2], 128, 196)
    assert 128 * 0.15 * 196 < big < 1.7 * 128 * 0.15 * 196


def test_capacity_edge_cases():
    assert row_capacity_for([0.0], [0.0], 8, 16) == 1  # nothing is ever masked: one padding row
    assert row_capacity_for([0.5], [0.0], 1, 16) == 8  # a single crop: its target exactly


@pytest.mark.parametrize("loader", ["torchvision", "synthetic"])
def test_every_loader_gives_the_same_shapes_whatever_the_masks(tmp_path, loader):
    cfg = tiny_config(tmp_path, **{"data.loader": loader, "data.num_workers": 0})
    data = build_data(cfg, 0, 1, torch.device("cpu"))
    cap = row_capacity(cfg)
    shapes, masked = set(), set()
    for b in data:
        shapes.add(tuple((k, tuple(v.shape)) for k, v in b.tensors().items() if torch.is_tensor(v) and k != "labels"))
        masked.add(int(b.masks.sum()))
        assert b.rows.shape == (cap,) and b.rows.dtype == torch.long
        assert int((b.row_weight > 0).sum()) == int(b.masks.sum())
    assert len(shapes) == 1 and len(masked) > 1  # different mask counts, one set of shapes


def test_masks_are_zero_before_the_start_epoch(tmp_path):
    cfg = tiny_config(tmp_path, **{"data.loader": "synthetic", "masking.start_epoch": 1})
    data = build_data(cfg, 0, 1, torch.device("cpu"))
    data.set_position(0, 0)
    assert all(not b.masks.any() and (b.row_weight == 0).all() for b in data)
    data.set_position(1, 0)
    assert any(b.masks.any() for b in data)


@pytest.mark.parametrize("ratios, var, n_crops, n", [
    ([0.0, 0.3], [0.0, 0.2], 32, 196), ([0.0, 0.3], [0.0, 0.2], 128, 196), ([0.0, 0.3], [0.0, 0.2], 1000, 196),
    ([0.3], [0.2], 64, 196), ([0.1, 0.4], [0.05, 0.1], 256, 49), ([0.3], [0.1], 300, 16)])
def test_capacity_is_the_bernstein_bound_solved_independently(ratios, var, n_crops, n):
    """R is the smallest multiple of 128 at or above E[S] + x, where x solves Bernstein's tail
    exp(-x² / (2(nσ² + b·x/3))) = 1e-6 (found here by root-finding), σ² the variance of one crop's target
    (a mixture of uniforms: mean of the components' (h - l)²/12 + mean², minus the mean²) and b its largest
    deviation above the mean; never above every crop at its largest target."""
    from scipy.optimize import brentq
    lo = [(r - v) * n for r, v in zip(ratios, var)]
    hi = [(r + v) * n for r, v in zip(ratios, var)]
    means = [(a + b) / 2 for a, b in zip(lo, hi)]
    mean = float(np.mean(means))
    sigma2 = float(np.mean([(b - a) ** 2 / 12 + m * m for a, b, m in zip(lo, hi, means)])) - mean * mean
    dev = max(hi) - mean
    tail = lambda x: -x * x / (2 * (n_crops * sigma2 + dev * x / 3)) - np.log(1e-6)  # noqa: E731
    x = brentq(tail, 1e-9, 1e9, xtol=1e-9)
    want = min(int(np.ceil((n_crops * mean + x) / 128)) * 128, n_crops * int(np.floor(max(hi) + 1e-9)))
    assert row_capacity_for(ratios, var, n_crops, n) == want
