"""A scheduler's stop signals to the whole process group of a run with loader workers."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fastibot.checkpoint import checkpoints
from fastibot.data.synthetic import synthetic_image
from conftest import tiny_overrides

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_a_stop_signal_to_the_process_group_checkpoints_and_exits(tmp_path, sig):
    """SIGTERM (preemption) or SIGUSR1 (SLURM, ahead of the time limit) to the run and its loader workers."""
    images = tmp_path / "images"
    for i in range(24):
        (images / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        synthetic_image(i, 2, 48, seed=3)[0].save(images / f"c{i % 2}" / f"{i}.jpg")
    run = tmp_path / "run"
    args = tiny_overrides(run, **{"data.source": "imagefolder", "data.path": str(images), "data.loader": "torchvision",
                                  "data.num_workers": 2, "optim.epochs": 200, "runtime.max_steps": 500})
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "fastibot.cli", "train", *args], env=env, cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.time() + 180
        while not (run / "metrics.csv").exists() or len((run / "metrics.csv").read_text().splitlines()) < 3:
            assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-2000:]
            time.sleep(0.2)
        os.killpg(proc.pid, sig)  # main process and loader workers alike
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 128 + sig, err[-2000:]
    assert "--resume" in err
    saved = [s for s, _ in checkpoints(run)]
    assert len(saved) == 1 and 2 <= saved[0] < 500
