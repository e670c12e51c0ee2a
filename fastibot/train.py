"""The iBOT training loop: build the run, then call one static step per batch.

The step itself (``fastibot.step``: teacher targets, student forward + named loss terms, backward,
update) reads only device tensors, so it is compiled whole (``runtime.compile``) and captured once as
a CUDA graph (``runtime.cuda_graph``, ``fastibot.graph``). Metrics accumulate on the device and are
read every ``runtime.log_every`` steps. Non-finite losses or gradients skip the optimizer step on
the device (fused AdamW's ``found_inf``), are counted, and stop the run after
``runtime.max_nonfinite`` in a row.
"""
from __future__ import annotations

import contextlib
import logging
import signal
import time
from pathlib import Path
from typing import List, Optional

import torch
import torch.distributed as dist

from . import checkpoint as ckpt
from .config import Config
from .data.batch import Batch, row_capacity
from .data.datasets import DataError, stop_workers
from .data.loaders import build_data
from .graph import CapturedStep
from .logger import MetricsWriter, Progress, setup_logging
from .loss import LossSpec
from .models.attention import BackendUnavailable, resolve_backend
from .models.ibot import build_model
from .resume import RunState
from .rundir import claim
from .kernels import resolve_impl
from .optim import GradBuffer, IBOTAdamW, LocalGrads, LossScaler, ShardedGrads
from .parallel import ParallelError, build_mesh, compile_blocks, gather_full, shard_model, shard_size
from .runtime import (AMP_DTYPES, Runtime, StopSignals, TrainingError, compile_options, init_runtime, resolve_switch,
                      seed_everything)
from .step import TrainStep
from .teacher import EMA, Centers, Schedules

__all__ = ["Runtime", "Trainer", "TrainingError", "init_runtime", "train"]

log = logging.getLogger("fastibot")
PRECISION_NAMES = {dtype: name for name, dtype in AMP_DTYPES.items()}  # as runtime.precision spells them


class Trainer(RunState):
    def __init__(self, cfg: Config, rt: Runtime, resume: Optional[str] = None):
        self.cfg, self.rt = cfg, rt
        self.out = Path(cfg.runtime.output_dir)
        seed_everything(cfg.runtime.seed + rt.rank)
        self.data = build_data(cfg, rt.rank, rt.world, rt.device)
        if cfg.eval.every_n_steps:  # at the start, not at the first k-NN hours into the run
            from .eval.features import check_folders
            check_folders(cfg.eval.train_path, cfg.eval.val_path, "eval.train_path", "eval.val_path")
        self.accum = cfg.optim.accum_steps
        self.steps_per_epoch = self.data.steps_per_epoch // self.accum
        if self.steps_per_epoch == 0:
            raise DataError(f"one epoch has {self.data.steps_per_epoch} batches, fewer than "
                            f"optim.accum_steps={self.accum}")
        self.sched = Schedules.build(cfg, self.steps_per_epoch, rt.world)
        cap = cfg.runtime.max_steps
        self.total_steps = min(cap, len(self.sched)) if cap > 0 else len(self.sched)
        self._build()
        self.step = 0
        self.writer = MetricsWriter(self.out, cfg.runtime.tensorboard, enabled=rt.is_main)
        if resume is not None:
            self.load(self.agree_on_resume(resume))
        self._last = (self.step, self._metric_values(), time.perf_counter())

    def _build(self) -> None:
        cfg, rt = self.cfg, self.rt
        with torch.random.fork_rng(devices=[]):
            # the base seed on every rank: every rank must start from the same student and teacher
            torch.manual_seed(cfg.runtime.seed)
            student = build_model(cfg, student=True).to(rt.device)
            teacher = build_model(cfg, student=False).to(rt.device)
        teacher.load_state_dict(student.state_dict(), strict=False)
        teacher.requires_grad_(False).eval()
        try:
            self.attention = resolve_backend(cfg.model.attention, rt.device.type, rt.amp_dtype or torch.float32)
        except BackendUnavailable as e:
            raise TrainingError(str(e)) from None
        for m in (student, teacher):
            m.backbone.set_attention_backend(self.attention)
        self.compile = resolve_switch("runtime.compile", cfg.runtime.compile, rt.device, runs_on_cpu=True)
        self.cuda_graph = resolve_switch("runtime.cuda_graph", cfg.runtime.cuda_graph, rt.device, runs_on_cpu=False)
        if self.cuda_graph and cfg.runtime.parallel != "ddp":  # auto on CUDA (true is refused by the config check)
            log.info("runtime.cuda_graph=auto: off under runtime.parallel=%s (FSDP2 gathers and frees parameters "
                     "from Python hooks around every unit, which a captured graph cannot replay)", cfg.runtime.parallel)
            self.cuda_graph = False
        if self.compile:
            # the min-cut partitioner recomputes until the saved activations fit the budget; dynamo's cache
            # is per code object, so a step compiled earlier in this process (another budget) must not be reused
            torch._functorch.config.activation_memory_budget = cfg.runtime.activation_memory
            torch._dynamo.reset()
        student.backbone.set_recompute(recomputed_blocks(cfg, len(student.backbone.blocks), self.compile))
        replicas = 1
        if cfg.runtime.parallel != "ddp":
            try:  # shards every unit in place: before the EMA, the optimizer and the gradients see the parameters
                mesh = build_mesh(cfg, rt)
                for model, is_teacher in ((student, False), (teacher, True)):
                    if self.compile:
                        compile_blocks(model, compile_options(cfg.runtime.autotune))
                    shard_model(model, mesh, rt.amp_dtype, cfg.runtime.fsdp_reduce_dtype, teacher=is_teacher)
                replicas = rt.world // shard_size(cfg, rt)
            except ParallelError as e:
                raise TrainingError(str(e)) from None
        self.student, self.teacher = student, teacher
        # the triton EMA moves parameters into flat buffers: before the optimizer and the gradients see them
        self.ema_impl = self._kernel_impl("ema", "foreach")
        if self.ema_impl == "triton" and cfg.runtime.parallel != "ddp":  # auto on CUDA; true is refused by the config
            self.ema_impl = "foreach"  # FSDP2 owns the shards' storage: the EMA runs on each rank's local shards
        self.ema = EMA(student, teacher, self.ema_impl)
        params = [p for p in student.parameters() if p.requires_grad]
        if cfg.runtime.parallel != "ddp":
            self.grads = ShardedGrads(params, replicas)
        else:
            self.grads = GradBuffer(params) if rt.world > 1 else LocalGrads(params)
        self.centers = Centers(cfg.model.out_dim, cfg.model.patch_out_dim, cfg.ibot.center_momentum,
                               cfg.ibot.center_momentum2).to(rt.device)
        self.update_impl = self._kernel_impl("update", "torch")
        if self.update_impl == "triton" and self.ema_impl != "triton":
            if cfg.kernels.update == "triton":
                raise TrainingError(f"kernels.update=triton runs the EMA inside its pass over the triton EMA's flat "
                                    f"buffers, but this run's EMA is {self.ema_impl}")
            self.update_impl = "torch"  # auto: the torch update where the EMA has no flat buffers
        flat = None
        if self.update_impl == "triton":
            (t_flat, s_flat), = self.ema.flat_buffers()
            flat = (s_flat, t_flat, self.ema.s_params, params)
        self.opt = IBOTAdamW(student, cfg.optim.betas, flat=flat)
        self.scaler = LossScaler(rt.device) if rt.amp_dtype == torch.float16 else None
        self.loss_impl = self._kernel_impl("loss", "reference")
        self.stepper = TrainStep(cfg, student, teacher, self.centers, self.ema, self.opt, self.grads, self.scaler,
                                    LossSpec.from_config(cfg, self.loss_impl), self.sched, rt.device, rt.amp_dtype,
                                    compile=self.compile and cfg.runtime.parallel == "ddp")
        self.run_step = CapturedStep(self.stepper, rt.device) if self.cuda_graph else self.stepper
        self._delivering = False  # whether the loader writes into the captured step's input buffers yet
        log.info("fastibot: %s/%d, %s, data=%s, attention=%s, packed=%s, loss=%s, ema=%s, update=%s, precision=%s, "
                 "compile=%s, cuda_graph=%s, masked rows per batch=%d, world=%d, parallel=%s%s",
                 cfg.model.arch, cfg.model.patch_size, rt.device, self.data.kind, self.attention, cfg.model.packed_forward(),
                 self.loss_impl, self.ema_impl, self.update_impl, PRECISION_NAMES[rt.amp_dtype],
                 f"{self.compile} (autotune={cfg.runtime.autotune})" if self.compile else False, self.cuda_graph,
                 row_capacity(cfg), rt.world, cfg.runtime.parallel,
                 f" ({replicas} x {rt.world // replicas})" if cfg.runtime.parallel == "hsdp" else "")

    def _kernel_impl(self, key: str, fallback: str) -> str:
        try:
            return resolve_impl(key, getattr(self.cfg.kernels, key), self.rt.device.type, fallback)
        except RuntimeError as e:
            raise TrainingError(str(e)) from None

    @property
    def metrics(self):
        return self.stepper.metrics

    def _metric_values(self) -> dict:
        """The metric sums, per-rank ones (losses, bad images) added over processes (a collective)."""
        m = self.metrics
        vals = dict(zip(m.names, m.buf[:len(m.names)].tolist()))  # sync-ok: at log steps only
        if self.rt.world > 1 and m.per_rank:  # the others agree on every rank already
            names = sorted(m.per_rank)
            summed = torch.tensor([vals[k] for k in names], dtype=torch.float64, device=self.rt.device)
            dist.all_reduce(summed)
            vals.update(zip(names, summed.tolist()))  # sync-ok: at log steps only
        return vals

    def train_step(self, micro_batches: List[Batch]) -> None:
        self.run_step(micro_batches)
        self.step += 1
        if self.cuda_graph and not self._delivering and self.run_step.captured:
            deliver = getattr(self.data, "deliver_into", None)
            if deliver is not None:  # the loader fills the captured step's input buffers itself from now on
                deliver(self.run_step.static)
                log.info("data: %s batches go straight into the captured step's input buffers", self.data.kind)
            self._delivering = True

    # ------------------------------------------------------------------ loop

    def fit(self, signals: Optional[StopSignals] = None) -> dict:
        """Train to the end, or until a stop signal or the time limit (``signals``: the caller's active
        :class:`StopSignals`; by default fit catches them itself)."""
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
        with contextlib.nullcontext(signals) if signals is not None else StopSignals() as signals:
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
                if self.rt.world > 1:  # leave together: under torchrun the first to exit makes it signal the rest
                    dist.barrier()
            finally:
                progress.close()
                self.writer.close()
        return summary

    def _stop_reason(self, signal_name: Optional[str], at_log: bool) -> Optional[str]:
        """Why to stop after this step, if at all: a SIGINT/SIGTERM/SIGUSR1, or ``runtime.max_minutes`` spent.

        One process acts on a signal after the current step. Several processes agree at log steps (a max
        all-reduce of the clock flag and the signal number, so any rank's signal or clock stops all of them
        at the same step, each naming the signal: a scheduler may signal some nodes only)."""
        limit = self.cfg.runtime.max_minutes
        late = at_log and limit > 0 and time.perf_counter() - self._started >= 60.0 * limit
        if self.rt.world > 1:
            if not at_log:
                return None
            signum = int(getattr(signal, signal_name)) if signal_name else 0
            flags = torch.tensor([float(late), float(signum)], device=self.rt.device)
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
            late, signum = bool(flags[0]), int(flags[1])  # sync-ok: only at log steps
            signal_name = signal.Signals(signum).name if signum else None
        if signal_name is not None:
            return signal_name
        return f"runtime.max_minutes={limit:g} reached" if late else None

    def periodic_eval(self) -> dict:
        """k-NN of the teacher every ``eval.every_n_steps`` (main process; the others wait)."""
        e = self.cfg.eval
        if not e.every_n_steps or self.step % e.every_n_steps != 0:
            return {}
        res = {}
        backbone = self.teacher.backbone
        if self.cfg.runtime.parallel != "ddp":  # a whole copy for the main process (every rank gathers)
            whole = {k: gather_full(v) for k, v in backbone.state_dict().items()}
            backbone = None
            if self.rt.is_main:
                backbone = build_model(self.cfg, student=False).backbone.to(self.rt.device)
                backbone.load_state_dict(whole)
                backbone.set_attention_backend(self.attention)
        if self.rt.is_main:
            from .eval.knn import run_knn
            knn = run_knn(backbone, e.train_path, e.val_path, e.k, e.temperature, e.image_size,
                          e.batch_size, e.max_images, self.rt.device, num_workers=min(4, self.cfg.data.num_workers))
            res = {"knn_top1": knn["top1"], "knn_top5": knn["top5"]}
            log.info("step %d: k-NN top-1 %.2f top-5 %.2f", self.step, knn["top1"], knn["top5"])
        if self.rt.world > 1:
            dist.barrier()
        return res

    def log_metrics(self, extra: Optional[dict] = None) -> dict:
        now = time.perf_counter()
        vals = self._metric_values()
        step0, prev, t0 = self._last
        self._last = (self.step, vals, now)
        d = {k: v - prev.get(k, 0.0) for k, v in vals.items()}
        steps = max(self.step - step0, 1)
        finite = d.get("finite_losses", 0.0)
        images = steps * self.accum * self.cfg.data.batch_size * self.rt.world
        it = self.step - 1
        # the loss terms, averaged over the micro-batches whose loss was finite (empty when there were none)
        losses = {k: (d[k] / finite if finite else float("nan")) for k in ("loss", *self._term_names())}
        row = {"step": self.step, "epoch": round(self.step / self.steps_per_epoch, 4), **losses,
               "lr": float(self.sched.lr[it]), "wd": float(self.sched.wd[it]),
               "momentum": float(self.sched.momentum[it]), "teacher_temp": float(self.sched.teacher_temp[it]),
               "grad_norm": d.get("grad_norm", 0.0) / steps, "img_s": images / max(now - t0, 1e-9),
               "nonfinite_steps": int(vals.get("nonfinite_steps", 0)), "bad_images": int(vals.get("bad_images", 0)),
               "trimmed_patches": int(vals.get("trimmed_patches", 0))}
        row.update(extra or {})
        if self.rt.device.type == "cuda":
            row["peak_mem_gib"] = round(torch.cuda.max_memory_allocated(self.rt.device) / 2 ** 30, 3)
        self.writer.write(row)
        self._check_health(vals)
        return row

    def _term_names(self) -> List[str]:
        skip = {"loss", "finite_losses", "bad_images", "trimmed_patches"}
        return [k for k in self.metrics.names if k in self.metrics.per_rank and k not in skip]

    def _check_health(self, vals: dict) -> None:
        run = vals.get("max_bad_run", 0.0)
        if run >= self.cfg.runtime.max_nonfinite:
            good = ckpt.newest_good(self.out)
            where = (f"resume from the newest checkpoint whose following steps were all finite: --resume {good}"
                     if good is not None else "no checkpoint was followed by finite steps: start again (--overwrite)")
            raise TrainingError(
                f"{int(run)} steps in a row had a non-finite loss or gradient (by step {self.step}); "
                f"the run has diverged. Lower optim.lr, raise optim.warmup_epochs, or use runtime.precision=bf16/fp32,"
                f" and {where}")
        seen = self.step * self.accum * self.cfg.data.batch_size * self.rt.world
        bad = vals.get("bad_images", 0.0)  # summed over processes
        if bad > self.cfg.data.max_bad_fraction * max(seen, 1) and bad >= 10:
            raise TrainingError(f"{int(bad)} of {seen} images could not be read "
                                f"(more than data.max_bad_fraction={self.cfg.data.max_bad_fraction}); check data.path")


def recomputed_blocks(cfg: Config, n_blocks: int, compiled: bool) -> int:
    """How many of the student's first blocks recompute their activations in the backward:
    ``runtime.recompute_blocks`` of them, and uncompiled also those beyond the share
    ``runtime.activation_memory`` keeps (compiled, that share is the partitioner's budget instead)."""
    n = int(round(cfg.runtime.recompute_blocks * n_blocks))
    if not compiled:
        n = max(n, n_blocks - int(round(cfg.runtime.activation_memory * n_blocks)))
    return n


def train(cfg: Config, resume: Optional[str] = None, overwrite: bool = False) -> dict:
    """Train, or continue (``resume``: a checkpoint, a run folder, or ``auto``). ``overwrite``: a fresh run
    may delete the run already in ``runtime.output_dir`` (see ``fastibot.rundir``)."""
    rt = init_runtime(cfg)
    setup_logging(rt.is_main)
    lock = trainer = None
    stack = contextlib.ExitStack()
    try:
        lock = claim(cfg.runtime.output_dir, rt, resume, overwrite)
        trainer = Trainer(cfg, rt, resume)
        # from here to the end of the clean-up a stop signal only asks to stop: under torchrun the first worker
        # to exit makes the launcher SIGTERM the others, which must not die in their own clean-up
        summary = {**trainer.fit(stack.enter_context(StopSignals())), "rank": rt.rank}
        if getattr(trainer, "stop_reason", None):
            summary["stopped"] = trainer.stop_reason
        return summary
    finally:
        with stack:
            if trainer is not None:  # persistent loader workers ignore SIGTERM: end them here, on every exit path
                stop_workers(getattr(trainer.data, "loader", None))
            if lock is not None:
                lock.release()
            if (rt.world > 1 or rt.owns_group) and dist.is_initialized():
                dist.destroy_process_group()
