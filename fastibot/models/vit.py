"""Vision Transformer with iBOT's masked-patch input and packed multi-crop forward.

Parameter names match timm's ``VisionTransformer`` (``patch_embed.proj``,
``cls_token``, ``pos_embed``, ``blocks.i.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}``,
``norm``), so ``models.backbones.timm_state_dict`` is a plain filter. The one extra
parameter is ``masked_embed``, the learned token that replaces masked patch
embeddings before the position embedding is added.

Two ways in:

- dense: ``forward_features(x, mask)``, a batch of equal-size crops ``(B, 3, H, W)``.
- packed: ``forward_packed([crops_a, crops_b, ...], [mask_a, None, ...])``: every
  crop of every size in one token batch ``(T, D)``; linear layers, norms and MLPs
  see all tokens at once, attention is block-diagonal (``attention.PackedLayout``).
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import Mlp, trunc_normal_
from torch.utils.checkpoint import checkpoint

from .attention import PackedLayout, attention_qkv
from .keep import residual_add

ARCHS = {
    "vit_tiny": dict(embed_dim=192, depth=12, num_heads=3),
    "vit_small": dict(embed_dim=384, depth=12, num_heads=6),
    "vit_base": dict(embed_dim=768, depth=12, num_heads=12),
    "vit_large": dict(embed_dim=1024, depth=24, num_heads=16),
}
POS_EMBED_RESIZE = ("official", "exact")  # model.pos_embed_resize, see VisionTransformer.pos_embed_for
TIMM_NAMES = {"vit_tiny": "vit_tiny_patch{p}_224", "vit_small": "vit_small_patch{p}_224",
              "vit_base": "vit_base_patch{p}_224", "vit_large": "vit_large_patch{p}_224"}


def drop_path(x: torch.Tensor, p: float, training: bool, layout: Optional[PackedLayout]) -> torch.Tensor:
    """Stochastic depth: drop a whole sample's residual branch (per sequence when packed)."""
    if p == 0.0 or not training:
        return x
    keep = 1.0 - p
    if layout is None:
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
    else:
        # one draw per sequence, broadcast over its tokens; shapes come from the layout's ints,
        # so torch.compile sees static shapes (no data-dependent repeat)
        mask = torch.cat([x.new_empty(n, 1).bernoulli_(keep).expand(n, length).reshape(n * length)
                          for n, length in layout.groups if n])[:, None]
    return x * mask.div_(keep)


def init_weights(m: nn.Module) -> None:
    """Linear: truncated normal (std 0.02), zero bias; LayerNorm: one and zero (the ViT and Swin recipe)."""
    if isinstance(m, nn.Linear):
        trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.backend = "sdpa"

    def forward(self, x: torch.Tensor, layout: Optional[PackedLayout] = None) -> torch.Tensor:
        lead = x.shape[:-1]  # (B, N) dense or (T,) packed
        qkv = self.qkv(x).view(*lead, 3, self.num_heads, self.head_dim)
        out = attention_qkv(qkv, self.backend, layout)  # (..., H, Dh)
        return self.proj(out.reshape(*lead, -1))

    def attention_probs(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, D) -> softmax attention weights (B, H, N, N), for attention maps."""
        b, n, _ = x.shape
        q, k, _ = self.qkv(x).view(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        return torch.softmax((q.float() * self.head_dim ** -0.5) @ k.float().transpose(-2, -1), dim=-1)


class Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, drop_path: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU)
        self.drop_path = drop_path

    def forward(self, x: torch.Tensor, layout: Optional[PackedLayout] = None) -> torch.Tensor:
        x = residual_add(x, drop_path(self.attn(self.norm1(x), layout), self.drop_path, self.training, layout))
        return residual_add(x, drop_path(self.mlp(self.norm2(x)), self.drop_path, self.training, layout))


class PatchEmbed(nn.Module):
    """Non-overlapping p×p patches to D features. The weight is timm's ``Conv2d`` (D, 3, p, p); the
    forward is one matmul over unfolded patches (``IMPL = "matmul"``) or the strided convolution."""

    IMPL = "matmul"

    def __init__(self, patch_size: int, embed_dim: int):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(3, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.IMPL == "conv":
            return self.proj(x).flatten(2).transpose(1, 2)  # (B, N, D)
        b, c, h, w = x.shape
        p = self.patch_size
        # (B, C, gh, p, gw, p) -> (B, gh, gw, C, p, p): each patch's pixels in the conv weight's order
        patches = x.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5).reshape(b, -1, c * p * p)
        return F.linear(patches, self.proj.weight.reshape(self.proj.out_channels, -1), self.proj.bias)


class VisionTransformer(nn.Module):
    def __init__(self, arch: str = "vit_small", patch_size: int = 16, img_size: int = 224,
                 drop_path_rate: float = 0.0, mlp_ratio: float = 4.0, depth: int = 0,
                 pos_embed_resize: str = "official"):
        super().__init__()
        if arch not in ARCHS:
            raise ValueError(f"unknown arch {arch!r} (one of {', '.join(ARCHS)})")
        if pos_embed_resize not in POS_EMBED_RESIZE:
            raise ValueError(f"model.pos_embed_resize: {pos_embed_resize!r} is not one of "
                             f"{', '.join(POS_EMBED_RESIZE)}")
        self.pos_embed_resize = pos_embed_resize
        spec = ARCHS[arch]
        self.arch, self.patch_size = arch, patch_size
        self.embed_dim, self.num_heads = spec["embed_dim"], spec["num_heads"]
        dim, depth = spec["embed_dim"], depth or spec["depth"]
        self.grid = img_size // patch_size
        self.patch_embed = PatchEmbed(patch_size, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.grid ** 2, dim))
        self.masked_embed = nn.Parameter(torch.zeros(1, dim))
        dpr = [x.item() for x in torch.linspace(0, drop_path_rate, depth)]
        self.blocks = nn.ModuleList([Block(dim, spec["num_heads"], mlp_ratio, dpr[i]) for i in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.recompute = 0  # the first `recompute` blocks recompute their activations in backward
        trunc_normal_(self.pos_embed, std=0.02)
        trunc_normal_(self.cls_token, std=0.02)
        self.apply(init_weights)

    def set_attention_backend(self, backend: str) -> None:
        for blk in self.blocks:
            blk.attn.backend = backend

    def set_recompute(self, n: int) -> None:
        """The first ``n`` blocks recompute their activations in the backward instead of keeping them
        (activation checkpointing, drop-path draws replayed); compiled, the recompute is part of the graph."""
        self.recompute = n

    def _run_blocks(self, t: torch.Tensor, layout: Optional[PackedLayout] = None) -> torch.Tensor:
        for i, blk in enumerate(self.blocks):
            if i < self.recompute and torch.is_grad_enabled():
                t = checkpoint(blk, t, layout, use_reentrant=False)
            else:
                t = blk(t, layout)
        return t

    # ----------------------------------------------------------------- tokens

    def pos_embed_for(self, h: int, w: int) -> torch.Tensor:
        """Position embedding (1, 1 + h·w, D) for an (h, w) patch grid (h rows), resampled bicubically
        from the trained (grid, grid) one.

        ``official`` (the iBOT/DINO ViT): ``F.interpolate`` with scale factors ``((h + 0.1) / grid,
        (w + 0.1) / grid)``. The output is still h × w (the 0.1 keeps the floor of ``grid · scale``
        from landing on h - 1), but PyTorch samples with the scale as given, so source positions
        step by grid / (h + 0.1), not grid / h (for 96-px crops, 6 × 6 from 14 × 14, the sample
        points move by up to 0.2 of a trained-grid cell). ``exact``: ``size=(h, w)``, the source
        grid mapped exactly onto the target. Both run in the parameter's dtype (fp32 in training,
        float64 in float64 tests; half types go through fp32), as the official code does.
        """
        if h == self.grid and w == self.grid:
            return self.pos_embed
        cls_pos, patch_pos = self.pos_embed[:, :1], self.pos_embed[:, 1:]
        dim = patch_pos.shape[-1]
        dtype = torch.promote_types(patch_pos.dtype, torch.float32)
        # (1, N, D) row-major -> (1, D, grid rows, grid cols): dim 2 is resampled to h, dim 3 to w
        grid = patch_pos.to(dtype).reshape(1, self.grid, self.grid, dim).permute(0, 3, 1, 2)
        if self.pos_embed_resize == "official":
            scale = ((h + 0.1) / self.grid, (w + 0.1) / self.grid)
            grid = F.interpolate(grid, scale_factor=scale, mode="bicubic", align_corners=False)
        else:
            grid = F.interpolate(grid, size=(h, w), mode="bicubic", align_corners=False)
        if grid.shape[-2:] != (h, w):  # cannot happen for grids of practical size; never reshape silently
            raise RuntimeError(f"position-embedding resize gave {tuple(grid.shape[-2:])}, not {(h, w)}")
        patch_pos = grid.permute(0, 2, 3, 1).reshape(1, h * w, dim).to(self.pos_embed.dtype)
        return torch.cat([cls_pos, patch_pos], dim=1)

    def prepare_tokens(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(B, 3, H, W) images, (B, N) bool mask -> (B, 1+N, D) tokens with position embedding."""
        b, _, h, w = x.shape
        gh, gw = h // self.patch_size, w // self.patch_size
        t = self.patch_embed(x)  # (B, N, D)
        if mask is not None:
            t = torch.where(mask.reshape(b, -1, 1), self.masked_embed.to(t.dtype), t)
        t = torch.cat([self.cls_token.expand(b, -1, -1).to(t.dtype), t], dim=1)
        return t + self.pos_embed_for(gh, gw).to(t.dtype)

    # ---------------------------------------------------------------- forward

    def forward_features(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Dense forward: (B, 3, H, W) -> normalised tokens (B, 1+N, D)."""
        return self.norm(self._run_blocks(self.prepare_tokens(x, mask)))

    def forward_packed(self, crops: Sequence[torch.Tensor], masks: Sequence[Optional[torch.Tensor]],
                       normed: bool = True) -> Tuple[torch.Tensor, PackedLayout]:
        """Packed forward over groups of equal-size crops.

        crops[i]: (n_i, 3, H_i, W_i); masks[i]: (n_i, N_i) bool or None.
        Returns tokens (sum_i n_i (1 + N_i), D) in group order, normalised unless ``normed=False`` (a caller
        that keeps a few rows applies ``self.norm`` to those only), and the layout.
        """
        parts, groups = [], []
        for x, m in zip(crops, masks):
            t = self.prepare_tokens(x, m)  # (n, 1+N, D)
            groups.append((t.shape[0], t.shape[1]))
            parts.append(t.reshape(-1, t.shape[-1]))
        layout = PackedLayout(tuple(groups))
        t = torch.cat(parts, 0) if len(parts) > 1 else parts[0]
        t = self._run_blocks(t, layout)
        return (self.norm(t) if normed else t), layout

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """[CLS] features, (B, D)."""
        return self.forward_features(x, mask)[:, 0]

    def get_intermediate_layers(self, x: torch.Tensor, n: int = 1) -> List[torch.Tensor]:
        """Normalised tokens of the last ``n`` blocks, each (B, 1+N, D)."""
        if not 1 <= n <= len(self.blocks):
            raise ValueError(f"n_last_blocks={n}: this backbone has {len(self.blocks)} blocks")
        t = self.prepare_tokens(x)
        out = []
        for i, blk in enumerate(self.blocks):
            t = blk(t)
            if i >= len(self.blocks) - n:
                out.append(self.norm(t))
        return out

    def last_self_attention(self, x: torch.Tensor) -> torch.Tensor:
        """Attention weights of the last block, (B, H, 1+N, 1+N)."""
        t = self.prepare_tokens(x)
        for blk in self.blocks[:-1]:
            t = blk(t)
        return self.blocks[-1].attn.attention_probs(self.blocks[-1].norm1(t))


def timm_model_name(arch: str, patch_size: int) -> str:
    return TIMM_NAMES[arch].format(p=patch_size)


def timm_create_kwargs(arch: str, patch_size: int, img_size: int, depth: int = 0) -> tuple:
    """(timm model name, extra create_model kwargs) that rebuild this backbone's shapes."""
    import timm

    name, kwargs = timm_model_name(arch, patch_size), {}
    if name not in timm.list_models(name):
        name, kwargs = timm_model_name(arch, 16), {"patch_size": patch_size}
    if img_size != 224:
        kwargs["img_size"] = img_size
    if depth and depth != ARCHS[arch]["depth"]:
        kwargs["depth"] = depth
    return name, kwargs
