"""The batch contract between loaders, model and loss: fixed-size tensors whose shapes depend on the
config only.

Every loader (torchvision, DALI, synthetic) yields a :class:`Batch`. Its masked-patch rows have a
fixed count ``R = row_capacity(cfg)``: the real masked patches first, then padding rows that point
at patch 0 with weight 0 (they add nothing to the loss or its gradient). So nothing downstream
depends on how many patches a batch happens to mask: a compiled step never recompiles and a CUDA
graph never sees a new shape.

``R`` is a bound that a batch exceeds with probability below 1e-6 (Bernstein's inequality over the
per-crop masked counts, which are independent and bounded). A batch that does exceed it has the
masks of its last crops trimmed to ``R`` patches (the student then sees exactly the trimmed masks,
so loss and inputs agree); the trimmed patches are counted in ``Batch.trimmed`` and logged.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

# a batch exceeds the row capacity with probability below this (Bernstein bound)
OVERFLOW_PROBABILITY = 1e-6
ROW_ALIGN = 128  # capacity rounded up to a multiple of this (GEMM- and kernel-friendly)


@dataclass
class Batch:
    globals: torch.Tensor  # (G*B, 3, H, W) global crops, crop-major
    locals: Optional[torch.Tensor]  # (L*B, 3, h, w) local crops, or None
    masks: torch.Tensor  # (G*B, N) bool: True where the student sees the mask token
    rows: torch.Tensor  # (R,) int64 flat index into G*B*N of each masked patch; padding rows point at 0
    row_weight: torch.Tensor  # (R,) fp32: 1 / (G·B·#masked of the row's image); 0 on padding rows
    n_bad: torch.Tensor  # () fp32: unreadable images replaced by others in this batch
    trimmed: torch.Tensor  # () fp32: masked patches dropped because the batch exceeded R
    labels: Optional[torch.Tensor] = None  # (B,) class indices (evaluation only; training never reads them)

    def tensors(self):
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def _map(self, fn) -> "Batch":
        return Batch(**{k: (fn(v) if torch.is_tensor(v) else v) for k, v in self.tensors().items()})

    def to(self, device, non_blocking: bool = False) -> "Batch":
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> "Batch":  # DataLoader(pin_memory=True) calls this
        return self._map(lambda t: t.pin_memory())

    def clone(self) -> "Batch":
        return self._map(torch.clone)

    def copy_(self, other: "Batch") -> None:
        """Copy ``other`` into this batch's tensors (static buffers of a captured step); shapes must agree.
        Labels are not copied: training never reads them. A field of ``other`` that already is this
        batch's tensor (a loader wrote it in place: the loaders' ``deliver_into``) is not copied again; a
        pinned host field is copied to the device without a sync."""
        for k, v in self.tensors().items():
            w = getattr(other, k)
            if torch.is_tensor(v) and k != "labels":
                if w is None or w.shape != v.shape:
                    raise ValueError(f"batch field {k}: shape {None if w is None else tuple(w.shape)} does not "
                                     f"match the captured {tuple(v.shape)}")
                if w is v:
                    continue
                v.copy_(w, non_blocking=True)


def _target_moments(pred_ratio: Sequence[float], pred_ratio_var: Sequence[float], n_patches: int):
    """(mean, variance, max) of one crop's masking target r·N: one of the configured ratios at random,
    each U(ratio - var, ratio + var). A crop's masked count never exceeds its target."""
    means, seconds, tops = [], [], []
    for r, v in zip(pred_ratio, pred_ratio_var):
        lo, hi = (r - v) * n_patches, (r + v) * n_patches
        means.append((lo + hi) / 2)
        seconds.append((lo * lo + lo * hi + hi * hi) / 3)  # E[x²] of U(lo, hi)
        tops.append(hi)
    mean = sum(means) / len(means)
    return mean, max(sum(seconds) / len(seconds) - mean * mean, 0.0), max(tops)


def row_capacity_for(pred_ratio, pred_ratio_var, n_crops: int, n_patches: int) -> int:
    """Fixed masked-row count for ``n_crops`` crops of ``n_patches`` patches (see the module docstring)."""
    mean, var, top = _target_moments(pred_ratio, pred_ratio_var, n_patches)
    hard = n_crops * int(math.floor(top + 1e-9))  # every crop at its largest target
    if hard == 0:
        return 1
    # Bernstein: P(S - E[S] >= x) <= exp(-x² / (2(nσ² + b·x/3))), b = max deviation of one term
    log_p = math.log(1.0 / OVERFLOW_PROBABILITY)
    b = max(top - mean, 1e-9)
    nv = n_crops * var
    x = (2 * b * log_p / 3 + math.sqrt((2 * b * log_p / 3) ** 2 + 8 * nv * log_p)) / 2
    cap = int(math.ceil(n_crops * mean + x))
    cap = -(-cap // ROW_ALIGN) * ROW_ALIGN
    return max(1, min(cap, hard))


def row_capacity(cfg) -> int:
    """R for one process's batch of ``cfg``."""
    from .masking import mask_grid

    h, w = mask_grid(cfg)
    m = cfg.masking
    return row_capacity_for(m.pred_ratio, m.pred_ratio_var, cfg.crops.n_global * cfg.data.batch_size, h * w)


def masked_rows(masks: torch.Tensor, n_global: int, capacity: int):
    """(G*B, N) bool masks -> (masks trimmed to ``capacity`` patches, rows (R,), row_weight (R,), trimmed ()).

    Static shapes and no host sync (runs on the masks' device): the rank of each masked patch is a
    cumulative sum; kept patches scatter to their rank, the rest to a spill slot that is dropped.
    The patch loss is the mean over globals of the mean over images of (Σ over masked patches of CE) /
    max(#masked, 1), so each row of image i weighs 1 / (G·B·#masked_i).
    """
    gb, n = masks.shape
    flat = masks.reshape(-1)
    rank = torch.cumsum(flat, 0) - 1  # (G*B*N,)
    keep = flat & (rank < capacity)
    trimmed = (flat.sum() - keep.sum()).float()
    masks = keep.view(gb, n)
    slots = torch.zeros(capacity + 1, dtype=torch.long, device=masks.device)
    slots.scatter_(0, torch.where(keep, rank, capacity), torch.arange(gb * n, device=masks.device))
    counts = masks.sum(1)  # (G*B,)
    valid = torch.arange(capacity, device=masks.device) < counts.sum()
    rows = torch.where(valid, slots[:capacity], 0)
    per_image = 1.0 / (n_global * (gb // n_global) * counts.clamp(min=1).float())
    weight = torch.where(valid, per_image[rows.div(n, rounding_mode="floor")], 0.0)
    return masks, rows, weight, trimmed


def make_batch(globals_, locals_, masks, n_global: int, capacity: int, n_bad=None, labels=None) -> Batch:
    """A :class:`Batch` from crops and (G*B, N) bool masks, on their device."""
    dev = masks.device
    masks, rows, weight, trimmed = masked_rows(masks.reshape(masks.shape[0], -1).bool(), n_global, capacity)
    if n_bad is None:
        n_bad = torch.zeros((), device=dev)
    elif not torch.is_tensor(n_bad):
        n_bad = torch.full((), float(n_bad), device=dev)  # a fill: no host-to-device copy
    return Batch(globals_, locals_, masks, rows, weight, n_bad.float().reshape(()), trimmed, labels)
