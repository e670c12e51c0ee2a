"""Export a trained backbone to timm: ``timm.create_model(name, num_classes=0)`` loads it strictly."""
from __future__ import annotations

from pathlib import Path
from typing import Tuple

import torch

from .checkpoint import find_checkpoint, load_checkpoint
from .config import Config, _apply, load_config
from .models.ibot import build_model
from .models.vit import timm_create_kwargs, timm_state_dict


def config_from_checkpoint(state: dict) -> Config:
    cfg = Config()
    _apply(cfg, state["config"], "")
    return cfg


def open_backbone(checkpoint, which: str = "teacher") -> Tuple[object, Config, Path]:
    """(VisionTransformer, Config, checkpoint path) from a checkpoint file or a run folder (its newest
    usable checkpoint); the file is verified and loaded as tensors and plain data only."""
    if which not in ("teacher", "student"):
        raise ValueError(f"which must be teacher or student, not {which!r}")
    path = find_checkpoint(checkpoint)
    state = load_checkpoint(path, verify=False)
    cfg = config_from_checkpoint(state)
    model = build_model(cfg, student=which == "student")
    model.load_state_dict(state[which])
    return model.backbone.eval(), cfg, path


def load_backbone(checkpoint, which: str = "teacher"):
    """(VisionTransformer, Config) from a checkpoint file or run folder."""
    backbone, cfg, _ = open_backbone(checkpoint, which)
    return backbone, cfg


def random_backbone(spec: str, seed: int = 0):
    """(VisionTransformer, Config) freshly initialised from ``random:ARCH`` (the untrained baseline)."""
    cfg = load_config(None, [f"model.arch={spec.split(':', 1)[1]}"])
    torch.manual_seed(seed)
    return build_model(cfg, student=False).backbone.eval(), cfg


def export_backbone(checkpoint, out_path, which: str = "teacher") -> Tuple[Path, str, dict]:
    """Write the backbone as ``.safetensors`` (or ``.pt``/``.pth``).

    Returns (path, timm model name, create_model kwargs): ``timm.create_model(name, num_classes=0,
    pretrained=True, pretrained_cfg_overlay=dict(file=path), **kwargs)`` loads it strictly.
    """
    backbone, cfg = load_backbone(checkpoint, which)
    name, kwargs = timm_create_kwargs(cfg.model.arch, cfg.model.patch_size, cfg.crops.global_size,
                                      cfg.model.depth)
    sd = {k: v.contiguous() for k, v in timm_state_dict(backbone).items()}
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    if out_path.suffix == ".safetensors":
        from safetensors.torch import save_file
        save_file(sd, str(out_path), metadata={"timm_model": name, "timm_kwargs": repr(kwargs)})
    else:
        torch.save(sd, out_path)
    return out_path, name, kwargs
