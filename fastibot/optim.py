"""The update half of a step, on device tensors only (so a CUDA graph can capture it).

- :class:`GradBuffer` (several processes): every gradient is a view into one flat fp32 buffer; one fill
  zeroes them, one all-reduce averages them over processes (with a slot that carries "this rank's loss
  was not finite", so every rank takes the same skip decision).
- :class:`LocalGrads` (one process): the gradients autograd makes, kept as they come.
- :func:`clip_`: per-parameter (official) or global norm clipping; returns the total norm.
- :class:`LossScaler`: fp16 loss scaling with the scale, its growth tracker and the overflow check on
  the device.
- :class:`IBOTAdamW`: PyTorch's fused AdamW (``capturable``, tensor learning rate). Decoupled weight
  decay θ ← θ·(1 - lr·wd) is applied here from device tensors (the schedule changes wd every step,
  which the fused kernel only takes as a Python float). The last head layer has its own fused
  instance, so that while it is frozen it is skipped exactly as the official code skips it (no
  update, no decay, no step count) by a device flag instead of ``p.grad = None``.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn as nn

from .parallel import local_list


class GradBuffer:
    """Flat fp32 gradient storage for ``params`` (+1 slot for a flag reduced with them)."""

    def __init__(self, params: List[nn.Parameter]):
        self.params = params
        n = sum(p.numel() for p in params)
        self.flat = torch.zeros(n + 1, dtype=torch.float32, device=params[0].device)
        offset = 0
        for p in params:
            if p.dtype != torch.float32:
                raise ValueError("the flat gradient buffer holds fp32 parameters only")
            p.grad = self.flat[offset: offset + p.numel()].view_as(p)  # autograd accumulates into it in place
            offset += p.numel()
        self.flag = self.flat[n:]  # (1,)

    @property
    def grads(self) -> List[torch.Tensor]:
        return [p.grad for p in self.params]

    def zero_(self) -> None:
        self.flat.zero_()

    def all_reduce_(self, local_flag: torch.Tensor) -> torch.Tensor:
        """Average gradients over processes; returns the flag summed over processes (0 when no rank set it)."""
        self.flag.copy_(local_flag.reshape(1).float())
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            world = dist.get_world_size()
            dist.all_reduce(self.flat)
            flag = self.flag.clone()
            self.flat.div_(world)
            return flag[0]
        return self.flag[0].clone()

    def reduce(self, bad_loss: torch.Tensor, scaler: Optional["LossScaler"]
               ) -> Tuple[torch.Tensor, Optional[torch.Tensor], List[torch.Tensor]]:
        """Average over processes, then unscale; returns (the loss-not-finite flag summed over processes, the
        overflow flag or None, per-parameter norms)."""
        flag = self.all_reduce_(bad_loss.float())
        found_inf = scaler.unscale_(self.grads) if scaler is not None else None
        return flag, found_inf, list(torch._foreach_norm(self.grads))


class LocalGrads:
    """One process's gradients as autograd hands them over (the interface of :class:`GradBuffer`).

    ``zero_`` drops every ``.grad``, so the first backward of a step gives each parameter the gradient
    tensor it computed instead of adding it into a zeroed buffer: per step that saves the fill and the
    add's read-read-write of every fp32 gradient (ViT-B/16: 94 M parameters, ≈ 1.5 GB of memory traffic).
    Later micro-batches add to those tensors. Under a CUDA graph the captured backward allocates them
    from the graph's pool once, and every replay writes the same memory."""

    def __init__(self, params: List[nn.Parameter]):
        self.params = params

    def zero_(self) -> None:
        for p in self.params:
            p.grad = None

    @property
    def grads(self) -> List[torch.Tensor]:
        for p in self.params:
            if p.grad is None:  # a parameter the forward did not reach: a zero gradient, as the flat buffer has
                p.grad = torch.zeros_like(p)
        return local_list(p.grad for p in self.params)

    def reduce(self, bad_loss: torch.Tensor, scaler: Optional["LossScaler"]
               ) -> Tuple[torch.Tensor, Optional[torch.Tensor], List[torch.Tensor]]:
        """No other process: (the loss-not-finite flag as 0/1, the overflow flag or None, per-parameter norms)."""
        grads = self.grads
        found_inf = scaler.unscale_(grads) if scaler is not None else None
        return bad_loss.float(), found_inf, list(torch._foreach_norm(grads))


class ShardedGrads(LocalGrads):
    """The gradients of sharded parameters: FSDP2 reduce-scatters them into ``p.grad`` as fp32 shards (a
    present ``.grad`` would be added to, so ``zero_`` drops them too); ``grads`` are this rank's shards.
    ``reduce`` agrees the skip flag, the overflow flag and every parameter's norm over all ranks."""

    def __init__(self, params: List[nn.Parameter], replicas: int):
        super().__init__(params)
        self.replicas = replicas

    def reduce(self, bad_loss: torch.Tensor, scaler) -> Tuple[torch.Tensor, Optional[torch.Tensor], List[torch.Tensor]]:
        """One all-reduce of [local squared norm of each parameter (P,), loss-not-finite flag, overflow flag];
        returns (flag summed over ranks, overflow 0/1 or None, per-parameter norms over all shards)."""
        grads = self.grads
        found_inf = scaler.unscale_(grads) if scaler is not None else torch.zeros((), device=grads[0].device)
        sq = torch.stack(torch._foreach_norm(grads)).float().square()  # (P,) this rank's partial sums
        buf = torch.cat([sq, bad_loss.float().reshape(1), found_inf.float().reshape(1)])
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(buf)
        n = len(grads)
        # every replica group holds every element once: the world sum counts each element `replicas` times
        norms = list((buf[:n] / self.replicas).sqrt().unbind())
        overflow = (buf[n + 1] > 0).float() if scaler is not None else None
        return buf[n], overflow, norms


def clip_coefficients(norms: List[torch.Tensor], max_norm: float, mode: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """(each gradient's clip factor (P,), the total norm before clipping (0-d)) from the per-parameter norms:
    ``per_param`` scales each tensor to at most ``max_norm`` (the official rule), ``global`` the whole set;
    ``max_norm`` 0 leaves every factor at 1."""
    norms = torch.stack(norms).float()
    total = torch.linalg.vector_norm(norms)
    if max_norm > 0 and mode == "per_param":
        coef = (norms + 1e-6).reciprocal_().mul_(max_norm).clamp_max_(1.0)
    elif max_norm > 0:
        coef = (max_norm / (total + 1e-6)).clamp(max=1.0).expand(norms.shape[0])
    else:
        coef = torch.ones_like(norms)
    return coef, total


def clip_(grads: List[torch.Tensor], max_norm: float, mode: str,
          norms: Optional[List[torch.Tensor]] = None) -> torch.Tensor:
    """Clip in place by :func:`clip_coefficients`; returns the total norm before clipping (0-d, fp32).
    ``norms``: each tensor's norm when ``grads`` are shards of larger tensors (their norms come from all
    ranks); by default the norms of ``grads``."""
    if norms is None:
        norms = torch._foreach_norm(grads)  # per-parameter norms, on the device
    coef, total = clip_coefficients(list(norms), max_norm, mode)
    if max_norm > 0:
        torch._foreach_mul_(grads, list(coef.unbind()))
    return total


class LossScaler:
    """Dynamic fp16 loss scaling on the device (the rule of ``torch.amp.GradScaler``: x2 after 2000 clean
    steps, x0.5 on an overflow, the step skipped)."""

    def __init__(self, device, init_scale: float = 2.0 ** 16, growth_interval: int = 2000):
        self.scale = torch.full((), init_scale, dtype=torch.float32, device=device)
        self.growth_tracker = torch.zeros((), dtype=torch.int32, device=device)
        self.growth_interval = growth_interval

    def unscale_(self, grads: List[torch.Tensor]) -> torch.Tensor:
        """Divide gradients by the scale; returns 1.0 if any is inf/NaN (0-d fp32)."""
        found_inf = torch.zeros((), dtype=torch.float32, device=self.scale.device)
        torch._amp_foreach_non_finite_check_and_unscale_(grads, found_inf, self.scale.reciprocal())
        return found_inf

    def update(self, found_inf: torch.Tensor) -> None:
        torch._amp_update_scale_(self.scale, self.growth_tracker, found_inf, 2.0, 0.5, self.growth_interval)

    def state_dict(self) -> Dict[str, torch.Tensor]:
        return {"scale": self.scale.clone(), "growth_tracker": self.growth_tracker.clone()}

    def load_state_dict(self, state: Dict[str, torch.Tensor]) -> None:
        self.scale.copy_(state["scale"])
        self.growth_tracker.copy_(state["growth_tracker"])


def _no_decay(name: str, p: nn.Parameter) -> bool:
    return name.endswith(".bias") or p.ndim == 1


def _last_layer(name: str) -> bool:
    return "last_layer" in name


def param_groups(model: nn.Module) -> Tuple[List[nn.Parameter], ...]:
    """(decay, no_decay, last_decay, last_no_decay): no weight decay on biases and 1-D parameters (the
    official grouping); the head's last layer apart, for the freeze."""
    out = ([], [], [], [])
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        out[2 * _last_layer(name) + _no_decay(name, p)].append(p)
    return out


class IBOTAdamW:
    """AdamW for the student; ``step`` reads every hyperparameter from device tensors.

    The parameters may be FSDP2 shards (DTensors): the fused kernel runs on them as on plain tensors, and the
    weight decay here multiplies each rank's local shard.

    ``flat`` = (student flat buffer, teacher flat buffer, every student parameter (views of the first), the
    trainable ones in gradient order) makes :meth:`fused_step` available: clipping, decay, AdamW and the EMA
    in one pass (``fastibot.kernels.fused_update``). The torch optimizers then only hold the state, as views
    of that pass's flat moments and step counts, so checkpoints keep their form."""

    def __init__(self, model: nn.Module, betas=(0.9, 0.999), eps: float = 1e-8, flat=None):
        self.names = {p: n for n, p in model.named_parameters()}
        decay, no_decay, last_decay, last_no_decay = param_groups(model)
        device = (decay or no_decay)[0].device
        self.lr = torch.zeros((), dtype=torch.float32, device=device)
        self.decay = decay
        self.last_decay = last_decay

        def adamw(groups):
            groups = [g for g in groups if g]
            if not groups:
                return None
            return torch.optim.AdamW([{"params": g} for g in groups], lr=self.lr, betas=tuple(betas), eps=eps,
                                     weight_decay=0.0, fused=True, capturable=True)

        self.main = adamw([decay, no_decay])
        self.last = adamw([last_decay, last_no_decay])
        self.fused = None
        if flat is not None:
            from .kernels.fused_update import FusedUpdate
            s_flat, t_flat, every, trainable = flat
            self.trainable = list(trainable)
            self.fused = FusedUpdate(s_flat, t_flat, every, self.trainable,
                                     [not _no_decay(self.names[p], p) for p in self.trainable],
                                     [_last_layer(self.names[p]) for p in self.trainable], betas, eps)
            self._point_state(keep=False)

    @property
    def optimizers(self) -> Dict[str, torch.optim.Optimizer]:
        return {k: v for k, v in (("main", self.main), ("last", self.last)) if v is not None}

    def _point_state(self, keep: bool) -> None:
        """Make every parameter's state the fused pass's views (``keep``: copy the values held now into them)."""
        where = {id(p): k for k, p in enumerate(self.trainable)}
        for opt in self.optimizers.values():
            for group in opt.param_groups:
                for p in group["params"]:
                    step, exp_avg, exp_avg_sq = self.fused.state_views(where[id(p)])
                    old = opt.state.get(p)
                    if keep and old:
                        with torch.no_grad():
                            step.copy_(old["step"].reshape(()))
                            exp_avg.copy_(old["exp_avg"])
                            exp_avg_sq.copy_(old["exp_avg_sq"])
                    opt.state[p] = {"step": step, "exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq}

    def fused_step(self, grads: List[torch.Tensor], coef: torch.Tensor, lr: torch.Tensor, wd: torch.Tensor,
                   skip: torch.Tensor, frozen: torch.Tensor, momentum: torch.Tensor,
                   one_minus_momentum: torch.Tensor) -> None:
        """Clip (``coef``: per gradient), decay, AdamW and the teacher EMA in one pass; ``grads`` in the order
        of ``flat``'s trainable parameters; the rest 0-d device values."""
        self.fused.set_grads(grads)
        self.fused(coef, lr, wd, skip, frozen, momentum, one_minus_momentum)

    @torch.no_grad()
    def step(self, lr: torch.Tensor, wd: torch.Tensor, skip: torch.Tensor, frozen: torch.Tensor) -> None:
        """lr, wd: 0-d; skip: 0-d fp32, 1.0 = leave every parameter alone (non-finite step);
        frozen: 0-d fp32, 1.0 = leave the last head layer alone."""
        self.lr.copy_(lr)
        skip_last = torch.maximum(skip, frozen)
        for params, s in ((self.decay, skip), (self.last_decay, skip_last)):
            if params:  # decoupled decay, as AdamW applies it
                torch._foreach_mul_(local_list(params), 1.0 - lr * wd * (1.0 - s))
        for opt, s in ((self.main, skip), (self.last, skip_last)):
            if opt is not None:
                opt.found_inf = s  # the fused kernel skips the update and the step count on the device
                opt.step()

    def state_dict(self) -> dict:
        return {k: opt.state_dict() for k, opt in self.optimizers.items()}

    def init_state(self) -> None:
        """Make every parameter's AdamW state now (as the first step would: a 0-d fp32 step count and zero
        moments shaped and sharded like the parameter), so a checkpoint can be loaded into it in place."""
        for opt in self.optimizers.values():
            for group in opt.param_groups:
                for p in group["params"]:
                    if not opt.state[p]:
                        opt.state[p] = {"step": torch.zeros((), dtype=torch.float32, device=p.device),
                                        "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                                        "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format)}

    def named_state(self) -> Dict[str, Dict[str, torch.Tensor]]:
        """{parameter name: {"step", "exp_avg", "exp_avg_sq"}}: the state by name, independent of how the
        parameters are grouped or sharded (the form of sharded checkpoints)."""
        self.init_state()
        return {self.names[p]: st for opt in self.optimizers.values() for p, st in opt.state.items()}

    def named_from_state_dict(self, state: dict) -> Dict[str, Dict[str, torch.Tensor]]:
        """:meth:`named_state` of a :meth:`state_dict` (whole tensors, as a single-file checkpoint holds it):
        torch numbers parameters in the order of their groups."""
        out = {}
        for k, opt in self.optimizers.items():
            params = [p for g in opt.param_groups for p in g["params"]]
            for i, st in state[k]["state"].items():
                out[self.names[params[int(i)]]] = st
        return out

    def load_state_dict(self, state: dict) -> None:
        for k, opt in self.optimizers.items():
            opt.load_state_dict(state[k])
            for g in opt.param_groups:  # keep reading the one device lr the step writes
                g["lr"] = self.lr
        if self.fused is not None:  # the loaded tensors into the fused pass's buffers
            self._point_state(keep=True)
