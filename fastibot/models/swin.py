"""Swin Transformer backbone with iBOT's masked-patch input, built from timm's Swin layers.

Parameter names match timm's ``SwinTransformer(num_classes=0)`` (``patch_embed.{proj,norm}``,
``layers.i.downsample.{norm,reduction}``, ``layers.i.blocks.j.*``, ``norm``), so the export is a
plain filter; the one extra parameter is ``masked_embed``.

iBOT on a Swin, as the reference implementation does it:

- Masks are drawn on the final-stage grid, one cell per ``patch_size * 8`` pixels (7 x 7 for a
  224 px crop with 4 px patches), and repeated up to the patch-embedding grid (56 x 56), where
  the learned mask token replaces the (normalised) patch embeddings.
- [CLS] is the mean of the normalised final-stage tokens; the patch tokens (and the MIM loss)
  are those final-stage tokens. ``forward_features`` returns ``(B, 1 + N, D)`` with that mean
  first, the same layout a ViT gives, so heads, losses and probes do not branch on the backbone.
- Window sizes and shifts are fixed at construction for the global crop (a stage whose grid is
  no larger than the window attends over one window of the grid's size, unshifted). Smaller
  crops (96 px locals: stage grids 24, 12, 6, 3) are padded at each block to a multiple of the
  window *before* the cyclic shift, and the shifted-window mask is built for the padded map
  (timm shifts first and pads after; on maps the window tiles the two orders agree).

LayerNorms use timm's eps (1e-5) so the exported weights reproduce this backbone exactly in timm.
"""
from __future__ import annotations

import logging
from typing import List, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from timm.layers import PatchEmbed
from timm.models.swin_transformer import PatchMerging, SwinTransformerBlock, window_partition, window_reverse

from .vit import init_weights

log = logging.getLogger("fastibot")

SWIN_ARCHS = {
    "swin_tiny": dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24)),
}


class SwinBlock(SwinTransformerBlock):
    """timm's block with the reference order for maps the window does not tile: pad, then shift."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, dynamic_mask=True, **kwargs)
        self._shift_masks = {}  # (Hp, Wp, device, dtype) -> (nW, win*win, win*win) additive mask

    def _shift_mask(self, x: torch.Tensor) -> Optional[torch.Tensor]:
        if not any(self.shift_size):
            return None
        if torch.compiler.is_compiling():  # a dict filled inside the graph fails the next call's guard: recompile
            return self.get_attn_mask(x)
        key = (x.shape[1], x.shape[2], x.device, x.dtype)
        if key not in self._shift_masks:
            self._shift_masks[key] = self.get_attn_mask(x)  # x is already padded: regions of the padded map
        return self._shift_masks[key]

    def _attn(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, W, C) -> (B, H, W, C): (shifted) window attention."""
        _, h, w, c = x.shape
        wh, ww = self.window_size
        sh, sw = self.shift_size
        x = F.pad(x, (0, 0, 0, (ww - w % ww) % ww, 0, (wh - h % wh) % wh))  # (B, Hp, Wp, C)
        hp, wp = x.shape[1], x.shape[2]
        if sh or sw:
            x = torch.roll(x, shifts=(-sh, -sw), dims=(1, 2))
        windows = window_partition(x, self.window_size).view(-1, wh * ww, c)  # (B*nW, win*win, C)
        windows = self.attn(windows, mask=self._shift_mask(x))
        x = window_reverse(windows.view(-1, wh, ww, c), self.window_size, hp, wp)
        if sh or sw:
            x = torch.roll(x, shifts=(sh, sw), dims=(1, 2))
        return x[:, :h, :w].contiguous()


class SwinStage(nn.Module):
    """Patch merging (all stages but the first), then ``depth`` blocks alternating plain and shifted windows."""

    def __init__(self, dim: int, out_dim: int, resolution: int, depth: int, num_heads: int, window_size: int,
                 downsample: bool, drop_path: Sequence[float], mlp_ratio: float = 4.0):
        super().__init__()
        self.downsample = PatchMerging(dim, out_dim) if downsample else nn.Identity()
        self.blocks = nn.Sequential(*[
            SwinBlock(out_dim, (resolution, resolution), num_heads=num_heads, window_size=window_size,
                      shift_size=0 if i % 2 == 0 else window_size // 2, mlp_ratio=mlp_ratio, drop_path=drop_path[i])
            for i in range(depth)])
        self.recompute = 0  # the first `recompute` blocks recompute their activations in backward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.downsample(x)
        for i, blk in enumerate(self.blocks):
            x = checkpoint(blk, x, use_reentrant=False) if i < self.recompute and torch.is_grad_enabled() else blk(x)
        return x


class SwinTransformer(nn.Module):
    """Swin backbone with the interface fastibot uses from ``VisionTransformer``.

    ``embed_dim`` is the width of the output tokens (768 for Swin-T), what heads and probes see;
    ``embed_dim``/``depths``/``num_heads`` arguments override the arch's (small models for tests).
    """

    def __init__(self, arch: str = "swin_tiny", patch_size: int = 4, img_size: int = 224, window_size: int = 7,
                 drop_path_rate: float = 0.0, mlp_ratio: float = 4.0, embed_dim: Optional[int] = None,
                 depths: Optional[Sequence[int]] = None, num_heads: Optional[Sequence[int]] = None):
        super().__init__()
        if arch not in SWIN_ARCHS:
            raise ValueError(f"unknown arch {arch!r} (one of {', '.join(SWIN_ARCHS)})")
        spec = SWIN_ARCHS[arch]
        dim0 = embed_dim or spec["embed_dim"]
        depths = tuple(depths or spec["depths"])
        num_heads = tuple(num_heads or spec["num_heads"])
        self.arch, self.patch_size, self.window_size, self.depths = arch, patch_size, window_size, depths
        self.merge = 2 ** (len(depths) - 1)  # patch-grid cells per final-stage token, per side
        self.patch_embed = PatchEmbed(img_size, patch_size, 3, dim0, norm_layer=nn.LayerNorm, strict_img_size=False,
                                      output_fmt="NHWC")
        self.masked_embed = nn.Parameter(torch.zeros(1, dim0))
        dpr = torch.linspace(0, drop_path_rate, sum(depths)).tolist()
        grid, dim, stages = img_size // patch_size, dim0, []
        for i, (depth, heads) in enumerate(zip(depths, num_heads)):
            out_dim = dim0 * 2 ** i
            res = -(-grid // 2 ** i)  # the stage's grid for the global crop: fixes its window and shift
            stages.append(SwinStage(dim, out_dim, res, depth, heads, window_size, i > 0,
                                    dpr[sum(depths[:i]):sum(depths[:i + 1])], mlp_ratio))
            dim = out_dim
        self.layers = nn.Sequential(*stages)
        self.norm = nn.LayerNorm(dim)
        self.embed_dim = self.num_features = dim
        self.apply(init_weights)

    @property
    def blocks(self) -> List[SwinBlock]:
        """Every block of every stage, in order (what ``runtime.compile`` compiles one by one)."""
        return [blk for stage in self.layers for blk in stage.blocks]

    def set_recompute(self, n: int) -> None:
        """The first ``n`` blocks (over all stages) recompute their activations in the backward."""
        for stage in self.layers:
            stage.recompute = max(0, min(n, len(stage.blocks)))
            n -= stage.recompute

    def set_attention_backend(self, backend: str) -> None:
        """``reference``: timm's explicit softmax; anything else: SDPA with the relative-position bias
        (and the shifted-window mask) as an additive mask. The packed backends (varlen, xformers) serve
        the ViT's block-diagonal attention; the config refuses them for Swin by name, so here they
        can only come from ``auto`` and mean SDPA."""
        for blk in self.blocks:
            blk.attn.fused_attn = backend != "reference"
        if backend not in ("sdpa", "reference"):
            log.info("swin: window attention runs on SDPA (auto picked %s, which serves ViTs)", backend)

    # ---------------------------------------------------------------- tokens

    def embed(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(B, 3, H, W) images, mask (B, h*w) or (B, h, w) bool on the final-stage grid
        -> normalised patch embeddings (B, H/p, W/p, C0), masked cells replaced by the mask token."""
        t = self.patch_embed(x)  # (B, H/p, W/p, C0)
        if mask is None:
            return t
        b, gh, gw, _ = t.shape
        h, w = gh // self.merge, gw // self.merge
        if mask.numel() != b * h * w:
            raise ValueError(f"mask has {mask.numel() // max(b, 1)} cells per image; a {x.shape[-2]}x{x.shape[-1]} "
                             f"crop has a {h}x{w} final-stage grid (one cell per {self.patch_size * self.merge} px)")
        m = mask.reshape(b, h, w).repeat_interleave(self.merge, 1).repeat_interleave(self.merge, 2)  # (B, gh, gw)
        return torch.where(m[..., None], self.masked_embed.to(t.dtype), t)

    def _tokens(self, t: torch.Tensor) -> torch.Tensor:
        """(B, h, w, D) final-stage map -> (B, 1+N, D): the mean-pooled [CLS], then the tokens."""
        t = t.flatten(1, 2)
        return torch.cat([t.mean(1, keepdim=True), t], dim=1)

    # ---------------------------------------------------------------- forward

    def forward_features(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Dense forward: (B, 3, H, W) -> (B, 1+N, D), N = final-stage tokens (49 for 224 px)."""
        return self._tokens(self.norm(self.layers(self.embed(x, mask))))

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """[CLS] features (the mean of the final-stage tokens), (B, D)."""
        return self.forward_features(x, mask)[:, 0]

    def get_intermediate_layers(self, x: torch.Tensor, n: int = 1) -> List[torch.Tensor]:
        """Tokens after each of the last ``n`` blocks, each (B, 1+N_i, D_i) with its mean first.

        Blocks of earlier stages have their own width and grid (Swin-T, n=4: two 384-wide blocks of
        stage 3, then two 768-wide of stage 4); only final-stage outputs pass the final norm, as in
        the reference linear probe."""
        total = sum(self.depths)
        if not 1 <= n <= total:
            raise ValueError(f"n_last_blocks={n}: this backbone has {total} blocks")
        t, out, i = self.embed(x), [], 0
        for s, stage in enumerate(self.layers):
            t = stage.downsample(t)
            for blk in stage.blocks:
                t = blk(t)
                if i >= total - n:
                    out.append(self._tokens(self.norm(t) if s == len(self.layers) - 1 else t))
                i += 1
        return out

    def last_self_attention(self, x: torch.Tensor) -> torch.Tensor:
        raise ValueError("attention maps show a [CLS] token's attention over all patches; a Swin has no [CLS] "
                         "token (its [CLS] is the mean of the final-stage tokens) and attends within windows, "
                         "so there is no such map: use a ViT backbone for `fastibot eval attention`")
