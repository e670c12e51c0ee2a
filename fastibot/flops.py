"""Analytic FLOPs of one iBOT training step (multiply-add = 2 FLOPs).

Per transformer layer over n tokens of width D: qkv, projection and MLP are
24·n·D², attention scores and values 4·n²·D. The head costs
2·(D·H + H·H + H·b) per token for its MLP and 2·b·K for its last layer.
The student's backward is counted as twice its forward. For the recipe
(ViT-S/16, 2×224 + 10×96, K = 8192) this gives 161 GFLOP per image with heads
on every token (the official computation) and about 125 with heads on [CLS]
and masked tokens only.
"""
from __future__ import annotations

from .models.vit import ARCHS


def backbone_flops(arch: str, patch: int, size: int, depth: int = 0) -> float:
    spec = ARCHS[arch]
    d, depth = spec["embed_dim"], depth or spec["depth"]
    n_patch = (size // patch) ** 2
    n = n_patch + 1
    return depth * (24.0 * n * d * d + 4.0 * n * n * d) + 2.0 * n_patch * 3 * patch * patch * d


def head_flops(cfg, tokens: float, last_layer: bool = True) -> float:
    m = cfg.model
    d = ARCHS[m.arch]["embed_dim"]
    h, b = m.head_hidden_dim, m.head_bottleneck_dim
    mlp = 2.0 * (d * h + h * h * max(m.head_layers - 2, 0) + h * b) if m.head_layers > 1 else 2.0 * d * b
    return tokens * (mlp + (2.0 * b * m.out_dim if last_layer else 0.0))


def step_flops_per_image(cfg, masked_per_global: float) -> float:
    """FLOPs per image of one step; ``masked_per_global`` = mean masked patches per global crop."""
    m, c = cfg.model, cfg.crops
    g_tokens = (c.global_size // m.patch_size) ** 2 + 1
    l_tokens = (c.local_size // m.patch_size) ** 2 + 1
    g_bb = backbone_flops(m.arch, m.patch_size, c.global_size, m.depth)
    l_bb = backbone_flops(m.arch, m.patch_size, c.local_size, m.depth)
    if m.packed_forward():
        t_heads = head_flops(cfg, c.n_global * (1 + masked_per_global))
        if cfg.ibot.patch_center == "all":  # the teacher MLP also runs on every patch for the center
            t_heads += head_flops(cfg, c.n_global * (g_tokens - 1 - masked_per_global), last_layer=False)
        s_heads = head_flops(cfg, c.n_global * (1 + masked_per_global) + c.n_local)
    else:
        t_heads = head_flops(cfg, c.n_global * g_tokens)
        s_heads = head_flops(cfg, c.n_global * g_tokens + c.n_local * l_tokens)
    teacher = c.n_global * g_bb + t_heads
    student = c.n_global * g_bb + c.n_local * l_bb + s_heads
    return teacher + 3.0 * student
