"""Two processes over torchrun with the gloo backend on the CPU: the data-parallel code path end to end
(gradients averaged by one all-reduce of the flat gradient buffer)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist
from conftest import free_port

HERE = Path(__file__).resolve().parent

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available in this build")


def _torchrun(out_dir: Path, *overrides: str) -> list:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE.parent)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", str(HERE / "ddp_worker.py"), str(out_dir), *overrides]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return [json.loads((out_dir / f"rank{r}.json").read_text()) for r in range(2)]


def test_ddp_keeps_ranks_in_step(tmp_path):
    r0, r1 = _torchrun(tmp_path, "optim.epochs=4", "runtime.max_steps=3", "optim.accum_steps=2",
                      "model.packed=true")
    assert r0["world"] == r1["world"] == 2 and r0["step"] == r1["step"] == 3
    # gradients are averaged, so every rank holds the same student, teacher and (all-reduced) centers
    assert r0["student"] == pytest.approx(r1["student"], rel=1e-6, abs=1e-6)
    assert r0["teacher"] == pytest.approx(r1["teacher"], rel=1e-6, abs=1e-6)
    assert r0["centers"] == pytest.approx(r1["centers"], rel=1e-6, abs=1e-6)
    # the logged loss is the mean over both ranks' batches, not each rank's own
    assert r0["loss"] == r1["loss"]
    assert sorted(p.name for p in tmp_path.glob("checkpoint_*.pt")) == ["checkpoint_00000003.pt"]  # rank 0 only


def test_a_nonfinite_loss_on_one_rank_skips_the_step_on_every_rank(tmp_path):
    """The skip decision travels with the gradient all-reduce: rank 1's NaN loss at step 0 makes both ranks
    skip that optimizer step, so they stay identical (one rank stepping alone would split them)."""
    r0, r1 = _torchrun(tmp_path, "optim.epochs=4", "runtime.max_steps=2", "nan_on_rank=1")
    assert r0["nonfinite_steps"] == r1["nonfinite_steps"] == 1
    assert r0["student"] == r1["student"] and r0["teacher"] == r1["teacher"]


def test_ddp_time_budget_stops_every_rank_together(tmp_path):
    r0, r1 = _torchrun(tmp_path, "optim.epochs=20", "runtime.max_steps=40", "runtime.log_every=2",
                      "runtime.max_minutes=1e-9")
    assert r0["step"] == r1["step"] == 2


def test_ddp_resume_is_exact(tmp_path):
    common = ("optim.epochs=4", "model.packed=true")
    whole = _torchrun(tmp_path / "whole", *common, "runtime.max_steps=3")
    _torchrun(tmp_path / "split", *common, "runtime.max_steps=2")
    resumed = _torchrun(tmp_path / "split", *common, "runtime.max_steps=3", f"resume={tmp_path / 'split'}")
    for a, b in zip(whole, resumed):
        assert b["step"] == 3
        assert a["student"] == b["student"] and a["teacher"] == b["teacher"] and a["centers"] == b["centers"]
