"""End-to-end training on the CPU: checkpoints, exact resume, non-finite steps, real JPEGs, the CLI."""

import pytest
import torch

from fastibot.checkpoint import checkpoints, load_checkpoint
from fastibot.cli import main
from fastibot.train import Runtime, Trainer, TrainingError, train
from conftest import metrics_rows, nan_loss_at, tiny_config, tiny_overrides


def test_synthetic_run_writes_checkpoints_and_metrics(tmp_path):
    cfg = tiny_config(tmp_path, **{"runtime.max_steps": 4, "runtime.ckpt_every": 2, "runtime.keep_last": 1,
                                   "runtime.tensorboard": True})
    summary = train(cfg)
    assert summary["step"] == 4
    assert [s for s, _ in checkpoints(tmp_path)] == [4]  # keep_last=1 removed step 2
    assert not list(tmp_path.glob(".*.tmp"))
    rows = metrics_rows(tmp_path)
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4]
    assert all(float(r["loss"]) > 0 for r in rows)
    assert (tmp_path / "config.yaml").is_file() and list((tmp_path / "tb").iterdir())
    state = load_checkpoint(tmp_path / "checkpoint_00000004.pt")
    assert state["step"] == 4 and set(state) >= {"student", "teacher", "centers", "optimizer", "rng", "config"}
    # the teacher moved towards the student, and the centers left zero
    assert state["centers"]["center"].abs().sum() > 0


def test_max_minutes_stops_with_a_checkpoint(tmp_path):
    cfg = tiny_config(tmp_path, **{"runtime.max_steps": 50, "runtime.log_every": 2, "runtime.ckpt_every": 0,
                                   "runtime.max_minutes": 1e-9})
    summary = train(cfg)
    assert summary["step"] == 2  # the first log step is past the limit
    assert [s for s, _ in checkpoints(tmp_path)] == [2]


@pytest.mark.parametrize("packed, update", [(True, {}), (False, {}),
                                            (True, {"kernels.ema": "triton", "kernels.update": "triton"})],
                         ids=["packed", "dense", "fused-update"])
def test_resume_is_bit_exact(tmp_path, packed, update):
    """Also with the fused update pass, whose AdamW state lives in flat buffers: the checkpoint holds views of
    them and a resume loads it back into them."""
    extra = {"runtime.max_steps": 8, "model.drop_path": 0.2, "data.num_workers": 1,  # 6 steps per epoch
             "model.packed": packed, **update}
    full = tmp_path / "full"
    train(tiny_config(full, **extra))
    part = tmp_path / "part"
    train(tiny_config(part, **{**extra, "runtime.max_steps": 4}))
    train(tiny_config(part, **extra), resume="auto")
    a, b = metrics_rows(full), metrics_rows(part)
    assert [r["step"] for r in b] == [str(i) for i in range(1, 9)]
    for ra, rb in zip(a, b):
        for k in ("loss", "cls", "patch", "lr", "momentum", "grad_norm"):
            assert ra[k] == rb[k], (ra["step"], k)
    sa = load_checkpoint(full / "checkpoint_00000008.pt")
    sb = load_checkpoint(part / "checkpoint_00000008.pt")
    for k, v in sa["teacher"].items():
        assert torch.equal(v, sb["teacher"][k]), k
    assert torch.equal(sa["centers"]["center2"], sb["centers"]["center2"])


def test_nonfinite_steps_are_skipped_then_stop(tmp_path, monkeypatch):
    cfg = tiny_config(tmp_path, **{"runtime.max_steps": 6, "runtime.max_nonfinite": 3})
    nan_loss_at(monkeypatch, {1, 3, 4, 5})
    trainer = Trainer(cfg, Runtime(torch.device("cpu")))
    batch = next(iter(trainer.data))
    trainer.train_step([batch])  # step 0: fine
    state = lambda: {k: v.clone() for k, v in trainer.student.state_dict().items()}  # noqa: E731
    opt_steps = lambda: [s["step"].item() for s in trainer.opt.main.state.values()]  # noqa: E731
    before, steps_before = state(), opt_steps()
    trainer.train_step([batch])  # step 1: NaN -> no update of the student, no AdamW step counted
    after = state()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert opt_steps() == steps_before
    row = trainer.log_metrics()
    assert row["nonfinite_steps"] == 1
    trainer.train_step([batch])  # step 2: fine again
    assert any(not torch.equal(before[k], trainer.student.state_dict()[k]) for k in before)
    for _ in range(3):  # steps 3, 4, 5: three in a row
        trainer.train_step([batch])
    with pytest.raises(TrainingError, match="3 steps in a row"):
        trainer.log_metrics()


def test_train_on_real_jpegs(tmp_path, shared_images):
    cfg = tiny_config(tmp_path, **{"data.source": "imagefolder", "data.path": str(shared_images / "train"),
                                   "runtime.max_steps": 2, "data.num_workers": 2})
    summary = train(cfg)
    assert summary["step"] == 2 and summary["bad_images"] == 0


def test_gradient_accumulation_and_global_clip(tmp_path):
    cfg = tiny_config(tmp_path, **{"runtime.max_steps": 2, "optim.accum_steps": 2, "optim.clip_mode": "global"})
    summary = train(cfg)
    assert summary["step"] == 2 and summary["loss"] > 0


def test_cli_missing_data_folder(tmp_path, capsys):
    args = ["train"] + tiny_overrides(tmp_path, **{"data.source": "imagefolder", "data.path": str(tmp_path / "x")})
    assert main(args) == 1
    assert "does not exist" in capsys.readouterr().err


def test_cli_unavailable_attention_backend_is_one_message(tmp_path, capsys):
    """An attention backend that cannot run on this device ends the run with its reason, not a traceback."""
    args = ["train"] + tiny_overrides(tmp_path, **{"runtime.device": "cpu", "model.attention": "varlen"})
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "model.attention=varlen" in err and "CUDA" in err and "Traceback" not in err


def test_resume_without_checkpoint_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        train(tiny_config(tmp_path / "empty"), resume=str(tmp_path))


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT", "SIGUSR1"])
def test_signal_stops_after_the_step_with_a_checkpoint(tmp_path, monkeypatch, sig):
    """SIGTERM (preemption), SIGINT (Ctrl-C) and SIGUSR1 (SLURM's warning before the time limit) all stop after
    the step with a checkpoint; a scheduler's SIGTERM or SIGUSR1 may arrive twice (to the process directly and
    forwarded by torchrun), and the second must not kill the process before it has saved."""
    import os
    import signal
    before = signal.getsignal(getattr(signal, sig))
    step = Trainer.train_step

    def step_then_signal(self, micro):
        step(self, micro)
        if self.step == 2:
            os.kill(os.getpid(), getattr(signal, sig))  # as a scheduler's preemption or Ctrl-C would
            if sig != "SIGINT":
                os.kill(os.getpid(), getattr(signal, sig))

    monkeypatch.setattr(Trainer, "train_step", step_then_signal)
    cfg = tiny_config(tmp_path, **{"runtime.max_steps": 6, "runtime.log_every": 4})
    summary = train(cfg)
    assert summary["stopped"] == sig and summary["step"] == 2
    assert [s for s, _ in checkpoints(tmp_path)] == [2]
    assert signal.getsignal(getattr(signal, sig)) is before  # handlers restored
    monkeypatch.setattr(Trainer, "train_step", step)
    assert train(cfg, resume=str(tmp_path))["step"] == 6


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGUSR1"])
def test_cli_exit_code_after_a_signal(tmp_path, monkeypatch, capsys, sig):
    import os
    import signal
    step = Trainer.train_step
    signum = getattr(signal, sig)

    def step_then_signal(self, micro):
        step(self, micro)
        os.kill(os.getpid(), signum)

    monkeypatch.setattr(Trainer, "train_step", step_then_signal)
    assert main(["train"] + tiny_overrides(tmp_path, **{"runtime.max_steps": 5})) == 128 + signum
    assert "--resume" in capsys.readouterr().err


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_start_up_line_spells_the_precision_as_the_config_does(tmp_path, caplog, precision):
    with caplog.at_level("INFO", logger="fastibot"):
        Trainer(tiny_config(tmp_path, **{"runtime.precision": precision}),
                Runtime(torch.device("cpu"), amp_dtype=torch.bfloat16 if precision == "bf16" else None))
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("fastibot: "))
    assert f"precision={precision}," in line and "torch." not in line
