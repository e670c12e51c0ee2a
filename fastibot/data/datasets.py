"""Image sources, the multi-crop dataset, an exactly resumable sampler, and the loader.

Determinism: the sampler yields ``(epoch, index)`` pairs; the dataset seeds
torch's and Python's generators from ``(seed, epoch, index)`` for each sample,
so crops and masks do not depend on worker count or order, and a run resumed
at step ``s`` of epoch ``e`` sees exactly the batches an uninterrupted run
would. The sampler cuts each global batch into per-rank slices in rank order,
so the global batch of a step does not depend on the number of processes.

Bad images (unreadable, truncated, not an image) are skipped: the dataset
warns once per file, counts them, and serves the next readable image in
their place so batch shapes stay fixed.
"""
from __future__ import annotations

import atexit
import logging
import multiprocessing
import random
import signal
import weakref
from pathlib import Path
from typing import List, Sequence, Tuple

import torch
from PIL import Image

from .batch import Batch, make_batch, row_capacity
from .masking import MaskGenerator
from .synthetic import synthetic_image

log = logging.getLogger("fastibot")

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


class DataError(RuntimeError):
    """The data cannot be used (missing folder, no images, too many bad files)."""


def list_images(root, key: str = "data.path") -> Tuple[List[Tuple[str, int]], List[str]]:
    """ImageFolder layout (``root/<class>/*.jpg``) or a flat folder of images (one class); errors name ``key``."""
    root = Path(root)
    if not root.exists():
        raise DataError(f"{key}: folder {str(root)!r} does not exist")
    if not root.is_dir():
        raise DataError(f"{key}: {str(root)!r} is not a folder")

    def images_in(d: Path):
        return sorted(str(p) for p in d.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())

    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    samples = [(p, i) for i, c in enumerate(classes) for p in images_in(root / c)]
    flat = sorted(str(p) for p in root.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if flat:  # images directly in root: they form one more class
        classes = classes + ["."]
        samples += [(p, len(classes) - 1) for p in flat]
    if not samples:
        raise DataError(f"{key}: no images found under {str(root)!r} "
                        f"(looked for {', '.join(IMAGE_EXTENSIONS)})")
    return samples, classes


def load_rgb(path: str) -> Image.Image:
    """Decode fully (so truncated files fail here) and convert grayscale/CMYK/palette to RGB."""
    with open(path, "rb") as f:
        img = Image.open(f)
        img.load()
    return img.convert("RGB")


class ImageFolderSource:
    def __init__(self, root):
        self.samples, self.classes = list_images(root)
        self.root = str(root)

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i: int):
        path, label = self.samples[i]
        return load_rgb(path), label

    def name(self, i: int) -> str:
        return self.samples[i][0]


class SyntheticSource:
    def __init__(self, size: int, n_classes: int, resolution: int = 128, seed: int = 0):
        if size < 1 or n_classes < 1:
            raise DataError("data.synthetic_size and data.synthetic_classes must be >= 1")
        self.size, self.n_classes, self.resolution, self.seed = size, n_classes, resolution, seed
        self.classes = [f"class{i}" for i in range(n_classes)]

    def __len__(self):
        return self.size

    def __getitem__(self, i: int):
        return synthetic_image(i, self.n_classes, self.resolution, self.seed)

    def name(self, i: int) -> str:
        return f"synthetic#{i}"


class _SeedScope:
    """Seed torch/python RNGs for one sample and restore them afterwards."""

    def __init__(self, seed: int):
        self.seed = seed

    def __enter__(self):
        self._torch = torch.random.get_rng_state()
        torch.manual_seed(self.seed)
        return random.Random(self.seed)

    def __exit__(self, *exc):
        torch.random.set_rng_state(self._torch)
        return False


def sample_seed(seed: int, epoch: int, index: int) -> int:
    return (seed * 1_000_003 + epoch * 1_000_000_007 + index * 7_919) % (2 ** 62)


class MultiCropDataset(torch.utils.data.Dataset):
    """(epoch, index) -> dict(crops=[...], masks=(G, h, w) bool, label=int, n_bad=int).

    ``patch_size``: pixels per mask cell, h = crop height // patch_size (a Swin's cell is its
    final-stage token, ``models.backbones.prediction_size``)."""

    MAX_RETRIES = 20

    def __init__(self, source, augment, mask_gen: MaskGenerator, patch_size: int, n_global: int,
                 seed: int = 0, mask_start_epoch: int = 0):
        self.source, self.augment, self.mask_gen = source, augment, mask_gen
        self.patch_size, self.n_global, self.seed = patch_size, n_global, seed
        self.mask_start_epoch = mask_start_epoch
        self._warned = set()

    def __len__(self):
        return len(self.source)

    def _load(self, index: int):
        n_bad = 0
        for attempt in range(self.MAX_RETRIES):
            i = (index + attempt) % len(self.source)
            try:
                img, label = self.source[i]
                return img, label, n_bad
            except Exception as e:  # any decode failure: skip this file
                n_bad += 1
                name = self.source.name(i)
                if name not in self._warned:
                    self._warned.add(name)
                    log.warning("skipping unreadable image %s (%s: %s)", name, type(e).__name__, e)
        raise DataError(f"{self.MAX_RETRIES} unreadable images in a row from index {index}; "
                        f"is {getattr(self.source, 'root', 'the data')} really an image folder?")

    def __getitem__(self, key):
        epoch, index = key if isinstance(key, tuple) else (0, key)
        img, label, n_bad = self._load(index)
        with _SeedScope(sample_seed(self.seed, epoch, index)) as rng:
            crops = self.augment(img)
            h = crops[0].shape[1] // self.patch_size
            w = crops[0].shape[2] // self.patch_size
            if epoch < self.mask_start_epoch:
                masks = torch.zeros(self.n_global, h, w, dtype=torch.bool)
            else:
                masks = self.mask_gen.batch(self.n_global, h, w, rng)
        return {"crops": crops, "masks": masks, "label": label, "n_bad": n_bad}


def collate_multicrop(samples: Sequence[dict], n_global: int, capacity: int) -> Batch:
    """Crop-major tensors (globals (G*B, 3, H, W), locals (L*B, 3, h, w), masks (G*B, N)) and the
    fixed-size masked rows of :mod:`fastibot.data.batch`."""
    n_crops = len(samples[0]["crops"])
    per_crop = [torch.stack([s["crops"][c] for s in samples]) for c in range(n_crops)]
    globals_ = torch.cat(per_crop[:n_global])
    locals_ = torch.cat(per_crop[n_global:]) if n_crops > n_global else None
    masks = torch.cat([torch.stack([s["masks"][g] for s in samples]) for g in range(n_global)]).flatten(1)
    return make_batch(globals_, locals_, masks, n_global, capacity,
                      n_bad=torch.tensor(float(sum(s["n_bad"] for s in samples))),
                      labels=torch.tensor([s["label"] for s in samples]))


class ResumableBatchSampler(torch.utils.data.Sampler):
    """Per-epoch shuffled batches of ``(epoch, index)``, sharded by rank, resumable mid-epoch.

    Each epoch draws one permutation from ``seed + epoch``, drops the tail that
    does not fill a global batch, and gives rank ``r`` every ``world``-th batch.
    """

    def __init__(self, n: int, batch_size: int, rank: int = 0, world: int = 1, seed: int = 0,
                 key: str = "data.batch_size"):
        self.n, self.batch_size, self.rank, self.world, self.seed = n, batch_size, rank, world, seed
        self.steps_per_epoch = n // (batch_size * world)
        if self.steps_per_epoch == 0:  # key: the setting that names the batch size (a config key or a flag)
            raise DataError(f"{n} images cannot fill one global batch of {batch_size * world} "
                            f"({key}={batch_size} x {world} processes); lower {key}")
        self.epoch, self.start_step = 0, 0

    def set_position(self, epoch: int, step: int = 0) -> None:
        self.epoch, self.start_step = epoch, step

    def __len__(self):
        return self.steps_per_epoch - self.start_step

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        perm = torch.randperm(self.n, generator=g)[: self.steps_per_epoch * self.batch_size * self.world]
        batches = perm.view(self.steps_per_epoch, self.world, self.batch_size)[:, self.rank]
        for step in range(self.start_step, self.steps_per_epoch):
            yield [(self.epoch, int(i)) for i in batches[step]]


def build_source(data_cfg, seed: int):
    if data_cfg.source == "synthetic":
        return SyntheticSource(data_cfg.synthetic_size, data_cfg.synthetic_classes,
                               data_cfg.synthetic_resolution, seed)
    return ImageFolderSource(data_cfg.path)


# loaders with persistent workers, shut down at exit (see ``stop_workers``)
_LOADERS = weakref.WeakSet()


def stop_workers(loader) -> None:
    """End the worker processes of ``loader`` now.

    Its workers are persistent and ignore SIGINT/SIGTERM/SIGUSR1 (``_worker_init``), so an exit that leaves them
    to multiprocessing's exit handler (which signals, then waits) would wait forever; after an error the
    loader may also still be referenced from the traceback. Idle workers leave on the usual shutdown
    message; any still running after it are killed."""
    it = getattr(loader, "_iterator", None)
    if it is None:
        return
    loader._iterator = None
    workers = list(getattr(it, "_workers", []))
    try:
        it._shutdown_workers()
    finally:
        for w in workers:
            if w.is_alive():
                w.kill()
                w.join(timeout=5)


@atexit.register
def _stop_all_workers() -> None:
    # registered after multiprocessing's own exit handler, so it runs before it
    for loader in list(_LOADERS):
        stop_workers(loader)


def worker_options(workers: int, persistent: bool = True) -> dict:
    """DataLoader arguments for ``workers`` processes (none: load in this process).

    Workers start from a forkserver, a clean process that imported torch and fastibot once, never by forking
    this one: a fork copies a process whose other threads (CUDA, NCCL or gloo, the compiler's pools, the
    TensorBoard writer) may hold a lock that the child then waits on forever, and it would inherit the open
    files (the run folder's lock among them)."""
    if workers == 0:
        return {"num_workers": 0}
    ctx = None
    if "forkserver" in multiprocessing.get_all_start_methods():
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(["fastibot.data.datasets", "fastibot.data.transforms",
                                    "fastibot.data.classification"])
    return {"num_workers": workers, "multiprocessing_context": ctx, "worker_init_fn": _worker_init,
            "persistent_workers": persistent}


def _worker_init(_):
    # one intra-op thread per worker: the workers are the parallelism
    torch.set_num_threads(1)
    # Ctrl-C and a scheduler's SIGTERM (preemption) or SIGUSR1 (time limit ahead) reach the whole process group:
    # the main process finishes its step and writes a checkpoint, so the workers must keep serving it rather than
    # die under it
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)


def build_loader(cfg, rank: int = 0, world: int = 1, pin_memory: bool = False):
    """The torchvision reference loader for ``cfg`` (dataset, batch sampler, DataLoader)."""
    from functools import partial

    from ..models.backbones import prediction_size
    from .transforms import MultiCropAugmentation

    source = build_source(cfg.data, cfg.runtime.seed)
    m = cfg.masking
    dataset = MultiCropDataset(
        source, MultiCropAugmentation.from_config(cfg.crops),
        MaskGenerator(m.pred_ratio, m.pred_ratio_var, m.aspect_ratio, m.shape),
        # the base seed on every rank: a sample's crops and masks follow from (seed, epoch, index) alone, so the
        # global batch of a step is the same images, crops and masks at any world size (a resume at another
        # world size, or 1 process against N, sees the same data)
        prediction_size(cfg), cfg.crops.n_global, seed=cfg.runtime.seed, mask_start_epoch=m.start_epoch)
    sampler = ResumableBatchSampler(len(source), cfg.data.batch_size, rank, world, cfg.runtime.seed)
    workers = cfg.data.num_workers
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=sampler, **worker_options(workers),
        collate_fn=partial(collate_multicrop, n_global=cfg.crops.n_global, capacity=row_capacity(cfg)),
        pin_memory=pin_memory, prefetch_factor=4 if workers > 0 else None,
        # its own generator: starting an epoch's iterator must not consume the training RNG stream,
        # or a resumed run would draw different drop-path masks
        generator=torch.Generator().manual_seed(cfg.runtime.seed))
    if workers > 0:
        _LOADERS.add(loader)
    return dataset, sampler, loader
