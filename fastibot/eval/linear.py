"""Linear probe on frozen features, with a sweep over learning rates.

Features per image (iBOT/DINO protocol): the [CLS] tokens of the last ``n``
blocks, concatenated, optionally with the average-pooled patch tokens of the
last block. They are extracted once (center crop, no augmentation) and one
linear classifier per learning rate is trained on them at the same time with
SGD (momentum 0.9, cosine schedule); the best on the validation split is
reported, as the reference protocols do.
"""
from __future__ import annotations

import math
from typing import Dict, Sequence

import torch
import torch.nn.functional as F


def probe_features(backbone, n_last_blocks: int = 4, avgpool: bool = False):
    def fn(x):
        outs = backbone.get_intermediate_layers(x, n_last_blocks)
        f = torch.cat([o[:, 0] for o in outs], dim=-1)
        if avgpool:
            f = torch.cat([f, outs[-1][:, 1:].mean(1)], dim=-1)
        return f
    return fn


def _topk(logits: torch.Tensor, y: torch.Tensor) -> Dict[str, float]:
    ranked = logits.topk(min(5, logits.shape[-1]), dim=-1).indices
    hit = ranked.eq(y[:, None])
    return {"top1": 100.0 * hit[:, :1].any(1).float().mean().item(),
            "top5": 100.0 * hit.any(1).float().mean().item()}


def train_linear(train_f: torch.Tensor, train_y: torch.Tensor, val_f: torch.Tensor, val_y: torch.Tensor,
                 num_classes: int, lrs: Sequence[float] = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1), epochs: int = 100,
                 batch_size: int = 256, weight_decay: float = 0.0, seed: int = 0) -> Dict[str, object]:
    """Train one linear head per lr on (N, D) features; returns the best head's val top-1/top-5 and all."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    dev = train_f.device
    n, d = train_f.shape
    h = len(lrs)
    weight = (torch.randn(h, d, num_classes, generator=g) * 0.01).to(dev).requires_grad_(True)
    bias = torch.zeros(h, 1, num_classes, device=dev, requires_grad=True)
    # all heads in one tensor: each head's step is scaled by its own learning rate
    lr_scale = torch.tensor([lr * batch_size / 256.0 for lr in lrs], device=dev).view(h, 1, 1)
    opt = torch.optim.SGD([weight, bias], lr=1.0, momentum=0.9, weight_decay=0.0)
    steps_per_epoch = max(1, math.ceil(n / batch_size))
    total = epochs * steps_per_epoch
    step = 0
    for _ in range(epochs):
        perm = torch.randperm(n, generator=g).to(dev)
        for i in range(0, n, batch_size):
            idx = perm[i:i + batch_size]
            x, y = train_f[idx], train_y[idx]
            logits = torch.einsum("nd,hdc->hnc", x, weight) + bias  # (H, b, C)
            loss = F.cross_entropy(logits.reshape(-1, num_classes), y.repeat(h), reduction="sum") / x.shape[0]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            cos = 0.5 * (1 + math.cos(math.pi * step / total))
            with torch.no_grad():
                weight.grad.add_(weight, alpha=weight_decay).mul_(lr_scale * cos)
                bias.grad.mul_(lr_scale * cos)
            opt.step()
            step += 1
    with torch.no_grad():
        logits = torch.einsum("nd,hdc->hnc", val_f, weight) + bias
        per_lr = {lr: _topk(logits[j], val_y) for j, lr in enumerate(lrs)}
    best = max(per_lr, key=lambda lr: per_lr[lr]["top1"])
    return {"best_lr": best, **per_lr[best], "per_lr": per_lr}


def run_linear(backbone, train_path, val_path, n_last_blocks: int = 4, avgpool: bool = False,
               lrs: Sequence[float] = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1), epochs: int = 100, image_size: int = 224,
               batch_size: int = 128, max_images: int = 0, device=None, num_workers: int = 4,
               progress: bool = False, label_fraction: float = 1.0, subset_seed: int = 0,
               subset_out=None) -> Dict[str, object]:
    """Probe on the training folder, or on a class-balanced ``label_fraction`` of it (``eval.subsets``;
    the list is written to ``subset_out``)."""
    from .features import extract, folder_samples
    from .subsets import label_subset, subset_summary, write_subset

    device = device or torch.device("cpu")
    backbone = backbone.to(device).eval()
    fn = probe_features(backbone, n_last_blocks, avgpool)
    samples, classes = folder_samples(train_path, max_images)
    subset = label_subset(samples, classes, label_fraction, subset_seed)
    info = {}
    if label_fraction < 1:
        if subset_out is None:
            raise ValueError("a label fraction needs a file to list the chosen images in (--subset-out)")
        digest = write_subset(subset_out, subset, train_path, label_fraction, subset_seed)
        info = {"label_fraction": label_fraction, "subset_seed": subset_seed, "subset_file": str(subset_out),
                "subset_sha1": digest, **{f"subset_{k}": v for k, v in subset_summary(subset, classes).items()}}
    tr_f, tr_y, _ = extract(fn, train_path, image_size, batch_size, 0, num_workers, device, progress,
                            subset=(subset, classes))
    va_f, va_y, va_classes = extract(fn, val_path, image_size, batch_size, max_images, num_workers, device, progress)
    if list(classes) != list(va_classes):
        raise ValueError(f"train and val folders have different classes: {classes} vs {va_classes}")
    out = train_linear(tr_f.to(device), tr_y.to(device), va_f.to(device), va_y.to(device), len(classes), lrs, epochs)
    out.update(n_train=tr_f.shape[0], n_val=va_f.shape[0], feature_dim=tr_f.shape[1], **info)
    return out
