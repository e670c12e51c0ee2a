"""Triton kernels against their eager references (interpreter on CPU, compiled on GPU)."""
import pytest
import torch

from fastibot.kernels import distill_ce as dce
from fastibot.kernels.ema import FlatEMA, ema_update_
from fastibot.loss import cls_loss_reference, weighted_ce_reference
from fastibot.teacher import ema_reference
from conftest import eager_and_compiled

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
    # the temperature as the trainer passes it: a 0-d device tensor (a schedule entry)
    loss = dce.distill_ce(s1, t, w, c, teacher_temp=torch.tensor(tt, device=DEVICE), student_temp=ts)
    (loss * grad_out).backward()
    s2 = s.clone().float().requires_grad_(True)
    ref = weighted_ce_reference(s2, t.float(), w, c, teacher_temp=tt, student_temp=ts)
    (ref * grad_out).backward()
    tol = TOL[s.dtype]
    torch.testing.assert_close(loss, ref, **tol)
    assert_rel(s1.grad, s2.grad, s.dtype)
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
    tt = torch.full((1,), 0.05, device=DEVICE)
    ref = dce._launch_ce(s, t, None, c, w, 1, 0, 10.0, tt, True, {"tuple": False, "rows": 1})
    out = dce._launch_ce(s, t, None, c, w, 1, 0, 10.0, tt, True, config)
    # the two-pass path forms softmax(s') as exp(s' - LSE), not e / Σe: a few ulp apart
    tol = dict(rtol=1e-6, atol=1e-7) if config.get("single", True) else dict(rtol=2e-5, atol=1e-6)
    torch.testing.assert_close(out[0], ref[0], **tol)
    torch.testing.assert_close(out[1], ref[1], **tol)


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


@pytest.mark.parametrize("rows_form", [False, True])
def test_ibot_terms_triton_equals_reference(rows_form):
    """The whole loss through both implementations: dense logits (rows gathered for the kernel) and the
    packed rows, with padding rows, temperatures as device tensors."""
    from fastibot.data.batch import masked_rows
    from fastibot.loss import LossSpec, ibot_terms
    from fastibot.models.ibot import StudentOut, TeacherOut
    g = torch.Generator().manual_seed(0)
    G, L, B, N, K = 2, 3, 3, 7, 129
    s_cls, t_cls = torch.randn((G + L) * B, K, generator=g), torch.randn(G * B, K, generator=g)
    s_patch, t_patch = torch.randn(G * B, N, K, generator=g), torch.randn(G * B, N, K, generator=g)
    masks = torch.rand(G * B, N, generator=g) < 0.4
    masks[0], masks[1] = True, False
    masks, rows, weight, _ = masked_rows(masks.to(DEVICE), G, capacity=int(masks.sum()) + 6)
    c1, c2 = (torch.randn(1, K, generator=g).to(DEVICE) * 0.1 for _ in range(2))
    tt, tpt = torch.tensor(0.04, device=DEVICE), torch.tensor(0.06, device=DEVICE)
    outs = {}
    for impl in ("reference", "triton"):
        sc = s_cls.clone().to(DEVICE).requires_grad_(True)
        sp = s_patch.clone().to(DEVICE).requires_grad_(True)
        tp = t_patch.to(DEVICE)
        student, teacher = StudentOut(sc, sp), TeacherOut(t_cls.to(DEVICE), tp, None)
        if rows_form:
            student = StudentOut(sc, sp.reshape(-1, K)[rows])
            teacher = TeacherOut(t_cls.to(DEVICE), tp.reshape(-1, K)[rows], None)
        terms, cls_mean = ibot_terms(LossSpec(G, impl=impl), student, teacher, masks, rows, weight, c1, c2, tt, tpt)
        sum(terms.values()).backward()
        outs[impl] = (terms, cls_mean, sc.grad, sp.grad)
    for k in ("cls", "patch"):
        torch.testing.assert_close(outs["triton"][0][k], outs["reference"][0][k], **TOL[torch.float32])
    torch.testing.assert_close(outs["triton"][1], outs["reference"][1], rtol=1e-5, atol=1e-6)  # [CLS] center stat
    assert_rel(outs["triton"][2], outs["reference"][2], torch.float32)
    assert_rel(outs["triton"][3], outs["reference"][3], torch.float32)


# ------------------------------------------------------------------------------- EMA


@pytest.mark.parametrize("impl", ["triton", "foreach", "triton-small-blocks"])
def test_ema_bit_exact_with_the_official_loop_over_10_steps(monkeypatch, impl):
    """Every EMA implementation against the official per-tensor loop, bit for bit, with the momentum
    given as the trainer gives it (0-d device tensors m and 1 - m from the schedule table). With small
    blocks the buffer spans many programs and ends in a partial one (a wrong tail offset shows)."""
    from fastibot.kernels import ema as ema_mod
    from fastibot.teacher import EMA
    if impl == "triton-small-blocks":
        monkeypatch.setattr(ema_mod, "INTERPRETER_BLOCK", 64)
        monkeypatch.setattr(ema_mod, "BLOCK", 64)
    g = torch.Generator().manual_seed(0)
    shapes = [(37, 11), (5,), (3, 3, 7), (1000,)]  # 1477 values: 23 blocks of 64 and a tail of 5
    student = torch.nn.ParameterList([torch.nn.Parameter(torch.randn(*s, generator=g).to(DEVICE)) for s in shapes])
    teacher = torch.nn.ParameterList([torch.nn.Parameter(torch.randn(*s, generator=g).to(DEVICE), requires_grad=False)
                                      for s in shapes])
    t_ref = [p.detach().clone() for p in teacher]
    s_ref = [p.detach().clone() for p in student]
    ema = EMA(student, teacher, impl.split("-")[0])
    for step in range(10):
        m = 0.996 + 0.0003 * step
        ema_reference(t_ref, s_ref, m, 1.0 - m)
        ema(torch.tensor(m, dtype=torch.float64, device=DEVICE), torch.tensor(1.0 - m, dtype=torch.float64,
                                                                            device=DEVICE))
        with torch.no_grad():
            for p, sr in zip(student, s_ref):  # the student moves between steps
                p.add_(0.01 * (step + 1))
                sr.add_(0.01 * (step + 1))
    for a, b in zip(teacher, t_ref):
        assert torch.equal(a.detach(), b), (a - b).abs().max()


def test_ema_rounds_each_product_like_the_loop():
    """m·θt + (1-m)·θs with each product rounded to fp32 (no fused multiply-add): values picked so that a
    fused multiply-add or the lerp form θt + (1-m)(θs - θt) gives other bits."""
    t = torch.tensor([1.0000001, 3.3333333, -7.123457, 1e-3], device=DEVICE)
    s = torch.tensor([0.9999999, -2.2222222, 5.432101, 1e-7], device=DEVICE)
    m = 0.9996
    ref = t.clone()
    ema_reference([ref], [s], m, 1.0 - m)
    lerp = t.clone().lerp_(s, float(torch.tensor(1.0 - m)))
    flat = t.clone()
    ema_update_(flat, s.clone(), m)
    assert torch.equal(flat, ref)
    assert not torch.equal(lerp, ref)  # the property is not vacuous for these values
def test_flat_params_are_views_and_model_still_trains():
    model = torch.nn.Sequential(torch.nn.Linear(7, 5), torch.nn.GELU(), torch.nn.Linear(5, 3)).to(DEVICE)
    teacher = torch.nn.Sequential(torch.nn.Linear(7, 5), torch.nn.GELU(), torch.nn.Linear(5, 3)).to(DEVICE)
    teacher.load_state_dict(model.state_dict())
    ema = FlatEMA(list(teacher.parameters()), list(model.parameters()))
    t_flat, s_flat = ema.buffers[0]
    assert all(p.data_ptr() >= s_flat.data_ptr() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(4, 7, device=DEVICE)).sum().backward()
    opt.step()
    assert not torch.equal(s_flat, t_flat)  # the optimizer wrote through the views
    ema(0.0, 1.0)  # m = 0: teacher := student
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

    for x, y in zip(*eager_and_compiled(fn, s, sc)):
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-7)
    for dtype in (torch.float32, torch.float16):  # fp16 logits: the fake op's dS is fp32 too
        torch.library.opcheck(torch.ops.fastibot.distill_ce_rows.default,
                              (s.to(dtype), t.to(dtype), w, c, torch.tensor(0.05, device=DEVICE), 0.1),
                              test_utils=("test_schema", "test_faketensor"))
