"""Two "nodes" on one machine, launched as users launch a multi-node run: two torchrun processes meeting at a
c10d rendezvous, each starting 2 workers of ``python -m fastibot.cli train`` with runtime.parallel=hsdp
(shard groups of one node's processes, replicated across the nodes). SIGUSR1 to one node's torchrun (as
SLURM sends it ahead of the time limit) stops the workers of both nodes at the same step with one sharded
checkpoint, which one DDP process then continues."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch.distributed as dist

from fastibot.checkpoint import checkpoints
from fastibot.train import train
from conftest import free_port, metrics_rows, tiny_config, tiny_overrides

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available in this build")

COMMON = {"runtime.device": "cpu", "model.depth": 1, "model.drop_path": 0.0, "optim.epochs": 10,
          "runtime.max_steps": 40, "runtime.ckpt_every": 0}


def test_two_nodes_train_hsdp_and_stop_together_on_sigusr1(tmp_path):
    run = tmp_path / "run"
    args = tiny_overrides(run, **COMMON, **{"runtime.parallel": "hsdp", "data.batch_size": 2})
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    nodes = []
    for node in range(2):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=2",
               "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}", "--rdzv_id=fastibot-test",
               f"--rdzv_conf=is_host={int(node == 0)}", "--max_restarts=0", "--shutdown-timeout=120",
               "--signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1",
               "-m", "fastibot.cli", "train", *args]
        nodes.append(subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True, start_new_session=True))
    try:
        deadline = time.time() + 300
        while not (run / "metrics.csv").exists() or len(metrics_rows(run)) < 3:
            assert all(p.poll() is None for p in nodes) and time.time() < deadline, nodes[0].communicate()[0][-3000:]
            time.sleep(0.2)
        nodes[0].send_signal(signal.SIGUSR1)  # node 0's torchrun only; it forwards the signal to its workers
        outs = [p.communicate(timeout=240)[0] for p in nodes]
    finally:
        for p in nodes:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
    saved = [s for s, _ in checkpoints(run)]
    assert len(saved) == 1 and 3 <= saved[0] < 40, outs[0][-3000:]
    stop = saved[0]
    assert "stopped by SIGUSR1 at step" in outs[0]
    # node 1's workers got no signal: they stopped at the agreed step, wrote their shards of the same checkpoint
    # and exited as signalled (128 + 10)
    folder = run / f"checkpoint_{stop:08d}.dcp"
    assert {p.name.split("_")[2] for p in folder.glob("__*.distcp")} == {"0", "1", "2", "3"}
    assert "exitcode  : 138" in outs[1], outs[1][-3000:]
    meta = json.loads((folder / "fastibot.json").read_text())
    assert (meta["world"], meta["parallel"], meta["step"]) == (4, "hsdp", stop)

    # the same global batch in one process: the same curve, and the checkpoint continues there under ddp
    ref, cont = tmp_path / "ref", tmp_path / "continued"
    one = {**COMMON, "data.batch_size": 8, "runtime.max_steps": stop + 1}
    train(tiny_config(ref, **one))
    train(tiny_config(cont, **one), resume=str(run / f"checkpoint_{stop:08d}.dcp"))
    want = {r["step"]: r for r in metrics_rows(ref)}
    got = metrics_rows(run) + metrics_rows(cont)
    assert [int(r["step"]) for r in got] == list(range(1, stop + 2))
    for r in got:
        for k in ("loss", "grad_norm"):
            assert float(r[k]) == pytest.approx(float(want[r["step"]][k]), rel=2e-5), (r["step"], k)
