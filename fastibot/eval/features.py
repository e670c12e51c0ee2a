"""Frozen-backbone features of a labelled image folder, batched, optionally cached on disk."""
from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Callable, Optional, Tuple

import torch

from ..data.datasets import ImageFolderSource, load_rgb, worker_options
from ..data.transforms import eval_transform

log = logging.getLogger("fastibot")


def folder_samples(root, max_images: int = 0, seed: int = 0):
    """((path, label) list, classes) of an ImageFolder tree; ``max_images`` keeps a seeded random subset."""
    src = ImageFolderSource(root)
    samples = src.samples
    if max_images and len(samples) > max_images:
        g = torch.Generator().manual_seed(seed)
        keep = torch.randperm(len(samples), generator=g)[:max_images].sort().values
        samples = [samples[i] for i in keep.tolist()]
    return samples, src.classes


def check_folders(train, val, train_key: str, val_key: str) -> None:
    """Both labelled folders exist, hold images, and have the same classes; errors name the flag or key."""
    from ..data.datasets import DataError, list_images

    classes = [list_images(path, key)[1] for path, key in ((train, train_key), (val, val_key)) if path is not None]
    if len(classes) == 2 and classes[0] != classes[1]:
        raise DataError(f"{train_key} and {val_key} have different classes: {classes[0]} vs {classes[1]}")


class LabelledFolder(torch.utils.data.Dataset):
    """(image tensor, label) with the evaluation transform; an unreadable image yields None (dropped by
    the collate function, with a warning). ``subset``: an explicit (samples, classes) pair to use instead."""

    def __init__(self, root, image_size: int = 224, max_images: int = 0, seed: int = 0, subset=None):
        self.samples, self.classes = subset if subset is not None else folder_samples(root, max_images, seed)
        self.transform = eval_transform(image_size)

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        path, label = self.samples[i]
        try:
            return self.transform(load_rgb(path)), label
        except Exception as e:
            log.warning("eval: skipping unreadable image %s (%s)", path, e)
            return None


def _collate(batch):
    batch = [b for b in batch if b is not None]
    if not batch:
        return torch.zeros(0, 3, 1, 1), torch.zeros(0, dtype=torch.long)
    return torch.stack([b[0] for b in batch]), torch.tensor([b[1] for b in batch])


@torch.no_grad()
def extract(fn: Callable[[torch.Tensor], torch.Tensor], root, image_size: int = 224, batch_size: int = 128,
            max_images: int = 0, num_workers: int = 4, device: Optional[torch.device] = None,
            progress: bool = False, subset=None) -> Tuple[torch.Tensor, torch.Tensor, list]:
    """Apply ``fn`` (images (B, 3, S, S) on ``device`` -> (B, F)) to every image, or to those of ``subset``
    ((samples, classes), e.g. a label fraction): (features fp32 CPU, labels, classes)."""
    ds = LabelledFolder(root, image_size, max_images, subset=subset)
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, collate_fn=_collate,
                                         **worker_options(num_workers, persistent=False))
    device = device or torch.device("cpu")
    feats, labels = [], []
    it = loader
    if progress:
        from tqdm import tqdm
        it = tqdm(loader, desc=f"features {Path(root).name}", unit="batch")
    for x, y in it:
        if x.shape[0] == 0:
            continue
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            f = fn(x.to(device, non_blocking=True))
        feats.append(f.float().cpu())
        labels.append(y)
    if not feats:
        raise RuntimeError(f"no readable images under {root}")
    return torch.cat(feats), torch.cat(labels), ds.classes


def cls_features(backbone) -> Callable[[torch.Tensor], torch.Tensor]:
    """l2-normalised [CLS] of the last layer (k-NN features)."""
    return lambda x: torch.nn.functional.normalize(backbone(x).float(), dim=1)


def cache_key(*parts) -> str:
    return hashlib.sha1("|".join(str(p) for p in parts).encode()).hexdigest()[:16]


def cached(cache_dir, key: str, compute):
    """Load ``cache_dir/key.pt`` or compute and save it."""
    if not cache_dir:
        return compute()
    path = Path(cache_dir) / f"{key}.pt"
    if path.is_file():
        try:
            return tuple(torch.load(path, weights_only=True))  # tensors and plain data only: runs no code
        except Exception as e:
            log.warning("ignoring the unreadable feature cache %s (%s: %s)", path, type(e).__name__,
                        (str(e).splitlines() or [""])[0][:200])
    out = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    from ..checkpoint import atomic_save
    atomic_save(list(out), path)
    return out


def checkpoint_fingerprint(path) -> str:
    p = Path(path)
    st = p.stat()
    return f"{p.resolve()}:{st.st_size}:{st.st_mtime_ns}"

