"""Convergence guard: a tiny model trained with kernels on and off (loss, EMA, the fused update, the GELU
backward) follows the same loss curve."""
import csv

import pytest

from fastibot.train import train
from conftest import tiny_config


def _losses(folder):
    with open(folder / "metrics.csv", newline="") as f:
        return [(float(r["loss"]), float(r["cls"]), float(r["patch"])) for r in csv.DictReader(f)]


@pytest.mark.parametrize("packed", [False, True])
def test_kernels_on_and_off_give_the_same_curve(tmp_path, packed):
    common = {"runtime.max_steps": 8, "model.packed": packed, "optim.lr": 2e-3}
    train(tiny_config(tmp_path / "ref", **common, **{"kernels.loss": "reference", "kernels.ema": "reference",
                                                      "kernels.update": "torch"}))
    train(tiny_config(tmp_path / "fast", **common, **{"kernels.loss": "triton", "kernels.ema": "triton",
                                                       "kernels.update": "triton"}))
    ref, fast = _losses(tmp_path / "ref"), _losses(tmp_path / "fast")
    assert len(ref) == len(fast) == 8
    for step, (a, b) in enumerate(zip(ref, fast)):
        for x, y in zip(a, b):
            assert y == pytest.approx(x, rel=2e-4, abs=1e-5), (step, a, b)
    # and the curve is not flat: training changed the loss
    assert abs(ref[-1][0] - ref[0][0]) > 1e-3
