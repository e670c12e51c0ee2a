"""Backbone + head, and the student/teacher forwards of one iBOT step.

Two paths that share weights and give the same loss:

- dense (``model.packed: false``, the official computation): the student runs
  the masked globals and the locals as two batches; the head runs on every
  token of every crop; the loss reads dense ``(G*B, N, K)`` patch logits.
- packed (``model.packed: true``, the default): one student pass over all
  crops (block-diagonal attention); the head runs only on the [CLS] tokens and
  the masked global patch tokens (the R fixed-size rows of
  ``fastibot.data.batch``), gathered into one ``(V*B + R, D)`` tensor. The
  teacher's patch head runs on the same R positions; when the patch center
  must average all patches (``ibot.patch_center: all``) the teacher's MLP runs
  on all its patch tokens. Because the last layer is linear, the center
  statistic is ``W · mean(z)`` over all patches or over the masked ones: no
  ``(G*B*N, K)`` tensor is ever made, and no extra pass over the ``(R, K)`` rows.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn as nn

from ..config import Config
from .backbones import build_backbone
from .head import IBOTHead
from .vit import VisionTransformer


class StudentOut(NamedTuple):
    cls: torch.Tensor  # (V*B, K) crop-major
    patch: torch.Tensor  # dense (G*B, N, K), or packed rows (R, K)


class TeacherOut(NamedTuple):
    cls: torch.Tensor  # (G*B, K)
    patch: torch.Tensor  # dense (G*B, N, K), or packed rows (R, K)
    patch_mean: torch.Tensor  # (K,) batch mean of the patch logits the center averages (fp32)


class IBOTModel(nn.Module):
    """A ViT backbone and an iBOT head. ``forward`` is the student step, ``teacher`` the teacher's."""

    def __init__(self, backbone: VisionTransformer, head: IBOTHead, packed: bool):
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.packed = packed
        self.mark = _no_mark  # benchmarks set a phase marker: called between backbone and heads

    # --------------------------------------------------------------- student

    def forward(self, globals_: torch.Tensor, masks: torch.Tensor, locals_: Optional[torch.Tensor],
                rows: torch.Tensor) -> StudentOut:
        """globals_ (G*B, 3, H, W), masks (G*B, N) bool, locals_ (L*B, 3, h, w) or None,
        rows (R,) flat indices of masked patches into G*B*N (``fastibot.data.batch``; packed path only)."""
        if self.packed:
            return self._student_packed(globals_, masks, locals_, rows)
        return self._student_dense(globals_, masks, locals_)

    def _student_dense(self, globals_, masks, locals_) -> StudentOut:
        tokens = self.backbone.forward_features(globals_, masks)
        local_tokens = None
        if locals_ is not None and locals_.shape[0] > 0:
            local_tokens = self.backbone.forward_features(locals_)
        self.mark("student forward")
        cls, patch = self.head(tokens)
        if local_tokens is not None:
            local_cls, _ = self.head(local_tokens)  # patch logits unused, as official
            cls = torch.cat([cls, local_cls], 0)
        return StudentOut(cls, patch)

    def _student_packed(self, globals_, masks, locals_, rows) -> StudentOut:
        crops, crop_masks = [globals_], [masks]
        if locals_ is not None and locals_.shape[0] > 0:
            crops.append(locals_)
            crop_masks.append(None)
        # the final LayerNorm runs on the rows the heads read only (each crop's [CLS], the masked patches)
        tokens, layout = self.backbone.forward_packed(crops, crop_masks, normed=False)  # (T, D)
        self.mark("student forward")
        # token index of every crop's [CLS]: group by group, one sequence after another (static shapes)
        cls_pos, start = [], 0
        for n, length in layout.groups:
            cls_pos.append(torch.arange(n, device=tokens.device) * length + start)
            start += n * length
        cls_pos = torch.cat(cls_pos)  # (V*B,)
        patch_pos = rows + rows.div(masks.shape[1], rounding_mode="floor") + 1  # (R,) skip each global's [CLS]
        z = self.head.embed(self.backbone.norm(tokens[torch.cat([cls_pos, patch_pos])]))  # (V*B + R, bottleneck)
        n_cls = cls_pos.shape[0]
        return StudentOut(self.head.cls_logits(z[:n_cls]), self.head.patch_logits(z[n_cls:]))

    # --------------------------------------------------------------- teacher

    @torch.no_grad()
    def teacher(self, globals_: torch.Tensor, masks: torch.Tensor, rows: torch.Tensor, row_weight: torch.Tensor,
                patch_center: str = "all") -> TeacherOut:
        """Teacher outputs on the unmasked globals (G*B, 3, H, W). Packed: patch logits at the masked
        rows (R,); the patch center averages all patches or (``patch_center: masked``) the real masked
        rows (row_weight > 0). Dense: patch logits of every token, and ``masks`` for the masked center."""
        tokens = self.backbone.forward_features(globals_)  # (G*B, 1+N, D)
        if not self.packed:
            cls, patch = self.head(tokens)  # (G*B, K), (G*B, N, K)
            if patch_center == "all":
                patch_mean = patch.float().mean(dim=(0, 1))
            else:
                w = masks.float()[..., None]
                patch_mean = (patch.float() * w).sum(dim=(0, 1)) / w.sum().clamp(min=1.0)
            return TeacherOut(cls, patch, patch_mean)
        gb, d = tokens.shape[0], tokens.shape[-1]
        if patch_center == "all":
            z = self.head.embed(tokens.reshape(-1, d)).view(gb, tokens.shape[1], -1)  # every token, one MLP pass
            z_cls, z_all = z[:, 0], z[:, 1:].reshape(-1, z.shape[-1])  # (G*B, b), (G*B*N, b)
            z_rows = z_all[rows]
            pooled = z_all.float().mean(0)
        else:
            flat = tokens[:, 1:].reshape(-1, d)  # (G*B*N, D)
            z = self.head.embed(torch.cat([tokens[:, 0], flat[rows]]))  # [CLS] and masked rows together
            z_cls, z_rows = z[:gb], z[gb:]
            valid = (row_weight > 0).float()[:, None]  # padding rows (weight 0) do not count
            pooled = (z_rows.float() * valid).sum(0) / valid.sum().clamp(min=1)
        # the last layer is linear: mean of logits = W · mean(z), no (rows, K) pass for the center
        patch_mean = self.head.patch_logits(pooled[None].to(z_rows.dtype))[0].float()
        return TeacherOut(self.head.cls_logits(z_cls), self.head.patch_logits(z_rows), patch_mean)


def _no_mark(name: str) -> None:
    return None


def build_model(cfg: Config, student: bool) -> IBOTModel:
    """Student (drop path, its own head sharing) or teacher (no drop path)."""
    m = cfg.model
    backbone = build_backbone(cfg, student)
    head = IBOTHead(backbone.embed_dim, m.out_dim, m.patch_out_dim, m.head_hidden_dim, m.head_bottleneck_dim,
                    m.head_layers, m.norm_last_layer, m.shared_head if student else m.shared_head_teacher)
    return IBOTModel(backbone, head, packed=m.packed_forward())
