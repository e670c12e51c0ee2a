"""One iBOT optimizer step as a function of device tensors only.

    h      = hyper()                            # lr, wd, momentum, temperatures, freeze flag at the device step
    for each micro-batch:
        t      = teacher(batch)                 # [CLS] logits, masked-row logits, patch center statistic
        terms  = student_terms(batch, t, h)     # student forward + the named loss terms (one compiled graph)
        start the centers' all-reduce; backward(Σ terms); move the centers
    all-reduce gradients (+ the skip flag); clip; AdamW(lr, wd); EMA(m); metrics; step += 1

Nothing here reads a tensor on the host or depends on how many patches a batch masks (the rows of
``fastibot.data.batch`` have a fixed count), so the whole call can be compiled and captured once as a
CUDA graph (``fastibot.graph``) and replayed every step.
"""
from __future__ import annotations

import contextlib
from typing import Dict, List, Optional

import torch

from .data.batch import Batch
from .loss import LossSpec, ibot_terms
from .optim import GradBuffer, IBOTAdamW, LossScaler, clip_, clip_coefficients
from .runtime import compile_options
from .teacher import EMA, Centers, Schedules


def _no_mark(name: str) -> None:
    return None


class StepMetrics:
    """Named float64 sums on the device since the start of the run, read every ``runtime.log_every`` steps.

    Names are registered on first use (before a CUDA graph is captured: the first steps run eagerly).
    ``per_rank`` names count each process's own batches (summed over processes when logged); the others
    follow the all-reduced gradients and agree on every process.
    """

    CAPACITY = 32

    def __init__(self, device):
        self.buf = torch.zeros(self.CAPACITY, dtype=torch.float64, device=device)
        self.names: List[str] = []
        self.per_rank: set = set()

    def _slot(self, name: str, per_rank: bool) -> int:
        if name not in self.names:
            if len(self.names) == self.CAPACITY:
                raise RuntimeError(f"more than {self.CAPACITY} step metrics")
            self.names.append(name)
            if per_rank:
                self.per_rank.add(name)
        return self.names.index(name)

    def add(self, name: str, value: torch.Tensor, per_rank: bool = False) -> None:
        i = self._slot(name, per_rank)
        self.buf[i] += value.double()

    def set(self, name: str, value: torch.Tensor) -> None:
        self.buf[self._slot(name, False)] = value.double()

    def get(self, name: str) -> torch.Tensor:
        return self.buf[self._slot(name, False)]

    def state_dict(self) -> dict:
        return {"names": list(self.names), "per_rank": sorted(self.per_rank), "values": self.buf.cpu()}  # sync-ok

    def load_state_dict(self, state: dict, keep_per_rank: bool = True) -> None:
        """``keep_per_rank=False``: the per-rank sums start at 0 here (another rank holds the run's totals)."""
        for name, value in zip(state["names"], state["values"].tolist()):  # sync-ok: on resume
            per_rank = name in state["per_rank"]
            self.buf[self._slot(name, per_rank)] = value if keep_per_rank or not per_rank else 0.0

    def run_totals(self, world: int) -> torch.Tensor:
        """The buffer with the per-rank sums added over processes (a collective; at checkpoints only): the
        run's totals, which a resume at any world size gives to its rank 0 (the others start those at 0)."""
        buf = self.buf.clone()
        if world > 1 and self.per_rank:
            idx = torch.tensor([self.names.index(n) for n in sorted(self.per_rank)], device=buf.device)
            part = buf[idx]
            torch.distributed.all_reduce(part)
            buf[idx] = part
        return buf


class TrainStep:
    """Holds the models, loss, optimizer, EMA and metrics of a run; ``step(micro_batches)`` trains one step."""

    def __init__(self, cfg, student, teacher, centers: Centers, ema: EMA, opt: IBOTAdamW, grads: GradBuffer,
                 scaler: Optional[LossScaler], spec: LossSpec, schedules: Schedules, device, amp_dtype,
                 compile: bool = False):
        self.cfg, self.student, self.teacher = cfg, student, teacher
        self.centers, self.ema, self.opt, self.grads, self.scaler, self.spec = centers, ema, opt, grads, scaler, spec
        self.device, self.amp_dtype = device, amp_dtype
        self.table = schedules.device_table(device)  # (rows, steps) float64
        self.step_t = torch.zeros((), dtype=torch.long, device=device)
        self.metrics = StepMetrics(device)
        self.accum = cfg.optim.accum_steps
        self.mark = _no_mark  # benchmarks set a phase marker (CUDA events) on eager steps
        self.teacher_fn, self.student_fn = self._teacher_targets, self._student_terms
        if compile:
            # the whole teacher forward, and the whole student forward + loss (and through AOTAutograd its
            # backward), each one graph; shapes depend on the config only, so they compile once
            opts = compile_options(cfg.runtime.autotune)
            self.teacher_fn = torch.compile(self._teacher_targets, fullgraph=True, dynamic=False, options=opts)
            self.student_fn = torch.compile(self._student_terms, fullgraph=True, dynamic=False, options=opts)

    # ------------------------------------------------------------------ parts

    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def hyper(self) -> Dict[str, torch.Tensor]:
        """This step's schedule values, 0-d float64 tensors (a column of the device table)."""
        col = self.table.index_select(1, self.step_t.clamp(max=self.table.shape[1] - 1).reshape(1))[:, 0]
        return dict(zip(Schedules.ROWS, col.unbind()))

    def _teacher_targets(self, globals_, masks, rows, row_weight):
        with self._autocast():
            return self.teacher.teacher(globals_, masks, rows, row_weight, self.cfg.ibot.patch_center)

    def _student_terms(self, globals_, locals_, masks, rows, row_weight, t, center, center2, tt, tpt):
        with self._autocast():
            s = self.student(globals_, masks, locals_, rows)
        return ibot_terms(self.spec, s, t, masks, rows, row_weight, center, center2, tt, tpt)

    def micro_step(self, b: Batch, h: Dict[str, torch.Tensor]) -> torch.Tensor:
        """Forward, loss and backward of one micro-batch; returns "the loss was not finite" (0-d bool)."""
        t = self.teacher_fn(b.globals, b.masks, b.rows, b.row_weight)
        self.mark("teacher forward")
        terms, cls_mean = self.student_fn(b.globals, b.locals, b.masks, b.rows, b.row_weight, t,
                                          self.centers.center, self.centers.center2,
                                          h["teacher_temp"].float(), h["teacher_patch_temp"].float())
        self.mark("student forward + loss")
        loss = sum(terms.values())
        scaled = loss / self.accum
        centers = self.centers.start(cls_mean, t.patch_mean)  # their all-reduce runs under the backward
        (scaled * self.scaler.scale if self.scaler is not None else scaled).backward()
        self.mark("backward")
        # after backward: a compiled backward that recomputes the loss (runtime.activation_memory < 1) reads
        # the centers this step used, so they must not change under it
        self.centers.finish(centers)
        ok = torch.isfinite(loss.detach())
        m = self.metrics
        for name, value in (("loss", loss), *terms.items()):
            m.add(name, torch.where(ok, value.detach(), 0.0), per_rank=True)
        m.add("finite_losses", ok, per_rank=True)
        m.add("bad_images", b.n_bad, per_rank=True)
        m.add("trimmed_patches", b.trimmed, per_rank=True)
        return ~ok

    def update(self, h: Dict[str, torch.Tensor], bad_loss: torch.Tensor) -> None:
        """Average gradients over processes, unscale, clip, AdamW, EMA, counters."""
        o = self.cfg.optim
        # flag > 0 if any rank's loss was not finite; norms: each parameter's, over all ranks' shards
        flag, found_inf, norms = self.grads.reduce(bad_loss, self.scaler)
        fused = self.opt.fused is not None  # clipping, decay, AdamW and the EMA in one pass (kernels.update=triton)
        if fused:  # the pass applies the clip factors as it reads the gradients
            coef, total = clip_coefficients(norms, o.clip_grad, o.clip_mode)
        else:
            total = clip_(self.grads.grads, o.clip_grad, o.clip_mode, norms)
        skip = ((flag > 0) | ~torch.isfinite(total)).float()
        if found_inf is not None:
            skip = torch.maximum(skip, found_inf)
            self.scaler.update(found_inf)
        lr, wd, frozen = h["lr"].float(), h["wd"].float(), h["frozen"].float()
        if fused:
            self.opt.fused_step(self.grads.grads, coef, lr, wd, skip, frozen, h["momentum"].float(),
                                h["one_minus_momentum"].float())
            self.mark("optimizer")
        else:
            self.opt.step(lr, wd, skip, frozen)
            self.mark("optimizer")
            self.ema(h["momentum"], h["one_minus_momentum"])
        self.mark("EMA")
        m = self.metrics
        m.add("nonfinite_steps", skip)
        m.set("bad_run", (m.get("bad_run") + 1.0) * skip.double())
        m.set("max_bad_run", torch.maximum(m.get("max_bad_run"), m.get("bad_run")))
        m.add("grad_norm", torch.where(torch.isfinite(total), total, 0.0))
        self.step_t += 1

    def after_capture(self) -> None:
        """Called once a CUDA graph has captured the step (the fused update learns its gradients' addresses)."""
        if self.opt.fused is not None:
            self.opt.fused.after_capture()

    def __call__(self, micro: List[Batch]) -> None:
        h = self.hyper()
        self.grads.zero_()
        bad = torch.zeros((), dtype=torch.bool, device=self.device)
        for b in micro:
            bad = bad | self.micro_step(b, h)
        self.update(h, bad)
