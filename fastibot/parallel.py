"""Sharded data parallelism: ``runtime.parallel = fsdp | hsdp`` through PyTorch's FSDP2 (``fully_shard``).

- **Units.** Each transformer block (a ViT's, or each block of a Swin's stages) is one FSDP unit, the head
  another, and the root unit holds what is left (patch embedding, [CLS]/mask tokens, position embedding,
  Swin's patch merging, final norm). A unit's parameters are
  all-gathered just before it runs and freed after (the student's head and root stay gathered from the
  end of the forward into the backward, which needs them at once).
- **Teacher.** Sharded exactly as the student (same units, same mesh), so teacher and student shards of a
  parameter hold the same elements on every rank and the EMA updates each rank's local shards only, with
  no gather (``fastibot.teacher.EMA`` over ``local()`` tensors). The teacher reshards after its forward
  (it has no backward), so the next forward gathers the shards the EMA has just moved.
- **Precision.** With bf16/fp16 autocast the gathered parameters are in that dtype (fp32 master shards);
  gradients are reduce-scattered in ``runtime.fsdp_reduce_dtype`` and land as fp32 shards.
- **Update.** AdamW, weight decay, clipping and the EMA work on local shards. Per-parameter clipping
  needs each parameter's norm over all its shards: :class:`fastibot.optim.ShardedGrads` adds the local squared norms of
  all parameters and the "loss not finite" flag into one buffer and all-reduces it once, on the device,
  so every rank takes the same clip factors and the same skip decision.
- **hsdp.** A 2-D mesh (replicate, shard): parameters sharded inside groups of ``runtime.shard_size``
  processes (default: one node, torchrun's ``LOCAL_WORLD_SIZE``) and replicated across the groups.
"""
from __future__ import annotations

import logging
import warnings
from typing import List, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn as nn

log = logging.getLogger("fastibot")

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


class ParallelError(RuntimeError):
    """A parallel mode cannot run as configured; the message names the setting."""


def _fsdp():
    try:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
    except ImportError:
        raise ParallelError(f"runtime.parallel=fsdp|hsdp needs PyTorch's FSDP2 (torch >= 2.6; this is torch "
                            f"{torch.__version__}); use runtime.parallel=ddp") from None
    return fully_shard, MixedPrecisionPolicy, register_fsdp_forward_method


def is_sharded(t) -> bool:
    from torch.distributed.tensor import DTensor
    return isinstance(t, DTensor)


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a sharded tensor (a view: in-place changes reach the parameter); a plain tensor
    as it is."""
    return t.to_local() if is_sharded(t) else t


def local_list(ts) -> List[torch.Tensor]:
    return [local(t) for t in ts]


def shard_size(cfg, rt) -> int:
    """Processes per shard group: the whole world for fsdp; ``runtime.shard_size`` (or the processes per
    node) for hsdp."""
    if cfg.runtime.parallel == "fsdp":
        return rt.world
    size = cfg.runtime.shard_size or rt.local_world
    if size > rt.world or rt.world % size:
        key = "runtime.shard_size" if cfg.runtime.shard_size else "the processes per node (LOCAL_WORLD_SIZE)"
        raise ParallelError(f"runtime.parallel=hsdp: {rt.world} processes cannot form groups of {size} "
                            f"({key}); set runtime.shard_size to a divisor of the world size")
    return size


def build_mesh(cfg, rt):
    """The device mesh of ``runtime.parallel``: 1-D (world) for fsdp, 2-D (replicate, shard) for hsdp.
    Consecutive ranks (one node under torchrun) form a shard group."""
    from torch.distributed.device_mesh import init_device_mesh

    shard = shard_size(cfg, rt)
    if cfg.runtime.parallel == "fsdp":
        return init_device_mesh(rt.device.type, (rt.world,), mesh_dim_names=("shard",))
    return init_device_mesh(rt.device.type, (rt.world // shard, shard), mesh_dim_names=("replicate", "shard"))


def transformer_blocks(backbone: nn.Module) -> List[nn.Module]:
    """The blocks of a ViT (``blocks``) or of a Swin's stages (``layers[i].blocks``), in forward order."""
    if hasattr(backbone, "blocks"):
        return list(backbone.blocks)
    return [block for stage in backbone.layers for block in stage.blocks]


def shard_model(model: nn.Module, mesh, amp_dtype: Optional[torch.dtype], reduce_dtype: str, teacher: bool) -> None:
    """FSDP2 units in place: each block, the head, the rest at the root (see the module docstring).

    Methods the step calls other than ``forward`` (the teacher's forward, the head's parts) are registered
    so that FSDP gathers around them too."""
    fully_shard, MixedPrecisionPolicy, register = _fsdp()
    # timm's Swin block returns a reshaped view; FSDP2 warns in case something changes it in place, and nothing
    # after it does (every op on a block's output is out of place; the Swin parity test holds fsdp to ddp)
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module \(FSDPSwinBlock\) returned a view tensor")
    mp = MixedPrecisionPolicy(param_dtype=amp_dtype, reduce_dtype=_DTYPES[reduce_dtype], cast_forward_inputs=False)
    for block in transformer_blocks(model.backbone):
        fully_shard(block, mesh=mesh, mp_policy=mp)
    # the student's head runs last in the forward and first in the backward: keep it gathered in between;
    # the teacher's must free its gathered copy, or its next forward would reuse it after the EMA moved the shards
    fully_shard(model.head, mesh=mesh, mp_policy=mp, reshard_after_forward=teacher)
    for name in ("embed", "cls_logits", "patch_logits"):
        register(model.head, name)
    if teacher:
        fully_shard(model, mesh=mesh, mp_policy=mp, reshard_after_forward=True)
        register(model, "teacher")
    else:
        fully_shard(model, mesh=mesh, mp_policy=mp)


def compile_blocks(model: nn.Module, options: Optional[dict] = None) -> None:
    """``runtime.compile`` under fsdp|hsdp: each transformer block's forward (and through AOTAutograd its
    backward) one inductor graph. FSDP2's gather and free run as hooks around the block, outside the graph
    (dynamo does not trace them, so the whole-step graph of ddp cannot hold them)."""
    blocks = list(transformer_blocks(model.backbone))
    # the blocks share one code object and each bakes in its own drop-path rate (a float dynamo guards on):
    # one compiled entry per block, more than dynamo's default limit of 8 for a 12-block ViT; a Swin's
    # student blocks see two crop sizes (dense path) and its teacher's one more: up to 3 per block
    cfg = torch._dynamo.config
    cfg.recompile_limit = max(cfg.recompile_limit, 4 * len(blocks) + 8)
    cfg.accumulated_recompile_limit = max(cfg.accumulated_recompile_limit, 4 * len(blocks) + 64)
    for block in blocks:
        block.forward = torch.compile(block.forward, fullgraph=True, dynamic=False, options=options)


@torch.no_grad()
def copy_full_(target: torch.Tensor, full: torch.Tensor) -> None:
    """Copy a whole (unsharded) tensor into ``target``: all of it, or this rank's shard of a sharded one
    (each rank cuts its own shard from its copy: no communication)."""
    if is_sharded(target):
        from torch.distributed.tensor import distribute_tensor
        full = full.to(device=target.device, dtype=target.dtype)
        target.to_local().copy_(distribute_tensor(full, target.device_mesh, target.placements,
                                                  src_data_rank=None).to_local())
    else:
        target.copy_(full)


def gather_full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor on every rank (a collective for a sharded one)."""
    return t.full_tensor() if is_sharded(t) else t
