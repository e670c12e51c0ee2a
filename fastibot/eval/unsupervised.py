"""Unsupervised classification: how well clusters of the teacher's outputs recover the labels.

Each validation image (center crop, no augmentation) is assigned to

- the arg-max prototype of the teacher head's [CLS] logits (the reference evaluation; it needs
  the head, so a checkpoint, and is read best with ``model.out_dim`` equal to the number of
  classes, as the reference pretrains for it), and, optionally,
- one of ``k`` cosine k-means clusters of the backbone's [CLS] features.

Both are scored against the labels with NMI, ARI and Hungarian-matched accuracy
(``eval.clusters``).
"""
from __future__ import annotations

from typing import Dict

import torch

from .clusters import cluster_scores, kmeans


@torch.no_grad()
def prototype_assignments(head, feats: torch.Tensor, device, chunk: int = 4096) -> torch.Tensor:
    """(N, D) backbone [CLS] features -> (N,) index of the arg-max [CLS] prototype."""
    out = []
    for start in range(0, feats.shape[0], chunk):
        z = head.embed(feats[start:start + chunk].to(device))
        out.append(head.cls_logits(z).argmax(1).cpu())
    return torch.cat(out)


def run_unsupervised(model, val_path, image_size: int = 224, batch_size: int = 128, max_images: int = 0,
                     device=None, num_workers: int = 4, kmeans_k: int = 0, seed: int = 0,
                     progress: bool = False) -> Dict[str, object]:
    """``model``: an ``IBOTModel`` (backbone + head). Returns the scores of the prototype assignment and,
    with ``kmeans_k > 0``, of k-means on the features."""
    from .features import extract

    device = device or torch.device("cpu")
    model = model.to(device).eval()
    feats, labels, classes = extract(model.backbone, val_path, image_size, batch_size, max_images, num_workers,
                                     device, progress)
    out = {"n_val": int(feats.shape[0]), "n_classes": len(classes), "prototypes_total": model.head.last_layer.out_features}
    out["prototypes"] = cluster_scores(labels.numpy(), prototype_assignments(model.head, feats, device).numpy())
    if kmeans_k:
        assigned = kmeans(feats.to(device), kmeans_k, seed=seed).cpu()
        out["kmeans"] = {"k": kmeans_k, **cluster_scores(labels.numpy(), assigned.numpy())}
    return out
