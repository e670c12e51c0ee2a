"""Weighted k-NN classification on frozen features (as in DINO and iBOT).

Each query takes its k most cosine-similar training features; neighbour j
votes for its label with weight exp(sim_j / T). Top-1 / top-5 count the
queries whose label is the highest / among the five highest-scored classes.
"""
from __future__ import annotations

from typing import Dict

import torch


@torch.no_grad()
def knn_classify(train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor,
                 test_labels: torch.Tensor, k: int = 20, temperature: float = 0.07, num_classes: int = 0,
                 chunk: int = 1024) -> Dict[str, float]:
    """Features (N, D) already l2-normalised. Returns {"top1", "top5"} in percent."""
    if train_feats.shape[0] == 0 or test_feats.shape[0] == 0:
        raise ValueError("k-NN needs at least one training and one test feature")
    num_classes = num_classes or int(max(train_labels.max(), test_labels.max())) + 1
    k = min(k, train_feats.shape[0])
    top1 = top5 = 0
    for start in range(0, test_feats.shape[0], chunk):
        q = test_feats[start:start + chunk]
        y = test_labels[start:start + chunk]
        sim, idx = (q @ train_feats.T).topk(k, dim=1)  # (b, k)
        votes = torch.zeros(q.shape[0], num_classes, dtype=torch.float64, device=q.device)
        votes.scatter_add_(1, train_labels[idx], (sim.double() / temperature).exp())
        ranked = votes.argsort(dim=1, descending=True, stable=True)
        hit = ranked.eq(y[:, None])
        top1 += int(hit[:, :1].sum())
        top5 += int(hit[:, :min(5, num_classes)].sum())
    n = test_feats.shape[0]
    return {"top1": 100.0 * top1 / n, "top5": 100.0 * top5 / n}


def run_knn(backbone, train_path, val_path, k: int = 20, temperature: float = 0.07, image_size: int = 224,
            batch_size: int = 128, max_images: int = 0, device=None, num_workers: int = 4, cache_dir=None,
            cache_tag: str = "", progress: bool = False) -> Dict[str, float]:
    """Extract teacher [CLS] features of both folders (cached when ``cache_dir`` and ``cache_tag``) and classify."""
    from .features import cache_key, cached, cls_features, extract

    device = device or torch.device("cpu")
    backbone = backbone.to(device).eval()
    fn = cls_features(backbone)

    def feats(path):
        key = cache_key("knn", cache_tag, path, image_size, max_images)
        return cached(cache_dir if cache_tag else None, key,
                      lambda: extract(fn, path, image_size, batch_size, max_images, num_workers, device, progress))

    tr_f, tr_y, tr_classes = feats(train_path)
    va_f, va_y, va_classes = feats(val_path)
    if list(tr_classes) != list(va_classes):
        raise ValueError(f"train and val folders have different classes: {tr_classes} vs {va_classes}")
    out = knn_classify(tr_f.to(device), tr_y.to(device), va_f.to(device), va_y.to(device), k, temperature,
                       num_classes=len(tr_classes))
    out.update(n_train=tr_f.shape[0], n_val=va_f.shape[0])
    return out
