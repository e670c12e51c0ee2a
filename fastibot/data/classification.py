"""Labelled images for supervised fine-tuning: timm's transforms, per-sample seeded, resumable.

A sample's augmentation (timm's RandomResizedCrop, flip, RandAugment, colour jitter, random
erasing; they draw from Python's, NumPy's and torch's global generators) runs with all three
seeded from ``(seed, epoch, index)`` and restored afterwards, so it does not depend on the worker
that made it or on what ran before: a run resumed mid-epoch sees exactly the batches an
uninterrupted run would (``datasets.ResumableBatchSampler`` gives the order).
"""
from __future__ import annotations

import logging
import random
from typing import List, Sequence, Tuple

import numpy as np
import torch

from .datasets import DataError, ResumableBatchSampler, load_rgb, sample_seed, worker_options
from .transforms import IMAGENET_MEAN, IMAGENET_STD, eval_transform

log = logging.getLogger("fastibot")


class SeededGlobals:
    """Seed Python's, NumPy's and torch's global generators; restore them on exit."""

    def __init__(self, seed: int):
        self.seed = seed

    def __enter__(self):
        self._saved = (random.getstate(), np.random.get_state(), torch.random.get_rng_state())
        random.seed(self.seed)
        np.random.seed(self.seed % 2 ** 32)
        torch.manual_seed(self.seed)
        return self

    def __exit__(self, *exc):
        py, npy, th = self._saved
        random.setstate(py)
        np.random.set_state(npy)
        torch.random.set_rng_state(th)
        return False


def train_transform(image_size: int, auto_augment: str = "rand-m9-mstd0.5-inc1", re_prob: float = 0.25,
                    color_jitter: float = 0.4, scale=(0.08, 1.0)):
    """The BEiT/iBOT fine-tuning augmentation, from timm: RandomResizedCrop (bicubic, area ``scale``), flip, RandAugment
    (or colour jitter when ``auto_augment`` is empty), ImageNet normalisation, random erasing."""
    from timm.data import create_transform

    return create_transform(input_size=image_size, is_training=True, scale=tuple(scale), color_jitter=color_jitter,
                            auto_augment=auto_augment or None, interpolation="bicubic", re_prob=re_prob,
                            re_mode="pixel", re_count=1, mean=IMAGENET_MEAN, std=IMAGENET_STD)


class ClassificationDataset(torch.utils.data.Dataset):
    """``(epoch, index)`` -> (image tensor, label, unreadable files skipped). An unreadable file is
    replaced by the next readable one (warned once), so batches keep their size."""

    MAX_RETRIES = 20

    def __init__(self, samples: List[Tuple[str, int]], transform, seed: int = 0):
        self.samples, self.transform, self.seed = samples, transform, seed
        self._warned = set()

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, key):
        epoch, index = key if isinstance(key, tuple) else (0, key)
        for attempt in range(self.MAX_RETRIES):
            path, label = self.samples[(index + attempt) % len(self.samples)]
            try:
                img = load_rgb(path)
            except Exception as e:
                if path not in self._warned:
                    self._warned.add(path)
                    log.warning("skipping unreadable image %s (%s: %s)", path, type(e).__name__, e)
                continue
            with SeededGlobals(sample_seed(self.seed, epoch, index)):
                return self.transform(img), label, attempt
        raise DataError(f"{self.MAX_RETRIES} unreadable images in a row from {self.samples[index][0]}")


def _collate(batch: Sequence[tuple]):
    return (torch.stack([b[0] for b in batch]), torch.tensor([b[1] for b in batch]),
            torch.tensor(sum(b[2] for b in batch)))


def train_loader(dataset: ClassificationDataset, batch_size: int, rank: int, world: int, seed: int, workers: int,
                 pin_memory: bool):
    """(resumable sampler, DataLoader) of shuffled full batches sharded by rank."""
    sampler = ResumableBatchSampler(len(dataset), batch_size, rank, world, seed, key="--batch-size")
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=sampler, **worker_options(workers), collate_fn=_collate, pin_memory=pin_memory,
        # its own generator: starting an epoch must not consume the training RNG stream (drop path)
        generator=torch.Generator().manual_seed(seed))
    return sampler, loader


def val_loader(samples: List[Tuple[str, int]], image_size: int, batch_size: int, rank: int, world: int,
               workers: int, pin_memory: bool):
    """Every ``world``-th validation image from ``rank`` on, center-cropped, in order (no augmentation)."""
    ds = ClassificationDataset(samples[rank::world], eval_transform(image_size))
    return torch.utils.data.DataLoader(ds, batch_size=batch_size, collate_fn=_collate, pin_memory=pin_memory,
                                       **worker_options(workers, persistent=False))

