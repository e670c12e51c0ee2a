"""Per-iteration schedules hit their endpoints; centers update as an EMA."""
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


def test_centers_ema_and_nonfinite_guard():
    c = Centers(4, 4, momentum=0.9, momentum2=0.5)
    c.update(torch.ones(4), torch.full((4,), 2.0))
    assert torch.allclose(c.center, torch.full((1, 4), 0.1))
    assert torch.allclose(c.center2, torch.full((1, 4), 1.0))
    c.update(torch.tensor([1.0, float("nan"), 1.0, 1.0]), torch.full((4,), 2.0))
    assert torch.allclose(c.center, torch.full((1, 4), 0.1))  # a non-finite statistic is ignored
    assert torch.allclose(c.center2, torch.full((1, 4), 1.5))
