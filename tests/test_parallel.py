"""runtime.parallel=fsdp|hsdp in one process (FSDP2 over a one-process group) and its sharded checkpoints:
the same numbers as ddp, compiled blocks, combinations that cannot run, and sharded checkpoints that are
atomic, verified, refused when hostile, skipped when broken and read by export."""
import functools
import json
import os
import pickle
import shutil

import pytest
import torch

from fastibot import checkpoint as ckpt
from fastibot.cli import main
from fastibot.config import ConfigError
from fastibot.rundir import RunFolderError
from fastibot.train import TrainingError, train
from conftest import metrics_rows, tiny_config, tiny_overrides

SMALL = {"runtime.device": "cpu", "model.depth": 1, "model.drop_path": 0.0, "runtime.max_steps": 2,
         "runtime.ckpt_every": 1}


def cfg(out, **extra):
    return tiny_config(out, **{**SMALL, **extra})


@pytest.fixture(scope="module")
def sharded_run(tmp_path_factory):
    """A finished 2-step fsdp run with sharded checkpoints at steps 1 and 2 (copied by tests that change it)."""
    run = tmp_path_factory.mktemp("sharded") / "run"
    train(cfg(run, **{"runtime.parallel": "fsdp"}))
    return run


@pytest.mark.parametrize("packed", [True, False])
def test_fsdp_trains_the_same_numbers_as_ddp(tmp_path, packed):
    """The head's parts run under FSDP's hooks (registered methods), the dense path calls the head twice:
    every gradient still arrives, once."""
    runs = {}
    for parallel in ("ddp", "fsdp"):
        train(cfg(tmp_path / parallel, **{"runtime.parallel": parallel, "model.packed": packed,
                                                          "runtime.max_steps": 3}))
        runs[parallel] = metrics_rows(tmp_path / parallel)
    for a, b in zip(runs["ddp"], runs["fsdp"]):
        for k in ("loss", "cls", "patch", "grad_norm"):
            assert float(b[k]) == pytest.approx(float(a[k]), rel=1e-6), (a["step"], k)
    a = ckpt.load_checkpoint(tmp_path / "ddp" / "checkpoint_00000003.pt")
    b = ckpt.load_checkpoint(tmp_path / "fsdp" / "checkpoint_00000003.dcp")
    for part in ("student", "teacher", "centers"):
        for k, v in a[part].items():
            torch.testing.assert_close(b[part][k], v, rtol=1e-6, atol=1e-7, msg=f"{part}.{k}")


def test_a_swin_under_fsdp_trains_the_same_numbers_as_ddp(tmp_path, monkeypatch):
    """Swin blocks inside stages become the units; the dense path runs the head twice (globals, locals)."""
    from fastibot.models import swin
    monkeypatch.setitem(swin.SWIN_ARCHS, "swin_tiny", dict(embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 2, 4)))
    extra = {"model.arch": "swin_tiny", "model.patch_size": 4, "model.packed": False, "crops.global_size": 64,
             "crops.local_size": 32, "data.batch_size": 4, "model.depth": 0}  # SMALL's depth is a ViT key
    runs = {}
    for parallel in ("ddp", "fsdp"):
        train(cfg(tmp_path / parallel, **extra, **{"runtime.parallel": parallel}))
        runs[parallel] = metrics_rows(tmp_path / parallel)
    for a, b in zip(runs["ddp"], runs["fsdp"]):
        for k in ("loss", "grad_norm"):
            assert float(b[k]) == pytest.approx(float(a[k]), rel=1e-6), (a["step"], k)


def test_compiled_blocks_under_fsdp_train_the_same_numbers_without_recompiling(tmp_path):
    from torch._dynamo.utils import counters
    runs = {}
    for compile_ in ("false", "true"):
        counters.clear()
        train(cfg(tmp_path / compile_, **{"runtime.parallel": "fsdp", "runtime.compile": compile_,
                                                          "runtime.max_steps": 3, "model.depth": 2}))
        runs[compile_] = metrics_rows(tmp_path / compile_)
    assert counters["stats"]["unique_graphs"] == 2  # one block graph for the student, one for the teacher
    for a, b in zip(runs["false"], runs["true"]):
        assert float(b["loss"]) == pytest.approx(float(a["loss"]), rel=1e-5)


def test_compiled_blocks_under_fsdp_with_stochastic_depth_and_more_blocks_than_dynamos_limit(tmp_path):
    """Each block bakes in its own drop-path rate, so each is its own compiled entry of one code object: a
    12-block ViT-S passed dynamo's default recompile limit (8) and the run stopped at its first step."""
    from torch._dynamo.utils import counters
    counters.clear()
    summary = train(cfg(tmp_path, **{"runtime.parallel": "fsdp", "runtime.compile": "true", "runtime.max_steps": 1,
                                     "model.depth": 10, "model.drop_path": 0.1, "runtime.ckpt_every": 0}))
    assert summary["step"] == 1
    assert counters["stats"]["unique_graphs"] == 10 + 1  # 10 rates (the first 0) for the student, 1 teacher


def test_a_compiled_swin_under_fsdp_fits_dynamos_cache_and_trains_the_uncompiled_numbers(tmp_path, monkeypatch):
    """Swin-T's 12 blocks (depths 2, 2, 6, 2) compiled one by one: each student block has its own drop-path rate
    and sees two crop sizes, the teacher's blocks differ by width, window and shift, all entries of one code
    object (31, past dynamo's default limit of 8). Half the blocks recompute in the backward, a checkpoint
    around the compiled forward. Dynamo alone (eager backend) shows the guards."""
    from torch._dynamo.utils import counters
    from fastibot.models import swin
    monkeypatch.setitem(swin.SWIN_ARCHS, "swin_tiny", dict(embed_dim=16, depths=(2, 2, 6, 2), num_heads=(1, 2, 2, 4)))
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    # window 3 on 64/32 px crops: stage grids 16, 8, 4, 2 (globals) and 8, 4, 2, 1 (locals, padded), shifted
    # windows in the first three stages, as Swin-T's window 7 on 224/96 px crops
    extra = {"model.arch": "swin_tiny", "model.patch_size": 4, "model.packed": False, "model.window_size": 3,
             "crops.global_size": 64, "crops.local_size": 32, "data.batch_size": 4, "model.depth": 0,
             "model.drop_path": 0.2, "runtime.parallel": "fsdp", "runtime.recompute_blocks": 0.5}
    runs = {}
    for compile_ in ("false", "true"):
        counters.clear()
        train(cfg(tmp_path / compile_, **extra, **{"runtime.compile": compile_, "runtime.ckpt_every": 0}))
        runs[compile_] = metrics_rows(tmp_path / compile_)
    # 12 student blocks x 2 crop sizes, 7 teacher blocks (stages 0-2: plain and shifted; stage 3), each compiled
    # once: a guard that failed in step 2 (a shift-mask cache filled in the graph) would add graphs
    assert counters["stats"]["unique_graphs"] == 12 * 2 + 7
    for a, b in zip(runs["false"], runs["true"], strict=True):
        for k in ("loss", "grad_norm"):
            assert float(b[k]) == pytest.approx(float(a[k]), rel=1e-6), (a["step"], k)


@pytest.mark.parametrize("override, key", [
    ({"runtime.cuda_graph": "true"}, "runtime.cuda_graph"),
    ({"kernels.ema": "triton"}, "kernels.ema"),
    ({"kernels.update": "triton"}, "kernels.update"),
])
def test_combinations_that_cannot_run_under_fsdp_are_errors(tmp_path, override, key):
    for parallel in ("fsdp", "hsdp"):
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            tiny_config(tmp_path, **{"runtime.parallel": parallel, **override})
    with pytest.raises(ConfigError, match="runtime.shard_size"):
        tiny_config(tmp_path, **{"runtime.parallel": "fsdp", "runtime.shard_size": 2})
    with pytest.raises(ConfigError, match="runtime.fsdp_reduce_dtype"):
        tiny_config(tmp_path, **{"runtime.fsdp_reduce_dtype": "bf16"})
    with pytest.raises(TrainingError, match="runtime.shard_size"):  # 1 process cannot form groups of 2
        train(cfg(tmp_path / "h", **{"runtime.parallel": "hsdp", "runtime.shard_size": 2}))


def test_a_sharded_checkpoint_is_complete_verified_and_read_by_export(sharded_run, tmp_path, capsys):
    assert [s for s, _ in ckpt.checkpoints(sharded_run)] == [1, 2]
    folder = sharded_run / "checkpoint_00000002.dcp"
    rec = ckpt.read_record(folder)
    assert rec["format"] == "dcp" and set(rec["files"]) == set(os.listdir(folder))
    assert ckpt.read_record(sharded_run / "checkpoint_00000001.dcp")["followed_by_finite"]
    assert not list(sharded_run.glob(".*"))[1:] and not list(sharded_run.glob(".*.tmp"))  # only .lock
    assert json.loads((folder / "fastibot.json").read_text())["step"] == 2
    out = tmp_path / "backbone.safetensors"
    assert main(["export", str(sharded_run), "--out", str(out)]) == 0
    from safetensors.torch import load_file
    exported, teacher = load_file(str(out)), ckpt.load_checkpoint(folder)["teacher"]
    assert torch.equal(exported["pos_embed"], teacher["backbone.pos_embed"])


def test_a_hostile_index_is_refused_without_running_it(sharded_run, tmp_path, capsys):
    """DCP unpickles its index with pickle.load; fastibot reads it through an allow-list, so an index that
    would run a command is refused even with a forged record."""
    run = tmp_path / "run"
    shutil.copytree(sharded_run, run)
    marker, folder = tmp_path / "MARKER", run / "checkpoint_00000002.dcp"

    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    (folder / ".metadata").write_bytes(pickle.dumps(Payload()))
    rec = ckpt.read_record(folder)
    rec["files"][".metadata"] = {"bytes": (folder / ".metadata").stat().st_size,
                                 "sha256": ckpt._sha256(folder / ".metadata")}
    ckpt.record_path(folder).write_text(json.dumps(rec))
    assert main(["export", str(folder), "--out", str(tmp_path / "a.pt")]) == 1
    err = capsys.readouterr().err
    assert "posix.system" in err and "refused" in err  # os.system, as pickle names it
    # as the newest of a run folder it is skipped: the resume continues from step 1
    summary = train(cfg(run, **{"runtime.parallel": "fsdp"}), resume="auto")
    assert summary["step"] == 2 and not marker.exists()
    assert (run / "checkpoint_00000002.dcp.superseded").is_dir()


def test_a_damaged_shard_is_skipped_and_a_changed_global_batch_is_refused(sharded_run, tmp_path, caplog):
    run = tmp_path / "run"
    shutil.copytree(sharded_run, run)
    shard = run / "checkpoint_00000002.dcp" / "__0_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(TrainingError, match="global batch of 8 .* data.batch_size=8"):
        train(cfg(run, **{"runtime.parallel": "fsdp", "data.batch_size": 4}), resume="auto")
    train(cfg(run, **{"runtime.parallel": "ddp"}), resume="auto")  # fsdp -> ddp, same batch
    assert any("SHA-256 of __0_0.distcp" in r.getMessage() for r in caplog.records)
    assert any("resumed from" in r.getMessage() and "checkpoint_00000001.dcp" in r.getMessage()
               for r in caplog.records)
    assert [s for s, _ in ckpt.checkpoints(run)] == [1, 2] and (run / "checkpoint_00000002.pt").is_file()


def test_overwrite_deletes_sharded_checkpoints_and_leftover_folders(sharded_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(sharded_run, run)
    (run / ".checkpoint_00000003.dcp.tmp").mkdir()  # a save that crashed before its rename
    with pytest.raises(RunFolderError, match="checkpoint_00000001.dcp"):
        train(cfg(run, **{"runtime.parallel": "fsdp"}))
    assert main(["train", *tiny_overrides(run, **{**SMALL, "runtime.parallel": "fsdp", "runtime.max_steps": 1}),
                 "--overwrite"]) == 0
    assert sorted(p.name for p in run.iterdir() if "checkpoint" in p.name) == [
        "checkpoint_00000001.dcp", "checkpoint_00000001.dcp.json"]


@pytest.mark.parametrize("env", [{"WORLD_SIZE": "2", "RANK": "3"}, {"WORLD_SIZE": "4", "RANK": "1", "LOCAL_RANK": "2",
                                                                    "LOCAL_WORLD_SIZE": "2"},
                                 {"WORLD_SIZE": "two"}])
def test_an_inconsistent_launch_environment_is_an_error(tmp_path, monkeypatch, env):
    from fastibot.runtime import init_runtime
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(TrainingError, match="RANK|WORLD_SIZE"):
        init_runtime(cfg(tmp_path))


def test_a_full_disk_while_writing_shards_ends_the_run_and_leaves_the_earlier_checkpoint(tmp_path, monkeypatch):
    """The disk fills up while DCP writes the shards of step 2 (DCP wraps the error of every rank): one line
    naming the checkpoint and the cause, no visible or temporary checkpoint of step 2, step 1's intact."""
    import errno

    import torch.distributed.checkpoint as dcp
    from fastibot import sharded
    real_save = sharded.save

    def save(folder, step, *args, **kw):
        if step == 2:
            def full(*a, **k):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            monkeypatch.setattr(dcp.FileSystemWriter, "write_data", full)
        return real_save(folder, step, *args, **kw)

    monkeypatch.setattr(sharded, "save", save)
    run = tmp_path / "run"
    with pytest.raises(ckpt.CheckpointError, match=r"checkpoint_00000002\.dcp.*disk is full"):
        train(cfg(run, **{"runtime.parallel": "fsdp"}))
    assert [s for s, _ in ckpt.checkpoints(run)] == [1] and not list(run.glob(".*.tmp"))
    assert ckpt.problem(run / "checkpoint_00000001.dcp") is None
