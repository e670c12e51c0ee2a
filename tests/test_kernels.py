"""Triton kernels against their eager references (interpreter on CPU, compiled on GPU)."""
import pytest
import torch

from fastibot.kernels import distill_ce as dce
from fastibot.kernels.ema import FlatEMA, ema_update_
from fastibot.loss import cls_loss_reference, weighted_ce_reference
from fastibot.teacher import ema_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: dict(rtol=2e-5, atol=2e-6), torch.bfloat16: dict(rtol=2e-2, atol=2e-3)}
REL = {torch.float32: 1e-5, torch.bfloat16: 8e-3}  # norm-relative error of gradients


def assert_rel(out, ref, dtype):
    """||out - ref|| / ||ref|| under the dtype's bound; NaN never passes."""
    out, ref = out.double(), ref.double()
    assert torch.isfinite(out).all()
    err = ((out - ref).norm() / ref.norm().clamp(min=1e-30)).item()
    assert err < REL[dtype], err


def _rows(M, K, dtype, seed=0, scale=4.0):
    g = torch.Generator().manual_seed(seed)
    s = (torch.randn(M, K, generator=g) * scale).to(dtype).to(DEVICE)
    t = (torch.randn(M, K, generator=g) * scale).to(dtype).to(DEVICE)
    w = torch.rand(M, generator=g).to(DEVICE)
    c = (torch.randn(K, generator=g) * 0.5).to(DEVICE)
    return s, t, w, c


def _check_rows(s, t, w, c, tt=0.04, ts=0.1, grad_out=1.7):
    s1 = s.clone().requires_grad_(True)
    loss, colsum = dce.distill_ce(s1, t, w, c, teacher_temp=tt, student_temp=ts, return_colsum=True)
    (loss * grad_out).backward()
    s2 = s.clone().float().requires_grad_(True)
    ref = weighted_ce_reference(s2, t.float(), w, c, teacher_temp=tt, student_temp=ts)
    (ref * grad_out).backward()
    tol = TOL[s.dtype]
    torch.testing.assert_close(loss, ref, **tol)
    assert_rel(s1.grad, s2.grad, s.dtype)
    torch.testing.assert_close(colsum, t.float().sum(0), rtol=1e-5, atol=1e-3)
    return loss, s1.grad


@pytest.mark.parametrize("M,K", [(37, 1000), (5, 997), (64, 128), (1, 17), (3, 2053)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_distill_ce_matches_reference(M, K, dtype):
    _check_rows(*_rows(M, K, dtype, seed=M + K))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_distill_ce_multi_block_path(monkeypatch, dtype):
    monkeypatch.setattr(dce, "MAX_SINGLE_BLOCK", 64)
    monkeypatch.setattr(dce, "MULTI_BLOCK", 64)
    _check_rows(*_rows(11, 301, dtype, seed=5))  # 301 = 4 full chunks + a partial one


@pytest.mark.parametrize("config", [{"tuple": True}, {"rows": 2}, {"rows": 4, "tuple": True}, {"rows": 2, "per_sm": 1},
                                    {"prefetch": True}, {"prefetch": True, "rows": 2, "per_sm": 1},
                                    {"prefetch": True, "per_sm": 1, "tuple": True}, {"c_regs": False},
                                    {"prefetch": True, "c_regs": False, "rows": 2},
                                    {"single": False, "block": 16}, {"single": False, "block": 16, "rows": 4},
                                    {"single": False, "block": 8, "rows": 2, "reverse": False, "per_sm": 1},
                                    {"evict_first": True, "warps": 8}])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_launch_configs_match(config, dtype):
    """Other launch shapes (tuple reductions, several rows per tile, fewer programs, the next tile's loads
    issued early, the center re-read per tile, the two-pass path over 16- or 8-column chunks in either order)
    give the same numbers."""
    s, t, w, c = _rows(7, 33, dtype, seed=9)
    colsum_a, colsum_b = torch.zeros(33, device=DEVICE), torch.zeros(33, device=DEVICE)
    ref = dce._launch_ce(s, t, None, c, w, 1, 0, 10.0, 20.0, True, colsum_a, {"tuple": False, "rows": 1})
    out = dce._launch_ce(s, t, None, c, w, 1, 0, 10.0, 20.0, True, colsum_b, config)
    # the two-pass path forms softmax(s') as exp(s' - LSE), not e / Σe: a few ulp apart
    tol = dict(rtol=1e-6, atol=1e-7) if config.get("single", True) else dict(rtol=2e-5, atol=1e-6)
    torch.testing.assert_close(out[0], ref[0], **tol)
    torch.testing.assert_close(out[1], ref[1], **tol)
    torch.testing.assert_close(colsum_b, colsum_a, rtol=1e-6, atol=1e-6)


def _check_cls_small(V, B, K):
    s = torch.randn(V * B, K, device=DEVICE, requires_grad=True)
    t = torch.randn(2 * B, K, device=DEVICE)
    c = torch.randn(K, device=DEVICE) * 0.1
    loss = dce.cls_distill_loss(s, t, c, n_global=2, teacher_temp=0.04)
    loss.backward()
    s2 = s.detach().clone().requires_grad_(True)
    ref = cls_loss_reference(s2, t, c, n_global=2, teacher_temp=0.04)
    ref.backward()
    torch.testing.assert_close(loss, ref, **TOL[torch.float32])
    assert_rel(s.grad, s2.grad, torch.float32)


def test_cls_with_several_rows_per_tile(monkeypatch):
    # rows: a power of 2; the prefetched tile of [CLS] rows is the partners' probability sum
    monkeypatch.setattr(dce, "CONFIGS", [(dce.MAX_SINGLE_BLOCK, dict(warps=4, stages=1, per_sm=1, tuple=False, rows=4,
                                                                     prefetch=True, c_regs=True))])
    _check_cls_small(V=7, B=2, K=50)  # 14 student rows straddle tiles of 4


def test_cls_two_pass_path(monkeypatch):
    monkeypatch.setattr(dce, "MAX_SINGLE_BLOCK", 64)
    monkeypatch.setattr(dce, "MULTI_BLOCK", 32)
    monkeypatch.setattr(dce, "MULTI_CONFIG", dict(dce.MULTI_CONFIG, rows=2))
    _check_cls_small(V=5, B=3, K=100)  # 4 chunks, the last one partial; 15 rows straddle tiles of 2


def test_loss_sum_is_deterministic():
    """Programs leave partial sums that the last one adds in program order: the same bits on every call."""
    s, t, w, c = _rows(301, 257, torch.float32, seed=3)
    losses = {dce.distill_ce(s, t, w, c, teacher_temp=0.07).item() for _ in range(4)}
    assert len(losses) == 1
    ref = weighted_ce_reference(s, t, w, c, teacher_temp=0.07)
    torch.testing.assert_close(torch.tensor(losses.pop(), dtype=torch.float32), ref.cpu(), **TOL[torch.float32])


def test_fp16_gradients_survive_loss_scaling():
    """fp16 logits under a large grad_output (loss scaling): dS is kept in fp32 until it is scaled, so
    gradients far below fp16's smallest subnormal before scaling come out right after it."""
    s, t, w, c = _rows(13, 100, torch.float32, seed=4)
    w = w * 1e-8  # unscaled |dS| <= 1e-7: about one fp16 subnormal step
    scale = 65536.0
    s16 = s.half().requires_grad_(True)
    (dce.distill_ce(s16, t.half(), w, c, teacher_temp=0.04) * scale).backward()
    s32 = s.half().float().requires_grad_(True)
    (weighted_ce_reference(s32, t.half().float(), w, c, teacher_temp=0.04) * scale).backward()
    assert s16.grad.dtype == torch.float16
    assert_rel(s16.grad.float(), s32.grad, torch.bfloat16)
    g = torch.Generator().manual_seed(1)
    sc = (torch.randn(6, 64, generator=g) * 3).half().to(DEVICE).requires_grad_(True)
    tc = (torch.randn(4, 64, generator=g) * 3).half().to(DEVICE)
    cc = torch.zeros(1, 64, device=DEVICE)
    (dce.cls_distill_loss(sc, tc, cc, n_global=2, teacher_temp=0.04) * 1e-7 * scale).backward()
    sr = sc.detach().float().requires_grad_(True)
    (cls_loss_reference(sr, tc.float(), cc, n_global=2, teacher_temp=0.04) * 1e-7 * scale).backward()
    assert sc.grad.dtype == torch.float16
    assert_rel(sc.grad.float(), sr.grad, torch.bfloat16)


def test_distill_ce_edge_rows():
    s, t, w, c = _rows(9, 257, torch.float32, seed=1)
    w[2] = 0.0  # zero weight
    s[3] = 1.5  # equal logits
    t[4] = -2.0
    s[5] = s[5] * 1e4  # huge logits: no overflow
    t[6] = t[6] * 1e4
    loss, grad = _check_rows(s, t, w, c, grad_out=1.0)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    assert grad[2].abs().max().item() == 0.0


def test_distill_ce_all_zero_weights_and_empty():
    s, t, w, c = _rows(6, 100, torch.float32)
    s.requires_grad_(True)
    loss = dce.distill_ce(s, t, torch.zeros_like(w), c, teacher_temp=0.07)
    loss.backward()
    assert loss.item() == 0.0 and s.grad.abs().max().item() == 0.0
    e = torch.zeros(0, 100, device=DEVICE, requires_grad=True)
    loss = dce.distill_ce(e, torch.zeros(0, 100, device=DEVICE), torch.zeros(0, device=DEVICE), c, teacher_temp=0.07)
    loss.backward()
    assert loss.item() == 0.0 and e.grad.shape == (0, 100)


@pytest.mark.parametrize("G,L,B,K", [(2, 10, 3, 1000), (2, 0, 4, 97), (3, 2, 2, 131), (1, 3, 2, 64)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cls_distill_matches_reference(G, L, B, K, dtype):
    g = torch.Generator().manual_seed(G * 100 + K)
    s = (torch.randn((G + L) * B, K, generator=g) * 3).to(dtype).to(DEVICE)
    t = (torch.randn(G * B, K, generator=g) * 3).to(dtype).to(DEVICE)
    c = (torch.randn(1, K, generator=g) * 0.3).to(DEVICE)
    s1 = s.clone().requires_grad_(True)
    loss, colsum = dce.cls_distill_loss(s1, t, c, n_global=G, teacher_temp=0.05, return_colsum=True)
    (loss * 0.37).backward()
    s2 = s.clone().float().requires_grad_(True)
    ref = cls_loss_reference(s2, t.float(), c, n_global=G, teacher_temp=0.05)
    (ref * 0.37).backward()
    torch.testing.assert_close(loss, ref, **TOL[dtype])
    assert_rel(s1.grad, s2.grad, dtype)
    torch.testing.assert_close(colsum, t.float().sum(0), rtol=1e-5, atol=1e-3)


def test_cls_distill_multi_block(monkeypatch):
    monkeypatch.setattr(dce, "MAX_SINGLE_BLOCK", 32)
    monkeypatch.setattr(dce, "MULTI_BLOCK", 32)
    _check_cls_small(V=4, B=2, K=77)


def test_ibot_loss_triton_equals_reference():
    from fastibot.loss import ibot_loss
    g = torch.Generator().manual_seed(0)
    G, L, B, N, K = 2, 3, 3, 7, 129
    s_cls, t_cls = torch.randn((G + L) * B, K, generator=g), torch.randn(G * B, K, generator=g)
    s_patch, t_patch = torch.randn(G * B, N, K, generator=g), torch.randn(G * B, N, K, generator=g)
    masks = torch.rand(G * B, N, generator=g) < 0.4
    masks[0], masks[1] = True, False
    c1, c2 = torch.randn(1, K, generator=g) * 0.1, torch.randn(1, K, generator=g) * 0.1
    outs = {}
    for impl in ("reference", "triton"):
        sc = s_cls.clone().to(DEVICE).requires_grad_(True)
        sp = s_patch.clone().to(DEVICE).requires_grad_(True)
        out = ibot_loss(sc, sp, t_cls.to(DEVICE), t_patch.to(DEVICE), masks.to(DEVICE), c1.to(DEVICE),
                        c2.to(DEVICE), n_global=G, teacher_temp=0.04, teacher_patch_temp=0.06, impl=impl)
        out["loss"].backward()
        outs[impl] = (out, sc.grad, sp.grad)
    for k in ("loss", "cls", "patch"):
        torch.testing.assert_close(outs["triton"][0][k], outs["reference"][0][k], **TOL[torch.float32])
    assert_rel(outs["triton"][1], outs["reference"][1], torch.float32)
    assert_rel(outs["triton"][2], outs["reference"][2], torch.float32)


# ------------------------------------------------------------------------------- EMA


def test_ema_kernel_bit_exact_over_10_steps():
    g = torch.Generator().manual_seed(0)
    shapes = [(37, 11), (5,), (3, 3, 7), (1000,)]
    t_ref = [torch.randn(*s, generator=g).to(DEVICE) for s in shapes]
    s_params = [torch.nn.Parameter(torch.randn(*s, generator=g).to(DEVICE)) for s in shapes]
    t_params = [torch.nn.Parameter(x.clone(), requires_grad=False) for x in t_ref]
    s_ref = [p.detach().clone() for p in s_params]
    ema = FlatEMA(t_params, s_params, bf16_copy=True)
    for step in range(10):
        m = 0.996 + 0.0003 * step
        ema_reference(t_ref, s_ref, m)
        ema(m)
        for p, sr in zip(s_params, s_ref):  # the student moves between steps
            p.data.add_(0.01 * (step + 1))
            sr.add_(0.01 * (step + 1))
    for a, b in zip(t_params, t_ref):
        assert torch.equal(a.detach(), b), (a - b).abs().max()
    bf16 = ema.buffers[0][2]
    assert torch.equal(bf16, torch.cat([p.detach().reshape(-1) for p in t_params]).bfloat16())


def test_flat_params_are_views_and_model_still_trains():
    model = torch.nn.Sequential(torch.nn.Linear(7, 5), torch.nn.GELU(), torch.nn.Linear(5, 3)).to(DEVICE)
    teacher = torch.nn.Sequential(torch.nn.Linear(7, 5), torch.nn.GELU(), torch.nn.Linear(5, 3)).to(DEVICE)
    teacher.load_state_dict(model.state_dict())
    ema = FlatEMA(list(teacher.parameters()), list(model.parameters()))
    t_flat, s_flat, _ = ema.buffers[0]
    assert all(p.data_ptr() >= s_flat.data_ptr() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(4, 7, device=DEVICE)).sum().backward()
    opt.step()
    assert not torch.equal(s_flat, t_flat)  # the optimizer wrote through the views
    ema(0.0)  # m = 0: teacher := student
    for a, b in zip(teacher.parameters(), model.parameters()):
        assert torch.equal(a, b)


def test_ema_shape_mismatch_is_an_error():
    with pytest.raises(ValueError):
        ema_update_(torch.zeros(3, device=DEVICE), torch.zeros(4, device=DEVICE), 0.9)


def test_ops_work_inside_torch_compile():
    """The kernels are registered torch.library ops: a compiled function calls them with no graph break."""
    s, t, w, c = _rows(13, 129, torch.float32, seed=4)
    tc = torch.randn(4, 129, device=DEVICE)
    sc = torch.randn(10, 129, device=DEVICE)

    def fn(s, sc):
        return (dce.distill_ce(s, t, w, c, teacher_temp=0.05) * 1.3
                + dce.cls_distill_loss(sc, tc, c, n_global=2, teacher_temp=0.05))

    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    grads = []
    for f in (fn, compiled):
        a, b = s.clone().requires_grad_(True), sc.clone().requires_grad_(True)
        loss = f(a, b)
        loss.backward()
        grads.append((loss.detach(), a.grad, b.grad))
    for x, y in zip(*grads):
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-7)
    for dtype in (torch.float32, torch.float16):  # fp16 logits: the fake op's dS is fp32 too
        torch.library.opcheck(torch.ops.fastibot.distill_ce_rows.default, (s.to(dtype), t.to(dtype), w, c, 0.05, 0.1),
                              test_utils=("test_schema", "test_faketensor"))
