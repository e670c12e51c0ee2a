"""Export a trained backbone to timm: ``timm.create_model(name, num_classes=0)`` loads it strictly."""
from __future__ import annotations

from pathlib import Path
from typing import Tuple

import torch

from .checkpoint import find_checkpoint, load_checkpoint
from .config import Config, _apply, load_config
from .models.ibot import build_model
from .models.backbones import is_swin, timm_create_kwargs, timm_state_dict


def config_from_checkpoint(state: dict) -> Config:
    cfg = Config()
    _apply(cfg, state["config"], "")
    return cfg


def open_model(checkpoint, which: str = "teacher") -> Tuple[object, Config, Path]:
    """(IBOTModel: backbone and head, Config, checkpoint path) from a checkpoint file or a run folder (its
    newest usable checkpoint); the file is verified and loaded as tensors and plain data only."""
    if which not in ("teacher", "student"):
        raise ValueError(f"which must be teacher or student, not {which!r}")
    path = find_checkpoint(checkpoint)
    state = load_checkpoint(path, verify=False)
    cfg = config_from_checkpoint(state)
    model = build_model(cfg, student=which == "student")
    model.load_state_dict(state[which])
    return model.eval(), cfg, path


def open_backbone(checkpoint, which: str = "teacher") -> Tuple[object, Config, Path]:
    """(backbone, Config, checkpoint path): see :func:`open_model`."""
    model, cfg, path = open_model(checkpoint, which)
    return model.backbone, cfg, path


def load_model(checkpoint, which: str = "teacher"):
    """(IBOTModel, Config) from a checkpoint file or run folder."""
    model, cfg, _ = open_model(checkpoint, which)
    return model, cfg


def load_backbone(checkpoint, which: str = "teacher"):
    """(backbone, Config) from a checkpoint file or run folder."""
    backbone, cfg, _ = open_backbone(checkpoint, which)
    return backbone, cfg


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


EXPORT_SUFFIXES = (".safetensors", ".pt", ".pth")


def export_backbone(checkpoint, out_path, which: str = "teacher") -> Tuple[Path, str, dict]:
    """Write the backbone as ``.safetensors`` (or ``.pt``/``.pth``).

    Returns (path, timm model name, create_model kwargs); :func:`timm_snippet` is the code that loads it.
    """
    out_path = Path(out_path)
    if out_path.suffix not in EXPORT_SUFFIXES or out_path.is_dir():
        raise ValueError(f"--out {str(out_path)!r}: give a file name ending in {', '.join(EXPORT_SUFFIXES)}")
    backbone, cfg = load_backbone(checkpoint, which)
    name, kwargs = timm_create_kwargs(cfg)
    sd = {k: v.contiguous() for k, v in timm_state_dict(backbone).items()}
    try:
        out_path.parent.mkdir(parents=True, exist_ok=True)
        if out_path.suffix == ".safetensors":
            from safetensors.torch import save_file
            save_file(sd, str(out_path), metadata={"timm_model": name, "timm_kwargs": repr(kwargs)})
        else:
            torch.save(sd, out_path)
    except (OSError, RuntimeError) as e:  # torch.save reports a failed open as a RuntimeError
        raise ValueError(f"--out {str(out_path)!r}: cannot write it ({(str(e).strip().splitlines() or [''])[0]})") \
            from None
    return out_path, name, kwargs


def timm_snippet(path, name: str, kwargs: dict) -> str:
    """The Python lines that load an exported backbone in timm (printed by ``fastibot export``).

    ViTs: ``checkpoint_path=`` builds the model, then loads the file strictly, in every timm fastibot
    supports (>= 0.9.0); ``pretrained=True, pretrained_cfg_overlay=dict(file=...)`` does not (it goes through
    the model's pretrained config, which for vit_small_patch16_224 in timm 1.0.3 to 1.0.29 expects a pickle
    or an original JAX .npz file). Swins load through ``load_state_dict``: timm up to 1.0.29 reads a headless
    Swin state dict through its pretrained path as the original Swin layout and renames its downsample layers.
    """
    p = str(Path(path).resolve())
    extra = "".join(f", {k}={v!r}" for k, v in kwargs.items())
    if not name.startswith("swin"):
        return f"import timm\nmodel = timm.create_model({name!r}, num_classes=0, checkpoint_path={p!r}{extra})"
    if p.endswith(".safetensors"):
        imports, load = "import safetensors.torch\nimport timm", f"safetensors.torch.load_file({p!r})"
    else:
        imports, load = "import timm\nimport torch", f"torch.load({p!r}, weights_only=True)"
    return (f"{imports}\nmodel = timm.create_model({name!r}, num_classes=0{extra})\n"
            f"model.load_state_dict({load})")
