"""The reference iBOT loss against an independent float64 per-pair implementation."""
import math

import numpy as np
import pytest
import torch

from fastibot.data.masking import mask_rows
from fastibot.loss import ibot_loss, ibot_loss_rows


def _softmax(x):
    x = x - x.max()
    e = np.exp(x)
    return e / e.sum()


def _log_softmax(x):
    m = x.max()
    return x - m - math.log(np.exp(x - m).sum())


def independent_ibot(s_cls, s_patch, t_cls, t_patch, masks, c1, c2, G, tt, tpt, st):
    """Per pair, per image, per patch loops in float64 (no shared code with fastibot.loss)."""
    s_cls, s_patch, t_cls, t_patch = (x.double().numpy() for x in (s_cls, s_patch, t_cls, t_patch))
    c1, c2, masks = c1.double().numpy().reshape(-1), c2.double().numpy().reshape(-1), masks.numpy()
    B = t_cls.shape[0] // G
    V = s_cls.shape[0] // B
    pair_losses = []
    for g in range(G):
        for v in range(V):
            if v == g:
                continue
            ces = [-(_softmax((t_cls[g * B + b] - c1) / tt) * _log_softmax(s_cls[v * B + b] / st)).sum()
                   for b in range(B)]
            pair_losses.append(np.mean(ces))
    view_losses = []
    for g in range(G):
        per_image = []
        for b in range(B):
            row = g * B + b
            idx = np.nonzero(masks[row])[0]
            total = sum(-(_softmax((t_patch[row, n] - c2) / tpt) * _log_softmax(s_patch[row, n] / st)).sum()
                        for n in idx)
            per_image.append(total / max(len(idx), 1))
        view_losses.append(np.mean(per_image))
    return np.mean(pair_losses), np.mean(view_losses)


def _inputs(G=2, L=3, B=3, N=7, K=13, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g) * scale  # noqa: E731
    masks = torch.rand(G * B, N, generator=g) < 0.4
    masks[0] = True  # all patches masked
    masks[1] = False  # none masked
    masks[2] = False
    masks[2, 3] = True  # exactly one
    return dict(s_cls=r((G + L) * B, K), s_patch=r(G * B, N, K), t_cls=r(G * B, K), t_patch=r(G * B, N, K),
                masks=masks, c1=r(1, K) * 0.1, c2=r(1, K) * 0.1)


@pytest.mark.parametrize("G,L", [(2, 3), (2, 10), (2, 0), (3, 2), (1, 2)])
def test_reference_matches_independent(G, L):
    x = _inputs(G=G, L=L)
    out = ibot_loss(x["s_cls"], x["s_patch"], x["t_cls"], x["t_patch"], x["masks"], x["c1"], x["c2"],
                    n_global=G, teacher_temp=0.04, teacher_patch_temp=0.07, student_temp=0.1)
    cls, patch = independent_ibot(x["s_cls"], x["s_patch"], x["t_cls"], x["t_patch"], x["masks"], x["c1"],
                                  x["c2"], G, 0.04, 0.07, 0.1)
    assert out["cls"].item() == pytest.approx(cls, rel=1e-5)
    assert out["patch"].item() == pytest.approx(patch, rel=1e-5)
    assert out["loss"].item() == pytest.approx(cls + patch, rel=1e-5)


def test_lambdas_and_rows_version_agree():
    x = _inputs()
    kw = dict(n_global=2, teacher_temp=0.05, teacher_patch_temp=0.06, student_temp=0.1, lambda1=0.7, lambda2=1.3)
    dense = ibot_loss(x["s_cls"], x["s_patch"], x["t_cls"], x["t_patch"], x["masks"], x["c1"], x["c2"], **kw)
    index, weight = mask_rows(x["masks"], 2)
    K = x["s_patch"].shape[-1]
    rows = ibot_loss_rows(x["s_cls"], x["s_patch"].reshape(-1, K)[index], x["t_cls"],
                          x["t_patch"].reshape(-1, K)[index], weight, x["c1"], x["c2"], **kw)
    for k in ("loss", "cls", "patch"):
        assert rows[k].item() == pytest.approx(dense[k].item(), rel=1e-6)
    cls, patch = independent_ibot(x["s_cls"], x["s_patch"], x["t_cls"], x["t_patch"], x["masks"], x["c1"], x["c2"],
                                  2, 0.05, 0.06, 0.1)
    assert dense["loss"].item() == pytest.approx(0.7 * cls + 1.3 * patch, rel=1e-5)


def test_gradients_of_dense_and_rows_agree():
    x = _inputs(seed=3)
    kw = dict(n_global=2, teacher_temp=0.05, teacher_patch_temp=0.06)
    s1 = x["s_patch"].clone().requires_grad_(True)
    c1 = x["s_cls"].clone().requires_grad_(True)
    ibot_loss(c1, s1, x["t_cls"], x["t_patch"], x["masks"], x["c1"], x["c2"], **kw)["loss"].backward()
    index, weight = mask_rows(x["masks"], 2)
    K = s1.shape[-1]
    s2 = x["s_patch"].clone().requires_grad_(True)
    c2 = x["s_cls"].clone().requires_grad_(True)
    ibot_loss_rows(c2, s2.reshape(-1, K)[index], x["t_cls"], x["t_patch"].reshape(-1, K)[index], weight,
                   x["c1"], x["c2"], **kw)["loss"].backward()
    torch.testing.assert_close(s1.grad, s2.grad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(c1.grad, c2.grad, rtol=1e-5, atol=1e-7)
    # unmasked patches get no gradient
    assert s1.grad[~x["masks"]].abs().max().item() == 0.0


def test_mask_rows_weights():
    masks = torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0], [1, 0, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    index, weight = mask_rows(masks, n_global=2)  # B = 2
    assert index.tolist() == [0, 1, 8, 12, 13, 14, 15]
    expected = [1 / (2 * 2 * 2)] * 2 + [1 / (2 * 2 * 1)] + [1 / (2 * 2 * 4)] * 4
    assert weight.tolist() == pytest.approx(expected)
