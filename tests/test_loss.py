"""The reference iBOT loss against an independent float64 per-pair implementation."""
import math

import numpy as np
import pytest
import torch

from fastibot.data.batch import masked_rows
from fastibot.loss import LossSpec, ibot_terms
from fastibot.models.ibot import StudentOut, TeacherOut


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


def _terms(x, G=2, impl="reference", rows_form=False, lambda1=1.0, lambda2=1.0, tt=0.04, tpt=0.07, st=0.1):
    """ibot_terms on dense logits, or on the masked rows gathered as the packed model produces them."""
    spec = LossSpec(G, st, lambda1, lambda2, impl)
    masks, rows, weight, _ = masked_rows(x["masks"], G, capacity=x["masks"].numel())
    s, t = StudentOut(x["s_cls"], x["s_patch"]), TeacherOut(x["t_cls"], x["t_patch"], None)
    if rows_form:
        K = x["s_patch"].shape[-1]
        s = StudentOut(x["s_cls"], x["s_patch"].reshape(-1, K)[rows])
        t = TeacherOut(x["t_cls"], x["t_patch"].reshape(-1, K)[rows], None)
    terms, cls_mean = ibot_terms(spec, s, t, masks, rows, weight, x["c1"], x["c2"], tt, tpt)
    return terms, cls_mean


@pytest.mark.parametrize("G,L", [(2, 3), (2, 10), (2, 0), (3, 2), (1, 2)])
def test_reference_matches_independent(G, L):
    x = _inputs(G=G, L=L)
    terms, cls_mean = _terms(x, G)
    cls, patch = independent_ibot(x["s_cls"], x["s_patch"], x["t_cls"], x["t_patch"], x["masks"], x["c1"],
                                  x["c2"], G, 0.04, 0.07, 0.1)
    assert terms["cls"].item() == pytest.approx(cls, rel=1e-5)
    assert terms["patch"].item() == pytest.approx(patch, rel=1e-5)
    torch.testing.assert_close(cls_mean, x["t_cls"].mean(0))


def test_float64_inputs_give_float64_math():
    """The parity tests' oracle: float64 logits are not rounded to fp32 on the way."""
    x = {k: (v.double() if v.is_floating_point() else v) for k, v in _inputs(scale=5.0).items()}
    terms, _ = _terms(x)
    assert terms["cls"].dtype == terms["patch"].dtype == torch.float64
    cls, patch = independent_ibot(x["s_cls"], x["s_patch"], x["t_cls"], x["t_patch"], x["masks"], x["c1"],
                                  x["c2"], 2, 0.04, 0.07, 0.1)
    assert terms["cls"].item() == pytest.approx(cls, rel=1e-12)
    assert terms["patch"].item() == pytest.approx(patch, rel=1e-12)


def test_lambdas_and_rows_version_agree():
    x = _inputs()
    kw = dict(lambda1=0.7, lambda2=1.3, tt=0.05, tpt=0.06)
    dense, _ = _terms(x, **kw)
    rows, _ = _terms(x, rows_form=True, **kw)
    for k in ("cls", "patch"):
        assert rows[k].item() == pytest.approx(dense[k].item(), rel=1e-6)
    cls, patch = independent_ibot(x["s_cls"], x["s_patch"], x["t_cls"], x["t_patch"], x["masks"], x["c1"], x["c2"],
                                  2, 0.05, 0.06, 0.1)
    assert (dense["cls"] + dense["patch"]).item() == pytest.approx(0.7 * cls + 1.3 * patch, rel=1e-5)


def test_temperatures_as_device_tensors_equal_floats():
    x = _inputs(seed=5)
    a, _ = _terms(x, tt=0.05, tpt=0.06)
    b, _ = _terms(x, tt=torch.tensor(0.05), tpt=torch.tensor(0.06))
    for k in a:
        torch.testing.assert_close(a[k], b[k])


def test_gradients_of_dense_and_rows_agree():
    x = _inputs(seed=3)
    grads = []
    for rows_form in (False, True):
        y = dict(x, s_patch=x["s_patch"].clone().requires_grad_(True), s_cls=x["s_cls"].clone().requires_grad_(True))
        terms, _ = _terms(y, rows_form=rows_form, tt=0.05, tpt=0.06)
        sum(terms.values()).backward()
        grads.append((y["s_patch"].grad, y["s_cls"].grad))
    torch.testing.assert_close(grads[1][0], grads[0][0], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(grads[1][1], grads[0][1], rtol=1e-5, atol=1e-7)
    # unmasked patches get no gradient
    assert grads[0][0][~x["masks"]].abs().max().item() == 0.0
