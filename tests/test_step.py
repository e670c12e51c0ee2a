"""The static step on the CPU: compiled equals eager, no recompiles as masks change, device schedules,
center wiring, accumulation, clipping and the last-layer freeze."""
import numpy as np
import pytest
import torch

from fastibot.models.keep import KeepMarked
from fastibot.optim import clip_
from fastibot.runtime import Runtime
from fastibot.teacher import Schedules
from fastibot.train import Trainer
from conftest import tiny_config

CPU = Runtime(torch.device("cpu"))


def _trainer(tmp_path, **extra):
    tmp_path.mkdir(parents=True, exist_ok=True)  # fit() makes the run folder; these tests call the step directly
    return Trainer(tiny_config(tmp_path, **extra), CPU)


def _batches(trainer, n):
    it, out = iter(trainer.data), []
    while len(out) < n:
        try:
            out.append(next(it))
        except StopIteration:
            it = iter(trainer.data)
    return out


def _snapshot(tr):
    return {"student": {k: v.clone() for k, v in tr.student.state_dict().items()},
            "teacher": {k: v.clone() for k, v in tr.teacher.state_dict().items()},
            "centers": {k: v.clone() for k, v in tr.centers.state_dict().items()},
            "metrics": tr.metrics.buf.clone()}


@pytest.mark.parametrize("both,compiled_only", [
    ({}, {}),
    # fastibot's tile-attention op inside the compiled graph (Triton's interpreter here) against the eager
    # step on SDPA
    ({}, {"model.attention": "triton"}),
    # the same with the partitioner's budget recomputing part of the step; no drop path (a recomputed random
    # draw is not eager's)
    ({"model.drop_path": 0.0}, {"model.attention": "triton", "runtime.activation_memory": 0.5}),
], ids=["sdpa", "triton-attention", "triton-attention-budget"])
def test_compiled_step_equals_eager_step(tmp_path, both, compiled_only):
    """runtime.compile=true (the teacher, and the student forward + loss, each one inductor graph; backward
    through AOTAutograd) trains the same numbers as the eager step over several steps: losses, student,
    teacher, centers. Inductor's random numbers follow eager's here (fallback_random) so drop path matches."""
    import torch._inductor.config as inductor_config
    extra = {"model.depth": 2, "model.drop_path": 0.2, "runtime.max_steps": 4, **both}
    runs = {}
    for mode in ("false", "true"):
        torch.manual_seed(0)
        tr = _trainer(tmp_path / mode, **extra, **{"runtime.compile": mode},
                      **(compiled_only if mode == "true" else {}))
        assert tr.compile == (mode == "true")
        batches = _batches(tr, 4)
        with inductor_config.patch(fallback_random=True):
            torch.manual_seed(1)
            for b in batches:
                tr.train_step([b])
        runs[mode] = _snapshot(tr)
    eager, compiled = runs["false"], runs["true"]
    torch.testing.assert_close(compiled["metrics"], eager["metrics"], rtol=1e-4, atol=1e-5)  # loss sums, norms
    for part in ("student", "teacher", "centers"):
        for k, v in eager[part].items():
            torch.testing.assert_close(compiled[part][k], v, rtol=1e-4, atol=1e-5, msg=f"{part}.{k}")
    assert not torch.equal(eager["student"]["backbone.pos_embed"], runs["false"]["teacher"]["backbone.pos_embed"])


def test_no_recompiles_as_the_masks_change(tmp_path):
    import torch._dynamo as dynamo
    from torch._dynamo.utils import counters
    dynamo.reset()
    counters.clear()
    tr = _trainer(tmp_path, **{"model.depth": 1, "runtime.compile": "true"})
    batches = _batches(tr, 5)
    tr.train_step([batches[0]])
    graphs = counters["stats"]["unique_graphs"]
    assert graphs == 2  # the teacher, and the student + loss: each compiled whole (fullgraph)
    masked = {int(b.masks.sum()) for b in batches}
    assert len(masked) > 2  # the batches really mask different numbers of patches
    for b in batches[1:]:
        tr.train_step([b])
    assert counters["stats"]["unique_graphs"] == graphs  # nothing compiled again


def test_device_schedules_equal_the_host_schedules_at_every_step(tmp_path):
    tr = _trainer(tmp_path, **{"optim.freeze_last_layer": 0.5})
    s: Schedules = tr.sched
    assert s.freeze_last_layer_steps > 0
    for i in range(len(s)):
        tr.stepper.step_t.fill_(i)
        h = tr.stepper.hyper()
        host = {"lr": s.lr[i], "wd": s.wd[i], "momentum": s.momentum[i], "one_minus_momentum": 1.0 - s.momentum[i],
                "teacher_temp": s.teacher_temp[i], "teacher_patch_temp": s.teacher_patch_temp[i],
                "frozen": float(i < s.freeze_last_layer_steps)}
        for k, v in host.items():
            assert h[k].item() == v, (i, k)


def test_each_center_follows_its_own_teacher_statistic(tmp_path):
    """Unequal [CLS] and patch prototype counts (separate last layers): after one step each center equals
    (1 - m)·mean of its own teacher logits; the patch mean is formed here from every patch's logits, not
    through the model's W·mean(z) shortcut."""
    tr = _trainer(tmp_path, **{"model.out_dim": 48, "model.patch_out_dim": 40, "model.shared_head": False,
                               "model.shared_head_teacher": False, "ibot.center_momentum": 0.75,
                               "ibot.center_momentum2": 0.6})
    b = _batches(tr, 1)[0]
    with torch.no_grad():
        tokens = tr.teacher.backbone.forward_features(b.globals)
        z = tr.teacher.head.embed(tokens)
        cls_mean = tr.teacher.head.cls_logits(z[:, 0]).double().mean(0)
        patch_mean = tr.teacher.head.patch_logits(z[:, 1:]).double().mean((0, 1))
    tr.train_step([b])
    c = tr.centers
    assert c.center.shape == (1, 48) and c.center2.shape == (1, 40)
    torch.testing.assert_close(c.center.double()[0], 0.25 * cls_mean, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(c.center2.double()[0], 0.4 * patch_mean, rtol=1e-4, atol=1e-6)


def test_the_centers_all_reduce_runs_under_the_backward(tmp_path, monkeypatch):
    """With several processes the center statistics are all-reduced asynchronously: started before the
    backward, waited for after it (as DINOv2 overlaps it), and the centers then move by the mean over
    processes. Two processes are played by a fake collective whose other rank sends the same statistics
    plus one, so the mean is this rank's statistic + 0.5."""
    import torch.distributed as dist

    tr = _trainer(tmp_path)
    b = _batches(tr, 1)[0]
    events = []

    class Work:
        def __init__(self, t):
            self.t = t

        def wait(self):
            events.append("wait")
            self.t.mul_(2).add_(1)  # this rank's + the other rank's (the same + 1)
            return True

    def all_reduce(t, op=None, group=None, async_op=False):
        if t.numel() == tr.centers.center.numel() + tr.centers.center2.numel():
            events.append(f"centers all-reduce, async={async_op}")
            return Work(t) if async_op else Work(t).wait()
        return None  # the gradient buffer: leaves it as it is (the other rank has the same gradients)

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    first = next(p for p in tr.student.parameters() if p.requires_grad)
    first.register_post_accumulate_grad_hook(lambda p: events.append("backward"))
    m, m2 = tr.centers.momentum, tr.centers.momentum2
    seen = {}
    real_start = tr.centers.start

    def start(cls_mean, patch_mean):  # what this rank contributes
        seen["stats"] = cls_mean.clone(), patch_mean.clone()
        return real_start(cls_mean, patch_mean)

    monkeypatch.setattr(tr.centers, "start", start)
    tr.train_step([b])
    assert events == ["centers all-reduce, async=True", "backward", "wait"]
    cls_mean, patch_mean = seen["stats"]
    torch.testing.assert_close(tr.centers.center[0], (1 - m) * (cls_mean.float() + 0.5), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(tr.centers.center2[0], (1 - m2) * (patch_mean.float() + 0.5), rtol=1e-5,
                               atol=1e-7)


def test_accumulated_micro_batches_average_their_gradients(tmp_path):
    """Two identical micro-batches give the gradient of one (each is divided by accum_steps); without the
    division the logged gradient norm would double."""
    norms = {}
    for accum in (1, 2):
        tr = _trainer(tmp_path / str(accum), **{"optim.accum_steps": accum, "model.drop_path": 0.0,
                                                 "ibot.center_momentum": 1.0, "ibot.center_momentum2": 1.0})
        b = _batches(tr, 1)[0]
        tr.train_step([b] * accum)
        norms[accum] = tr.log_metrics()["grad_norm"]
    assert norms[2] == pytest.approx(norms[1], rel=1e-5)


def test_clipping_per_parameter_and_global():
    g = torch.Generator().manual_seed(0)
    grads = [torch.randn(7, 3, generator=g) * 5, torch.randn(11, generator=g) * 0.01, torch.randn(4, 4, generator=g)]
    before = [x.clone() for x in grads]
    total = clip_(grads, 1.0, "per_param")
    assert total.item() == pytest.approx(float(torch.cat([x.reshape(-1) for x in before]).norm()), rel=1e-6)
    for a, b in zip(grads, before):
        expected = b * min(1.0, 1.0 / (float(b.norm()) + 1e-6))  # each tensor on its own (the official rule)
        torch.testing.assert_close(a, expected)
    assert grads[1].norm() < 0.5  # a small gradient is left alone
    grads = [x.clone() for x in before]
    clip_(grads, 1.0, "global")
    assert float(torch.cat([x.reshape(-1) for x in grads]).norm()) == pytest.approx(1.0, rel=1e-5)
    ratios = [float(a.norm() / b.norm()) for a, b in zip(grads, before)]
    assert max(ratios) == pytest.approx(min(ratios), rel=1e-6)  # one factor for all


def test_last_layer_is_frozen_for_the_first_epoch_then_trains(tmp_path):
    tr = _trainer(tmp_path, **{"optim.freeze_last_layer": 1.0})
    spe = tr.steps_per_epoch
    last = [p for n, p in tr.student.named_parameters() if "last_layer" in n]
    other = tr.student.backbone.pos_embed
    start, start_other = [p.detach().clone() for p in last], other.detach().clone()
    batches = _batches(tr, spe + 1)
    for b in batches[:spe]:
        tr.train_step([b])
    assert all(torch.equal(a, p) for a, p in zip(start, last))  # no update, no weight decay
    assert all(s["step"].item() == 0 for s in tr.opt.last.state.values())  # not even counted
    assert not torch.equal(start_other, other)
    tr.train_step([batches[spe]])
    assert any(not torch.equal(a, p) for a, p in zip(start, last))
    assert np.isclose(tr.log_metrics()["lr"], tr.sched.lr[spe])


def test_compiled_step_with_the_leanest_activation_budget_trains(tmp_path):
    """runtime.activation_memory near 0 makes the compiled backward recompute almost everything from the
    inputs, the loss's centers included: the step must leave them alone until backward is done."""
    tr = _trainer(tmp_path, **{"model.depth": 1, "runtime.compile": "true", "runtime.activation_memory": 0.05})
    for b in _batches(tr, 2):
        tr.train_step([b])
    row = tr.log_metrics()
    assert row["nonfinite_steps"] == 0 and np.isfinite(row["loss"])


def _saved_bytes(tr, batch) -> int:
    """Bytes one step keeps for its backward (compiled graphs' saved tensors included)."""
    total = [0]

    def pack(t):
        total[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        tr.train_step([batch])
    return total[0]


def test_compiled_step_recomputes_blocks_keeps_less_and_trains_the_same(tmp_path):
    """runtime.recompute_blocks=1 checkpoints every student block inside the compiled graph (the
    recompute is forced there, matmuls and attention included, whatever the partitioner would choose):
    the same numbers as keeping them, far fewer bytes saved for the backward, nothing compiled twice."""
    import torch._inductor.config as inductor_config
    from torch._dynamo.utils import counters
    runs, saved = {}, {}
    for share in (0.0, 1.0):
        torch.manual_seed(0)
        tr = _trainer(tmp_path / str(share), **{"model.depth": 2, "model.drop_path": 0.2, "runtime.compile": "true",
                                                 "runtime.activation_memory": 1.0, "runtime.recompute_blocks": share})
        assert tr.student.backbone.recompute == int(2 * share)
        batches = _batches(tr, 3)
        with inductor_config.patch(fallback_random=True):
            torch.manual_seed(1)
            tr.train_step([batches[0]])
            graphs = counters["stats"]["unique_graphs"]
            tr.train_step([batches[1]])
            saved[share] = _saved_bytes(tr, batches[2])
            assert counters["stats"]["unique_graphs"] == graphs
        runs[share] = _snapshot(tr)
    assert saved[1.0] < 0.6 * saved[0.0]
    for part in ("student", "teacher", "centers"):
        for k, v in runs[0.0][part].items():
            torch.testing.assert_close(runs[1.0][part][k], v, rtol=1e-4, atol=1e-5, msg=f"{part}.{k}")
    torch.testing.assert_close(runs[1.0]["metrics"], runs[0.0]["metrics"], rtol=1e-4, atol=1e-5)


def test_eager_activation_budget_recomputes_blocks_and_trains_the_same(tmp_path):
    """Uncompiled, runtime.activation_memory keeps that share of the blocks' activations and recomputes the
    others in backward (drop-path draws replayed): the same numbers as keeping all of them."""
    runs = {}
    for share in (1.0, 0.5):
        torch.manual_seed(0)
        tr = _trainer(tmp_path / str(share), **{"model.depth": 4, "model.drop_path": 0.3,
                                                 "runtime.activation_memory": share})
        assert tr.student.backbone.recompute == (0 if share == 1.0 else 2)
        torch.manual_seed(1)
        for b in _batches(tr, 2):
            tr.train_step([b])
        runs[share] = _snapshot(tr)
    for part in ("student", "teacher"):
        for k, v in runs[1.0][part].items():
            torch.testing.assert_close(runs[0.5][part][k], v, rtol=1e-5, atol=1e-6, msg=f"{part}.{k}")
    torch.testing.assert_close(runs[0.5]["metrics"], runs[1.0]["metrics"], rtol=1e-5, atol=1e-6)


def test_loss_scaler_unscales_skips_overflow_and_adapts_the_scale():
    """fp16 loss scaling on the device: unscale divides by the scale, an inf/NaN sets found_inf and halves
    the scale, growth_interval clean steps double it (GradScaler's rule)."""
    from fastibot.optim import LossScaler
    s = LossScaler(torch.device("cpu"), init_scale=1024.0, growth_interval=2)
    g = [torch.full((3,), 2048.0), torch.full((2,), -512.0)]
    assert s.unscale_(g).item() == 0.0
    torch.testing.assert_close(g[0], torch.full((3,), 2.0))
    torch.testing.assert_close(g[1], torch.full((2,), -0.5))
    s.update(torch.zeros(()))
    assert s.scale.item() == 1024.0
    s.update(torch.zeros(()))
    assert s.scale.item() == 2048.0  # two clean steps: doubled
    bad = [torch.tensor([1.0, float("inf")])]
    found = s.unscale_(bad)
    assert found.item() == 1.0
    s.update(found)
    assert s.scale.item() == 1024.0 and s.growth_tracker.item() == 0
    state = s.state_dict()
    t = LossScaler(torch.device("cpu"))
    t.load_state_dict(state)
    assert t.scale.item() == 1024.0


def test_fp16_training_scales_the_loss_on_the_device(tmp_path):
    """Overflowing scaled gradients skip their step and halve the scale (on the device); the others train."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    tr = Trainer(tiny_config(tmp_path, **{"runtime.precision": "fp16"}),
                 Runtime(torch.device("cpu"), amp_dtype=torch.float16))  # the CPU autocasts to fp16 as CUDA would
    assert tr.scaler is not None and tr.scaler.scale.item() == 2.0 ** 16
    start = tr.student.backbone.pos_embed.detach().clone()
    batches = _batches(tr, 3)
    for i in range(12):  # this tiny model's gradients overflow fp16 at scales above ~1e3: the first steps skip
        tr.train_step([batches[i % 3]])
    row = tr.log_metrics()
    skipped = row["nonfinite_steps"]
    assert 0 < skipped < 10 and np.isfinite(row["loss"])
    assert tr.scaler.scale.item() == 2.0 ** (16 - skipped)  # one halving per skipped step, none grew yet
    assert not torch.equal(start, tr.student.backbone.pos_embed)  # the finite steps trained


def test_switches_that_cannot_run_here_say_why(tmp_path):
    """No quiet substitutes: a CUDA graph asked for on the CPU is an error naming the key; auto resolves to
    what runs (eager, uncaptured, reference loss, foreach EMA on the CPU)."""
    from fastibot.runtime import TrainingError
    with pytest.raises(TrainingError, match="runtime.cuda_graph=true needs a CUDA device"):
        _trainer(tmp_path / "g", **{"runtime.cuda_graph": "true"})
    tr = _trainer(tmp_path / "a")
    assert (tr.compile, tr.cuda_graph, tr.loss_impl, tr.ema_impl) == (False, False, "reference", "foreach")
    assert tr.run_step is tr.stepper  # not wrapped in a graph


@pytest.mark.parametrize("level,expect", [("none", {}), ("kernels", {"coordinate_descent_tuning": True}),
                                          ("max", {"coordinate_descent_tuning": True, "max_autotune": True})])
def test_runtime_autotune_reaches_both_compiled_graphs(tmp_path, monkeypatch, level, expect):
    """runtime.autotune picks inductor's search options for the teacher graph and the student + loss graph,
    and inductor's own CUDA graphs stay off at every level (the step captures its own)."""
    import fastibot.step as step_mod
    seen = []

    def recorder(fn, **kw):
        seen.append(kw)
        return fn

    monkeypatch.setattr(step_mod.torch, "compile", recorder)
    _trainer(tmp_path, **{"runtime.compile": "true", "runtime.autotune": level, "model.depth": 1})
    assert len(seen) == 2
    for kw in seen:
        assert kw["fullgraph"] is True and kw["dynamic"] is False
        options = dict(kw["options"])
        assert isinstance(options.pop("joint_custom_pre_pass"), KeepMarked)  # the residuals are kept
        assert options == {"triton.cudagraphs": False, **expect}
