"""fastibot finetune: per-layer learning rates, a tiny run that learns, exact resume, sources and subsets."""
import json
from pathlib import Path

import pytest
import torch

from fastibot.checkpoint import checkpoints
from fastibot.cli import main
from fastibot.data import classification
from fastibot.finetune import build_optimizer, build_scheduler
from fastibot.models.classifier import build_classifier, load_source
from fastibot.train import train
from conftest import labelled_folder, metrics_rows, tiny_config

timm = pytest.importorskip("timm")

CLASSES = ("n01440764", "n02102040", "n02979186")


@pytest.fixture
def small_folder(tmp_path, shared_images):
    """The first ``n`` shared training images of each of the first ``classes`` classes, linked into a tree."""
    def make(n=16, classes=3):
        root = tmp_path / f"images_{classes}x{n}"
        for c in CLASSES[:classes]:
            (root / c).mkdir(parents=True)
            for p in sorted((shared_images / "train" / c).iterdir())[:n]:
                (root / c / p.name).symlink_to(p)
        return root
    return make


def _args(src, train_dir, val_dir, out, **extra):
    """A test_vit (6 blocks of width 64, timm's test model) on 32 px images: a step is milliseconds."""
    o = {"--model": "test_vit", "--image-size": 32, "--batch-size": 16, "--epochs": 2, "--warmup-epochs": 0.5,
         "--workers": 0, "--device": "cpu", "--keep-last": 1}
    o.update(extra)
    args = ["finetune", src, "--train", str(train_dir), "--val", str(val_dir), "--out", str(out)]
    for k, v in o.items():
        args += [k] if v is True else [k, *str(v).split(" ")] if k == "--scale" else [k, str(v)]
    return args


def test_per_layer_learning_rates_follow_the_decay():
    model = timm.create_model("test_vit", num_classes=3, img_size=32)  # 6 blocks
    opt = build_optimizer(model, lr=1.0, weight_decay=0.05, layer_decay=0.5)
    sched = build_scheduler(opt, total_steps=10, warmup_steps=2, min_lr=0.0)
    sched.step_update(2)  # the end of the warm-up: the peak
    lr = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    wd = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    for name, p in model.named_parameters():
        if name.startswith(("patch_embed", "cls_token", "pos_embed")):
            expect = 0.5 ** 7  # the embeddings: decay ** (L + 1)
        elif name.startswith("blocks."):
            expect = 0.5 ** (6 - int(name.split(".")[1]))  # block i: decay ** (L - i)
        elif name.startswith("norm."):
            expect = 0.5  # timm groups the final norm with the last block
        else:
            expect = 1.0  # the head
        assert lr[id(p)] == expect, name
        no_decay = p.ndim <= 1 or name in ("pos_embed", "cls_token")
        assert wd[id(p)] == (0.0 if no_decay else 0.05), name
    sched.step_update(1)  # half-way up the warm-up
    assert lr_of(opt, model, "head.weight") == 0.5 and lr_of(opt, model, "blocks.5.mlp.fc1.weight") == 0.25

    swin = timm.models.swin_transformer.SwinTransformer(img_size=64, embed_dim=16, depths=(2, 2, 2, 2),
                                                        num_heads=(1, 2, 2, 4), num_classes=3)
    opt = build_optimizer(swin, lr=1.0, weight_decay=0.05, layer_decay=0.5)
    build_scheduler(opt, 10, 2, 0.0).step_update(2)
    order = ["patch_embed.proj.weight"] + [f"layers.{s}.blocks.{b}.mlp.fc1.weight" for s in range(4) for b in range(2)]
    rates = [lr_of(opt, swin, n) for n in order] + [lr_of(opt, swin, "head.fc.weight")]
    assert rates[-1] == 1.0 and all(a < b for a, b in zip(rates, rates[1:])), rates


def lr_of(opt, model, name):
    p = dict(model.named_parameters())[name]
    return next(g["lr"] for g in opt.param_groups if any(q is p for q in g["params"]))


def test_tiny_run_learns(small_folder, tmp_path):
    # 2 classes x 8 images, one batch per epoch, validated on the same images with whole-image crops: what is
    # certain in a few CPU steps from random weights is that the loop fits them. The schedule spans 40 epochs,
    # the run stops after 16, so the lr stays near its peak.
    images, out = small_folder(8, 2), tmp_path / "ft"
    args = _args("random:vit_tiny", images, images, out, **{
        "--epochs": 40, "--max-steps": 16, "--warmup-epochs": 1, "--lr": 0.1, "--scale": "1 1", "--mixup": 0,
        "--cutmix": 0, "--aa": "", "--reprob": 0, "--smoothing": 0, "--drop-path": 0})
    assert main(args) == 0
    rows = metrics_rows(out)
    assert [int(r["epoch"]) for r in rows] == list(range(1, 17))
    first, late = rows[0], rows[-4:]
    # measured: val loss 0.695 -> 0.41-0.53 over the last four epochs, top-1 56 -> 81-88
    assert sum(float(r["val_loss"]) for r in late) / 4 < 0.8 * float(first["val_loss"])
    assert sum(float(r["val_top1"]) for r in late) / 4 >= float(first["val_top1"]) + 15


def test_resume_is_exact(tmp_path):
    # the whole recipe (RandAugment, random erasing, mixup/cutmix, smoothing, drop path); 3 steps per epoch
    common = {"--lr": 0.02, "--ckpt-every": 2, "--batch-size": 8}
    images, full, part = labelled_folder(tmp_path / "images", 12, 2), tmp_path / "full", tmp_path / "part"
    assert main(_args("random:vit_tiny", images, images, full, **common)) == 0
    assert main(_args("random:vit_tiny", images, images, part, **common, **{"--max-steps": 4})) == 0
    assert [s for s, _ in checkpoints(part)] == [4]  # stopped mid-epoch 2
    assert main(_args("random:vit_tiny", images, images, part, **common, **{"--workers": 1})) == 1  # not --resume
    assert main(_args("random:vit_tiny", images, images, part, **common, **{"--workers": 1},
                      **{"--resume": True})) == 0  # another worker count: augmentations are seeded per sample
    a, b = metrics_rows(full), metrics_rows(part)
    assert len(a) == len(b) == 2
    for ra, rb in zip(a, b):
        for k in ("step", "train_loss", "lr", "val_top1", "val_top5", "val_loss"):
            assert ra[k] == rb[k], (ra["step"], k)
    sa = torch.load(full / "checkpoint_00000006.pt", weights_only=True)["model"]
    sb = torch.load(part / "checkpoint_00000006.pt", weights_only=True)["model"]
    assert all(torch.equal(v, sb[k]) for k, v in sa.items())


def test_resume_past_a_broken_newest_checkpoint_keeps_it_aside(tmp_path):
    """--resume falls back to the newest good checkpoint and renames the broken newer one to *.superseded
    (as fastibot train does) instead of writing over it."""
    common = {"--ckpt-every": 2, "--batch-size": 8, "--keep-last": 2}
    images, out = labelled_folder(tmp_path / "images", 12, 2), tmp_path / "run"
    assert main(_args("random:vit_tiny", images, images, out, **common, **{"--max-steps": 4})) == 0
    assert [s for s, _ in checkpoints(out)] == [3, 4]  # the epoch's end and the stop
    broken = out / "checkpoint_00000004.pt"
    broken.write_bytes(b"cut short")
    assert main(_args("random:vit_tiny", images, images, out, **common, **{"--resume": True})) == 0
    aside = out / "checkpoint_00000004.pt.superseded"
    assert aside.read_bytes() == b"cut short"
    assert [s for s, _ in checkpoints(out)] == [4, 6]  # steps 4-6 trained again from step 3
    assert [int(r["step"]) for r in metrics_rows(out)] == [3, 6]


def test_pretrained_sources_and_a_label_fraction(small_folder, tmp_path, capsys, monkeypatch):
    images, run = small_folder(16, 3), tmp_path / "pre"
    train(tiny_config(run, **{"runtime.max_steps": 1}))  # ViT-T/8 on 32 px crops
    name, kwargs, sd = load_source(str(run))
    assert name == "vit_tiny_patch16_224" and kwargs == {"patch_size": 8, "img_size": 32}
    model = build_classifier(name, kwargs, 3, 32, 0.1, sd)
    teacher = torch.load(next(run.glob("checkpoint_*.pt")), weights_only=True)["teacher"]
    assert torch.equal(model.blocks[3].attn.qkv.weight, teacher["backbone.blocks.3.attn.qkv.weight"])
    assert main(["export", str(run), "--out", str(tmp_path / "vit.safetensors")]) == 0
    assert load_source(str(tmp_path / "vit.safetensors"))[:2] == (name, kwargs)  # from the file's metadata

    out, val = tmp_path / "semi", small_folder(2, 3)
    loaded = []
    real = classification.load_rgb
    monkeypatch.setattr(classification, "load_rgb", lambda p: loaded.append(p) or real(p))
    args = _args(str(tmp_path / "vit.safetensors"), images, val, out, **{
        "--model": "", "--max-steps": 3, "--batch-size": 4, "--label-fraction": 0.25})  # one epoch of 12 images
    assert main(args) == 0
    listed = [ln for ln in (out / "train_subset.txt").read_text().splitlines() if not ln.startswith("#")]
    assert sorted({ln.split("/")[0] for ln in listed}) == list(CLASSES) and len(listed) == 12  # 4 of 16 per class
    trained = sorted(str(Path(p).relative_to(images)) for p in loaded if Path(p).is_relative_to(images))
    assert trained == sorted(listed)  # the epoch went over exactly the listed images
    assert json.loads((out / "finetune_args.json").read_text())["label_fraction"] == 0.25
    assert main(args) == 1  # the folder holds a run: no --resume, no overwrite
    assert "already holds" in capsys.readouterr().err
    assert main(_args("random:vit_tiny", images, images, tmp_path / "odd", **{"--batch-size": 5})) == 1
    assert "--batch-size: must be even" in capsys.readouterr().err
    assert main(_args(str(tmp_path / "nope.pt"), images, images, tmp_path / "x")) == 1
    assert "no such run folder" in capsys.readouterr().err


def test_a_weights_file_that_is_not_weights_is_one_message(tmp_path, capsys):
    """Garbage, a hostile pickle (never run) and a broken .safetensors given as the source each end with one
    message naming the file, not a traceback."""
    import os

    images, marker = labelled_folder(tmp_path / "images", 2, 2), tmp_path / "MARKER"

    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    (tmp_path / "garbage.pt").write_text("not a checkpoint")
    torch.save({"w": Payload()}, tmp_path / "hostile.pt")
    (tmp_path / "broken.safetensors").write_bytes(b"\x00" * 16)
    for name, why in (("garbage.pt", "refused"), ("hostile.pt", "refused"), ("broken.safetensors", "cannot be read")):
        assert main(_args(str(tmp_path / name), images, images, tmp_path / f"out_{name}",
                          **{"--max-steps": 1, "--batch-size": 2})) == 1
        err = capsys.readouterr().err
        assert name in err and why in err and "Traceback" not in err and "weights_only" not in err, err
    assert not marker.exists()


def test_flag_errors_name_the_flag(tmp_path, capsys):
    images = labelled_folder(tmp_path / "images", 2, 2)  # 4 images, batches of 16
    assert main(_args("random:vit_tiny", images, images, tmp_path / "ft", **{"--model": ""})) == 1
    err = capsys.readouterr().err
    assert "4 images cannot fill one global batch of 16" in err and "lower --batch-size" in err
    assert "data.batch_size" not in err  # fastibot train's key, not a finetune flag
    assert main(_args("random:vit_tiny", images, images, tmp_path / "new",
                      **{"--model": "", "--resume": True, "--batch-size": 2})) == 1
    assert f"--resume: --out {tmp_path / 'new'} holds no fine-tuning checkpoint" in capsys.readouterr().err
    # the metrics of a run stopped before its first checkpoint: a new run there would add its rows to them (and
    # report that run's best epoch as its own)
    (tmp_path / "left").mkdir()
    (tmp_path / "left" / "metrics.csv").write_text("step,epoch,val_top1\n3,1,99.0\n")
    assert main(_args("random:vit_tiny", images, images, tmp_path / "left", **{"--batch-size": 2})) == 1
    assert f"--out {tmp_path / 'left'} holds the metrics.csv of an earlier run" in capsys.readouterr().err
    assert (tmp_path / "left" / "metrics.csv").read_text() == "step,epoch,val_top1\n3,1,99.0\n"


def test_sigterm_stops_after_the_step_with_a_checkpoint(tmp_path, monkeypatch):
    import os
    import signal

    from fastibot.finetune import Finetuner
    step = Finetuner.train_step

    def step_then_signal(self, x, y, bad):
        step(self, x, y, bad)
        if self.step == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # as a scheduler's preemption would

    monkeypatch.setattr(Finetuner, "train_step", step_then_signal)
    images, out = labelled_folder(tmp_path / "images", 12, 2), tmp_path / "ft"
    args = _args("random:vit_tiny", images, images, out, **{"--batch-size": 8})
    assert main(args) == 128 + signal.SIGTERM
    assert [s for s, _ in checkpoints(out)] == [2]
    monkeypatch.setattr(Finetuner, "train_step", step)
    assert main(args + ["--resume"]) == 0
    assert [int(r["step"]) for r in metrics_rows(out)] == [3, 6]


def test_finetune_quality_stages_and_table(tmp_path, capsys):
    """benchmarks/finetune_quality.py: the pretrained fine-tune refuses to start before the pretraining
    finished; the table reads each finished run's metrics.csv (best, last, and the curve at the first
    epoch and each quarter)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("finetune_quality",
                                                  Path(__file__).resolve().parents[1] / "benchmarks" / "finetune_quality.py")
    fq = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fq)
    args = ["--train", "t", "--val", "v", "--out", str(tmp_path)]
    with pytest.raises(SystemExit, match="run --stage pretrain first"):
        fq.main(args + ["--stage", "pretrained"])
    for run, top1 in (("pretrained", [30, 40, 50, 60, 70, 65, 66, 67]), ("random", [10, 20, 30, 40, 50, 55, 56, 57])):
        folder = tmp_path / f"ft_{run}"
        folder.mkdir()
        rows = ["epoch,val_top1,val_top5"] + [f"{e + 1},{t},{t + 20}" for e, t in enumerate(top1)]
        (folder / "metrics.csv").write_text("\n".join(rows) + "\n")
        (tmp_path / f"ft_{run}.done").write_text("ok\n")
    fq.main(args + ["--stage", "table", "--json", str(tmp_path / "t.json")])
    table = capsys.readouterr().out
    assert "| pretrained (iBOT teacher) | 8 | 30.0@1 / 40.0@2 / 60.0@4 / 65.0@6 / 67.0@8 | 70.00 | 5 | 67.00 | 87.00 |" in table
    assert "| random init | 8 | 10.0@1 / 20.0@2 / 40.0@4 / 55.0@6 / 57.0@8 | 57.00 | 8 | 57.00 | 77.00 |" in table
    saved = json.loads((tmp_path / "t.json").read_text())["results"]
    assert [r["best top-1"] for r in saved] == [70.0, 57.0]


def test_a_loader_worker_error_ends_the_process_with_one_line(tmp_path):
    """Every training image unreadable, loaded by a (persistent, SIGTERM-ignoring) worker: the process prints the
    worker's own message and exits, rather than a traceback and then waiting forever on the worker at exit."""
    import subprocess
    import sys

    bad, val = tmp_path / "bad", labelled_folder(tmp_path / "val", 2, 2)
    for c in ("c0", "c1"):
        (bad / c).mkdir(parents=True)
        for i in range(12):
            (bad / c / f"{i}.png").write_text("not an image")
    args = _args("random:vit_tiny", bad, val, tmp_path / "ft", **{"--batch-size": 2, "--workers": 1})
    done = subprocess.run([sys.executable, "-m", "fastibot.cli", *args], capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stderr[-2000:]
    err = done.stderr.splitlines()[-1]
    assert err.startswith(f"fastibot finetune: in a data loader worker: 20 unreadable images in a row from {bad}"), err
    assert "Traceback" not in done.stderr, done.stderr[-2000:]


def test_a_source_or_resume_without_a_usable_checkpoint_is_one_message(tmp_path, capsys):
    """A fine-tuning run given as the source, a run folder whose only checkpoint is broken, a folder with none,
    and --resume of a run whose checkpoints are all broken: each one message naming the folder or file."""
    images, ft = labelled_folder(tmp_path / "images", 2, 2), tmp_path / "ft"
    small = {"--batch-size": 2, "--max-steps": 1}
    assert main(_args("random:vit_tiny", images, images, ft, **small)) == 0
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "checkpoint_00000001.pt").write_text("cut short")
    capsys.readouterr()
    for src, msg in ((ft, "is from a fine-tuning run (fastibot finetune), not a pretraining run"),
                     (tmp_path / "broken", "no usable checkpoint in"), (images, "no checkpoint_*.pt in")):
        assert main(_args(str(src), images, images, tmp_path / "out", **small)) == 1
        err = capsys.readouterr().err
        assert msg in err and str(src) in err and "--resume" not in err, err
    for _, path in checkpoints(ft):
        path.write_bytes(path.read_bytes()[:1000])
    assert main(_args("random:vit_tiny", images, images, ft, **small, **{"--resume": True})) == 1
    assert f"no usable checkpoint in {str(ft)!r}" in capsys.readouterr().err


def test_resume_with_another_model_or_global_batch_names_the_flags(tmp_path, capsys):
    """--resume with flags that build another model, or another global batch (the schedule and the data order
    follow the step): one message naming the flag and the checkpoint's value, and the run's files untouched."""
    images, ft = labelled_folder(tmp_path / "images", 2, 2), tmp_path / "ft"
    small = {"--batch-size": 2, "--max-steps": 1}
    assert main(_args("random:vit_tiny", images, images, ft, **small)) == 0
    before = {p.name: p.read_bytes() for p in ft.iterdir()}
    capsys.readouterr()
    for flags, msg in (({"--model": ""}, "--model 'test_vit' (this run: '')"),
                       ({"--image-size": 48}, "--image-size 32 (this run: 48)"),
                       ({"--layer-decay": 1}, "--layer-decay unset (this run: 1.0)"),
                       ({"--batch-size": 4}, "global batch of 2 images per step, this run has 4 (--batch-size 4")):
        assert main(_args("random:vit_tiny", images, images, ft, **{**small, **flags, "--resume": True})) == 1
        err = capsys.readouterr().err
        assert f"--resume: {ft / 'checkpoint_00000001.pt'}" in err and msg in err, err
    assert {p.name: p.read_bytes() for p in ft.iterdir()} == before


def test_outputs_that_cannot_be_written_are_refused_before_the_run(tmp_path, capsys):
    """--out a file, --json a folder or under a file, --subset-out a folder: refused by name before anything is
    trained (the summary is written at the very end); a --json in a folder not made yet is written there."""
    images, afile = labelled_folder(tmp_path / "images", 2, 2), tmp_path / "afile"
    afile.write_text("another run's notes")
    small = {"--batch-size": 2, "--max-steps": 1}
    for flags, msg in (({}, f"--out {afile}: is a file; give a folder"),
                       ({"--json": str(images)}, f"--json {images}: is a folder; give a file name"),
                       ({"--json": str(afile / "s.json")}, f"--json {afile / 's.json'}: {afile} is a file"),
                       ({"--label-fraction": 0.5, "--subset-out": str(images)}, f"--subset-out {images}: is a folder")):
        out = afile if not flags else tmp_path / "ft"
        assert main(_args("random:vit_tiny", images, images, out, **small, **flags)) == 1
        err = capsys.readouterr().err
        assert msg in err and "Traceback" not in err, err
        assert not (tmp_path / "ft").exists()
    assert afile.read_text() == "another run's notes"
    assert main(_args("random:vit_tiny", images, images, tmp_path / "ft", **small,
                      **{"--json": str(tmp_path / "new" / "s.json")})) == 0
    assert json.loads((tmp_path / "new" / "s.json").read_text())["step"] == 1


def test_vit_weights_into_a_model_without_a_position_embedding_is_one_message():
    """--model naming a Swin for a ViT's weights: the SourceError names both flags to check, not an
    AttributeError from the position-embedding resampling."""
    from fastibot.models.classifier import SourceError
    vit = timm.create_model("test_vit", num_classes=0, img_size=32).state_dict()
    tiny_swin = {"embed_dim": 16, "depths": (1, 1, 1, 1), "num_heads": (1, 1, 1, 1), "window_size": 2}
    with pytest.raises(SourceError, match=r"do not fit swin_tiny_patch4_window7_224 at 32 px .*check --model .* "
                                          r"and --image-size"):
        build_classifier("swin_tiny_patch4_window7_224", tiny_swin, 3, 32, 0.0, vit)


def test_finetune_quality_arguments_and_a_failed_stage(tmp_path, capsys):
    """benchmarks/finetune_quality.py: values that would fail only after the pretraining are refused first, the
    table needs no image folders but a finished run, and a failed stage is one line, not a traceback."""
    import importlib.util
    import sys
    spec = importlib.util.spec_from_file_location("finetune_quality",
                                                  Path(__file__).resolve().parents[1] / "benchmarks" / "finetune_quality.py")
    fq = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fq)
    base = ["--train", "t", "--val", "v", "--out", str(tmp_path / "fq")]
    for bad, msg in ((["--epochs", "0"], "argument --epochs"), (["--batch", "63"], "--batch 63: must be even"),
                     (["--minutes", "0"], "argument --minutes"), (["--workers", "-1"], "argument --workers")):
        with pytest.raises(SystemExit) as e:
            fq.main(base + bad)
        assert e.value.code == 2 and msg in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        fq.main(["--out", str(tmp_path / "fq"), "--stage", "random"])
    assert e.value.code == 2 and "--stage random needs --train and --val" in capsys.readouterr().err
    assert not (tmp_path / "fq").exists()  # nothing ran
    with pytest.raises(SystemExit, match=r"no finished fine-tuning in .*: run the stages first"):
        fq.main(["--out", str(tmp_path / "fq"), "--stage", "table"])
    with pytest.raises(SystemExit, match=r"\[x\] failed \(exit status 3\): see its message above"):
        fq.stage("x", tmp_path / "x", [sys.executable, "-c", "raise SystemExit(3)"], resumable=False)
    assert not (tmp_path / "x.done").exists()
