"""EMA teacher, centers and the per-iteration schedules.

- Schedules (one value per optimizer step): lr linear warm-up from 0 then
  cosine to ``min_lr`` (peak ``lr · global_batch / 256``); weight decay cosine;
  teacher momentum cosine; teacher temperatures linear warm-up then constant.
- Centers: c <- m·c + (1-m)·mean(teacher logits), the batch mean averaged over
  processes. A non-finite batch statistic leaves the center unchanged (checked
  on the device: no host sync).
- EMA: θt <- m·θt + (1-m)·θs over all shared parameters; ``reference`` is the
  official per-tensor loop, ``foreach`` the same two products as two foreach
  launches, ``triton`` the fused kernel of ``fastibot.kernels.ema`` on flat
  buffers. All three read m and 1-m from device tensors (a schedule entry) and
  round the two products as the loop does, so they give the same teacher bits.
- The schedules live on the device too (:meth:`Schedules.device_table`): the
  step reads its row with a device step counter, so no host value enters it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Tuple

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

from .config import Config


def cosine_schedule(base: float, final: float, total: int, warmup: int = 0, warmup_start: float = 0.0) -> np.ndarray:
    """``total`` values: linear ``warmup_start -> base`` over ``warmup`` steps, then cosine ``base -> final``."""
    warmup = min(warmup, total)
    warm = np.linspace(warmup_start, base, warmup) if warmup > 0 else np.array([])
    rest = total - warmup
    iters = np.arange(rest)
    cos = final + 0.5 * (base - final) * (1 + np.cos(np.pi * iters / max(rest, 1)))
    return np.concatenate((warm, cos)).astype(np.float64)


def warmup_constant(start: float, end: float, total: int, warmup: int) -> np.ndarray:
    warmup = min(warmup, total)
    return np.concatenate((np.linspace(start, end, warmup), np.full(total - warmup, end))).astype(np.float64)


@dataclass
class Schedules:
    lr: np.ndarray
    wd: np.ndarray
    momentum: np.ndarray
    teacher_temp: np.ndarray
    teacher_patch_temp: np.ndarray
    freeze_last_layer_steps: int

    @classmethod
    def build(cls, cfg: Config, steps_per_epoch: int, world: int) -> "Schedules":
        """One value per optimizer step for ``optim.epochs · steps_per_epoch`` steps.

        Teacher temperatures: a linear warm-up over ``teacher.warmup_temp_epochs`` (W), then constant.
        ``teacher.temp_warmup=epoch`` (official) holds one value per epoch, ``linspace(warm, temp, W)``
        over the W warm-up epochs (the last of them already at ``temp``); ``iteration`` ramps over the
        W · steps_per_epoch steps. The patch temperature stays at its warm-up value for the
        ``masking.start_epoch`` epochs without masking and starts its warm-up there, as officially.
        """
        o, t = cfg.optim, cfg.teacher
        total = o.epochs * steps_per_epoch
        spe = steps_per_epoch
        peak = o.lr * cfg.data.batch_size * o.accum_steps * world / 256.0

        def temps(start: float, end: float, delay_epochs: int) -> np.ndarray:
            if t.temp_warmup == "epoch":
                w = int(round(t.warmup_temp_epochs))
                per_epoch = np.concatenate((np.full(delay_epochs, start), np.linspace(start, end, w),
                                            np.full(max(o.epochs - delay_epochs - w, 0), end)))[: o.epochs]
                return np.repeat(per_epoch, spe).astype(np.float64)
            delay = min(delay_epochs * spe, total)
            ramp = warmup_constant(start, end, total - delay, int(round(t.warmup_temp_epochs * spe)))
            return np.concatenate((np.full(delay, start), ramp)).astype(np.float64)

        return cls(
            lr=cosine_schedule(peak, o.min_lr, total, int(round(o.warmup_epochs * spe))),
            wd=cosine_schedule(o.weight_decay, o.weight_decay_end, total),
            momentum=cosine_schedule(t.momentum, t.momentum_end, total),
            teacher_temp=temps(t.warmup_temp, t.temp, 0),
            teacher_patch_temp=temps(t.warmup_patch_temp, t.patch_temp, cfg.masking.start_epoch),
            freeze_last_layer_steps=int(round(o.freeze_last_layer * spe)),
        )

    def __len__(self):
        return len(self.lr)

    # rows of the device table, in order
    ROWS = ("lr", "wd", "momentum", "one_minus_momentum", "teacher_temp", "teacher_patch_temp", "frozen")

    def device_table(self, device) -> torch.Tensor:
        """(len(ROWS), steps) float64 tensor: column i holds step i's values. ``one_minus_momentum`` is 1 - m in
        float64 (as the official loop forms it); ``frozen`` is 1 while the last head layer gets no update."""
        n = len(self)
        frozen = (np.arange(n) < self.freeze_last_layer_steps).astype(np.float64)
        rows = [self.lr, self.wd, self.momentum, 1.0 - self.momentum, self.teacher_temp, self.teacher_patch_temp,
                frozen]
        return torch.from_numpy(np.stack([np.asarray(r, dtype=np.float64) for r in rows])).to(device)


class Centers(nn.Module):
    """The [CLS] and patch centers (buffers, saved in checkpoints)."""

    def __init__(self, out_dim: int, patch_out_dim: int, momentum: float = 0.9, momentum2: float = 0.9):
        super().__init__()
        self.register_buffer("center", torch.zeros(1, out_dim))
        self.register_buffer("center2", torch.zeros(1, patch_out_dim))
        self.momentum, self.momentum2 = momentum, momentum2

    @torch.no_grad()
    def start(self, cls_mean: torch.Tensor, patch_mean: torch.Tensor) -> Tuple[torch.Tensor, object]:
        """Begin the update with this process's batch means of the teacher logits, cls_mean (K,) and patch_mean
        (K2,): their all-reduce over processes is started here and runs under the backward (as DINOv2 overlaps
        it); :meth:`finish` waits for it and moves the centers."""
        stats = torch.cat([cls_mean.float().reshape(-1), patch_mean.float().reshape(-1)])
        work = None
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            work = dist.all_reduce(stats, async_op=True)
        return stats, work

    @torch.no_grad()
    def finish(self, pending: Tuple[torch.Tensor, object]) -> None:
        stats, work = pending
        if work is not None:
            work.wait()
            stats.div_(dist.get_world_size())
        k = self.center.shape[1]
        for buf, new, m in ((self.center, stats[:k], self.momentum), (self.center2, stats[k:], self.momentum2)):
            ok = torch.isfinite(new).all()
            buf.copy_(torch.where(ok, buf * m + new[None] * (1 - m), buf))


# ------------------------------------------------------------------------------ EMA


def ema_pairs(student: nn.Module, teacher: nn.Module) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
    """Matching (teacher, student) parameters by name, in a fixed order."""
    s = dict(student.named_parameters())
    t_params, s_params = [], []
    for name, p in teacher.named_parameters():
        if name in s:
            t_params.append(p)
            s_params.append(s[name])
    return t_params, s_params


@torch.no_grad()
def ema_reference(teacher_params, student_params, m, one_minus_m) -> None:
    """The official loop: θt.mul_(m).add_((1 - m) · θs) per tensor (m, 1 - m: floats or 0-d tensors)."""
    for pt, ps in zip(teacher_params, student_params):
        pt.mul_(m).add_(ps.detach() * one_minus_m)


@torch.no_grad()
def ema_foreach(teacher_params, student_params, m, one_minus_m) -> None:
    """The same two products, each one foreach launch (no host value needed: m may be a device tensor)."""
    torch._foreach_mul_(teacher_params, m)
    torch._foreach_add_(teacher_params, torch._foreach_mul([p.detach() for p in student_params], one_minus_m))


def _fp32(x):
    """m as the fp32 value the loop multiplies fp32 parameters by (a 0-d tensor stays on its device)."""
    return x.float() if torch.is_tensor(x) else float(np.float32(x))


class EMA:
    """Teacher update with the implementation chosen by ``kernels.ema``; call with (m, 1 - m)."""

    def __init__(self, student: nn.Module, teacher: nn.Module, impl: str):
        from .parallel import is_sharded
        self.impl = impl
        self.t_params, self.s_params = ema_pairs(student, teacher)
        # FSDP2 shards (runtime.parallel=fsdp|hsdp): teacher and student are sharded alike, so each rank updates
        # its local shards (views taken at each call: FSDP2 owns their storage)
        self.sharded = any(is_sharded(p) for p in self.t_params)
        if impl == "triton":
            if self.sharded:
                raise ValueError("kernels.ema=triton moves parameters into flat buffers, but FSDP2 owns the storage "
                                 "of sharded parameters: use kernels.ema=foreach (or auto) with runtime.parallel="
                                 "fsdp|hsdp")
            from .kernels.ema import FlatEMA
            self._flat = FlatEMA(self.t_params, self.s_params)

    def flat_buffers(self):
        """[(teacher, student)] flat buffers of the triton EMA, one pair per dtype."""
        if self.impl != "triton":
            raise ValueError(f"the {self.impl} EMA keeps no flat buffers")
        return self._flat.buffers

    @torch.no_grad()
    def __call__(self, m, one_minus_m) -> None:
        m, one_minus_m = _fp32(m), _fp32(one_minus_m)
        t, s = self.t_params, self.s_params
        if self.sharded:
            from .parallel import local_list
            t, s = local_list(t), local_list(s)
        if self.impl == "reference":
            ema_reference(t, s, m, one_minus_m)
        elif self.impl == "foreach":
            ema_foreach(t, s, m, one_minus_m)
        else:
            self._flat(m, one_minus_m)
