"""Multi-crop augmentation on the CPU with torchvision: the reference data path.

Per image: ``n_global`` global crops and ``n_local`` local crops, each with
RandomResizedCrop (bicubic), horizontal flip p=0.5, ColorJitter(0.4, 0.4, 0.2,
0.1) with p=0.8, grayscale p=0.2, Gaussian blur (radius U(0.1, 2)) with p=1.0
on global 1, 0.1 on the other globals and 0.5 on locals, solarization p=0.2 on
globals after the first, then ImageNet normalisation.

All randomness comes from torch's global generator, which the dataset seeds
per (seed, epoch, index): a sample's crops do not depend on which worker made
them, so resumed runs see the same data.
"""
from __future__ import annotations

import torch
from PIL import Image, ImageFilter, ImageOps
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _uniform(lo: float, hi: float) -> float:
    return lo + (hi - lo) * torch.rand(()).item()


class GaussianBlur:
    """PIL Gaussian blur with probability ``p`` and radius ~ U(radius_min, radius_max)."""

    def __init__(self, p: float, radius_min: float = 0.1, radius_max: float = 2.0):
        self.p, self.radius_min, self.radius_max = p, radius_min, radius_max

    def __call__(self, img: Image.Image) -> Image.Image:
        if torch.rand(()).item() >= self.p:
            return img
        return img.filter(ImageFilter.GaussianBlur(radius=_uniform(self.radius_min, self.radius_max)))


class Solarization:
    """Invert pixels above 128 with probability ``p``."""

    def __init__(self, p: float):
        self.p = p

    def __call__(self, img: Image.Image) -> Image.Image:
        return ImageOps.solarize(img) if torch.rand(()).item() < self.p else img


class MultiCropAugmentation:
    """PIL image -> list of normalised crops: globals first, then locals."""

    def __init__(self, global_size: int = 224, local_size: int = 96, n_global: int = 2, n_local: int = 10,
                 global_scale=(0.25, 1.0), local_scale=(0.05, 0.25)):
        color = T.Compose([
            T.RandomHorizontalFlip(p=0.5),
            T.RandomApply([T.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1)], p=0.8),
            T.RandomGrayscale(p=0.2),
        ])
        normalize = T.Compose([T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
        bicubic = InterpolationMode.BICUBIC
        self.global1 = T.Compose([T.RandomResizedCrop(global_size, scale=tuple(global_scale), interpolation=bicubic),
                                  color, GaussianBlur(1.0), normalize])
        self.global2 = T.Compose([T.RandomResizedCrop(global_size, scale=tuple(global_scale), interpolation=bicubic),
                                  color, GaussianBlur(0.1), Solarization(0.2), normalize])
        self.local = T.Compose([T.RandomResizedCrop(local_size, scale=tuple(local_scale), interpolation=bicubic),
                                color, GaussianBlur(0.5), normalize])
        self.n_global, self.n_local = n_global, n_local

    @classmethod
    def from_config(cls, crops) -> "MultiCropAugmentation":
        return cls(crops.global_size, crops.local_size, crops.n_global, crops.n_local,
                   crops.global_scale, crops.local_scale)

    def __call__(self, img: Image.Image):
        crops = [self.global1(img)]
        crops += [self.global2(img) for _ in range(self.n_global - 1)]
        crops += [self.local(img) for _ in range(self.n_local)]
        return crops


def eval_transform(image_size: int = 224):
    """Resize to 8/7 of the size (256 for 224), center crop, normalise (DINO/iBOT evaluation)."""
    return T.Compose([
        T.Resize(int(round(image_size * 8 / 7)), interpolation=InterpolationMode.BICUBIC),
        T.CenterCrop(image_size),
        T.ToTensor(),
        T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])
