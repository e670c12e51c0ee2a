"""examples/slurm.sbatch on the CPU, with stand-ins for SLURM's commands (srun runs its command here, scontrol
names this host and records a requeue, scancel passes the signal to the job step, torchrun is this Python's
torch.distributed.run): SIGUSR1 to the batch
script, as SLURM sends it ahead of the time limit, stops the run with a checkpoint and requeues the job; the
requeued start resumes and completes without asking for another."""
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch.distributed as dist

from fastibot.checkpoint import checkpoints
from conftest import free_port, metrics_rows, tiny_overrides

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available in this build")

SHIMS = {
    # srun OPTIONS COMMAND...: run COMMAND here, in its own session, and note its pid for scancel
    "srun": 'while [[ "$1" == --* ]]; do shift; done\necho $$ > "$STEP_PID"\nexec setsid "$@"',
    "scontrol": 'case "$1" in\n  show) echo 127.0.0.1 ;;\n  requeue) echo "$2" >> "$REQUEUED" ;;\nesac',
    "scancel": 'sig="${1#--signal=}"\nkill -"$sig" "$(cat "$STEP_PID")"',
    "torchrun": f'exec {sys.executable} -m torch.distributed.run "$@"',  # what pip's torchrun script runs
}


def _sbatch(tmp_path, run, *args):
    path = f"{tmp_path / 'bin'}:{os.environ['PATH']}"
    env = {**os.environ, "PATH": path, "PYTHONPATH": str(REPO),
           "OMP_NUM_THREADS": "1", "SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "fastibot", "SLURM_NNODES": "1",
           "SLURM_JOB_NODELIST": "localhost", "SLURM_GPUS_ON_NODE": "2", "RUN": str(run),
           "STEP_PID": str(tmp_path / "step.pid"), "REQUEUED": str(tmp_path / "requeued"),
           "PORT": str(free_port())}
    return subprocess.Popen(["bash", str(REPO / "examples" / "slurm.sbatch"), *args], env=env, cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def test_the_slurm_script_requeues_at_the_time_limit_and_resumes(tmp_path):
    (tmp_path / "bin").mkdir()
    for name, body in SHIMS.items():
        shim = tmp_path / "bin" / name
        shim.write_text("#!/bin/bash\n" + body + "\n")
        shim.chmod(shim.stat().st_mode | stat.S_IXUSR)
    run = tmp_path / "run"
    args = tiny_overrides(run, **{"runtime.device": "cpu", "model.depth": 1, "data.batch_size": 4, "optim.epochs": 10})
    args = [a for a in args if not a.startswith("runtime.output_dir=")]  # the script sets it from RUN
    job = _sbatch(tmp_path, run, *args, "runtime.max_steps=40", "runtime.ckpt_every=0")
    try:
        deadline = time.time() + 240
        while not (run / "metrics.csv").exists() or len(metrics_rows(run)) < 2:
            assert job.poll() is None and time.time() < deadline, job.communicate()[0][-3000:]
            time.sleep(0.2)
        job.send_signal(signal.SIGUSR1)  # SLURM's --signal=B:USR1@300, to the batch script
        out = job.communicate(timeout=240)[0]
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
    saved = [s for s, _ in checkpoints(run)]
    assert len(saved) == 1 and 2 <= saved[0] < 40, out[-3000:]
    assert "stopped by SIGUSR1" in out
    assert (tmp_path / "requeued").read_text().split() == ["4242"]
    # the requeued start finds the checkpoint, resumes, completes, and does not requeue again
    done = _sbatch(tmp_path, run, *args, f"runtime.max_steps={saved[0] + 2}", "runtime.ckpt_every=0")
    out = done.communicate(timeout=240)[0]
    assert done.returncode == 0, out[-3000:]
    assert f"resumed from {run / f'checkpoint_{saved[0]:08d}.pt'}" in out
    assert [int(r["step"]) for r in metrics_rows(run)] == list(range(1, saved[0] + 3))
    assert (tmp_path / "requeued").read_text().split() == ["4242"]
