"""Sharded data parallelism (runtime.parallel=fsdp) over torchrun with gloo on the CPU, against one process
training the same global batch: losses, gradient norms and weights agree step by step; sharded checkpoints
written by 4 processes resume on 2 processes (FSDP) and on 1 (DDP), and one process's single-file checkpoint on
2 FSDP processes, each continuing the same curve; a NaN loss on one rank skips the step on every rank."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from fastibot.checkpoint import checkpoints, load_checkpoint
from fastibot.train import train
from conftest import free_port, labelled_folder, metrics_rows, tiny_config

HERE = Path(__file__).resolve().parent

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available in this build")

# 8 images per step in every run: 1 x 8, 2 x 4, 4 x 2. No drop path: its draws are per process.
COMMON = {"runtime.device": "cpu", "model.depth": 1, "model.drop_path": 0.0, "runtime.max_steps": 4,
          "runtime.ckpt_every": 2, "runtime.keep_last": 3}


def torchrun(nproc: int, runs: list) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE.parent)}
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", str(HERE / "fsdp_worker.py"), json.dumps(runs)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def run(out: Path, batch: int, parallel: str = "fsdp", resume=None, nan_on_rank=None, **extra) -> dict:
    return {"out": str(out), "resume": resume and str(resume), "nan_on_rank": nan_on_rank,
            "overrides": {**COMMON, "data.batch_size": batch, "runtime.parallel": parallel, **extra}}


def assert_same_curve(got: list, want: list, steps) -> None:
    by_step = {int(r["step"]): r for r in want}
    assert [int(r["step"]) for r in got] == list(steps)
    for r in got:
        for k in ("loss", "cls", "patch", "grad_norm", "lr", "teacher_temp"):
            assert float(r[k]) == pytest.approx(float(by_step[int(r["step"])][k]), rel=2e-5), (r["step"], k)


def assert_same_weights(a: dict, b: dict) -> None:
    for part in ("student", "teacher", "centers"):
        assert a[part].keys() == b[part].keys()
        for k, v in a[part].items():
            torch.testing.assert_close(b[part][k], v, rtol=1e-4, atol=1e-5, msg=f"{part}.{k}")


def test_fsdp_equals_one_process_and_resumes_at_other_world_sizes(tmp_path):
    ref, dense_ref, dense = tmp_path / "ref", tmp_path / "dense_ref", tmp_path / "dense"
    train(tiny_config(ref, **COMMON, **{"data.batch_size": 8}))
    short_dense = {"model.packed": False, "runtime.max_steps": 2, "runtime.ckpt_every": 0}
    train(tiny_config(dense_ref, **{**COMMON, **short_dense, "data.batch_size": 8}))
    w4, w2, w2r, w2f, w1r, nan = (tmp_path / n for n in ("w4", "w2", "w2_resumed", "w2_from_file", "w1_resumed",
                                                         "nan"))
    images = labelled_folder(tmp_path / "images")
    knn = {"eval.every_n_steps": 2, "eval.train_path": str(images), "eval.val_path": str(images), "eval.k": 1,
           "eval.image_size": 32, "eval.batch_size": 8}
    torchrun(4, [run(w4, 2)])
    saved = w4 / "checkpoint_00000002.dcp"
    torchrun(2, [run(w2, 4, **knn), run(w2r, 4, resume=saved), run(w2f, 4, resume=ref / "checkpoint_00000002.pt"),
                 run(dense, 4, **short_dense),
                 run(nan, 4, **{"runtime.max_steps": 2, "runtime.ckpt_every": 0}, nan_on_rank=1)])
    train(tiny_config(w1r, **COMMON, **{"data.batch_size": 8}), resume=str(saved))

    assert [s for s, _ in checkpoints(w4)] == [2, 4] and saved.is_dir()
    assert not list(w4.glob(".*.tmp"))  # written in a temporary folder, then renamed
    reference = load_checkpoint(ref / "checkpoint_00000004.pt")
    for folder in (w4, w2):  # 4 and 2 processes from scratch
        assert_same_curve(metrics_rows(folder), metrics_rows(ref), range(1, 5))
        assert_same_weights(reference, load_checkpoint(folder / "checkpoint_00000004.dcp"))
    assert_same_curve(metrics_rows(dense), metrics_rows(dense_ref), range(1, 3))  # the dense path calls the head twice per step
    # periodic k-NN on the main process, of a teacher every rank gathered whole (the memory bank as queries, k=1)
    assert [(r["step"], r["knn_top1"]) for r in metrics_rows(w2) if r.get("knn_top1")] == [("2", "100.0"), ("4", "100.0")]
    # the world-4 checkpoint of step 2 continues on 2 FSDP processes and on 1 DDP process
    assert_same_curve(metrics_rows(w2r), metrics_rows(ref), range(3, 5))
    assert_same_weights(reference, load_checkpoint(w2r / "checkpoint_00000004.dcp"))
    assert_same_curve(metrics_rows(w1r), metrics_rows(ref), range(3, 5))
    # and one process's single-file checkpoint continues on 2 FSDP processes (each cuts its shards from it)
    assert_same_curve(metrics_rows(w2f), metrics_rows(ref), range(3, 5))
    assert_same_weights(reference, load_checkpoint(w2f / "checkpoint_00000004.dcp"))
    assert_same_weights(reference, load_checkpoint(w1r / "checkpoint_00000004.pt"))
    views = [json.loads((w2r / f"rank{r}.json").read_text()) for r in range(2)]
    assert all(v["opt_steps"] == [0.0, 4.0] for v in views)  # AdamW's step counts came back (last layer frozen)
    # rank 1's NaN loss at step 1 skips that step on both ranks (one rank stepping alone would split the shards)
    views = [json.loads((nan / f"rank{r}.json").read_text()) for r in range(2)]
    assert [v["nonfinite_steps"] for v in views] == [1, 1]
    assert [v["opt_steps"] for v in views] == [[0.0, 1.0], [0.0, 1.0]]
