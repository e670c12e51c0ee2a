"""The iBOT loss: the eager reference (ground truth) and the dispatch to fused kernels.

Notation: B images per process, G global crops, V = G + L crops, K prototypes,
N patches per global crop, R masked-patch rows (``fastibot.data.batch``).
Teacher targets q = softmax((t - c) / τt); student log-probabilities
log p = log_softmax(s / τs).

- [CLS] loss: mean over all pairs (teacher global g, student crop v, v != g) of
  the batch mean of -Σ_k q_g log p_v (2·V - 2 = 22 pairs for G=2, L=10).
- Patch loss (same view only): per image, Σ over masked patches of
  -Σ_k q log p divided by max(#masked, 1); mean over images (unmasked images
  count 0); mean over the G globals. Over the R rows of a batch that is
  Σ_r w_r · CE_r with w_r = 1 / (G·B·#masked of the row's image), 0 on padding.
- loss = λ1·cls + λ2·patch, returned as named terms {"cls": λ1·cls, "patch": λ2·patch}.

:func:`ibot_terms` is the one entry point. Patch logits arrive either as the R
masked rows ``(R, K)`` (the packed model) or dense ``(G*B, N, K)`` (the
official computation, ``model.packed=false``, the test oracle); ``impl``
picks the eager reference or the fused Triton kernels of
``fastibot.kernels.distill_ce``. Temperatures may be floats or 0-d tensors
(the trainer's device schedules). The references compute in fp32, or in the
inputs' dtype when that is float64 (the parity tests' oracle).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Tuple

import torch
import torch.nn.functional as F

IMPLS = ("reference", "triton")


def _acc(x: torch.Tensor) -> torch.Tensor:
    """fp32 for bf16/fp16/fp32 inputs; float64 stays float64."""
    return x if x.dtype == torch.float64 else x.float()


def cls_loss_reference(student_cls: torch.Tensor, teacher_cls: torch.Tensor, center_cls: torch.Tensor, *,
                       n_global: int, teacher_temp, student_temp: float = 0.1) -> torch.Tensor:
    """Mean over (g, v != g) pairs of the batch-mean cross-entropy; the official double loop."""
    b = teacher_cls.shape[0] // n_global
    n_crops = student_cls.shape[0] // b
    s = (_acc(student_cls) / student_temp).chunk(n_crops)
    q = F.softmax((_acc(teacher_cls) - _acc(center_cls)) / teacher_temp, dim=-1).chunk(n_global)
    total, pairs = 0.0, 0
    for g in range(n_global):
        for v in range(n_crops):
            if v == g:
                continue
            total = total + torch.sum(-q[g] * F.log_softmax(s[v], dim=-1), dim=-1).mean()
            pairs += 1
    return total / max(pairs, 1)


def patch_loss_reference(student_patch: torch.Tensor, teacher_patch: torch.Tensor, masks: torch.Tensor,
                         center_patch: torch.Tensor, *, n_global: int, teacher_temp,
                         student_temp: float = 0.1) -> torch.Tensor:
    """Dense (G*B, N, K) logits and (G*B, N) masks; the official per-view masked mean."""
    s = (_acc(student_patch) / student_temp).chunk(n_global)
    q = F.softmax((_acc(teacher_patch) - _acc(center_patch)) / teacher_temp, dim=-1).chunk(n_global)
    m = masks.reshape(masks.shape[0], -1).to(s[0].dtype).chunk(n_global)
    total = 0.0
    for g in range(n_global):
        ce = torch.sum(-q[g] * F.log_softmax(s[g], dim=-1), dim=-1)  # (B, N)
        total = total + (torch.sum(ce * m[g], dim=-1) / m[g].sum(dim=-1).clamp(min=1.0)).mean()
    return total / n_global


def weighted_ce_reference(student: torch.Tensor, teacher: torch.Tensor, weight: torch.Tensor,
                          center: torch.Tensor, *, teacher_temp, student_temp: float = 0.1) -> torch.Tensor:
    """Σ_m w_m · (-Σ_k softmax((t_m - c)/τt)_k log_softmax(s_m/τs)_k) over rows m of (M, K)."""
    if student.shape[0] == 0:
        return _acc(student).sum() * 0.0
    q = F.softmax((_acc(teacher) - _acc(center)) / teacher_temp, dim=-1)
    ce = torch.sum(-q * F.log_softmax(_acc(student) / student_temp, dim=-1), dim=-1)
    return (ce * weight.to(ce.dtype)).sum()


@dataclass(frozen=True)
class LossSpec:
    """The loss settings that stay fixed for a run (from ``ibot.*`` and ``kernels.loss``)."""

    n_global: int = 2
    student_temp: float = 0.1
    lambda1: float = 1.0
    lambda2: float = 1.0
    impl: str = "reference"

    def __post_init__(self):
        if self.impl not in IMPLS:
            raise ValueError(f"loss impl must be one of {IMPLS}, not {self.impl!r}")

    @classmethod
    def from_config(cls, cfg, impl: str) -> "LossSpec":
        return cls(cfg.crops.n_global, cfg.ibot.student_temp, cfg.ibot.lambda1, cfg.ibot.lambda2, impl)


def cls_term(spec: LossSpec, student_cls, teacher_cls, center_cls, teacher_temp) -> Tuple[torch.Tensor, torch.Tensor]:
    """([CLS] loss, batch mean of the raw teacher [CLS] logits (K,), the [CLS] center's statistic)."""
    if spec.impl == "triton":
        from .kernels.distill_ce import cls_distill_loss
        loss, colsum = cls_distill_loss(student_cls, teacher_cls, center_cls, n_global=spec.n_global,
                                        teacher_temp=teacher_temp, student_temp=spec.student_temp,
                                        return_colsum=True)
        return loss, colsum / max(teacher_cls.shape[0], 1)
    loss = cls_loss_reference(student_cls, teacher_cls, center_cls, n_global=spec.n_global,
                              teacher_temp=teacher_temp, student_temp=spec.student_temp)
    return loss, teacher_cls.detach().mean(0, dtype=torch.float32)  # fp32 accumulation, no fp32 copy


def patch_term(spec: LossSpec, student_patch, teacher_patch, masks, rows, row_weight, center_patch,
               teacher_temp) -> torch.Tensor:
    """Masked-patch loss from R rows (R, K), or from dense (G*B, N, K) logits."""
    if student_patch.dim() == 3:
        if spec.impl == "reference":  # the official computation
            return patch_loss_reference(student_patch, teacher_patch, masks, center_patch, n_global=spec.n_global,
                                        teacher_temp=teacher_temp, student_temp=spec.student_temp)
        k = student_patch.shape[-1]
        student_patch, teacher_patch = student_patch.reshape(-1, k)[rows], teacher_patch.reshape(-1, k)[rows]
    if spec.impl == "triton":
        from .kernels.distill_ce import distill_ce
        return distill_ce(student_patch, teacher_patch, row_weight, center_patch, teacher_temp=teacher_temp,
                          student_temp=spec.student_temp)
    return weighted_ce_reference(student_patch, teacher_patch, row_weight, center_patch, teacher_temp=teacher_temp,
                                 student_temp=spec.student_temp)


def ibot_terms(spec: LossSpec, student, teacher, masks, rows, row_weight, center_cls, center_patch,
               teacher_temp, teacher_patch_temp) -> Tuple[Dict[str, torch.Tensor], torch.Tensor]:
    """The iBOT loss as named, λ-weighted terms, and the [CLS] center statistic (K,).

    student: ``StudentOut`` (cls (V*B, K) crop-major; patch (R, K) rows or dense (G*B, N, K));
    teacher: ``TeacherOut`` (cls (G*B, K); patch like the student's); masks (G*B, N) bool;
    rows (R,), row_weight (R,) from ``fastibot.data.batch``; centers (1, K) or (K,).
    A new term is one more entry here; the trainer sums and logs the terms by name.
    """
    cls, cls_mean = cls_term(spec, student.cls, teacher.cls, center_cls, teacher_temp)
    patch = patch_term(spec, student.patch, teacher.patch, masks, rows, row_weight, center_patch, teacher_patch_temp)
    return {"cls": spec.lambda1 * cls, "patch": spec.lambda2 * patch}, cls_mean
