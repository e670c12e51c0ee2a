"""Block masks for masked-image modelling (the BEiT generator iBOT uses).

Per global crop a masked ratio ``r`` is drawn: for each configured
``(pred_ratio[i], pred_ratio_var[i])`` a value ``U(ratio - var, ratio + var)``
(or ``ratio`` when ``var`` is 0), then one of those values at random. With the
recipe's ``[0, 0.3]`` / ``[0, 0.2]`` a crop is unmasked or has
``r ~ U(0.1, 0.5)``. ``block`` shape then adds rectangles (area at least
``(min(H, W) // 3) ** 2``, log-uniform aspect ratio in ``aspect_ratio``) until
``r·H·W`` patches are covered; ``rand`` masks ``int(r·H·W)`` patches uniformly.

Masks are drawn on the CPU in the loader workers (one rectangle is a NumPy
slice, not a per-patch loop), so the step never waits on them.
"""
from __future__ import annotations

import math
import random
from typing import Sequence

import numpy as np
import torch


class MaskGenerator:
    def __init__(self, pred_ratio: Sequence[float], pred_ratio_var: Sequence[float],
                 aspect_ratio: Sequence[float] = (0.3, 1 / 0.3), shape: str = "block"):
        if len(pred_ratio) != len(pred_ratio_var):
            raise ValueError("pred_ratio and pred_ratio_var need the same length")
        if shape not in ("block", "rand"):
            raise ValueError(f"mask shape must be block or rand, not {shape!r}")
        self.pred_ratio = list(pred_ratio)
        self.pred_ratio_var = list(pred_ratio_var)
        self.log_aspect = (math.log(aspect_ratio[0]), math.log(aspect_ratio[1]))
        self.shape = shape

    def sample_ratio(self, rng: random.Random) -> float:
        values = [rng.uniform(r - v, r + v) if v > 0 else r for r, v in zip(self.pred_ratio, self.pred_ratio_var)]
        return values[0] if len(values) == 1 else rng.choice(values)

    def __call__(self, h: int, w: int, rng: random.Random, ratio: float | None = None,
                 draws: list | None = None) -> np.ndarray:
        """One (h, w) bool mask. A ``draws`` list (tests) receives one tuple per block drawn, with the fields
        of ``fastibot.kernels.block_mask.DRAW_FIELDS``: (top, left, height, width, budget, accepted)."""
        ratio = self.sample_ratio(rng) if ratio is None else ratio
        target = ratio * h * w
        if self.shape == "rand":
            n = int(target)
            flat = np.zeros(h * w, dtype=bool)
            flat[rng.sample(range(h * w), n)] = True
            return flat.reshape(h, w)
        return self._blocks(h, w, target, rng, draws)

    def _blocks(self, h: int, w: int, target: float, rng: random.Random, draws: list | None = None) -> np.ndarray:
        mask = np.zeros((h, w), dtype=bool)
        count = 0
        min_area = (min(h, w) // 3) ** 2
        while count < target:
            budget = target - count
            delta = 0
            for _ in range(10):
                area = rng.uniform(min_area, budget)
                aspect = math.exp(rng.uniform(*self.log_aspect))
                bh = int(round(math.sqrt(area * aspect)))
                bw = int(round(math.sqrt(area / aspect)))
                top = left = -1  # a block that does not fit gets no position
                if bw < w and bh < h:
                    top = rng.randint(0, h - bh)
                    left = rng.randint(0, w - bw)
                    window = mask[top: top + bh, left: left + bw]
                    new = bh * bw - int(window.sum())
                    if 0 < new <= budget:
                        window[...] = True
                        delta = new
                if draws is not None:
                    draws.append((top, left, bh, bw, budget, delta > 0))
                if delta > 0:
                    break
            if delta == 0:
                break
            count += delta
        return mask

    def batch(self, n: int, h: int, w: int, rng: random.Random) -> torch.Tensor:
        """(n, h, w) bool masks, one ratio draw each."""
        return torch.from_numpy(np.stack([self(h, w, rng) for _ in range(n)]))


def mask_grid(cfg, size: int = 0) -> tuple:
    """(h, w) of the grid block masks are drawn on, for a crop of ``size`` px (default: the global crop):
    one cell per patch for a ViT, per final-stage token for a Swin (``fastibot.models.backbones``)."""
    from ..models.backbones import mask_grid as backbone_mask_grid

    return backbone_mask_grid(cfg, size or cfg.crops.global_size)
