"""Clusters and how well they match labels: cosine k-means, NMI, ARI, Hungarian-matched accuracy.

All three scores read the contingency table ``C[i, j]`` = images of class ``i`` put in cluster
``j`` (clusters may be any integers, e.g. prototype indices out of 8192):

- NMI: mutual information over the arithmetic mean of the two entropies (natural log; 1 when
  both partitions are a single block).
- ARI: the Hubert-Arabie adjusted Rand index, pair counts from ``C`` (1 when the expected and the
  maximal index coincide, i.e. nothing to adjust).
- Accuracy: a one-to-one matching of clusters to classes that maximises the matched images
  (``scipy.optimize.linear_sum_assignment``); images in clusters left unmatched (more clusters
  than classes) count as errors. With as many clusters as classes this is the usual
  unsupervised-classification accuracy.
"""
from __future__ import annotations

from typing import Dict

import numpy as np
import torch
import torch.nn.functional as F


def kmeans(x: torch.Tensor, k: int, iters: int = 25, seed: int = 0) -> torch.Tensor:
    """Cluster labels (N,) of the rows of ``x`` (N, D): cosine k-means with k-means++ seeding.

    Runs on ``x``'s device; the seeding draws come from a CPU generator seeded with ``seed``."""
    x = F.normalize(x.float(), dim=-1)
    n = x.shape[0]
    k = min(k, n)
    g = torch.Generator().manual_seed(seed)
    centers = torch.empty(k, x.shape[1], device=x.device)
    centers[0] = x[int(torch.randint(n, (1,), generator=g))]
    best = x @ centers[0]  # (N,) similarity to the nearest chosen center
    for j in range(1, k):
        probs = (1 - best).clamp(min=0).double().cpu() + 1e-12
        centers[j] = x[int(torch.multinomial(probs / probs.sum(), 1, generator=g))]
        best = torch.maximum(best, x @ centers[j])
    for _ in range(iters):
        labels = (x @ centers.T).argmax(1)
        sums = torch.zeros_like(centers).index_add_(0, labels, x)  # (k, D)
        counts = torch.bincount(labels, minlength=k)
        centers = torch.where((counts > 0)[:, None], F.normalize(sums, dim=-1), centers)  # empty ones stay
    return (x @ centers.T).argmax(1)


def contingency(labels, clusters) -> np.ndarray:
    """(n_classes, n_clusters) int64 counts; classes are ``0..max(labels)``, clusters the distinct values."""
    labels = np.asarray(labels, dtype=np.int64)
    _, cluster_idx = np.unique(np.asarray(clusters), return_inverse=True)
    table = np.zeros((labels.max() + 1, cluster_idx.max() + 1), dtype=np.int64)
    np.add.at(table, (labels, cluster_idx), 1)
    return table


def nmi(table: np.ndarray) -> float:
    n = table.sum()
    p = table / n
    pi, pj = p.sum(1), p.sum(0)
    nz = p > 0
    mi = float((p[nz] * np.log(p[nz] / np.outer(pi, pj)[nz])).sum())
    h_u = -float((pi[pi > 0] * np.log(pi[pi > 0])).sum())
    h_v = -float((pj[pj > 0] * np.log(pj[pj > 0])).sum())
    denom = (h_u + h_v) / 2
    return 1.0 if denom == 0 else max(mi, 0.0) / denom


def ari(table: np.ndarray) -> float:
    def pairs(v):  # exact integer sum of C(v, 2)
        return sum(int(c) * (int(c) - 1) // 2 for c in np.asarray(v).ravel())

    index = pairs(table)
    rows, cols = pairs(table.sum(1)), pairs(table.sum(0))
    total = pairs([table.sum()])
    expected = rows * cols / total if total else 0.0
    maximum = (rows + cols) / 2
    return 1.0 if maximum == expected else (index - expected) / (maximum - expected)


def matched_accuracy(table: np.ndarray) -> float:
    from scipy.optimize import linear_sum_assignment

    r, c = linear_sum_assignment(table, maximize=True)
    return float(table[r, c].sum()) / float(table.sum())


def cluster_scores(labels, clusters) -> Dict[str, float]:
    """{"nmi", "ari", "acc" (percent), "clusters"} of a clustering against the labels."""
    table = contingency(labels, clusters)
    return {"nmi": nmi(table), "ari": ari(table), "acc": 100.0 * matched_accuracy(table),
            "clusters": int(table.shape[1])}

