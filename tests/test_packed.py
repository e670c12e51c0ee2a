"""Packed multi-crop forward vs the dense (official) path; attention backends vs the reference."""
import pytest
import torch

from fastibot.config import load_config, packaged_config
from fastibot.config import ConfigError
from fastibot.data.batch import masked_rows
from fastibot.loss import LossSpec, ibot_terms
from fastibot.models import attention as attention_mod
from fastibot.models.attention import (BackendUnavailable, PackedLayout, attention, check_backend, cu_seqlens,
                                       resolve_backend)
from fastibot.models.ibot import build_model
from fastibot.models.vit import VisionTransformer, drop_path

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _crops(b=3, n_local=4, gsize=32, lsize=16, patch=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = (gsize // patch) ** 2
    globals_ = torch.randn(2 * b, 3, gsize, gsize, generator=g)
    locals_ = torch.randn(n_local * b, 3, lsize, lsize, generator=g)
    masks = torch.rand(2 * b, n, generator=g) < 0.3
    masks[0] = True  # all masked
    masks[1] = False  # none masked
    masks[2] = False
    masks[2, 5] = True  # one masked
    return globals_.to(DEVICE), locals_.to(DEVICE), masks.to(DEVICE)


def test_packed_forward_and_grads_equal_dense():
    torch.manual_seed(0)
    vit = VisionTransformer("vit_tiny", patch_size=8, img_size=32).to(DEVICE).double()
    g, loc, m = (x.double() if x.is_floating_point() else x for x in _crops())
    tokens, layout = vit.forward_packed([g, loc], [m, None])
    dense_g = vit.forward_features(g, m)
    dense_l = vit.forward_features(loc)
    n_g = dense_g.shape[0] * dense_g.shape[1]  # float64 model and crops: float64 tolerances
    torch.testing.assert_close(tokens[:n_g].view_as(dense_g), dense_g, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(tokens[n_g:].view_as(dense_l), dense_l, rtol=1e-10, atol=1e-10)
    w = torch.randn_like(tokens)
    grads_packed = torch.autograd.grad((tokens * w).sum(), list(vit.parameters()))
    dense = torch.cat([dense_g.reshape(-1, dense_g.shape[-1]), dense_l.reshape(-1, dense_l.shape[-1])])
    grads_dense = torch.autograd.grad((dense * w).sum(), list(vit.parameters()), allow_unused=True)
    for (name, _), a, b in zip(vit.named_parameters(), grads_packed, grads_dense):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11, msg=name)
    assert layout.groups == ((6, 17), (12, 5))


@pytest.mark.parametrize("backend", ["reference", "sdpa", "mixed", "triton", "varlen", "xformers"])
def test_backends_agree_with_reference(backend):
    dtype = torch.float32 if DEVICE == "cpu" else torch.bfloat16
    try:
        check_backend(backend, DEVICE, dtype)
    except BackendUnavailable as e:
        pytest.skip(f"{backend} cannot run here: {e}")  # the other backends in this test still run
    layout = PackedLayout(((3, 17), (5, 5), (2, 9), (1, 70)))  # mixed: the last group is long, the others short
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(layout.total, 3, 16, generator=g).to(DEVICE, dtype).requires_grad_(True) for _ in range(3))
    out = attention(q, k, v, backend, layout)
    grads = torch.autograd.grad(out.float().square().sum(), (q, k, v))
    q2, k2, v2 = (x.detach().double().requires_grad_(True) for x in (q, k, v))
    ref = attention(q2, k2, v2, "reference", layout)
    ref_grads = torch.autograd.grad(ref.square().sum(), (q2, k2, v2))
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=3e-2, atol=3e-2)
    torch.testing.assert_close(out.double(), ref, **tol)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a.double(), b, **tol)
    # no attention across sequence boundaries: changing one sequence leaves the others alone
    q3 = q.detach().clone()
    q3[:17] += 1.0
    k3 = k.detach().clone()
    k3[:17] -= 1.0
    out3 = attention(q3, k3, v.detach(), backend, layout)
    torch.testing.assert_close(out3[17:].float(), out.detach()[17:].float(), rtol=0, atol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="xformers' PyTorch-backed operators need a CUDA device")
def test_xformers_pt_operators_with_shim(monkeypatch):
    """Where xformers' compiled extension cannot load, its ``-pt`` operators (PyTorch's own
    kernels behind xformers' API) still run once xformers is told it was built with CUDA."""
    common = pytest.importorskip("xformers.ops.fmha.common")
    monkeypatch.setattr(common, "_built_with_cuda", True)
    check_backend.cache_clear()
    try:
        test_backends_agree_with_reference("xformers")
    finally:
        check_backend.cache_clear()


def test_dense_backends_agree():
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(2, 11, 3, 8, generator=g) for _ in range(3))
    torch.testing.assert_close(attention(q, k, v, "sdpa"), attention(q, k, v, "reference"), rtol=1e-5, atol=1e-6)


def test_unavailable_backends_say_why():
    with pytest.raises(BackendUnavailable, match="CUDA|varlen"):
        check_backend("varlen", "cpu", torch.float32)
    with pytest.raises(BackendUnavailable):
        check_backend("flash9", "cpu", torch.float32)
    assert resolve_backend("auto", "cpu") == "sdpa"


def test_cu_seqlens_offsets():
    layout = PackedLayout(((2, 5), (0, 7), (3, 2), (1, 1)))
    cu = cu_seqlens(layout)
    assert cu.dtype == torch.int32 and cu.device.type == "cpu"
    assert cu.tolist() == [0, 5, 10, 12, 14, 16, 17] and cu[-1] == layout.total
    assert torch.equal(attention_mod._cu_seqlens(layout, torch.device("cpu")), cu)  # what varlen_attn gets


def test_varlen_needs_packed_and_logs_where_sdpa_runs(monkeypatch, caplog):
    with pytest.raises(ConfigError, match="model.attention: varlen .*model.packed=false"):
        load_config(packaged_config("quickstart"), ["model.attention=varlen", "model.packed=false"])
    assert load_config(packaged_config("quickstart"), ["model.attention=varlen"]).model.packed_forward()
    monkeypatch.setattr(attention_mod, "check_backend", lambda *a: None)  # as if on a GPU with varlen_attn
    with caplog.at_level("INFO", logger="fastibot"):
        assert resolve_backend("varlen", "cuda") == "varlen"
    assert "teacher" in caplog.text and "runs SDPA" in caplog.text


def test_auto_is_a_fixed_order_and_says_so(monkeypatch, caplog):
    with caplog.at_level("INFO", logger="fastibot"):
        assert resolve_backend("auto", "cpu") == "sdpa"
    assert "model.attention=auto: sdpa (the first of the fixed order sdpa" in caplog.text
    # on CUDA the measured order puts triton first, then mixed: with fp32 activations triton's check refuses
    # (without touching a GPU) and mixed runs; where every check passes, triton
    check_backend.cache_clear()
    assert resolve_backend("auto", "cuda", torch.float32) == "mixed"
    with monkeypatch.context() as m:
        m.setattr(attention_mod, "check_backend", lambda *a: None)
        assert resolve_backend("auto", "cuda") == "triton"
    monkeypatch.setitem(attention_mod.AUTO_ORDER, "cpu", ("varlen", "xformers"))
    with pytest.raises(BackendUnavailable, match="no backend of varlen, xformers runs on cpu"):
        resolve_backend("auto", "cpu", torch.float32)


def test_packed_drop_path_drops_whole_sequences():
    layout = PackedLayout(((4, 6), (3, 2)))
    torch.manual_seed(0)
    x = torch.ones(layout.total, 5)
    y = drop_path(x, 0.5, True, layout)
    start = 0
    for n, length in layout.groups:
        for _ in range(n):
            seq = y[start:start + length]
            assert torch.all(seq == seq[0, 0]) and seq[0, 0].item() in (0.0, 2.0)
            start += length


@pytest.mark.parametrize("patch_center", ["all", "masked"])
def test_masked_only_heads_give_the_dense_loss(tmp_path, patch_center):
    """In float64 end to end (model, inputs, loss), so the two computations agree to float64 rounding."""
    over = ["model.patch_size=8", "crops.global_size=32", "crops.local_size=16", "crops.n_local=3",
            "model.out_dim=97", "model.patch_out_dim=97", "model.head_hidden_dim=64", "model.head_bottleneck_dim=32",
            "model.drop_path=0.0", f"ibot.patch_center={patch_center}"]
    cfg = load_config(packaged_config("quickstart"), over + ["model.packed=false"])
    torch.manual_seed(0)
    dense = build_model(cfg, student=True).to(DEVICE).double()
    cfg.model.packed = "true"
    packed = build_model(cfg, student=True).to(DEVICE).double()
    packed.load_state_dict(dense.state_dict())
    g, loc, m = _crops(b=3, n_local=3)
    g, loc = g.double(), loc.double()
    m, rows, weight, _ = masked_rows(m, 2, capacity=int(m.sum()) + 9)  # with padding rows, as every loader
    spec = LossSpec(n_global=2)
    c1, c2 = torch.randn(1, 97, device=DEVICE).double() * 0.1, torch.randn(1, 97, device=DEVICE).double() * 0.1

    sd, td = dense(g, m, loc, rows), dense.teacher(g, m, rows, weight, patch_center)
    ld, _ = ibot_terms(spec, sd, td, m, rows, weight, c1, c2, 0.05, 0.06)
    sp, tp = packed(g, m, loc, rows), packed.teacher(g, m, rows, weight, patch_center)
    assert sp.patch.shape == (rows.numel(), 97) and tp.patch.shape == (rows.numel(), 97)
    lp, _ = ibot_terms(spec, sp, tp, m, rows, weight, c1, c2, 0.05, 0.06)
    f64 = dict(rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(sp.cls, sd.cls, **f64)
    torch.testing.assert_close(sp.patch, sd.patch.reshape(-1, 97)[rows], **f64)  # the masked rows, in order
    torch.testing.assert_close(tp.patch, td.patch.reshape(-1, 97)[rows], **f64)
    assert ld["patch"] > 0.1 and ld["cls"] > 0.1  # both terms carry weight in the comparison
    # float64 everywhere except the rows' weights 1 / (G·B·#masked), which a batch carries in fp32
    # (|relative error| <= 2^-24): the bound here is that rounding, not fp32 math
    for k in ("cls", "patch"):
        assert ld[k].dtype == torch.float64
        torch.testing.assert_close(lp[k], ld[k], rtol=1e-7, atol=1e-12)
    torch.testing.assert_close(td.cls, tp.cls, rtol=1e-10, atol=1e-12)
    # the center statistic: the mean over every patch, or over the real masked ones (not the padding rows)
    torch.testing.assert_close(tp.patch_mean.double(), td.patch_mean.double(), rtol=1e-5, atol=1e-7)  # fp32 stat
    gd = torch.autograd.grad(sum(ld.values()), list(dense.parameters()), allow_unused=True)
    gp = torch.autograd.grad(sum(lp.values()), list(packed.parameters()), allow_unused=True)
    checked = 0
    for (name, _), a, b in zip(dense.named_parameters(), gd, gp):
        if a is None or b is None:
            assert a is None or a.abs().max() == 0, name
            continue
        err = ((b - a).norm() / a.norm().clamp(min=1e-30)).item()  # norm-relative: elements cancel unevenly
        assert err < 1e-6, (name, err)
        checked += 1
    assert checked > 10


def test_packed_block_compiles_without_graph_breaks():
    """Static shapes from the layout: torch.compile (runtime.compile=true) captures a packed
    block, drop path included, as one graph."""
    import torch._dynamo as dynamo
    vit = VisionTransformer("vit_tiny", patch_size=8, img_size=32, drop_path_rate=0.1)
    layout = PackedLayout(((6, 17), (12, 5)))
    explained = dynamo.explain(vit.blocks[5])(torch.randn(layout.total, 192), layout)
    assert explained.graph_break_count == 0 and explained.graph_count == 1


def test_masked_center_ignores_padding_rows():
    """With more padding rows the masked patch center does not move: padding rows (weight 0) do not count."""
    over = ["model.patch_size=8", "crops.global_size=32", "model.out_dim=97", "model.patch_out_dim=97",
            "model.head_hidden_dim=64", "model.head_bottleneck_dim=32", "model.packed=true"]
    torch.manual_seed(0)
    model = build_model(load_config(packaged_config("quickstart"), over), student=False).to(DEVICE).double()
    g, _, m = _crops(b=3, n_local=0)
    k = int(m.sum())
    _, rows, weight, _ = masked_rows(m, 2, capacity=k)
    _, padded, padded_w, _ = masked_rows(m, 2, capacity=k + 7)
    exact = model.teacher(g.double(), m, rows, weight, "masked")
    pad = model.teacher(g.double(), m, padded, padded_w, "masked")
    torch.testing.assert_close(pad.patch_mean, exact.patch_mean, rtol=1e-6, atol=1e-9)
    rows_mean = exact.patch.double().mean(0)  # the mean of the real masked rows' logits
    torch.testing.assert_close(exact.patch_mean.double(), rows_mean, rtol=1e-5, atol=1e-7)
