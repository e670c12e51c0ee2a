"""Which backbone a config builds, the grid its masks are drawn on, and how timm names it.

- ViT (``vit_*``): one mask cell per patch; the patch loss reads every patch token.
- Swin (``swin_*``): one mask cell per final-stage token, ``patch_size * 8`` pixels (the
  reference implementation's prediction size); the mask is repeated up to the patch grid
  inside the backbone.
"""
from __future__ import annotations

from typing import Tuple

import torch.nn as nn

from ..config import Config
from .swin import SwinTransformer
from .vit import VisionTransformer, timm_create_kwargs as vit_timm_kwargs

SWIN_TIMM_NAMES = {"swin_tiny": "swin_tiny_patch4_window7_224"}


def is_swin(arch: str) -> bool:
    return arch.startswith("swin")


def build_backbone(cfg: Config, student: bool) -> nn.Module:
    """The student's (with drop path) or the teacher's (without) backbone for ``cfg.model``."""
    m = cfg.model
    drop_path = m.drop_path if student else 0.0
    if is_swin(m.arch):
        return SwinTransformer(m.arch, m.patch_size, cfg.crops.global_size, m.window_size, drop_path_rate=drop_path)
    return VisionTransformer(m.arch, m.patch_size, cfg.crops.global_size, drop_path_rate=drop_path, depth=m.depth,
                             pos_embed_resize=m.pos_embed_resize)


def prediction_size(cfg: Config) -> int:
    """Pixels per side of one mask cell: the patch for a ViT, a final-stage token for a Swin."""
    return cfg.model.patch_size * (8 if is_swin(cfg.model.arch) else 1)


def mask_grid(cfg: Config, crop_size: int) -> Tuple[int, int]:
    """(h, w) of the grid block masks are drawn on for a square crop of ``crop_size`` pixels."""
    n = crop_size // prediction_size(cfg)
    return n, n


def timm_create_kwargs(cfg: Config) -> tuple:
    """(timm model name, extra ``create_model`` kwargs) that rebuild the backbone's shapes."""
    m = cfg.model
    if not is_swin(m.arch):
        return vit_timm_kwargs(m.arch, m.patch_size, cfg.crops.global_size, m.depth)
    kwargs = {}
    if m.window_size != 7:
        kwargs["window_size"] = m.window_size
    if m.patch_size != 4:
        kwargs["patch_size"] = m.patch_size
    if cfg.crops.global_size != 224:
        kwargs["img_size"] = cfg.crops.global_size
    return SWIN_TIMM_NAMES[m.arch], kwargs


def timm_state_dict(backbone: nn.Module) -> dict:
    """The backbone's weights as timm's model with ``num_classes=0`` names them (no mask token)."""
    return {k: v.detach().clone() for k, v in backbone.state_dict().items() if k != "masked_embed"}
