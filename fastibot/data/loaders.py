"""Loaders behind one interface: ``steps_per_epoch``, ``set_position(epoch, step)``, iteration
yields :class:`fastibot.data.batch.Batch` objects on the training device (fixed shapes per config).

- ``torchvision``: the CPU reference path (PIL decode, torchvision multi-crop, block masks
  in worker processes).
- ``synthetic``: crops already on the device (random pixels, real block masks): no decode or
  augmentation, for measuring the training step alone.
- ``dali``: decode and multi-crop augmentation on the GPU (``fastibot.data.dali``).
- ``auto``: ``dali`` when it is installed and a GPU is used, else ``torchvision`` (with a warning on
  a GPU, where the CPU loader bounds throughput).
"""
from __future__ import annotations

import logging
import random

import torch

from .batch import make_batch, row_capacity
from .datasets import ResumableBatchSampler, build_loader, collate_multicrop
from .masking import MaskGenerator, mask_grid

log = logging.getLogger("fastibot")


class TorchvisionData:
    def __init__(self, cfg, rank: int, world: int, device: torch.device):
        self.dataset, self.sampler, self.loader = build_loader(cfg, rank, world, pin_memory=device.type == "cuda")
        self.device = device
        self.steps_per_epoch = self.sampler.steps_per_epoch
        self.pinned = False  # set by deliver_into: yield the pinned host batch, copied once, into the step's buffers

    def set_position(self, epoch: int, step: int) -> None:
        self.sampler.set_position(epoch, step)

    def deliver_into(self, static) -> None:
        # the captured step copies each pinned batch host-to-device straight into its input buffers (no sync: the
        # host allocator keeps a pinned block until the copy that reads it has run), not via a device copy first
        self.pinned = True

    def __iter__(self):
        for batch in self.loader:
            yield batch if self.pinned else batch.to(self.device, non_blocking=self.device.type == "cuda")


class SyntheticTensorData:
    """A pool of device-resident multi-crop batches with real block masks, cycled (masks all zero
    before ``masking.start_epoch``, as the other loaders)."""

    POOL = 4

    def __init__(self, cfg, rank: int, world: int, device: torch.device):
        c, m = cfg.crops, cfg.masking
        self.sampler = ResumableBatchSampler(cfg.data.synthetic_size, cfg.data.batch_size, rank, world,
                                             cfg.runtime.seed)
        self.steps_per_epoch = self.sampler.steps_per_epoch
        gen = MaskGenerator(m.pred_ratio, m.pred_ratio_var, m.aspect_ratio, m.shape)
        rng = random.Random(cfg.runtime.seed + rank)
        g = torch.Generator(device="cpu").manual_seed(cfg.runtime.seed + rank)
        b, (gh, gw), cap = cfg.data.batch_size, mask_grid(cfg), row_capacity(cfg)
        self.start_epoch = m.start_epoch
        self.pool, self.unmasked = [], []
        for _ in range(self.POOL):
            samples = [{"crops": [torch.randn(3, c.global_size, c.global_size, generator=g) for _ in range(c.n_global)]
                        + [torch.randn(3, c.local_size, c.local_size, generator=g) for _ in range(c.n_local)],
                        "masks": gen.batch(c.n_global, gh, gw, rng), "label": 0, "n_bad": 0} for _ in range(b)]
            batch = collate_multicrop(samples, c.n_global, cap).to(device)
            self.pool.append(batch)
            if m.start_epoch > 0:  # the same crops with no masks, for the epochs before masking starts
                self.unmasked.append(make_batch(batch.globals, batch.locals, torch.zeros_like(batch.masks),
                                                c.n_global, cap, labels=batch.labels))
        self.position = 0

    def set_position(self, epoch: int, step: int) -> None:
        self.position = epoch * self.steps_per_epoch + step

    def __iter__(self):
        epoch, start = divmod(self.position, self.steps_per_epoch)
        pool = self.unmasked if epoch < self.start_epoch else self.pool
        for i in range(start, self.steps_per_epoch):
            yield pool[i % self.POOL]


def dali_available() -> bool:
    try:
        import nvidia.dali  # noqa: F401
        return True
    except ImportError:
        return False


def build_data(cfg, rank: int, world: int, device: torch.device):
    kind = cfg.data.loader
    if kind == "auto":
        use_dali = device.type == "cuda" and cfg.data.source == "imagefolder" and dali_available()
        kind = "dali" if use_dali else "torchvision"
        if device.type == "cuda" and cfg.data.source == "imagefolder" and not use_dali:
            log.warning("data.loader=auto: NVIDIA DALI is not installed, so images are decoded and augmented on "
                        "the CPU (torchvision), which bounds throughput well below the GPU step (about 400-500 "
                        "img/s with 15 workers). Install the GPU loader with: pip install 'fastibot[dali]'")
    if kind == "synthetic":
        data = SyntheticTensorData(cfg, rank, world, device)
    elif kind == "dali":
        if not dali_available():
            from .datasets import DataError
            raise DataError("data.loader=dali needs NVIDIA DALI (pip install 'fastibot[dali]'); "
                            "use data.loader=torchvision or auto")
        from .dali import DaliData
        data = DaliData(cfg, rank, world, device)
    else:
        data = TorchvisionData(cfg, rank, world, device)
    data.kind = kind
    return data
