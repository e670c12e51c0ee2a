"""The classifier ``fastibot finetune`` trains: a pretrained backbone as the timm model it exports to.

Sources: a fastibot run folder or ``checkpoint_*.pt`` (its teacher or student backbone), an
exported ``.safetensors`` (the timm name and kwargs are in its metadata) or ``.pt`` (pass the
timm name), or ``random:ARCH`` (timm's own initialisation: the from-scratch baseline). The head
is new; every other key of the model must come from the weights. A ViT at another image size gets
its position embedding resampled (bicubic); a Swin fine-tunes at the size it was pretrained at
(its relative-position tables follow the windows, which follow the size).
"""
from __future__ import annotations

import ast
import re
from pathlib import Path

import torch

from .. import checkpoint as ckpt

# the published per-size layer decays (ViT-S/16 0.75, ViT-B/16 0.65, ViT-L/16 0.75); Swin: BEiT's default
LAYER_DECAY = (("vit_tiny", 0.75), ("vit_small", 0.75), ("vit_base", 0.65), ("vit_large", 0.75), ("swin", 0.9))


class SourceError(ValueError):
    """The backbone cannot be loaded as asked; the message names the file or flag."""


def load_source(source: str, which: str = "teacher", model_name: str = ""):
    """(timm name, create_model kwargs, timm state dict or None for random:ARCH) of a backbone."""
    from ..export import config_from_checkpoint, random_model
    from .backbones import timm_create_kwargs, timm_state_dict
    from .ibot import build_model

    if source.startswith("random:"):
        try:
            _, cfg = random_model(source)
        except Exception as e:
            raise SourceError(f"{source}: {e}") from None
        name, kwargs = timm_create_kwargs(cfg)
        return model_name or name, kwargs, None
    path = Path(source)
    if path.is_dir() or re.fullmatch(r"checkpoint_\d+\.pt", path.name):  # a run, a checkpoint file or folder
        state = ckpt.load_checkpoint(source)  # CheckpointError names the file (broken, or a fine-tuning run's)
        cfg = config_from_checkpoint(state)
        model = build_model(cfg, student=which == "student")
        model.load_state_dict(state[which])
        name, kwargs = timm_create_kwargs(cfg)
        return model_name or name, kwargs, timm_state_dict(model.backbone)
    if not path.is_file():
        raise FileNotFoundError(f"{source}: no such run folder, checkpoint or weights file")
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open
            from safetensors.torch import load_file
            with safe_open(str(path), "pt") as f:
                meta = f.metadata() or {}
            name, kwargs = model_name or meta.get("timm_model", ""), ast.literal_eval(meta.get("timm_kwargs", "{}"))
            sd = load_file(str(path))
        else:
            name, kwargs, sd = model_name, {}, torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # not a weights file (garbage, truncated, another format), or a pickle with code in it
        raise SourceError(f"weights file {source!r} {ckpt.load_failure(e)}") from None
    if not isinstance(sd, dict):
        raise SourceError(f"weights file {source!r} holds a {type(sd).__name__}, not a state dict of tensors")
    if not name:
        raise SourceError(f"{source} does not say which timm model it is: pass --model (e.g. vit_small_patch16_224)")
    return name, kwargs, sd


def build_classifier(name: str, kwargs: dict, num_classes: int, image_size: int, drop_path: float, state_dict=None):
    """timm model with a fresh ``num_classes`` head; the backbone weights loaded, every key accounted for."""
    import timm
    from timm.layers import resample_abs_pos_embed

    kwargs = {**kwargs, "img_size": image_size}
    try:
        model = timm.create_model(name, num_classes=num_classes, drop_path_rate=drop_path, **kwargs)
    except Exception as e:
        raise SourceError(f"timm cannot build {name} with {kwargs} ({e})") from None
    if state_dict is None:
        return model
    sd = dict(state_dict)
    pos = getattr(model, "pos_embed", None)  # None: a model without one (a Swin), given a ViT's weights by --model
    if "pos_embed" in sd and pos is not None and sd["pos_embed"].shape != pos.shape:  # another size: bicubic resample
        sd["pos_embed"] = resample_abs_pos_embed(sd["pos_embed"], list(model.patch_embed.grid_size),
                                                 num_prefix_tokens=model.num_prefix_tokens)
    try:
        missing, unexpected = model.load_state_dict(sd, strict=False)
    except RuntimeError as e:
        raise SourceError(f"the weights do not fit {name} at {image_size} px ({ckpt.error_tail(e)}): "
                          "check --model (weights of another architecture?) and --image-size (a Swin fine-tunes "
                          "at the size it was pretrained at)") from None
    head = model.pretrained_cfg.get("classifier", "head")
    missing = [k for k in missing if not k.startswith(head + ".")]
    if missing or unexpected:
        raise SourceError(f"the weights do not match {name}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model


def default_layer_decay(name: str) -> float:
    return next((d for prefix, d in LAYER_DECAY if name.startswith(prefix)), 0.75)
