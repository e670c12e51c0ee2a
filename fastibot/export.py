"""Export a trained backbone to timm: ``timm.create_model(name, num_classes=0)`` loads it strictly."""
from __future__ import annotations

from pathlib import Path
from typing import Tuple

import torch

from .checkpoint import load_checkpoint, resolve_resume
from .config import Config, _apply, load_config
from .models.ibot import build_model
from .models.backbones import is_swin, timm_create_kwargs, timm_state_dict


def config_from_checkpoint(state: dict) -> Config:
    cfg = Config()
    _apply(cfg, state["config"], "")
    return cfg


def load_model(checkpoint, which: str = "teacher"):
    """(IBOTModel: backbone and head, Config) from a checkpoint file or run folder."""
    if which not in ("teacher", "student"):
        raise ValueError(f"which must be teacher or student, not {which!r}")
    path = resolve_resume(str(checkpoint), str(checkpoint))
    state = load_checkpoint(path)
    cfg = config_from_checkpoint(state)
    model = build_model(cfg, student=which == "student")
    model.load_state_dict(state[which])
    return model.eval(), cfg


def load_backbone(checkpoint, which: str = "teacher"):
    """(backbone, Config) from a checkpoint file or run folder."""
    model, cfg = load_model(checkpoint, which)
    return model.backbone, cfg


def random_model(spec: str, seed: int = 0):
    """(IBOTModel, Config) freshly initialised from ``random:ARCH`` (the untrained baseline; Swins with
    4 px patches and 7-token windows)."""
    arch = spec.split(":", 1)[1]
    cfg = load_config(None, [f"model.arch={arch}"] + (["model.patch_size=4"] if is_swin(arch) else []))
    torch.manual_seed(seed)
    return build_model(cfg, student=False).eval(), cfg


def random_backbone(spec: str, seed: int = 0):
    """(backbone, Config) of :func:`random_model`."""
    model, cfg = random_model(spec, seed)
    return model.backbone, cfg


def export_backbone(checkpoint, out_path, which: str = "teacher") -> Tuple[Path, str, dict]:
    """Write the backbone as ``.safetensors`` (or ``.pt``/``.pth``).

    Returns (path, timm model name, create_model kwargs): ``timm.create_model(name, num_classes=0,
    pretrained=True, pretrained_cfg_overlay=dict(file=path), **kwargs)`` loads it strictly.
    """
    backbone, cfg = load_backbone(checkpoint, which)
    name, kwargs = timm_create_kwargs(cfg)
    sd = {k: v.contiguous() for k, v in timm_state_dict(backbone).items()}
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    if out_path.suffix == ".safetensors":
        from safetensors.torch import save_file
        save_file(sd, str(out_path), metadata={"timm_model": name, "timm_kwargs": repr(kwargs)})
    else:
        torch.save(sd, out_path)
    return out_path, name, kwargs


def load_hint(path, name: str, kwargs: dict) -> str:
    """The Python line that loads an export into timm. Swins load through ``load_state_dict``: timm up to
    1.0.29 reads a headless Swin state dict through ``pretrained=True`` as the original Swin layout and
    renames its downsample layers."""
    extra = "".join(f", {k}={v!r}" for k, v in kwargs.items())
    if name.startswith("swin"):
        return (f"m = timm.create_model({name!r}, num_classes=0{extra}); "
                f"m.load_state_dict(safetensors.torch.load_file({str(path)!r}))")
    return (f"timm.create_model({name!r}, num_classes=0, pretrained=True, "
            f"pretrained_cfg_overlay=dict(file={str(path)!r}){extra})")
