"""The backbone's token preparation: the mask token and position embeddings for other crop sizes."""
import math

import numpy as np
import pytest
import torch

from fastibot.config import ConfigError, load_config, packaged_config
from fastibot.models.ibot import build_model
from fastibot.models.vit import VisionTransformer


def _vit(img_size=32, patch=8, **kw):
    torch.manual_seed(0)
    vit = VisionTransformer("vit_tiny", patch_size=patch, img_size=img_size, **kw).double()
    with torch.no_grad():
        vit.masked_embed.normal_()  # zero at init: a real value shows whether it is substituted
    return vit


def test_mask_token_replaces_exactly_the_masked_patches():
    vit = _vit()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 3, 32, 32, generator=g, dtype=torch.float64)
    mask = torch.rand(3, 16, generator=g) < 0.4
    mask[0] = True  # every patch masked
    mask[1] = False  # none masked
    assert 0 < int(mask[2].sum()) < 16
    out = vit.prepare_tokens(x, mask)  # (B, 1 + N, D)
    plain = vit.prepare_tokens(x)  # no mask
    pos = vit.pos_embed_for(4, 4)[0]  # (1 + N, D)
    patches = vit.patch_embed(x)  # (B, N, D)
    torch.testing.assert_close(out[:, 0], plain[:, 0], rtol=0, atol=0)  # [CLS] untouched
    for b in range(3):  # float64 model and inputs throughout: the tight tolerances below are float64's
        for n in range(16):
            want = (vit.masked_embed[0] if mask[b, n] else patches[b, n]) + pos[1 + n]
            torch.testing.assert_close(out[b, 1 + n], want, rtol=1e-12, atol=1e-12, msg=f"image {b} patch {n}")
    torch.testing.assert_close(out[1], plain[1], rtol=0, atol=0)  # an all-False mask changes nothing


def test_mask_token_gets_the_gradient_of_the_masked_positions_only():
    vit = _vit()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    mask = torch.zeros(2, 16, dtype=torch.bool)
    mask[0, [1, 5, 6]] = True
    w = torch.randn(2, 17, vit.embed_dim, dtype=torch.float64)
    (grad,) = torch.autograd.grad((vit.prepare_tokens(x, mask) * w).sum(), [vit.masked_embed])
    torch.testing.assert_close(grad[0], w[0, [2, 6, 7]].sum(0), rtol=1e-12, atol=1e-12)  # float64 throughout


# ------------------------------------------------------------------ position embeddings


def _cubic(t, a=-0.75):
    """Keys' cubic convolution kernel with PyTorch's a = -0.75."""
    t = abs(t)
    if t <= 1:
        return (a + 2) * t ** 3 - (a + 3) * t ** 2 + 1
    if t < 2:
        return a * t ** 3 - 5 * a * t ** 2 + 8 * a * t - 4 * a
    return 0.0


def _resample_matrix(n_in, n_out, step):
    """(n_out, n_in) weights: output i samples the input at (i + 0.5)·step - 0.5 (half-pixel centres),
    four taps, indices clamped at the border."""
    m = np.zeros((n_out, n_in))
    for i in range(n_out):
        src = (i + 0.5) * step - 0.5
        base = math.floor(src)
        for k in range(-1, 3):
            m[i, min(max(base + k, 0), n_in - 1)] += _cubic(src - (base + k))
    return m


def official_pos_embed(pos_embed, grid, h, w):
    """The official iBOT/DINO resampling written out in NumPy float64: bicubic, scale factors
    ((h + 0.1) / grid, (w + 0.1) / grid) applied as given, so rows step by grid / (h + 0.1)."""
    p = pos_embed[0, 1:].reshape(grid, grid, -1)  # (rows, cols, D)
    rows = _resample_matrix(grid, h, grid / (h + 0.1))
    cols = _resample_matrix(grid, w, grid / (w + 0.1))
    out = np.einsum("ir,rcd,jc->ijd", rows, p, cols).reshape(h * w, -1)
    return np.concatenate([pos_embed[0, :1], out])[None]


@pytest.mark.parametrize("h,w", [(6, 6), (3, 5), (5, 3), (2, 2), (7, 4)])
def test_pos_embed_official_resampling(h, w):
    vit = _vit(img_size=112, patch=8)  # a 14 x 14 trained grid, as ViT-S/16 at 224 px
    got = vit.pos_embed_for(h, w).detach().numpy()
    want = official_pos_embed(vit.pos_embed.detach().numpy(), 14, h, w)  # float64, as the model (_vit)
    assert got.shape == (1, 1 + h * w, vit.embed_dim)
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)


def test_pos_embed_orientation_is_kept():
    """A grid whose rows and columns differ: a transposed resize puts row content in columns."""
    vit = _vit(img_size=112, patch=8)
    with torch.no_grad():  # position (r, c) holds r in channel 0 and c in channel 1
        r, c = torch.meshgrid(torch.arange(14.0), torch.arange(14.0), indexing="ij")
        vit.pos_embed[0, 1:, 0] = r.reshape(-1).double()
        vit.pos_embed[0, 1:, 1] = c.reshape(-1).double()
    pe = vit.pos_embed_for(3, 7)[0, 1:].reshape(3, 7, -1)
    # the row channel varies down the rows only, the column channel along the columns only
    assert (pe[:, :, 0].diff(dim=0) > 1).all() and pe[:, :, 0].diff(dim=1).abs().max() < 1e-9
    assert (pe[:, :, 1].diff(dim=1) > 1).all() and pe[:, :, 1].diff(dim=0).abs().max() < 1e-9


def test_pos_embed_exact_resize_option_and_official_default():
    vit = _vit(img_size=112, patch=8, pos_embed_resize="exact")
    got = vit.pos_embed_for(6, 4).detach().numpy()
    p = vit.pos_embed.detach().numpy()
    rows, cols = _resample_matrix(14, 6, 14 / 6), _resample_matrix(14, 4, 14 / 4)
    want = np.einsum("ir,rcd,jc->ijd", rows, p[0, 1:].reshape(14, 14, -1), cols).reshape(24, -1)  # float64
    np.testing.assert_allclose(got[0, 1:], want, rtol=1e-10, atol=1e-12)
    # the two differ noticeably at the recipe's local-crop size (14 -> 6)
    official = _vit(img_size=112, patch=8).pos_embed_for(6, 6)
    exact = _vit(img_size=112, patch=8, pos_embed_resize="exact").pos_embed_for(6, 6)
    assert (official - exact).abs().max() > 0.05 * exact.abs().max()
    # the trained size is the parameter itself in both modes
    assert vit.pos_embed_for(14, 14) is vit.pos_embed
    with pytest.raises(ValueError, match="pos_embed_resize"):
        VisionTransformer("vit_tiny", pos_embed_resize="bilinear")


def test_pos_embed_resize_from_config():
    base = ["model.patch_size=8", "crops.global_size=32", "model.out_dim=64", "model.patch_out_dim=64"]
    cfg = load_config(packaged_config("quickstart"), base)
    assert cfg.model.pos_embed_resize == "official"
    assert build_model(cfg, student=True).backbone.pos_embed_resize == "official"
    cfg = load_config(packaged_config("quickstart"), base + ["model.pos_embed_resize=exact"])
    assert build_model(cfg, student=False).backbone.pos_embed_resize == "exact"
    with pytest.raises(ConfigError, match="model.pos_embed_resize"):
        load_config(packaged_config("quickstart"), ["model.pos_embed_resize=nearest"])


def test_pos_embed_keeps_fp32_for_fp32_parameters():
    vit = VisionTransformer("vit_tiny", patch_size=8, img_size=112)
    pe = vit.pos_embed_for(6, 6)
    ref = official_pos_embed(vit.pos_embed.detach().double().numpy(), 14, 6, 6)
    assert pe.dtype == torch.float32
    np.testing.assert_allclose(pe.detach().double().numpy(), ref, rtol=1e-5, atol=1e-6)
