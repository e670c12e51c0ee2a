"""Class-balanced label subsets for semi-supervised evaluation (1% / 10% of the labels).

The rule, fixed so that runs are comparable: for each class ``c`` with ``n_c`` training images
(sorted by path), keep ``k_c = ceil(fraction * n_c)`` of them (at least one), the first ``k_c``
of a permutation drawn from a generator seeded with ``sha1("<seed>:<class name>")``. A class's
choice depends only on its own files, the fraction and the seed, not on the other classes. The
chosen files are written, one path relative to the training folder per line after ``#`` header
lines, and the list's SHA-1 is reported so two runs can check they trained on the same labels.
(ImageNet's published 1% / 10% splits pick 12,811 / 128,116 images; this rule picks 13 / 128 of
every class's images, a fixed but different subset.)
"""
from __future__ import annotations

import hashlib
import math
from collections import defaultdict
from fractions import Fraction
from pathlib import Path
from typing import List, Tuple

import torch

Sample = Tuple[str, int]


def _class_seed(seed: int, name: str) -> int:
    return int.from_bytes(hashlib.sha1(f"{seed}:{name}".encode()).digest()[:8], "little") % (2 ** 63)


def label_subset(samples: List[Sample], classes: List[str], fraction: float, seed: int = 0) -> List[Sample]:
    """The class-balanced subset of ``samples`` (see the module doc), in path order."""
    if not 0 < fraction <= 1:
        raise ValueError(f"--label-fraction {fraction}: need 0 < fraction <= 1")
    if fraction == 1:
        return list(samples)
    exact = Fraction(str(fraction))  # 0.1 * 30 is 3, not 3.0000000000000004
    by_class = defaultdict(list)
    for s in samples:
        by_class[s[1]].append(s)
    chosen = []
    for label, items in sorted(by_class.items()):
        items = sorted(items)
        k = max(1, math.ceil(exact * len(items)))
        g = torch.Generator().manual_seed(_class_seed(seed, classes[label]))
        chosen += [items[i] for i in torch.randperm(len(items), generator=g)[:k].tolist()]
    return sorted(chosen)


def subset_lines(subset: List[Sample], root) -> List[str]:
    root = Path(root)
    return [str(Path(p).relative_to(root)) if Path(p).is_relative_to(root) else str(p) for p, _ in subset]


def write_subset(path, subset: List[Sample], root, fraction: float, seed: int) -> str:
    """Write the list (see the module doc); returns its SHA-1. An existing file with another list is an error
    (it belongs to another run)."""
    lines = subset_lines(subset, root)
    body = "\n".join(lines) + "\n"
    digest = hashlib.sha1(body.encode()).hexdigest()
    text = f"# label fraction {fraction}, seed {seed}: {len(lines)} images of {Path(root)}\n# sha1 {digest}\n{body}"
    path = Path(path)
    if path.exists():
        if path.read_text() != text:
            raise ValueError(f"{path} already lists another label subset; choose another --subset-out")
        return digest
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return digest


def read_subset(path) -> List[str]:
    """The relative paths of a written list."""
    return [ln for ln in Path(path).read_text().splitlines() if ln and not ln.startswith("#")]


def subset_summary(subset: List[Sample], classes: List[str]) -> dict:
    counts = defaultdict(int)
    for _, label in subset:
        counts[classes[label]] += 1
    return {"n": len(subset), "per_class_min": min(counts.values()), "per_class_max": max(counts.values())}
