"""Schedules hit their endpoints (teacher temperatures per epoch, as officially, or per iteration); centers
update as an EMA."""
import numpy as np
import pytest
import torch

from fastibot.teacher import Centers, Schedules, cosine_schedule, warmup_constant
from conftest import tiny_config


def test_cosine_with_warmup_endpoints():
    s = cosine_schedule(1.0, 0.01, total=100, warmup=10)
    assert len(s) == 100
    assert s[0] == 0.0 and s[9] == pytest.approx(1.0)
    assert s[10] == pytest.approx(1.0)
    assert s[-1] == pytest.approx(0.01, abs=1e-3)
    assert np.all(np.diff(s[10:]) <= 1e-12)  # monotone decay after warm-up


def test_warmup_constant():
    s = warmup_constant(0.04, 0.07, total=50, warmup=20)
    assert s[0] == pytest.approx(0.04) and s[19] == pytest.approx(0.07) and s[-1] == pytest.approx(0.07)


def test_schedules_from_config(tmp_path):
    cfg = tiny_config(tmp_path, **{"optim.epochs": 10, "optim.warmup_epochs": 2, "optim.lr": 5e-4,
                                    "data.batch_size": 8, "teacher.warmup_temp_epochs": 3,
                                    "optim.freeze_last_layer": 1})
    spe = 5
    s = Schedules.build(cfg, steps_per_epoch=spe, world=4)
    peak = 5e-4 * 8 * 4 / 256  # linear scaling with the global batch
    assert len(s) == 50
    assert s.lr[0] == 0.0 and s.lr[2 * spe - 1] == pytest.approx(peak) and s.lr.max() == pytest.approx(peak)
    assert s.lr[-1] == pytest.approx(cfg.optim.min_lr, rel=0.2)
    assert s.wd[0] == pytest.approx(0.04) and s.wd[-1] == pytest.approx(0.4, rel=1e-2)
    assert s.momentum[0] == pytest.approx(0.996) and s.momentum[-1] == pytest.approx(1.0, abs=1e-5)
    assert s.teacher_temp[0] == pytest.approx(0.04) and s.teacher_temp[3 * spe - 1] == pytest.approx(0.07)
    assert s.teacher_temp[-1] == pytest.approx(0.07)
    assert s.freeze_last_layer_steps == spe


def _official_epoch_temps(warm, final, warmup_epochs, epochs, start_epoch=0):
    """The official per-epoch values, written from its definition: ``start_epoch`` epochs at ``warm``, then
    ``warmup_epochs`` values evenly spaced from ``warm`` to ``final`` (both included), then ``final``."""
    out = []
    for e in range(epochs):
        k = e - start_epoch
        if k < 0:
            out.append(warm)
        elif k < warmup_epochs:
            out.append(warm if warmup_epochs == 1 else warm + (final - warm) * k / (warmup_epochs - 1))
        else:
            out.append(final)
    return np.array(out)


@pytest.mark.parametrize("start_epoch", [0, 2])
def test_teacher_temperatures_step_once_per_epoch(tmp_path, start_epoch):
    cfg = tiny_config(tmp_path, **{"optim.epochs": 9, "teacher.warmup_temp_epochs": 4, "teacher.warmup_temp": 0.04,
                                    "teacher.temp": 0.07, "teacher.warmup_patch_temp": 0.03,
                                    "teacher.patch_temp": 0.06, "masking.start_epoch": start_epoch})
    assert cfg.teacher.temp_warmup == "epoch"  # the official schedule is the default
    spe = 5
    s = Schedules.build(cfg, steps_per_epoch=spe, world=1)
    cls_ref = _official_epoch_temps(0.04, 0.07, 4, 9)
    patch_ref = _official_epoch_temps(0.03, 0.06, 4, 9, start_epoch)
    for step in range(9 * spe):
        assert s.teacher_temp[step] == pytest.approx(cls_ref[step // spe], abs=1e-15), step
        assert s.teacher_patch_temp[step] == pytest.approx(patch_ref[step // spe], abs=1e-15), step
    # the [CLS] temperature never waits for masking; the patch one starts its warm-up at masking.start_epoch
    assert s.teacher_temp[3 * spe] == pytest.approx(0.07)
    assert s.teacher_patch_temp[(start_epoch + 3) * spe - 1] < 0.06
    assert s.teacher_patch_temp[(start_epoch + 3) * spe] == pytest.approx(0.06)


@pytest.mark.parametrize("start_epoch", [0, 3])
def test_teacher_temperatures_per_iteration_option(tmp_path, start_epoch):
    cfg = tiny_config(tmp_path, **{"optim.epochs": 8, "teacher.warmup_temp_epochs": 2, "teacher.warmup_temp": 0.04,
                                    "teacher.temp": 0.07, "teacher.warmup_patch_temp": 0.04,
                                    "teacher.patch_temp": 0.07, "teacher.temp_warmup": "iteration",
                                    "masking.start_epoch": start_epoch})
    spe = 5
    s = Schedules.build(cfg, steps_per_epoch=spe, world=1)
    ramp = np.linspace(0.04, 0.07, 2 * spe)  # every step rises
    np.testing.assert_allclose(s.teacher_temp[: 2 * spe], ramp, rtol=0, atol=1e-15)
    np.testing.assert_allclose(s.teacher_temp[2 * spe:], 0.07, rtol=0, atol=1e-15)
    shift = start_epoch * spe
    np.testing.assert_allclose(s.teacher_patch_temp[:shift], 0.04, rtol=0, atol=1e-15)
    np.testing.assert_allclose(s.teacher_patch_temp[shift: shift + 2 * spe], ramp, rtol=0, atol=1e-15)
    np.testing.assert_allclose(s.teacher_patch_temp[shift + 2 * spe:], 0.07, rtol=0, atol=1e-15)
    assert len(s.teacher_patch_temp) == len(s.teacher_temp) == 8 * spe


def test_epoch_warmup_needs_whole_epochs(tmp_path):
    from fastibot.config import ConfigError
    with pytest.raises(ConfigError, match="teacher.warmup_temp_epochs"):
        tiny_config(tmp_path, **{"teacher.warmup_temp_epochs": 1.5})
    cfg = tiny_config(tmp_path, **{"teacher.warmup_temp_epochs": 1.5, "teacher.temp_warmup": "iteration"})
    assert len(Schedules.build(cfg, steps_per_epoch=4, world=1).teacher_temp) == 8


def test_centers_ema_and_nonfinite_guard():
    c = Centers(4, 4, momentum=0.9, momentum2=0.5)
    c.finish(c.start(torch.ones(4), torch.full((4,), 2.0)))
    assert torch.allclose(c.center, torch.full((1, 4), 0.1))
    assert torch.allclose(c.center2, torch.full((1, 4), 1.0))
    c.finish(c.start(torch.tensor([1.0, float("nan"), 1.0, 1.0]), torch.full((4,), 2.0)))
    assert torch.allclose(c.center, torch.full((1, 4), 0.1))  # a non-finite statistic is ignored
    assert torch.allclose(c.center2, torch.full((1, 4), 1.5))


def test_cosine_follows_the_official_formula_at_every_step():
    """After the warm-up, value i is final + (base - final)·(1 + cos(π·i / R))/2 over the R remaining steps (the
    last value stays just above ``final``, as officially); half-way it is exactly the midpoint."""
    base, final, total, warmup = 1.0, 0.01, 100, 10
    s = cosine_schedule(base, final, total, warmup)
    rest = total - warmup
    want = [final + 0.5 * (base - final) * (1 + np.cos(np.pi * i / rest)) for i in range(rest)]
    np.testing.assert_allclose(s[warmup:], want, rtol=0, atol=1e-15)
    assert s[warmup + rest // 2] == pytest.approx((base + final) / 2, abs=1e-15)
    np.testing.assert_allclose(s[:warmup], np.arange(warmup) / (warmup - 1) * base, rtol=0, atol=1e-15)


def test_peak_lr_scales_with_the_global_batch_accumulation_included(tmp_path):
    """The peak lr follows the images per optimizer step: batch_size × accum_steps × processes / 256."""
    cfg = tiny_config(tmp_path, **{"optim.epochs": 4, "optim.warmup_epochs": 1, "optim.lr": 5e-4,
                                    "data.batch_size": 8, "optim.accum_steps": 3})
    s = Schedules.build(cfg, steps_per_epoch=5, world=2)
    assert s.lr.max() == pytest.approx(5e-4 * 8 * 3 * 2 / 256, rel=1e-12)
    assert s.lr[4] == s.lr.max()  # the last warm-up step reaches it
