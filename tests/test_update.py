"""The update half of a step against independent computations: AdamW and the EMA written out in float64,
the skip of non-finite steps (the last head layer included), the gradient all-reduce, clipping edge cases,
the sharded norms and the metric sums."""
import math
import os

import pytest
import torch
import torch.distributed as dist

from fastibot.optim import GradBuffer, LocalGrads, ShardedGrads, clip_
from fastibot.runtime import Runtime
from fastibot.step import StepMetrics
from fastibot.train import Trainer
from conftest import nan_loss_at, tiny_config

CPU = Runtime(torch.device("cpu"))
BETAS, EPS = (0.9, 0.999), 1e-8


def _trainer(tmp_path, **extra):
    tmp_path.mkdir(parents=True, exist_ok=True)
    return Trainer(tiny_config(tmp_path, **extra), CPU)


# the update after the gradients: PyTorch's foreach ops and fused AdamW then the EMA, or the one fused pass
# (run here by Triton's interpreter)
UPDATES = {"torch": {}, "triton": {"kernels.ema": "triton", "kernels.update": "triton"}}
# these trainers run on the CPU: there the fused pass needs Triton's interpreter, which conftest turns on only
# on machines without a GPU (where a GPU is, tests/test_fused_update.py and tests/test_gpu_step.py run the pass)
ON_CPU = pytest.param("triton", marks=pytest.mark.skipif(
    torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1",
    reason="the fused update on a CPU trainer needs TRITON_INTERPRET=1; on a GPU test_fused_update covers it"))


def _batches(tr, n):
    it, out = iter(tr.data), []
    while len(out) < n:
        out.append(next(it))
    return out


def _doubles(model):
    return {n: p.detach().double().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("update", ["torch", ON_CPU])
def test_two_steps_equal_adamw_and_the_ema_written_out_in_float64(tmp_path, update):
    """Two steps after the warm-up, clipping off (so ``p.grad`` after a step is the gradient AdamW used):
    every student parameter follows θ ← θ·(1 − lr·wd) − lr·m̂/(√v̂ + ε) with the schedule's lr and wd at
    that step, no decay on biases and 1-D parameters, betas (0.9, 0.999); every teacher parameter follows
    θt ← m·θt + (1 − m)·θs with the schedule's momentum, after the student moved."""
    tr = _trainer(tmp_path, **{"optim.lr": 0.32, "optim.weight_decay": 0.3, "optim.weight_decay_end": 0.3,
                               "optim.clip_grad": 0.0, "optim.freeze_last_layer": 0.0, **UPDATES[update]})
    assert tr.update_impl == update
    assert tuple(tr.cfg.optim.betas) == BETAS
    k = tr.steps_per_epoch + 1  # past the warm-up: lr ~1e-2, so the decay term (~lr·wd·θ) is well resolved
    tr.stepper.step_t.fill_(k)
    names = [n for n, p in tr.student.named_parameters() if p.requires_grad]
    params = dict(tr.student.named_parameters())
    theta, teacher = _doubles(tr.student), _doubles(tr.teacher)
    exp_avg = {n: torch.zeros_like(theta[n]) for n in names}
    exp_avg_sq = {n: torch.zeros_like(theta[n]) for n in names}
    for i, b in enumerate(_batches(tr, 2)):
        step = k + i
        lr, wd, m = (float(getattr(tr.sched, r)[step]) for r in ("lr", "wd", "momentum"))
        assert lr > 1e-3 and wd == pytest.approx(0.3) and m < 1
        tr.train_step([b])
        assert tr.log_metrics()["nonfinite_steps"] == 0
        for n in names:
            g = params[n].grad.double()
            decay = params[n].ndim > 1 and not n.endswith(".bias")
            exp_avg[n] = BETAS[0] * exp_avg[n] + (1 - BETAS[0]) * g
            exp_avg_sq[n] = BETAS[1] * exp_avg_sq[n] + (1 - BETAS[1]) * g * g
            m_hat = exp_avg[n] / (1 - BETAS[0] ** (i + 1))
            v_hat = exp_avg_sq[n] / (1 - BETAS[1] ** (i + 1))
            want = theta[n] * (1 - lr * wd * decay) - lr * m_hat / (v_hat.sqrt() + EPS)
            torch.testing.assert_close(params[n].detach().double(), want, rtol=1e-5, atol=lr * 1e-4, msg=n)
        theta = _doubles(tr.student)
        t_now = _doubles(tr.teacher)
        for n, t in teacher.items():
            torch.testing.assert_close(t_now[n], m * t + (1 - m) * theta[n], rtol=1e-6, atol=1e-8, msg=n)
        teacher = t_now
    assert any(p.ndim == 1 and not n.endswith(".bias") for n, p in params.items())  # LayerNorm weights: no decay
    assert any("last_layer" in n for n in names)  # the last layer decays and steps like the rest once unfrozen


@pytest.mark.parametrize("update", ["torch", ON_CPU])
def test_a_nonfinite_step_leaves_the_unfrozen_last_layer_alone_and_the_logs_finite(tmp_path, update, monkeypatch):
    """After the freeze period the last head layer has its own AdamW, which must skip a non-finite step as the
    main one does (no update, no decay, no step count); the logged loss and gradient norm average the finite
    step only."""
    tr = _trainer(tmp_path, **{"optim.freeze_last_layer": 0.0, **UPDATES[update]})
    nan_loss_at(monkeypatch, {1})
    b = _batches(tr, 1)[0]
    tr.stepper.step_t.fill_(tr.steps_per_epoch)  # lr and wd well above 0
    tr.train_step([b])
    first = tr.log_metrics()
    before = _doubles(tr.student)
    counts = {k: [s["step"].item() for s in opt.state.values()] for k, opt in tr.opt.optimizers.items()}
    assert set(counts) == {"main", "last"} and counts["last"] and all(c == 1 for c in counts["last"])
    tr.train_step([b])  # NaN loss
    after = _doubles(tr.student)
    for n, v in before.items():
        assert torch.equal(v, after[n]), n
    assert {k: [s["step"].item() for s in opt.state.values()] for k, opt in tr.opt.optimizers.items()} == counts
    tr.train_step([b])  # finite again
    row = tr.log_metrics()
    assert row["nonfinite_steps"] == 1
    assert math.isfinite(row["loss"]) and math.isfinite(row["grad_norm"]) and math.isfinite(row["cls"])
    assert first["grad_norm"] > 0 and row["grad_norm"] > 0


@pytest.mark.parametrize("update", ["torch", ON_CPU])
def test_a_nonfinite_gradient_under_a_finite_loss_skips_the_step(tmp_path, update):
    """An inf gradient (an overflow inside the backward) with a finite loss: the step is skipped on the
    device, the weights stay put, and the logged gradient norm stays finite."""
    tr = _trainer(tmp_path, **{"optim.freeze_last_layer": 0.0, **UPDATES[update]})
    b = _batches(tr, 1)[0]
    tr.stepper.step_t.fill_(tr.steps_per_epoch)
    pos = tr.student.backbone.pos_embed
    handle = pos.register_hook(lambda g: g * float("inf"))
    before = _doubles(tr.student)
    tr.train_step([b])
    handle.remove()
    after = _doubles(tr.student)
    for n, v in before.items():
        assert torch.equal(v, after[n]), n
    row = tr.log_metrics()
    assert row["nonfinite_steps"] == 1 and math.isfinite(row["loss"]) and row["grad_norm"] == 0.0


def test_the_gradient_buffer_averages_over_processes_and_sums_the_flag(monkeypatch):
    """Two processes played by a fake all-reduce that adds the other rank's buffer: gradients are the mean,
    the "loss not finite" flag the sum."""
    a = torch.nn.Parameter(torch.zeros(2, 3))
    b = torch.nn.Parameter(torch.zeros(4))
    buf = GradBuffer([a, b])
    mine_a, mine_b = torch.arange(6.0).reshape(2, 3), torch.tensor([1.0, -2.0, 3.0, 0.5])
    other = torch.cat([torch.full((6,), 10.0), torch.tensor([3.0, 2.0, 1.0, 0.5]), torch.ones(1)])  # + its flag 1

    def all_reduce(t, op=None, group=None, async_op=False):
        t.add_(other)

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    a.grad.copy_(mine_a)
    b.grad.copy_(mine_b)
    flag = buf.all_reduce_(torch.tensor(False))
    assert flag.item() == 1.0  # this rank 0 + the other's 1
    torch.testing.assert_close(a.grad, (mine_a + 10.0) / 2, rtol=0, atol=0)
    torch.testing.assert_close(b.grad, (mine_b + other[6:10]) / 2, rtol=0, atol=0)


def test_one_process_keeps_autograds_gradients_and_trains_bit_for_bit_as_the_flat_buffer(tmp_path):
    """One process trains on the gradients autograd hands over (no zeroed buffer to add into): three steps of
    two micro-batches each give the same student, teacher and logged sums, bit for bit, as the flat buffer
    that several processes all-reduce (0 + g is g exactly). A step that kept the last step's gradients, or a
    second micro-batch that replaced the first's instead of adding to it, would part the two runs."""
    runs = {}
    for kind in ("local", "flat"):
        tr = _trainer(tmp_path / kind, **{"optim.accum_steps": 2})
        assert isinstance(tr.grads, LocalGrads)
        if kind == "flat":
            tr.grads = tr.stepper.grads = GradBuffer(tr.grads.params)
        bs = _batches(tr, 6)
        for i in range(3):
            tr.train_step(bs[2 * i: 2 * i + 2])
            if kind == "local":  # each step's gradients are tensors of their own, not views of one buffer
                assert all(p.grad._base is None for p in tr.grads.params)
        runs[kind] = (_doubles(tr.student), _doubles(tr.teacher), tr.log_metrics())
    (s_local, t_local, m_local), (s_flat, t_flat, m_flat) = runs["local"], runs["flat"]
    for n in s_flat:
        assert torch.equal(s_local[n], s_flat[n]), n
        assert torch.equal(t_local[n], t_flat[n]), n
    assert m_local["loss"] == m_flat["loss"] and m_local["grad_norm"] == m_flat["grad_norm"]


def test_local_gradients_start_each_step_empty_and_fill_what_the_forward_missed():
    p, q = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2))
    grads = LocalGrads([p, q])
    (p * torch.tensor([1.0, 2.0, 3.0])).sum().backward()
    grads.zero_()
    assert p.grad is None and q.grad is None
    (p * 2.0).sum().backward()
    (p * 3.0).sum().backward()  # a second micro-batch adds
    flag, overflow, norms = grads.reduce(torch.tensor(True), None)
    assert flag.item() == 1.0 and overflow is None
    torch.testing.assert_close(p.grad, torch.full((3,), 5.0))
    assert torch.equal(q.grad, torch.zeros(2))  # not reached by the forward: a zero gradient
    torch.testing.assert_close(torch.stack(norms), torch.tensor([5.0 * 3 ** 0.5, 0.0]))


def test_sharded_norms_count_each_element_once_and_flags_keep_their_meaning(monkeypatch):
    """ShardedGrads.reduce under hsdp (2 replica groups of shards): the world sum of squared norms counts each
    element once per replica, so a parameter's norm is √(sum / replicas); the first flag is "loss not finite",
    the second the overflow (with a loss scaler)."""
    from fastibot.optim import LossScaler
    p = torch.nn.Parameter(torch.zeros(3))
    q = torch.nn.Parameter(torch.zeros(2))
    grads = ShardedGrads([p, q], replicas=2)
    p.grad, q.grad = torch.tensor([3.0, 0.0, 4.0]), torch.tensor([1.0, 0.0])  # this rank's shards
    others = torch.tensor([25.0 + 2 * 7.0, 1.0 + 2 * 8.0, 2.0, 0.0])  # 3 other ranks: squared norms, flags

    def all_reduce(t, op=None, group=None, async_op=False):
        t.add_(others)

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    flag, overflow, norms = grads.reduce(torch.tensor(False), None)
    assert flag.item() == 2.0 and overflow is None
    torch.testing.assert_close(torch.stack(norms), torch.tensor([math.sqrt(64.0 / 2), math.sqrt(18.0 / 2)]))
    scaler = LossScaler(torch.device("cpu"), init_scale=1.0)
    p.grad, q.grad = torch.tensor([3.0, 0.0, 4.0]), torch.tensor([1.0, 0.0])
    flag, overflow, _ = grads.reduce(torch.tensor(True), scaler)
    assert flag.item() == 3.0 and overflow.item() == 0.0  # no rank overflowed (the last slot summed to 0)


def test_clipping_leaves_small_gradients_and_a_zero_threshold_alone():
    g = torch.Generator().manual_seed(0)
    small = [torch.randn(5, 3, generator=g) * 0.01, torch.randn(7, generator=g) * 0.01]
    for mode in ("per_param", "global"):
        grads = [x.clone() for x in small]
        total = clip_(grads, 3.0, mode)  # global norm ~0.04 < 3: nothing to clip
        assert all(torch.equal(a, b) for a, b in zip(grads, small)), mode
        big = [x * 1e4 for x in small]
        grads = [x.clone() for x in big]
        clip_(grads, 0.0, mode)  # optim.clip_grad=0: off
        assert all(torch.equal(a, b) for a, b in zip(grads, big)), mode
    want = math.sqrt(sum(float(x.double().square().sum()) for x in small))
    assert total.item() == pytest.approx(want, rel=1e-6)


def test_step_metrics_accumulate_and_a_resume_on_another_rank_zeroes_only_per_rank_sums():
    m = StepMetrics(torch.device("cpu"))
    m.add("loss", torch.tensor(1.5), per_rank=True)
    m.add("loss", torch.tensor(2.0), per_rank=True)
    m.add("grad_norm", torch.tensor(0.25))
    m.add("grad_norm", torch.tensor(0.5))
    assert m.get("loss").item() == 3.5 and m.get("grad_norm").item() == 0.75
    state = m.state_dict()
    main, other = StepMetrics(torch.device("cpu")), StepMetrics(torch.device("cpu"))
    main.load_state_dict(state, keep_per_rank=True)
    other.load_state_dict(state, keep_per_rank=False)
    assert main.get("loss").item() == 3.5 and main.get("grad_norm").item() == 0.75
    assert other.get("loss").item() == 0.0  # rank 0 holds the run's total
    assert other.get("grad_norm").item() == 0.75  # agreed by every rank: each keeps it
    assert other.per_rank == {"loss"}


def test_each_loss_term_gets_its_own_scheduled_temperature_and_centers(tmp_path, monkeypatch):
    """The step hands the loss this step's [CLS] and patch teacher temperatures from the device table, and the
    [CLS] and patch centers, each to its own argument (distinct values here, so a swap shows)."""
    import fastibot.step as step_mod
    tr = _trainer(tmp_path, **{"teacher.warmup_temp": 0.02, "teacher.temp": 0.05, "teacher.warmup_patch_temp": 0.03,
                               "teacher.patch_temp": 0.09, "teacher.warmup_temp_epochs": 2, "optim.epochs": 3})
    real, seen = step_mod.ibot_terms, {}

    def terms(spec, s, t, masks, rows, row_weight, center, center2, tt, tpt):
        seen.update(center=center, center2=center2, tt=float(tt), tpt=float(tpt))
        return real(spec, s, t, masks, rows, row_weight, center, center2, tt, tpt)

    monkeypatch.setattr(step_mod, "ibot_terms", terms)
    k = tr.steps_per_epoch + 2
    tr.stepper.step_t.fill_(k)
    tr.train_step(_batches(tr, 1))
    assert seen["tt"] == pytest.approx(float(tr.sched.teacher_temp[k]), rel=1e-7)
    assert seen["tpt"] == pytest.approx(float(tr.sched.teacher_patch_temp[k]), rel=1e-7)
    assert abs(seen["tt"] - seen["tpt"]) > 0.01  # distinct, so a swap would show
    assert seen["center"] is tr.centers.center and seen["center2"] is tr.centers.center2
