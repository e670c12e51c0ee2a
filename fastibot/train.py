"""The iBOT training loop: one file, no host syncs inside the step.

A step is four named parts: teacher targets, student forward, losses (+ center
update), update (clip, optimizer, EMA). Metrics accumulate on the device and
are read every ``runtime.log_every`` steps. Non-finite gradients skip the
optimizer step on the device (fused AdamW's ``found_inf``), are counted, and
stop the run after ``runtime.max_nonfinite`` in a row.
"""
from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path
from typing import List, Optional

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from . import checkpoint as ckpt
from .config import Config
from .data.datasets import DataError, stop_workers
from .data.loaders import build_data
from .logger import MetricsWriter, Progress, setup_logging
from .loss import ibot_loss, ibot_loss_rows
from .models.attention import resolve_backend
from .models.ibot import build_model
from .rundir import claim
from .kernels import resolve_impl
from .runtime import Runtime, StopSignals, TrainingError, build_optimizer, init_runtime, seed_everything
from .teacher import EMA, Centers, Schedules

__all__ = ["Runtime", "Trainer", "TrainingError", "build_optimizer", "init_runtime", "train"]

log = logging.getLogger("fastibot")

# device-side counters: sums since the start of the run
C_LOSS, C_CLS, C_PATCH, C_FINITE, C_NONFINITE, C_BAD_RUN, C_MAX_BAD_RUN, C_BAD_IMAGES, C_GRAD_NORM = range(9)
# per-rank counts of each rank's own batches; the others (non-finite steps, gradient norms) follow the
# all-reduced gradients and are equal on every rank
_RANK_SUMMED = [C_LOSS, C_CLS, C_PATCH, C_FINITE, C_BAD_IMAGES]
N_COUNTERS = 9


def _no_mark(name: str) -> None:
    return None


class Trainer:
    def __init__(self, cfg: Config, rt: Runtime, resume: Optional[str] = None):
        self.cfg, self.rt = cfg, rt
        self.out = Path(cfg.runtime.output_dir)
        seed_everything(cfg.runtime.seed + rt.rank)
        self.data = build_data(cfg, rt.rank, rt.world, rt.device)
        self.accum = cfg.optim.accum_steps
        self.steps_per_epoch = self.data.steps_per_epoch // self.accum
        if self.steps_per_epoch == 0:
            raise DataError(f"one epoch has {self.data.steps_per_epoch} batches, fewer than "
                            f"optim.accum_steps={self.accum}")
        self.sched = Schedules.build(cfg, self.steps_per_epoch, rt.world)
        cap = cfg.runtime.max_steps
        self.total_steps = min(cap, len(self.sched)) if cap > 0 else len(self.sched)
        self._build_models()
        self.counters = torch.zeros(N_COUNTERS, dtype=torch.float64, device=rt.device)
        self.step = 0
        self.mark = _no_mark  # benchmarks set a phase marker (records CUDA events)
        self.writer = MetricsWriter(self.out, cfg.runtime.tensorboard, enabled=rt.is_main)
        if resume is not None:
            self.load(ckpt.resolve_resume(resume, cfg.runtime.output_dir))
        self._last = (self.step, self.counters.tolist(), time.perf_counter())  # sync-ok: once at start

    def _build_models(self) -> None:
        cfg, rt = self.cfg, self.rt
        with torch.random.fork_rng(devices=[]):
            # the base seed on every rank: DDP broadcasts the student from rank 0, but the teacher is a copy
            # made here, so every rank must start from the same weights
            torch.manual_seed(cfg.runtime.seed)
            student = build_model(cfg, student=True).to(rt.device)
            teacher = build_model(cfg, student=False).to(rt.device)
        teacher.load_state_dict(student.state_dict(), strict=False)
        teacher.requires_grad_(False).eval()
        self.attention = resolve_backend(cfg.model.attention, rt.device.type, rt.amp_dtype or torch.float32)
        if cfg.runtime.compile:
            # every block instance (student and teacher, dense and packed inputs) has its own guards
            torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 256)
            torch._dynamo.config.accumulated_cache_size_limit = max(
                torch._dynamo.config.accumulated_cache_size_limit, 1024)
        for m in (student, teacher):
            m.backbone.set_attention_backend(self.attention)
            if cfg.runtime.compile:
                for blk in m.backbone.blocks:
                    blk.compile()
        self.student_module, self.teacher = student, teacher
        # the triton EMA moves parameters into flat buffers: before DDP and the optimizer see them
        self.ema_impl = self._kernel_impl("ema", "foreach")
        self.ema = EMA(student, teacher, self.ema_impl)
        self.student = DDP(student, device_ids=[rt.device.index] if rt.device.type == "cuda" else None) \
            if rt.world > 1 else student
        self.centers = Centers(cfg.model.out_dim, cfg.model.patch_out_dim, cfg.ibot.center_momentum,
                               cfg.ibot.center_momentum2).to(rt.device)
        self.opt = build_optimizer(student, cfg)
        self.scaler = torch.amp.GradScaler(rt.device.type) if rt.amp_dtype == torch.float16 else None
        self.loss_impl = self._kernel_impl("loss", "reference")
        self.params = [p for p in student.parameters() if p.requires_grad]
        self.last_layer = [p for n, p in student.named_parameters() if "last_layer" in n and p.requires_grad]
        log.info("fastibot: %s/%d, %s, data=%s, attention=%s, packed=%s, loss=%s, ema=%s, precision=%s, world=%d",
                 cfg.model.arch, cfg.model.patch_size, rt.device, self.data.kind, self.attention, cfg.model.packed,
                 self.loss_impl, self.ema_impl, rt.amp_dtype or "fp32", rt.world)

    def _kernel_impl(self, key: str, fallback: str) -> str:
        try:
            return resolve_impl(key, getattr(self.cfg.kernels, key), self.rt.device.type, fallback)
        except RuntimeError as e:
            raise TrainingError(str(e)) from None

    # ------------------------------------------------------------------ step parts

    def _autocast(self):
        if self.rt.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.rt.device.type, dtype=self.rt.amp_dtype)

    def teacher_targets(self, batch):
        with self._autocast():
            return self.teacher.teacher(batch["globals"], batch["masks"], batch["mask_index"],
                                        self.cfg.ibot.patch_center)

    def student_forward(self, batch):
        with self._autocast():
            return self.student(batch["globals"], batch["masks"], batch["locals"], batch["mask_index"])

    def losses(self, s, t, batch, it: int):
        c, sched = self.cfg, self.sched
        kw = dict(n_global=c.crops.n_global, teacher_temp=float(sched.teacher_temp[it]),
                  teacher_patch_temp=float(sched.teacher_patch_temp[it]), student_temp=c.ibot.student_temp,
                  lambda1=c.ibot.lambda1, lambda2=c.ibot.lambda2, impl=self.loss_impl)
        if c.model.packed:
            out = ibot_loss_rows(s.cls, s.patch, t.cls, t.patch, batch["mask_weight"], self.centers.center,
                                 self.centers.center2, **kw)
        else:
            out = ibot_loss(s.cls, s.patch, t.cls, t.patch, batch["masks"], self.centers.center,
                            self.centers.center2, **kw)
        self.centers.update(out["teacher_cls_mean"], t.patch_mean)
        return out

    def micro_step(self, batch, it: int, last: bool) -> torch.Tensor:
        sync = contextlib.nullcontext() if (last or self.rt.world == 1) else self.student.no_sync()
        with sync:
            t = self.teacher_targets(batch)
            self.mark("teacher forward")
            s = self.student_forward(batch)
            self.mark("heads")
            out = self.losses(s, t, batch, it)
            self.mark("loss")
            loss = out["loss"] / self.accum
            (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
            self.mark("backward")
        vals = torch.stack([out["loss"], out["cls"], out["patch"]]).detach().double()
        ok = torch.isfinite(vals).all()
        self.counters[C_LOSS:C_PATCH + 1] += torch.where(ok, vals, 0.0)
        self.counters[C_FINITE] += ok.double()
        self.counters[C_BAD_IMAGES] += batch["n_bad"].double()
        return ~ok

    def update(self, it: int, bad_loss: torch.Tensor) -> None:
        o = self.cfg.optim
        for i, g in enumerate(self.opt.param_groups):
            g["lr"] = float(self.sched.lr[it])
            if i == 0:
                g["weight_decay"] = float(self.sched.wd[it])
        if self.scaler is not None:
            self.scaler.unscale_(self.opt)
        grads = [p.grad for p in self.params if p.grad is not None]
        norms = torch._foreach_norm(grads)  # per-parameter gradient norms, on the device
        total_norm = torch.linalg.vector_norm(torch.stack(norms))
        found_inf = (~torch.isfinite(total_norm)).float()
        if o.clip_grad > 0 and o.clip_mode == "per_param":
            coef = torch._foreach_add(norms, 1e-6)
            torch._foreach_reciprocal_(coef)
            torch._foreach_mul_(coef, o.clip_grad)
            torch._foreach_clamp_max_(coef, 1.0)
            torch._foreach_mul_(grads, coef)
        elif o.clip_grad > 0:
            torch._foreach_mul_(grads, (o.clip_grad / (total_norm + 1e-6)).clamp(max=1.0))
        if it < self.sched.freeze_last_layer_steps:
            for p in self.last_layer:
                p.grad = None
        if self.scaler is not None:
            bad = bad_loss.float()
            self.scaler.step(self.opt)
            self.scaler.update()
        else:
            bad = torch.maximum(found_inf, bad_loss.float())  # 0-d, as fused AdamW's step count
            if o.fused:
                self.opt.found_inf = bad
                self.opt.step()
            elif not bool(bad.item()):  # sync-ok: only the non-fused optimizer needs a host decision
                self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.mark("optimizer")
        self.ema(float(self.sched.momentum[it]))
        self.mark("EMA")
        self._count_nonfinite(bad.double(), total_norm)

    def _count_nonfinite(self, bad: torch.Tensor, total_norm: torch.Tensor) -> None:
        c = self.counters
        c[C_NONFINITE] += bad
        c[C_BAD_RUN] = (c[C_BAD_RUN] + 1.0) * bad
        c[C_MAX_BAD_RUN] = torch.maximum(c[C_MAX_BAD_RUN], c[C_BAD_RUN])
        c[C_GRAD_NORM] += torch.where(torch.isfinite(total_norm), total_norm.double(), 0.0)

    def train_step(self, micro_batches: List[dict]) -> None:
        it = self.step
        bad = torch.zeros((), dtype=torch.bool, device=self.rt.device)
        for i, batch in enumerate(micro_batches):
            bad = bad | self.micro_step(batch, it, last=i == len(micro_batches) - 1)
        self.update(it, bad)
        self.step += 1

    # ------------------------------------------------------------------ loop

    def fit(self) -> dict:
        cfg, spe = self.cfg, self.steps_per_epoch
        if self.step >= self.total_steps:
            log.info("the run is already complete at step %d of %d: nothing to do (raise optim.epochs or "
                     "runtime.max_steps to train further)", self.step, self.total_steps)
            self.writer.close()
            return {"step": self.step, "complete": True}
        self._nonfinite_at_save = self._nonfinite_steps()  # the loaded checkpoint's count
        if self.rt.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            cfg.save(self.out / "config.yaml")
        progress = Progress(self.total_steps, self.step, cfg.runtime.progress and self.rt.is_main)
        summary = {}
        self._started = time.perf_counter()
        self.stop_reason = None
        with StopSignals() as signals:
            try:
                while self.step < self.total_steps and self.stop_reason is None:
                    epoch, pos = divmod(self.step, spe)
                    self.data.set_position(epoch, pos * self.accum)
                    batches = iter(self.data)
                    for _ in range(pos, spe):
                        if self.step >= self.total_steps:
                            break
                        try:
                            micro = [next(batches) for _ in range(self.accum)]
                        except Exception:
                            # loader workers got the same signal and quit: the state is between steps, so save
                            if signals.received is None or self.rt.world > 1:
                                raise
                            self.stop_reason = signals.received
                            break
                        self.train_step(micro)
                        postfix = None
                        extra = self.periodic_eval()
                        at_log = bool(extra) or self.step % cfg.runtime.log_every == 0 or self.step == self.total_steps
                        if at_log:
                            summary = self.log_metrics(extra)
                            postfix = {k: f"{summary[k]:.4g}" for k in ("loss", "lr", "img_s") if k in summary}
                        self.stop_reason = self._stop_reason(signals.received, at_log)
                        progress.update(1, postfix)
                        if cfg.runtime.ckpt_every and self.step % cfg.runtime.ckpt_every == 0:
                            self.save()
                        if self.stop_reason is not None:
                            summary = summary if at_log else self.log_metrics()
                            break
                    del batches
                if self.stop_reason is not None:
                    log.info("%s at step %d of %d: stopping with a checkpoint (continue with --resume)",
                             self.stop_reason, self.step, self.total_steps)
                if not cfg.runtime.ckpt_every or self.step % cfg.runtime.ckpt_every != 0:
                    self.save()
            finally:
                progress.close()
                self.writer.close()
        return summary

    def _stop_reason(self, signal_name: Optional[str], at_log: bool) -> Optional[str]:
        """Why to stop after this step, if at all: a SIGINT/SIGTERM, or ``runtime.max_minutes`` spent.

        One process acts on a signal after the current step. Several processes agree at log steps (a max
        all-reduce, so any rank's signal or clock stops all of them at the same step)."""
        limit = self.cfg.runtime.max_minutes
        late = at_log and limit > 0 and time.perf_counter() - self._started >= 60.0 * limit
        if self.rt.world > 1:
            if not at_log:
                return None
            flags = torch.tensor([float(late), float(signal_name is not None)], device=self.rt.device)
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
            late, signalled = (bool(v) for v in flags.tolist())  # sync-ok: only at log steps
            signal_name = (signal_name or "a stop signal on another rank") if signalled else None
        if signal_name is not None:
            return signal_name
        return f"runtime.max_minutes={limit:g} reached" if late else None

    def periodic_eval(self) -> dict:
        """k-NN of the teacher every ``eval.every_n_steps`` (main process; the others wait)."""
        e = self.cfg.eval
        if not e.every_n_steps or self.step % e.every_n_steps != 0:
            return {}
        res = {}
        if self.rt.is_main:
            from .eval.knn import run_knn
            knn = run_knn(self.teacher.backbone, e.train_path, e.val_path, e.k, e.temperature, e.image_size,
                          e.batch_size, e.max_images, self.rt.device, num_workers=min(4, self.cfg.data.num_workers))
            res = {"knn_top1": knn["top1"], "knn_top5": knn["top5"]}
            log.info("step %d: k-NN top-1 %.2f top-5 %.2f", self.step, knn["top1"], knn["top5"])
        if self.rt.world > 1:
            dist.barrier()
        return res

    def log_metrics(self, extra: Optional[dict] = None) -> dict:
        now = time.perf_counter()
        counters = self.counters
        if self.rt.world > 1:  # losses and bad images summed over ranks (the other counters agree already)
            counters = counters.clone()
            summed = counters[_RANK_SUMMED]
            dist.all_reduce(summed)
            counters[_RANK_SUMMED] = summed
        vals = counters.tolist()  # sync-ok: read every runtime.log_every steps
        step0, prev, t0 = self._last
        self._last = (self.step, vals, now)
        d = [a - b for a, b in zip(vals, prev)]
        steps = max(self.step - step0, 1)
        finite = d[C_FINITE]  # micro-batches with a finite loss; with none, the means are NaN, not 0

        def mean(total):
            return total / finite if finite else float("nan")

        images = steps * self.accum * self.cfg.data.batch_size * self.rt.world
        it = self.step - 1
        row = {"step": self.step, "epoch": round(self.step / self.steps_per_epoch, 4),
               "loss": mean(d[C_LOSS]), "cls": mean(d[C_CLS]), "patch": mean(d[C_PATCH]),
               "lr": float(self.sched.lr[it]), "wd": float(self.sched.wd[it]),
               "momentum": float(self.sched.momentum[it]), "teacher_temp": float(self.sched.teacher_temp[it]),
               "grad_norm": d[C_GRAD_NORM] / steps, "img_s": images / max(now - t0, 1e-9),
               "nonfinite_steps": int(vals[C_NONFINITE]), "bad_images": int(vals[C_BAD_IMAGES])}
        row.update(extra or {})
        if self.rt.device.type == "cuda":
            row["peak_mem_gib"] = round(torch.cuda.max_memory_allocated(self.rt.device) / 2 ** 30, 3)
        self.writer.write(row)
        self._check_health(vals)
        return row

    def _check_health(self, vals) -> None:
        if vals[C_MAX_BAD_RUN] >= self.cfg.runtime.max_nonfinite:
            good = ckpt.newest_good(self.out)
            where = (f"resume from the newest checkpoint whose following steps were all finite: --resume {good}"
                     if good is not None else "no checkpoint was followed by finite steps: start again (--overwrite)")
            raise TrainingError(
                f"{int(vals[C_MAX_BAD_RUN])} steps in a row had a non-finite loss or gradient (by step {self.step}); "
                f"the run has diverged. Lower optim.lr, raise optim.warmup_epochs, or use runtime.precision=bf16/fp32,"
                f" and {where}")
        seen = self.step * self.accum * self.cfg.data.batch_size
        if vals[C_BAD_IMAGES] > self.cfg.data.max_bad_fraction * max(seen, 1) and vals[C_BAD_IMAGES] >= 10:
            raise TrainingError(f"{int(vals[C_BAD_IMAGES])} of {seen} images could not be read "
                                f"(more than data.max_bad_fraction={self.cfg.data.max_bad_fraction}); check data.path")

    # ------------------------------------------------------------------ checkpoints

    def state(self) -> dict:
        rng = ckpt.rng_state(self.rt.device)
        if self.rt.world > 1:
            gathered = [None] * self.rt.world
            dist.all_gather_object(gathered, rng)
            rng = gathered
        else:
            rng = [rng]
        counters = self.counters.cpu()  # sync-ok: checkpoints only
        return {"step": self.step, "student": self.student_module.state_dict(),
                "teacher": self.teacher.state_dict(), "centers": self.centers.state_dict(),
                "optimizer": self.opt.state_dict(), "scaler": self.scaler.state_dict() if self.scaler else None,
                "counters": counters, "rng": rng, "config": self.cfg.to_dict()}

    def save(self) -> Optional[Path]:
        state = self.state()  # collective under DDP: every rank gathers
        if not self.rt.is_main:
            return None
        # finite steps since the previous checkpoint make it known good; until the run completes, rotation keeps
        # the newest known-good checkpoint, the one to resume from if the run diverges
        nonfinite = self._nonfinite_steps()
        finite = nonfinite == getattr(self, "_nonfinite_at_save", 0)
        self._nonfinite_at_save = nonfinite
        path = ckpt.save_checkpoint(self.out, self.step, state, self.cfg.runtime.keep_last, finite=finite,
                                    keep_good=self.step < self.total_steps)
        log.info("saved %s%s", path, "" if finite else " (after non-finite steps)")
        return path

    def _nonfinite_steps(self) -> int:
        """Optimizer steps skipped as non-finite since the start of the run (reads the device)."""
        return int(self.counters[C_NONFINITE].item())  # sync-ok: checkpoints and start only

    def load(self, path: Path) -> None:
        state = ckpt.load_checkpoint(path, verify=False)  # resolve_resume has just verified it
        _warn_config_changes(state.get("config", {}), self.cfg.to_dict())
        self.student_module.load_state_dict(state["student"])
        self.teacher.load_state_dict(state["teacher"])
        self.centers.load_state_dict(state["centers"])
        self.opt.load_state_dict(state["optimizer"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.counters.copy_(state["counters"].to(self.counters.device))
        self.step = int(state["step"])
        rng = state["rng"][self.rt.rank] if len(state["rng"]) > self.rt.rank else state["rng"][0]
        ckpt.set_rng_state(rng, self.rt.device)
        if self.rt.is_main:
            ckpt.set_aside_after(self.out, self.step)
        self.writer.truncate_after(self.step)
        log.info("resumed from %s at step %d", path, self.step)


def _warn_config_changes(old: dict, new: dict, prefix: str = "") -> None:
    for k, v in new.items():
        if k not in old or prefix == "" and k == "runtime":
            continue
        if isinstance(v, dict):
            _warn_config_changes(old[k], v, f"{prefix}{k}.")
        elif old[k] != v:
            log.warning("resume: %s%s changed from %r to %r", prefix, k, old[k], v)


def train(cfg: Config, resume: Optional[str] = None, overwrite: bool = False) -> dict:
    """Train, or continue (``resume``: a checkpoint, a run folder, or ``auto``). ``overwrite``: a fresh run
    may delete the run already in ``runtime.output_dir`` (see ``fastibot.rundir``)."""
    rt = init_runtime(cfg)
    setup_logging(rt.is_main)
    lock = trainer = None
    try:
        lock = claim(cfg.runtime.output_dir, rt, resume, overwrite)
        trainer = Trainer(cfg, rt, resume)
        summary = {**trainer.fit(), "rank": rt.rank}
        if getattr(trainer, "stop_reason", None):
            summary["stopped"] = trainer.stop_reason
        return summary
    finally:
        if trainer is not None:  # persistent loader workers ignore SIGTERM: end them here, on every exit path
            stop_workers(getattr(trainer.data, "loader", None))
        if lock is not None:
            lock.release()
        if rt.world > 1 and dist.is_initialized():
            dist.destroy_process_group()
