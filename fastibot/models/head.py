"""The iBOT projection head.

A 3-layer MLP (GELU, hidden 2048) to an l2-normalised 256-d bottleneck, then a
weight-normalised linear layer to K prototypes. The MLP is always shared by
[CLS] and patch tokens; ``shared_head`` decides whether the last layer is too.
Parameter names follow the official implementation (``mlp.*``,
``last_layer.weight_g``, ``last_layer.weight_v``, ``last_layer2.*``) so
official checkpoints load.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import trunc_normal_


class WeightNormLinear(nn.Module):
    """Linear layer without bias whose rows are ``g * v / ||v||`` (weight normalisation)."""

    def __init__(self, in_dim: int, out_dim: int, fix_gain: bool):
        super().__init__()
        self.weight_v = nn.Parameter(torch.empty(out_dim, in_dim))
        self.weight_g = nn.Parameter(torch.ones(out_dim, 1), requires_grad=not fix_gain)
        trunc_normal_(self.weight_v, std=0.02)

    @property
    def out_features(self) -> int:
        return self.weight_v.shape[0]

    def weight(self) -> torch.Tensor:
        return self.weight_g * self.weight_v / self.weight_v.norm(dim=1, keepdim=True)  # (K, bottleneck)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight())


class IBOTHead(nn.Module):
    def __init__(self, in_dim: int, out_dim: int, patch_out_dim: int, hidden_dim: int = 2048,
                 bottleneck_dim: int = 256, nlayers: int = 3, norm_last_layer: bool = True,
                 shared_head: bool = True):
        super().__init__()
        nlayers = max(nlayers, 1)
        if nlayers == 1:
            layers = [nn.Linear(in_dim, bottleneck_dim)]
        else:
            layers = [nn.Linear(in_dim, hidden_dim), nn.GELU()]
            for _ in range(nlayers - 2):
                layers += [nn.Linear(hidden_dim, hidden_dim), nn.GELU()]
            layers.append(nn.Linear(hidden_dim, bottleneck_dim))
        self.mlp = nn.Sequential(*layers)
        self.apply(self._init_weights)
        self.last_layer = WeightNormLinear(bottleneck_dim, out_dim, fix_gain=norm_last_layer)
        self.shared_head = shared_head
        if not shared_head:
            self.last_layer2 = WeightNormLinear(bottleneck_dim, patch_out_dim, fix_gain=norm_last_layer)

    @staticmethod
    def _init_weights(m):
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """MLP and l2 normalisation: (..., D) -> (..., bottleneck)."""
        return F.normalize(self.mlp(x), dim=-1, p=2)

    def cls_logits(self, z: torch.Tensor) -> torch.Tensor:
        return self.last_layer(z)

    def patch_logits(self, z: torch.Tensor) -> torch.Tensor:
        return self.last_layer(z) if self.shared_head else self.last_layer2(z)

    def forward(self, tokens: torch.Tensor):
        """(B, 1+N, D) tokens -> ([CLS] logits (B, K), patch logits (B, N, K))."""
        z = self.embed(tokens)
        return self.cls_logits(z[:, 0]), self.patch_logits(z[:, 1:])
