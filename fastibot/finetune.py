"""``fastibot finetune``: supervised fine-tuning of a pretrained backbone, the BEiT/iBOT recipe.

The backbone becomes the timm model it exports to, with a new linear head (``models.classifier``).
Built from timm's parts: ``create_optimizer_v2`` (AdamW with layer-wise lr decay: block ``i`` of
``L`` gets ``decay ** (L - i)`` of the lr, the embeddings ``decay ** (L + 1)``, the head 1, and
timm groups the final norm with the last block; no weight decay on 1-D parameters and position
embeddings), ``CosineLRScheduler`` stepped per
iteration (linear warm-up from 0, cosine to ``--min-lr``), ``create_transform`` (RandAugment,
random erasing), ``Mixup`` (mixup/cutmix with label smoothing) with ``SoftTargetCrossEntropy``;
drop path in the blocks; bf16 autocast on CUDA; DDP under torchrun. Top-1/top-5 on the validation
split after every epoch, in ``metrics.csv``. Checkpoints are atomic, load with
``weights_only=True``, and resume exactly, mid-epoch too: augmentations are seeded per sample,
mixup per step, and the generator state of every process is saved.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from . import checkpoint as ckpt
from .data.classification import ClassificationDataset, train_loader, train_transform, val_loader
from .data.datasets import list_images, sample_seed, stop_workers
from .logger import MetricsWriter, setup_logging
from .models.classifier import build_classifier, default_layer_decay, load_source
from .runtime import StopSignals

log = logging.getLogger("fastibot")


class FinetuneError(RuntimeError):
    """Fine-tuning cannot start or go on; the message names the flag or file at fault."""


def build_optimizer(model, lr: float, weight_decay: float, layer_decay: float):
    from timm.optim import create_optimizer_v2

    return create_optimizer_v2(model, opt="adamw", lr=lr, weight_decay=weight_decay,
                               layer_decay=layer_decay if layer_decay < 1 else None)


def build_scheduler(opt, total_steps: int, warmup_steps: int, min_lr: float):
    """Per step: linear warm-up from 0, then cosine to ``min_lr``; timm scales each group by its lr_scale."""
    from timm.scheduler import CosineLRScheduler

    warmup_steps = max(0, min(warmup_steps, total_steps - 1))
    return CosineLRScheduler(opt, t_initial=max(total_steps - warmup_steps, 1), lr_min=min_lr, warmup_t=warmup_steps,
                             warmup_lr_init=0.0, warmup_prefix=True, t_in_epochs=False)


@contextlib.contextmanager
def numpy_seeded(seed: int):
    """timm's Mixup draws from NumPy's global generator: seed it per step, restore it after."""
    saved = np.random.get_state()
    np.random.seed(seed % 2 ** 32)
    try:
        yield
    finally:
        np.random.set_state(saved)


def runtime(device: str, precision: str):
    """(device, rank, world, autocast dtype or None); joins the process group under torchrun."""
    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    if device == "cuda" and not torch.cuda.is_available():
        raise FinetuneError("--device cuda: no CUDA device is visible")
    cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    return dev, rank, world, (torch.bfloat16 if precision == "bf16" or (precision == "auto" and cuda) else None)


class Finetuner:
    def __init__(self, args, resume: bool = False):
        self.args, a = args, args
        self.device, self.rank, self.world, self.amp = runtime(a.device, a.precision)
        self.out = Path(a.out)
        self._data()
        name, kwargs, sd = load_source(a.source, a.which, a.model)
        torch.manual_seed(a.seed)  # the same head on every process
        self.module = build_classifier(name, kwargs, len(self.classes), a.image_size, a.drop_path, sd).to(self.device)
        self.model = torch.nn.parallel.DistributedDataParallel(
            self.module, device_ids=[self.device.index] if self.device.type == "cuda" else None) \
            if self.world > 1 else self.module
        self.layer_decay = a.layer_decay if a.layer_decay is not None else default_layer_decay(name)
        self.peak_lr = a.lr * a.batch_size * self.world / 256
        self.spe = self.sampler.steps_per_epoch
        total = a.epochs * self.spe
        self.total = min(total, a.max_steps) if a.max_steps else total
        self.opt = build_optimizer(self.module, self.peak_lr, a.weight_decay, self.layer_decay)
        self.sched = build_scheduler(self.opt, total, int(round(a.warmup_epochs * self.spe)), a.min_lr)
        self.mixup = None
        if a.mixup > 0 or a.cutmix > 0:
            from timm.data import Mixup
            from timm.loss import SoftTargetCrossEntropy
            self.mixup = Mixup(mixup_alpha=a.mixup, cutmix_alpha=a.cutmix, prob=a.mixup_prob,
                               switch_prob=a.mixup_switch_prob, label_smoothing=a.smoothing,
                               num_classes=len(self.classes))
            self.criterion = SoftTargetCrossEntropy()
        else:
            self.criterion = torch.nn.CrossEntropyLoss(label_smoothing=a.smoothing)
        torch.manual_seed(a.seed + self.rank)  # drop-path draws: one stream per process
        self.step, self.sums = 0, torch.zeros(3, dtype=torch.float64, device=self.device)  # loss, steps, bad
        self.writer = MetricsWriter(self.out, tensorboard=False, enabled=self.rank == 0)
        log.info("finetune: %s (%s) on %d classes, %d training images, lr %.3g (peak), layer decay %.3g, %s, %s",
                 name, a.source, len(self.classes), len(self.dataset), self.peak_lr, self.layer_decay, self.device,
                 self.amp or "fp32")
        if resume:
            self.load(ckpt.resolve_resume("auto", str(self.out)))

    def _data(self) -> None:
        from .eval.subsets import label_subset, subset_summary, write_subset

        a = self.args
        samples, self.classes = list_images(a.train, "--train")
        val, val_classes = list_images(a.val, "--val")
        if val_classes != self.classes:
            raise FinetuneError(f"--train and --val have different classes: {self.classes} vs {val_classes}")
        subset = label_subset(samples, self.classes, a.label_fraction, a.subset_seed)
        self.subset_sha1 = ""
        if a.label_fraction < 1:
            out = a.subset_out or str(self.out / "train_subset.txt")
            self.subset_sha1 = write_subset(out, subset, a.train, a.label_fraction, a.subset_seed) \
                if self.rank == 0 else ""
            log.info("label fraction %g: %s (listed in %s)", a.label_fraction, subset_summary(subset, self.classes), out)
        self.dataset = ClassificationDataset(subset, train_transform(a.image_size, a.aa, a.reprob, a.color_jitter, a.scale),
                                             seed=a.seed)
        cuda = self.device.type == "cuda"
        self.sampler, self.loader = train_loader(self.dataset, a.batch_size, self.rank, self.world, a.seed, a.workers,
                                                 cuda)
        self.val = val_loader(val, a.image_size, a.batch_size, self.rank, self.world, a.workers, cuda)

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=self.amp) if self.amp else contextlib.nullcontext()

    def train_step(self, x: torch.Tensor, y: torch.Tensor, bad: torch.Tensor) -> None:
        self.sched.step_update(self.step)
        if self.mixup is not None:
            with numpy_seeded(sample_seed(self.args.seed, self.step, self.rank)):
                x, y = self.mixup(x, y)  # y: (B, C) soft targets, label smoothing included
        with self._autocast():
            loss = self.criterion(self.model(x), y)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if self.args.clip_grad > 0:
            torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.args.clip_grad)
        self.opt.step()
        self.sums += torch.stack([loss.detach().double(), torch.ones((), dtype=torch.float64, device=loss.device),
                                  bad.to(loss.device).double()])
        self.step += 1

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Top-1 / top-5 (percent) and mean cross-entropy on the validation split (all processes' shards)."""
        self.module.eval()
        acc = torch.zeros(4, dtype=torch.float64, device=self.device)  # top-1 hits, top-5 hits, loss sum, images
        for x, y, _ in self.val:
            x, y = x.to(self.device), y.to(self.device)
            with self._autocast():
                logits = self.module(x).float()
            top = logits.topk(min(5, logits.shape[1]), dim=1).indices
            acc += torch.stack([(top[:, 0] == y).sum().double(), (top == y[:, None]).any(1).sum().double(),
                                F.cross_entropy(logits, y, reduction="sum").double(),
                                torch.tensor(float(y.shape[0]), dtype=torch.float64, device=self.device)])
        if self.world > 1:
            dist.all_reduce(acc)
        self.module.train()
        hit1, hit5, loss, n = acc.tolist()  # sync-ok: once per epoch
        return {"val_top1": 100 * hit1 / n, "val_top5": 100 * hit5 / n, "val_loss": loss / n}

    def end_epoch(self, started: float, images: int) -> dict:
        sums = self.sums.clone()
        if self.world > 1:
            dist.all_reduce(sums)
        loss, steps, bad = sums.tolist()  # sync-ok: once per epoch
        img_s = images * self.world / max(time.perf_counter() - started, 1e-9)  # training only, not validation
        row = {"step": self.step, "epoch": self.step // self.spe, "train_loss": loss / max(steps, 1),
               "lr": max(g["lr"] for g in self.opt.param_groups), **self.evaluate(), "img_s": img_s,
               "bad_images": int(bad)}
        self.writer.write(row)
        self.sums.zero_()
        log.info("epoch %d: train loss %.4f, val top-1 %.2f top-5 %.2f", row["epoch"], row["train_loss"],
                 row["val_top1"], row["val_top5"])
        return row

    def fit(self) -> dict:
        a, row, self.stopped = self.args, {}, None
        if self.rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "finetune_args.json").write_text(json.dumps(vars(a), indent=2, default=str))
        with contextlib.ExitStack() as stack:
            # one process stops after the step on SIGINT/SIGTERM; under torchrun the launcher's signals apply
            signals = stack.enter_context(StopSignals()) if self.world == 1 else None
            while self.step < self.total and self.stopped is None:
                epoch, pos = divmod(self.step, self.spe)
                self.sampler.set_position(epoch, pos)
                started, images = time.perf_counter(), 0
                for x, y, bad in self.loader:
                    self.train_step(x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True), bad)
                    images += x.shape[0]
                    if self.step % self.spe == 0:
                        row = self.end_epoch(started, images)
                    if self.step % self.spe == 0 or (a.ckpt_every and self.step % a.ckpt_every == 0):
                        self.save()
                    self.stopped = signals.received if signals is not None else None
                    if self.step >= self.total or self.stopped:
                        break
            if self.step % self.spe and (not a.ckpt_every or self.step % a.ckpt_every):
                self.save()  # stopped mid-epoch (max steps, a signal): the next run resumes here
        best = _best(self.out / "metrics.csv") if self.rank == 0 else {}
        return {**row, **best, "step": self.step, **({"stopped": self.stopped} if self.stopped else {})}

    # ------------------------------------------------------------------ checkpoints

    def state(self) -> dict:
        rng = {"torch": torch.get_rng_state(),
               "cuda": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else torch.zeros(0)}
        if self.world > 1:
            every = [None] * self.world
            dist.all_gather_object(every, rng)
            rng = every
        else:
            rng = [rng]
        return {"finetune": 1, "step": self.step, "model": self.module.state_dict(), "optimizer": self.opt.state_dict(),
                "sums": self.sums.cpu(), "rng": rng, "classes": self.classes, "subset_sha1": self.subset_sha1,
                "args": {k: v for k, v in vars(self.args).items() if k != "func"}}

    def save(self) -> None:
        state = self.state()  # collective under DDP
        if self.rank == 0:
            path = ckpt.save_checkpoint(self.out, self.step, state, self.args.keep_last, keep_good=False)
            log.info("saved %s", path)

    def _load_weights(self, path: Path, state: dict) -> None:
        """Load the model and optimizer of ``state``; a checkpoint of another global batch (the schedule and data
        order follow the step) or of another model is an error naming the flags that differ."""
        a, saved = self.args, state.get("args", {})
        old = saved.get("batch_size", a.batch_size) * len(state["rng"])
        if old != a.batch_size * self.world:
            raise FinetuneError(f"--resume: {path} was trained with a global batch of {old} images per step, this run "
                                f"has {a.batch_size * self.world} (--batch-size {a.batch_size} x {self.world} processes): "
                                f"the schedule and data order follow the step, so resume with the same global batch")
        try:
            self.module.load_state_dict(state["model"])
            self.opt.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError) as e:
            flags = ("source", "model", "which", "image_size", "layer_decay")
            shown = lambda v: "unset" if v is None else repr(v)  # noqa: E731
            changed = [f"{'--' * (k != 'source')}{k.replace('_', '-')} {shown(saved[k])} (this run: {shown(getattr(a, k))})"
                       for k in flags if k in saved and saved[k] != getattr(a, k)]
            raise FinetuneError(f"--resume: {path} does not fit the model this run builds ({ckpt.error_tail(e)}); "
                                "resume with "
                                + (f"the checkpoint's settings: {', '.join(changed)}" if changed else
                                   "the arguments in finetune_args.json of --out")) from None

    def load(self, path: Path) -> None:
        state = torch.load(path, map_location="cpu", weights_only=True)
        if state.get("classes") != self.classes:
            raise FinetuneError(f"--resume: {path} was trained on classes {state.get('classes')}, not {self.classes}")
        if self.rank == 0 and state.get("subset_sha1", "") != self.subset_sha1:
            raise FinetuneError(f"--resume: {path} trained on another label subset than --label-fraction "
                                f"{self.args.label_fraction} / --subset-seed {self.args.subset_seed} give")
        self._load_weights(path, state)
        self.sums.copy_(state["sums"].to(self.device))
        self.step = int(state["step"])
        rng = state["rng"][self.rank] if len(state["rng"]) > self.rank else state["rng"][0]
        torch.set_rng_state(rng["torch"])
        if self.device.type == "cuda" and rng["cuda"].numel():
            torch.cuda.set_rng_state(rng["cuda"], self.device)
        if self.rank == 0:  # a broken newer checkpoint is kept aside, not overwritten by this run's save
            ckpt.set_aside_after(self.out, self.step)
        self.writer.truncate_after(self.step)
        log.info("resumed from %s at step %d", path, self.step)


def _best(path: Path) -> dict:
    import csv
    if not path.is_file():
        return {}
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return {}
    best = max(rows, key=lambda r: float(r["val_top1"]))
    return {"best_val_top1": float(best["val_top1"]), "best_epoch": int(best["epoch"])}


def finetune(args) -> dict:
    """Run (or resume) one fine-tuning; returns the last epoch's row with the best top-1."""
    out = Path(args.out)
    if args.resume is None and ckpt.latest_checkpoint(out) is not None:
        raise FinetuneError(f"--out {out} already holds a fine-tuning run: pass --resume to continue it, "
                            "or choose another folder")
    if args.resume is None and (out / "metrics.csv").exists():  # a run stopped before its first checkpoint
        raise FinetuneError(f"--out {out} holds the metrics.csv of an earlier run but no checkpoint to resume: this "
                            "run would add its rows to that run's; choose another folder, or delete the file")
    if args.resume is not None and ckpt.latest_checkpoint(out) is None:
        raise FinetuneError(f"--resume: --out {out} holds no fine-tuning checkpoint to continue; leave out "
                            "--resume to start this run there")
    setup_logging(int(os.environ.get("RANK", "0")) == 0)
    tuner = None
    try:
        tuner = Finetuner(args, resume=args.resume is not None)
        return {**tuner.fit(), "rank": tuner.rank}
    finally:
        if tuner is not None:  # persistent loader workers ignore SIGTERM: after an error the exit would wait on them
            stop_workers(tuner.loader)
        if dist.is_initialized():
            dist.destroy_process_group()



# ------------------------------------------------------------------ command line


def check_args(args) -> None:
    def need(cond, flag, msg):
        if not cond:
            raise FinetuneError(f"{flag}: {msg}")

    for flag in ("epochs", "batch_size", "image_size", "keep_last"):
        need(getattr(args, flag) >= 1, "--" + flag.replace("_", "-"), "must be >= 1")
    for flag in ("lr", "min_lr", "warmup_epochs", "weight_decay", "drop_path", "smoothing", "mixup", "cutmix", "reprob",
                 "clip_grad", "max_steps", "ckpt_every", "workers"):
        need(getattr(args, flag) >= 0, "--" + flag.replace("_", "-"), "must be >= 0")
    need(args.lr > 0, "--lr", "must be > 0")
    need(args.layer_decay is None or 0 < args.layer_decay <= 1, "--layer-decay", "need 0 < decay <= 1 (1: off)")
    need(args.smoothing < 1, "--smoothing", "must be < 1")
    need(0 < args.scale[0] <= args.scale[1] <= 1, "--scale", "need 0 < LO <= HI <= 1")
    need(not (args.mixup > 0 or args.cutmix > 0) or args.batch_size % 2 == 0, "--batch-size",
         "must be even with --mixup/--cutmix (images are mixed in pairs); or pass --mixup 0 --cutmix 0")
    from .eval.cli import check_output
    check_output(args.out, "--out", folder=True)  # written at the end: refused before the run, not after it
    check_output(args.json, "--json")
    check_output(args.subset_out, "--subset-out")


def _finetune(args) -> int:
    import signal
    import sys

    from .data.datasets import DataError
    from .models.classifier import SourceError

    try:
        check_args(args)
        summary = finetune(args)
    except (FinetuneError, SourceError, ckpt.CheckpointError, DataError, FileNotFoundError, ValueError) as e:
        from .cli import one_line
        print(f"fastibot finetune: {one_line(e)}", file=sys.stderr)  # a worker's error: its last line
        return 1
    if summary.get("rank", 0) == 0:
        from .eval.cli import report
        report(summary, args.json)
    stopped = summary.get("stopped")
    return 128 + int(getattr(signal, stopped)) if stopped else 0


def add_finetune_parser(sub) -> None:
    from .eval.cli import add_subset_args

    f = sub.add_parser("finetune", help="fine-tune a pretrained backbone on labelled images (BEiT/iBOT recipe)",
                       description="Supervised fine-tuning with layer-wise lr decay, RandAugment, mixup/cutmix, "
                                   "label smoothing and drop path. Defaults: the iBOT ImageNet recipe; the lr is per "
                                   "256 images and scales with the global batch.")
    f.add_argument("source", help="pretraining run folder or checkpoint, exported .safetensors/.pt, or random:ARCH")
    f.add_argument("--train", required=True, help="labelled image folder (class subfolders) to train on")
    f.add_argument("--val", required=True, help="labelled image folder to report top-1/top-5 on after every epoch")
    f.add_argument("--out", required=True, help="run folder: metrics.csv, checkpoints, finetune_args.json")
    f.add_argument("--resume", action="store_const", const="auto", default=None,
                   help="continue the run in --out exactly from its latest checkpoint")
    f.add_argument("--which", default="teacher", choices=("teacher", "student"), help="backbone of a pretraining run")
    f.add_argument("--model", default="", help="timm model name (needed for .pt weights)")
    g = f.add_argument_group("schedule and optimiser")
    g.add_argument("--epochs", type=int, default=100)
    g.add_argument("--batch-size", type=int, default=128, help="images per step per process")
    g.add_argument("--lr", type=float, default=1e-3, help="peak lr per 256 images (4e-3 at the recipe's 1024)")
    g.add_argument("--min-lr", type=float, default=1e-6)
    g.add_argument("--warmup-epochs", type=float, default=20.0)
    g.add_argument("--weight-decay", type=float, default=0.05)
    g.add_argument("--layer-decay", type=float, default=None,
                   help="lr ratio between consecutive blocks (default: 0.75 ViT-T/S/L, 0.65 ViT-B, 0.9 Swin)")
    g.add_argument("--clip-grad", type=float, default=0.0, help="global gradient-norm clip (0: off)")
    g = f.add_argument_group("regularisation and augmentation")
    g.add_argument("--drop-path", type=float, default=0.1)
    g.add_argument("--smoothing", type=float, default=0.1, help="label smoothing")
    g.add_argument("--mixup", type=float, default=0.8, help="mixup alpha (0: off)")
    g.add_argument("--cutmix", type=float, default=1.0, help="cutmix alpha (0: off)")
    g.add_argument("--mixup-prob", type=float, default=1.0)
    g.add_argument("--mixup-switch-prob", type=float, default=0.5, help="chance of cutmix when both are on")
    g.add_argument("--aa", default="rand-m9-mstd0.5-inc1", help="timm RandAugment policy ('' for colour jitter)")
    g.add_argument("--reprob", type=float, default=0.25, help="random-erasing probability")
    g.add_argument("--color-jitter", type=float, default=0.4)
    g.add_argument("--image-size", type=int, default=224)
    g.add_argument("--scale", type=float, nargs=2, default=[0.08, 1.0], metavar=("LO", "HI"),
                   help="RandomResizedCrop area range")
    g = f.add_argument_group("run")
    g.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"))
    g.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp32"), help="auto: bf16 on CUDA")
    g.add_argument("--workers", type=int, default=8)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--ckpt-every", type=int, default=0, help="also checkpoint every N steps (always: each epoch)")
    g.add_argument("--keep-last", type=int, default=2, help="checkpoints kept")
    g.add_argument("--max-steps", type=int, default=0, help="stop after this many steps (0: all epochs)")
    g.add_argument("--json", help="also write the final summary here")
    add_subset_args(f)
    f.set_defaults(func=_finetune)
