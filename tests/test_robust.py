"""Abuse: hostile and broken checkpoints, shared run folders, divergence, and errors that must end the process."""
import hashlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from fastibot import checkpoint as ckpt
from fastibot.cli import main
from fastibot.data.synthetic import synthetic_image
from fastibot.rundir import RunFolderError, RunLock
from fastibot.train import TrainingError, train
from conftest import metrics_rows, tiny_config, tiny_overrides

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def _digest(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    """A finished 2-step run with checkpoints at steps 1 and 2 (copied by each test that changes it)."""
    run = tmp_path_factory.mktemp("base") / "run"
    train(tiny_config(run, **{"runtime.max_steps": 2, "runtime.ckpt_every": 1}))
    assert [s for s, _ in ckpt.checkpoints(run)] == [1, 2]
    return run


def _copy(base_run, tmp_path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(base_run, run)
    return run


def _hostile(path: Path, marker: Path, record: bool) -> None:
    """A checkpoint whose unpickling would run a shell command that creates ``marker``."""
    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    torch.save({"step": 99999999, "config": {}, "student": Payload()}, path)
    if record:  # forged, so that only the loader's refusal stands between the file and its code
        ckpt.record_path(path).write_text(json.dumps({"bytes": path.stat().st_size, "sha256": _digest(path)}))


# --------------------------------------------------------------------------- security


def test_every_torch_load_reads_tensors_and_plain_data_only():
    calls = []
    for path in (REPO / "fastibot").rglob("*.py"):
        text = path.read_text()
        calls += [(path.name, text[m.start():text.find(")", m.start()) + 1]) for m in re.finditer(r"torch\.load\(", text)]
    assert calls
    for name, call in calls:
        assert "weights_only=True" in call, (name, call)


def test_a_hostile_checkpoint_is_refused_by_every_command(tmp_path, capsys):
    marker = tmp_path / "MARKER"
    run = tmp_path / "run"
    run.mkdir()
    bad = run / "checkpoint_99999999.pt"
    _hostile(bad, marker, record=True)
    images = str(tmp_path)  # never read: the checkpoint is refused first
    commands = [
        ["train", *tiny_overrides(run), "--resume"],
        ["eval", "knn", str(bad), "--train", images, "--val", images, "--device", "cpu"],
        ["eval", "knn", str(run), "--train", images, "--val", images, "--device", "cpu"],
        ["export", str(bad), "--out", str(tmp_path / "a.safetensors")],
        ["export", str(run), "--out", str(tmp_path / "b.safetensors")],
    ]
    for args in commands:
        assert main(args) == 1, args
        err = capsys.readouterr().err
        assert "checkpoint_99999999.pt" in err and "refused" in err, (args, err)
        assert "weights_only" not in err  # no advice to load it the unsafe way
    # without its record: a folder skips it as unverified, a file named directly is still refused
    ckpt.record_path(bad).unlink()
    assert main(["export", str(bad), "--out", str(tmp_path / "c.pt")]) == 1
    assert "refused" in capsys.readouterr().err
    assert main(["export", str(run), "--out", str(tmp_path / "c.pt")]) == 1
    assert "no usable checkpoint" in capsys.readouterr().err
    assert not marker.exists()
    assert not list(tmp_path.glob("*.safetensors")) and not (tmp_path / "c.pt").exists()


def test_rng_states_survive_a_weights_only_round_trip(tmp_path):
    random.seed(3)
    np.random.seed(4)
    torch.manual_seed(5)
    np.random.standard_normal()  # leaves a cached Gaussian in NumPy's state
    state = ckpt.rng_state(torch.device("cpu"))
    torch.save(state, tmp_path / "rng.pt")
    want = (random.random(), np.random.standard_normal(3).tolist(), torch.rand(3).tolist())
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    ckpt.set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True), torch.device("cpu"))
    assert (random.random(), np.random.standard_normal(3).tolist(), torch.rand(3).tolist()) == want


# --------------------------------------------------------------------------- nothing lost


def test_a_fresh_run_does_not_touch_an_older_run(base_run, tmp_path, capsys):
    run = _copy(base_run, tmp_path)
    (run / "notes.txt").write_text("mine")
    before = {p.name: _digest(p) for p in run.iterdir() if p.is_file()}
    assert main(["train", *tiny_overrides(run, **{"runtime.max_steps": 1})]) == 1
    err = capsys.readouterr().err
    assert "already holds a run" in err and "--resume" in err and "runtime.output_dir" in err and "--overwrite" in err
    assert {p.name: _digest(p) for p in run.iterdir() if p.is_file()} == before
    assert main(["train", *tiny_overrides(run), "--resume", "--overwrite"]) == 1
    assert "use one of them" in capsys.readouterr().err
    # --overwrite deletes that run's own files and nothing else
    assert main(["train", *tiny_overrides(run, **{"runtime.max_steps": 1}), "--overwrite"]) == 0
    assert [s for s, _ in ckpt.checkpoints(run)] == [1]
    assert [r["step"] for r in metrics_rows(run)] == ["1"]
    assert (run / "notes.txt").read_text() == "mine"


def test_resuming_a_finished_run_says_so(base_run, tmp_path, capsys):
    run = _copy(base_run, tmp_path)
    stamps = {p.name: p.stat().st_mtime_ns for p in run.glob("checkpoint_*")}
    metrics = _digest(run / "metrics.csv")
    assert main(["train", *tiny_overrides(run, **{"runtime.max_steps": 2}), "--resume"]) == 0
    assert "already complete at step 2" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in run.glob("checkpoint_*")} == stamps  # nothing written again
    assert _digest(run / "metrics.csv") == metrics


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_resuming_into_another_model_names_the_settings(base_run, tmp_path, capsys, parallel):
    """A checkpoint whose tensors do not fit the run's model (another head size) ends with one message naming
    the keys to set back, in either parallel mode, not a load_state_dict traceback."""
    other = {"model.out_dim": 32, "model.patch_out_dim": 32, "runtime.parallel": parallel}
    args = ["train", *tiny_overrides(tmp_path / "new", **other), "--resume", str(base_run / "checkpoint_00000002.pt")]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "does not fit this run's model" in err and "model.out_dim=64 (this run: 32)" in err
    assert "Traceback" not in err and not (tmp_path / "new" / "checkpoint_00000002.pt").exists()


def test_an_unusable_output_dir_names_the_key(tmp_path, capsys):
    (tmp_path / "file").write_text("a file, not a folder")
    assert main(["train", *tiny_overrides(tmp_path / "file" / "run", **{"runtime.max_steps": 1})]) == 1
    err = capsys.readouterr().err
    assert "runtime.output_dir" in err and "Not a directory" in err and "Traceback" not in err


def test_a_second_run_in_the_same_folder_stops(tmp_path, caplog):
    run = tmp_path / "run"
    args = tiny_overrides(run, **{"optim.epochs": 1000, "runtime.max_steps": 100000})
    first = subprocess.Popen([sys.executable, "-m", "fastibot.cli", "train", *args], env=ENV, cwd=tmp_path,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.time() + 180
        while not (run / "metrics.csv").exists():  # the first run holds the lock and is training
            assert first.poll() is None and time.time() < deadline, first.communicate()[1][-2000:]
            time.sleep(0.2)
        for resume in (None, "auto"):
            with pytest.raises(RunFolderError, match=f"in use by a running fastibot run \\(pid {first.pid} "):
                train(tiny_config(run, **{"runtime.max_steps": 1}), resume=resume)
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.communicate(timeout=60)
    # the killed run's lock is stale: the next run takes it over and says so
    lock = RunLock(run).acquire()
    try:
        assert any(f"pid {first.pid}" in r.getMessage() and "without releasing" in r.getMessage()
                   for r in caplog.records)
    finally:
        lock.release()


def test_every_rank_stops_when_the_main_process_cannot_use_the_folder(tmp_path):
    """Under torchrun rank 0 refuses a used folder; rank 1 must stop too, not wait for it at the first collective."""
    import socket

    import torch.distributed as dist

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available in this build; the one-process checks still run")
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.csv").write_text("step,loss\n1,5.0\n")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={port}", "-m", "fastibot.cli", "train", *tiny_overrides(run)]
    done = subprocess.run(cmd, env=ENV, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    assert "already holds a run" in done.stderr and "the main process cannot use runtime.output_dir" in done.stderr
    assert (run / "metrics.csv").read_text() == "step,loss\n1,5.0\n"


def test_a_forked_child_does_not_keep_a_dead_run_locked(tmp_path):
    """A loader worker that outlives its killed run must not hold the run folder's lock."""
    code = ("import os, sys, time\n"
            "from fastibot.rundir import RunLock\n"
            "RunLock(sys.argv[1]).acquire()\n"
            "if os.fork() == 0:\n    time.sleep(60)\n    os._exit(0)\n"
            "print('locked', flush=True)\n"
            "os._exit(0)  # the run dies at once, its child lives on\n")
    proc = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], env=ENV, stdout=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        proc.wait(timeout=60)
        lock = RunLock(tmp_path).acquire()
        lock.release()
    finally:
        os.killpg(proc.pid, signal.SIGKILL)


@pytest.mark.parametrize("damage", ["truncated", "random bytes", "hostile"])
def test_resume_skips_a_broken_newest_checkpoint_and_keeps_it(base_run, tmp_path, caplog, damage):
    run = _copy(base_run, tmp_path)
    newest = run / "checkpoint_00000002.pt"
    size = newest.stat().st_size
    if damage == "truncated":
        with open(newest, "r+b") as f:
            f.truncate(size // 2)
    elif damage == "random bytes":  # same size: only the checksum tells
        newest.write_bytes(os.urandom(size))
    else:
        _hostile(newest, tmp_path / "MARKER", record=True)
    broken = _digest(newest)
    summary = train(tiny_config(run, **{"runtime.max_steps": 2, "runtime.ckpt_every": 1}), resume="auto")
    assert summary["step"] == 2
    skipped = [r.getMessage() for r in caplog.records if "skipping checkpoint" in r.getMessage()]
    assert len(skipped) == 1 and "checkpoint_00000002.pt" in skipped[0]
    assert {"truncated": "bytes", "random bytes": "SHA-256", "hostile": "refused"}[damage] in skipped[0]
    assert any("resumed from" in r.getMessage() and "checkpoint_00000001.pt" in r.getMessage() for r in caplog.records)
    kept = run / "checkpoint_00000002.pt.superseded"
    assert _digest(kept) == broken  # the broken file is kept as it was, out of the way of rotation
    assert ckpt.load_checkpoint(newest)["step"] == 2  # written again by the resumed run
    assert [r["step"] for r in metrics_rows(run)] == ["1", "2"]
    assert not (tmp_path / "MARKER").exists()


def test_rotation_keeps_the_newest_known_good_checkpoint(tmp_path):
    def save(step, finite, keep_good=True):
        ckpt.save_checkpoint(tmp_path, step, {"step": step, "config": {}}, keep_last=1, finite=finite,
                             keep_good=keep_good)
        return [s for s, _ in ckpt.checkpoints(tmp_path)]

    assert save(1, True) == [1]
    assert save(2, True) == [1, 2]  # 1 is known good (step 2 was finite); 2 is not known yet
    assert save(3, False) == [1, 3]  # non-finite steps after 2: it is not good, 1 stays
    assert save(4, False) == [1, 4]
    assert ckpt.newest_good(tmp_path).name == "checkpoint_00000001.pt"
    assert save(5, True) == [4, 5]  # finite again after 4
    assert save(6, True, keep_good=False) == [6]  # a completed run keeps exactly keep_last


def test_divergence_stop_names_a_checkpoint_that_resumes(tmp_path):
    """optim.lr=1e30: step 2's update blows the weights up (finite), step 3 is the first non-finite one."""
    extra = {"runtime.max_steps": 8, "runtime.ckpt_every": 1, "runtime.keep_last": 1, "runtime.max_nonfinite": 2}
    with pytest.raises(TrainingError) as e:
        train(tiny_config(tmp_path, **{**extra, "optim.lr": 1e30}))
    rows = metrics_rows(tmp_path)
    bad = [r for r in rows if int(r["nonfinite_steps"]) > 0]
    assert [int(r["nonfinite_steps"]) for r in bad] == [1, 2]
    assert all(r["loss"] == r["cls"] == r["patch"] == "nan" for r in bad)  # skipped steps are not a loss of 0
    first_bad = int(bad[0]["step"])
    named = re.search(r"--resume (\S+)", str(e.value))
    assert named, str(e.value)
    good = Path(named.group(1))
    assert good.is_file() and ckpt.checkpoints(tmp_path)[0][1] == good
    assert int(good.name[11:19]) < first_bad - 1  # the steps after it were finite
    summary = train(tiny_config(tmp_path, **{**extra, "runtime.max_steps": int(good.name[11:19]) + 2}),
                    resume=str(good))
    assert summary["nonfinite_steps"] == 0 and np.isfinite(summary["loss"])


# --------------------------------------------------------------------------- nothing hangs


def _run_cli(argv, cwd, timeout=240, prelude=""):
    """The CLI in its own process group; fails on a hang and on any process left behind."""
    code = f"import sys\n{prelude}\nfrom fastibot.cli import main\nsys.exit(main(sys.argv[1:]))"
    proc = subprocess.Popen([sys.executable, "-c", code, *argv], env=ENV, cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"no exit within {timeout} s: {err[-2000:]}")
    # helpers end with it: the workers at once, the forkserver they start from when it sees the process gone
    deadline = time.monotonic() + 10
    while True:
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            break
        if time.monotonic() > deadline:
            left = subprocess.run(["ps", "-o", "pid,args", "-g", str(proc.pid)], capture_output=True, text=True)
            os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail(f"processes outlived the process: {left.stdout}")
        time.sleep(0.1)
    return proc.returncode, out, err


def _last_line(err: str) -> str:
    return [ln for ln in err.splitlines() if ln.strip()][-1]


def test_an_error_in_a_loader_worker_ends_the_process(tmp_path):
    images = tmp_path / "images" / "a"
    images.mkdir(parents=True)
    for i in range(40):
        (images / f"{i}.jpg").write_bytes(b"")
    run = tmp_path / "run"
    args = tiny_overrides(run, **{"data.source": "imagefolder", "data.path": str(images.parent),
                                  "data.loader": "torchvision", "data.num_workers": 2})
    rc, _, err = _run_cli(["train", *args], tmp_path)
    assert rc == 1, err[-2000:]
    assert _last_line(err).startswith("fastibot: in a data loader worker: 20 unreadable images")
    assert "Traceback" not in err


def test_train_ends_its_loader_workers_when_it_fails(tmp_path):
    import multiprocessing

    from fastibot.data.datasets import DataError

    images = tmp_path / "images"
    images.mkdir()
    for i in range(40):
        (images / f"{i}.jpg").write_bytes(b"")
    cfg = tiny_config(tmp_path / "run", **{"data.source": "imagefolder", "data.path": str(images),
                                           "data.loader": "torchvision", "data.num_workers": 2})
    with pytest.raises(DataError):
        train(cfg)
    assert not multiprocessing.active_children()


def test_a_full_disk_while_checkpointing_ends_the_process(tmp_path):
    images = tmp_path / "images"
    for i in range(24):
        (images / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        synthetic_image(i, 2, 48, seed=3)[0].save(images / f"c{i % 2}" / f"{i}.jpg")
    run = tmp_path / "run"
    args = tiny_overrides(run, **{"data.source": "imagefolder", "data.path": str(images),
                                  "data.loader": "torchvision", "data.num_workers": 2, "runtime.max_steps": 2})
    full = ("import errno, os\n"
            "def fsync(fd):\n    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))\n"
            "os.fsync = fsync")
    rc, _, err = _run_cli(["train", *args], tmp_path, prelude=full)
    assert rc == 1, err[-2000:]
    last = _last_line(err)
    assert last.startswith("fastibot: cannot write") and "checkpoint_00000002.pt" in last and "disk is full" in last
    assert "Traceback" not in err
    assert not ckpt.checkpoints(run) and not list(run.glob(".*.tmp"))


def test_a_write_error_inside_torch_save_is_reported_as_such(tmp_path, monkeypatch):
    """torch.save turns a failed write into "unexpected pos ..."; the message must still say the disk is full."""
    import errno

    ckpt.save_checkpoint(tmp_path, 1, {"w": torch.randn(1000), "config": {}}, keep_last=2)
    intact = _digest(tmp_path / "checkpoint_00000001.pt")
    real_fdopen = os.fdopen

    class FullDisk:
        """The checkpoint's file: the disk fills up after 2 kB."""

        def __init__(self, f):
            self.f, self.written = f, 0

        def write(self, b):
            self.written += len(b)
            if self.written > 2048:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return self.f.write(b)

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    monkeypatch.setattr(os, "fdopen", lambda fd, mode: FullDisk(real_fdopen(fd, mode)))
    with pytest.raises(ckpt.CheckpointError, match=r"checkpoint_00000003\.pt.*disk is full.*checkpoint_00000001\.pt"):
        ckpt.save_checkpoint(tmp_path, 3, {"w": torch.randn(1000), "config": {}}, keep_last=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint_00000001.pt", "checkpoint_00000001.pt.json"]
    assert _digest(tmp_path / "checkpoint_00000001.pt") == intact
