"""Pictures of what the backbone attends to, as in the DINO/iBOT figures.

For each image: ``<name>_attention.png``, a row of tiles (the image; each
head's last-layer [CLS] attention over the patches as a heat map; the image
with the region holding ``threshold`` of each head's attention mass outlined
in that head's colour), and ``<name>_clusters.png`` (the image beside its
patches coloured by k-means cluster of their last-layer features).
Drawing uses PIL and NumPy only.
"""
from __future__ import annotations

from pathlib import Path
from typing import List, Sequence

import numpy as np
import torch
from PIL import Image

from ..data.datasets import IMAGE_EXTENSIONS, load_rgb
from ..data.transforms import IMAGENET_MEAN, IMAGENET_STD, eval_transform
from .clusters import kmeans

# a perceptually ordered dark-to-bright colour map (anchors interpolated linearly)
_HEAT = np.array([[0, 0, 4], [40, 11, 84], [101, 21, 110], [159, 42, 99], [212, 72, 66], [245, 125, 21],
                  [250, 193, 39], [252, 255, 164]], dtype=np.float32)
_PALETTE = np.array([[230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48], [145, 30, 180],
                     [70, 240, 240], [240, 50, 230], [210, 245, 60], [250, 190, 212], [0, 128, 128],
                     [170, 110, 40]], dtype=np.uint8)


def heat(values: np.ndarray) -> np.ndarray:
    """(h, w) floats -> (h, w, 3) uint8 heat map, normalised to the map's own range."""
    v = values - values.min()
    v = v / max(float(v.max()), 1e-12)
    pos = v * (len(_HEAT) - 1)
    lo = np.floor(pos).astype(int).clip(0, len(_HEAT) - 2)
    frac = (pos - lo)[..., None]
    return (_HEAT[lo] * (1 - frac) + _HEAT[lo + 1] * frac).astype(np.uint8)


def mass_mask(attn: torch.Tensor, threshold: float) -> torch.Tensor:
    """(heads, n) attention -> bool mask of the smallest set of patches holding ``threshold`` of the mass."""
    vals, idx = attn.sort(dim=-1)
    cum = vals.cumsum(-1) / vals.sum(-1, keepdim=True)
    keep_sorted = cum > (1 - threshold)
    return torch.zeros_like(keep_sorted).scatter(-1, idx, keep_sorted)


def _denormalise(x: torch.Tensor) -> np.ndarray:
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return ((x.cpu() * std + mean).clamp(0, 1).permute(1, 2, 0).numpy() * 255).astype(np.uint8)


def _upsample(grid: np.ndarray, size: int) -> np.ndarray:
    img = Image.fromarray(grid)
    return np.asarray(img.resize((size, size), Image.NEAREST))


def _outline(mask: np.ndarray) -> np.ndarray:
    """Boundary pixels of a bool mask."""
    inner = mask.copy()
    inner[1:-1, 1:-1] = mask[1:-1, 1:-1] & mask[:-2, 1:-1] & mask[2:, 1:-1] & mask[1:-1, :-2] & mask[1:-1, 2:]
    return mask & ~inner


@torch.no_grad()
def render(backbone, image: Image.Image, image_size: int = 224, threshold: float = 0.6, clusters: int = 5,
           device=None) -> tuple:
    """(attention row PNG, clusters PNG) as PIL images for one image."""
    device = device or torch.device("cpu")
    x = eval_transform(image_size)(image)
    p = backbone.patch_size
    gh = gw = image_size // p
    attn = backbone.last_self_attention(x[None].to(device))[0, :, 0, 1:].float().cpu()  # (heads, N)
    base = _denormalise(x)
    tiles = [base]
    for h in range(attn.shape[0]):
        tiles.append(_upsample(heat(attn[h].view(gh, gw).numpy()), image_size))
    overlay = base.copy()
    masks = mass_mask(attn, threshold).view(-1, gh, gw).numpy()
    for h, m in enumerate(masks):
        edge = _outline(_upsample((m * 255).astype(np.uint8), image_size) > 127)
        overlay[edge] = _PALETTE[h % len(_PALETTE)]
    tiles.append(overlay)
    row = Image.fromarray(np.concatenate(tiles, axis=1))
    tokens = backbone.forward_features(x[None].to(device))[0, 1:].float().cpu()  # (N, D)
    labels = kmeans(tokens, clusters).view(gh, gw).numpy()
    colours = _upsample(_PALETTE[labels % len(_PALETTE)], image_size)
    blend = (0.45 * base + 0.55 * colours).astype(np.uint8)
    return row, Image.fromarray(np.concatenate([base, blend], axis=1))


def list_inputs(paths: Sequence[str], limit: int) -> List[Path]:
    files = []
    for p in map(Path, paths):
        if p.is_dir():
            files += sorted(f for f in p.rglob("*") if f.suffix.lower() in IMAGE_EXTENSIONS)
        elif p.is_file():
            files.append(p)
        else:
            raise FileNotFoundError(f"{p} does not exist")
    if not files:
        raise FileNotFoundError(f"no images in {', '.join(map(str, paths))}")
    return files[:limit] if limit else files


def output_names(files: Sequence[Path]) -> List[str]:
    """One name per file: its stem, or for stems shared by several inputs (``a/x.jpg``, ``b/x.jpg``) the stem
    and a number no other name has, so that no picture overwrites another."""
    stems = [f.stem for f in files]
    taken, names = set(stems), []
    for i, stem in enumerate(stems):
        if stem in stems[:i]:
            k = 2
            while f"{stem}-{k}" in taken:
                k += 1
            stem = f"{stem}-{k}"
            taken.add(stem)
        names.append(stem)
    return names


def write_maps(backbone, inputs: Sequence[str], out_dir, n_images: int = 4, image_size: int = 224,
               threshold: float = 0.6, clusters: int = 5, device=None) -> List[Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    backbone = backbone.to(device or "cpu").eval()
    written = []
    files = list_inputs(inputs, n_images)
    for f, name in zip(files, output_names(files)):
        row, clus = render(backbone, load_rgb(str(f)), image_size, threshold, clusters, device)
        for suffix, img in (("attention", row), ("clusters", clus)):
            path = out / f"{name}_{suffix}.png"
            img.save(path)
            written.append(path)
    return written
