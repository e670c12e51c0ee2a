"""The iBOT loss: the eager reference (ground truth) and the dispatch to fused kernels.

Notation: B images per process, G global crops, V = G + L crops, K prototypes,
N patches per global crop. Teacher targets q = softmax((t - c) / τt); student
log-probabilities log p = log_softmax(s / τs).

- [CLS] loss: mean over all pairs (teacher global g, student crop v, v != g) of
  the batch mean of -Σ_k q_g log p_v (2·V - 2 = 22 pairs for G=2, L=10).
- Patch loss (same view only): per image, Σ over masked patches of
  -Σ_k q log p divided by max(#masked, 1); mean over images (unmasked images
  count 0); mean over the G globals.
- loss = λ1·cls + λ2·patch.

:func:`ibot_loss` takes dense patch logits ``(G*B, N, K)`` as the official
code does; :func:`ibot_loss_rows` takes only the masked rows ``(M, K)`` with
per-row weights (``data.masking.mask_rows``), which is what the packed model
produces. Both compute the same numbers. ``impl="triton"`` runs the fused
kernels of ``fastibot.kernels.distill_ce``.
"""
from __future__ import annotations

from typing import Dict

import torch
import torch.nn.functional as F

IMPLS = ("reference", "triton")


def _check_impl(impl: str) -> None:
    if impl not in IMPLS:
        raise ValueError(f"loss impl must be one of {IMPLS}, not {impl!r}")


def cls_loss_reference(student_cls: torch.Tensor, teacher_cls: torch.Tensor, center_cls: torch.Tensor, *,
                       n_global: int, teacher_temp: float, student_temp: float = 0.1) -> torch.Tensor:
    """Mean over (g, v != g) pairs of the batch-mean cross-entropy; the official double loop."""
    b = teacher_cls.shape[0] // n_global
    n_crops = student_cls.shape[0] // b
    s = (student_cls.float() / student_temp).chunk(n_crops)
    q = F.softmax((teacher_cls.float() - center_cls.float()) / teacher_temp, dim=-1).chunk(n_global)
    total, pairs = student_cls.new_zeros((), dtype=torch.float32), 0
    for g in range(n_global):
        for v in range(n_crops):
            if v == g:
                continue
            total = total + torch.sum(-q[g] * F.log_softmax(s[v], dim=-1), dim=-1).mean()
            pairs += 1
    return total / max(pairs, 1)


def patch_loss_reference(student_patch: torch.Tensor, teacher_patch: torch.Tensor, masks: torch.Tensor,
                         center_patch: torch.Tensor, *, n_global: int, teacher_temp: float,
                         student_temp: float = 0.1) -> torch.Tensor:
    """Dense (G*B, N, K) logits and (G*B, N) masks; the official per-view masked mean."""
    s = (student_patch.float() / student_temp).chunk(n_global)
    q = F.softmax((teacher_patch.float() - center_patch.float()) / teacher_temp, dim=-1).chunk(n_global)
    m = masks.reshape(masks.shape[0], -1).float().chunk(n_global)
    total = student_patch.new_zeros((), dtype=torch.float32)
    for g in range(n_global):
        ce = torch.sum(-q[g] * F.log_softmax(s[g], dim=-1), dim=-1)  # (B, N)
        total = total + (torch.sum(ce * m[g], dim=-1) / m[g].sum(dim=-1).clamp(min=1.0)).mean()
    return total / n_global


def weighted_ce_reference(student: torch.Tensor, teacher: torch.Tensor, weight: torch.Tensor,
                          center: torch.Tensor, *, teacher_temp: float, student_temp: float = 0.1) -> torch.Tensor:
    """Σ_m w_m · (-Σ_k softmax((t_m - c)/τt)_k log_softmax(s_m/τs)_k) over rows m of (M, K)."""
    if student.shape[0] == 0:
        return student.float().sum() * 0.0
    q = F.softmax((teacher.float() - center.float()) / teacher_temp, dim=-1)
    ce = torch.sum(-q * F.log_softmax(student.float() / student_temp, dim=-1), dim=-1)
    return (ce * weight.float()).sum()


def _total(cls: torch.Tensor, patch: torch.Tensor, lambda1: float, lambda2: float, **stats) -> Dict[str, torch.Tensor]:
    """λ-weighted terms; ``stats`` are the teacher means (no grad) the center update reads."""
    cls, patch = cls * lambda1, patch * lambda2
    return {"loss": cls + patch, "cls": cls, "patch": patch, **stats}


def _cls(impl, student_cls, teacher_cls, center_cls, n_global, teacher_temp, student_temp):
    """([CLS] loss, batch mean of the raw teacher [CLS] logits (K,) for the center)."""
    if impl == "triton":
        from .kernels.distill_ce import cls_distill_loss
        loss, colsum = cls_distill_loss(student_cls, teacher_cls, center_cls, n_global=n_global,
                                        teacher_temp=teacher_temp, student_temp=student_temp, return_colsum=True)
        return loss, colsum / max(teacher_cls.shape[0], 1)
    loss = cls_loss_reference(student_cls, teacher_cls, center_cls, n_global=n_global,
                              teacher_temp=teacher_temp, student_temp=student_temp)
    return loss, teacher_cls.detach().mean(0, dtype=torch.float32)  # fp32 accumulation, no fp32 copy


def ibot_loss(student_cls, student_patch, teacher_cls, teacher_patch, masks, center_cls, center_patch, *,
              n_global: int, teacher_temp: float, teacher_patch_temp: float, student_temp: float = 0.1,
              lambda1: float = 1.0, lambda2: float = 1.0, impl: str = "reference") -> Dict[str, torch.Tensor]:
    """iBOT loss from dense outputs.

    student_cls (V*B, K) crop-major; student_patch (G*B, N, K); teacher_cls (G*B, K);
    teacher_patch (G*B, N, K); masks (G*B, N) bool; centers (1, K) or (K,).
    Returns {"loss", "cls", "patch"} (fp32 scalars, λ-weighted) and "teacher_cls_mean" (K,).
    """
    _check_impl(impl)
    cls, cls_mean = _cls(impl, student_cls, teacher_cls, center_cls, n_global, teacher_temp, student_temp)
    if impl == "reference":
        patch = patch_loss_reference(student_patch, teacher_patch, masks, center_patch, n_global=n_global,
                                     teacher_temp=teacher_patch_temp, student_temp=student_temp)
    else:
        from .data.masking import mask_rows
        index, weight = mask_rows(masks.reshape(masks.shape[0], -1), n_global)
        k = student_patch.shape[-1]
        patch = _rows(impl, student_patch.reshape(-1, k)[index], teacher_patch.reshape(-1, k)[index],
                      weight.to(student_patch.device), center_patch, teacher_patch_temp, student_temp)
    return _total(cls, patch, lambda1, lambda2, teacher_cls_mean=cls_mean)


def _rows(impl, student_rows, teacher_rows, row_weight, center_patch, teacher_temp, student_temp):
    if impl == "triton":
        from .kernels.distill_ce import distill_ce
        return distill_ce(student_rows, teacher_rows, row_weight, center_patch, teacher_temp=teacher_temp,
                          student_temp=student_temp)
    return weighted_ce_reference(student_rows, teacher_rows, row_weight, center_patch,
                                 teacher_temp=teacher_temp, student_temp=student_temp)


def ibot_loss_rows(student_cls, student_rows, teacher_cls, teacher_rows, row_weight, center_cls, center_patch, *,
                   n_global: int, teacher_temp: float, teacher_patch_temp: float, student_temp: float = 0.1,
                   lambda1: float = 1.0, lambda2: float = 1.0, impl: str = "reference") -> Dict[str, torch.Tensor]:
    """iBOT loss from packed outputs: patch logits only at the M masked positions.

    student_rows, teacher_rows (M, K); row_weight (M,) = 1 / (G·B·#masked of the row's image).
    Also returns "teacher_cls_mean" (K,) for the [CLS] center (the patch center's comes from the teacher).
    """
    _check_impl(impl)
    cls, cls_mean = _cls(impl, student_cls, teacher_cls, center_cls, n_global, teacher_temp, student_temp)
    patch = _rows(impl, student_rows, teacher_rows, row_weight, center_patch, teacher_patch_temp, student_temp)
    return _total(cls, patch, lambda1, lambda2, teacher_cls_mean=cls_mean)
