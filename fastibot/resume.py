"""A run's state on disk and back: single-file checkpoints (``runtime.parallel=ddp``, written by rank 0) and
sharded ones (``fsdp|hsdp``, every rank writes its shards: ``fastibot.sharded``). Either kind resumes in
every parallel mode and at another world size, as long as the global batch (``data.batch_size`` ×
``optim.accum_steps`` × processes) stays the same, since the schedules and the data order are indexed by
the optimizer step.

What a resume restores: student, teacher, AdamW moments and step counts, centers, the loss scale, the
device step counter (hence every schedule), the metric totals and the step. The data position is exact
for the torchvision loader (each sample's crops and masks follow from (seed, epoch, index), and a step's
global batch is the same images at any world size); the DALI and synthetic loaders draw per rank, so at
another world size their batches differ from the uninterrupted run's. Random generators (drop path) are
restored per rank at the same world size; at another world size each rank starts fresh seeds.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from . import checkpoint as ckpt
from . import sharded
from .parallel import copy_full_
from .runtime import TrainingError, seed_everything

log = logging.getLogger("fastibot")


def global_batch(cfg: dict, world: int) -> int:
    return int(cfg["data"]["batch_size"]) * int(cfg["optim"]["accum_steps"]) * world


class RunState:
    """Checkpoint methods of :class:`fastibot.train.Trainer` (which provides the models, optimizer, etc.)."""

    # ------------------------------------------------------------------ writing

    def _rng_states(self) -> list:
        rng = ckpt.rng_state(self.rt.device)
        if self.rt.world == 1:
            return [rng]
        gathered = [None] * self.rt.world
        dist.all_gather_object(gathered, rng)  # collective
        return gathered

    def _live_tensors(self) -> dict:
        """The run's tensors by name, sharing storage with the live ones (a sharded checkpoint is read into them)."""
        t = {"student": self.student.state_dict(), "teacher": self.teacher.state_dict(),
             "optimizer": self.opt.named_state(), "centers": self.centers.state_dict()}
        if self.scaler is not None:
            t["scaler"] = {"scale": self.scaler.scale, "growth_tracker": self.scaler.growth_tracker}
        return t

    def _plain(self) -> dict:
        return {"step": self.step, "config": self.cfg.to_dict(), "world": self.rt.world,
                "parallel": self.cfg.runtime.parallel}

    def state(self) -> dict:
        """The single-file checkpoint (collective under several processes: every rank gathers)."""
        metrics = self.metrics.state_dict()
        metrics["values"] = self.metrics.run_totals(self.rt.world).cpu()  # sync-ok: checkpoints only
        return {**self._plain(), "student": self.student.state_dict(), "teacher": self.teacher.state_dict(),
                "centers": self.centers.state_dict(), "optimizer": self.opt.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler else None, "metrics": metrics,
                "rng": self._rng_states()}

    def save(self) -> Optional[Path]:
        # finite steps since the previous checkpoint make it known good; until the run completes, rotation keeps
        # the newest known-good checkpoint, the one to resume from if the run diverges
        nonfinite = self._nonfinite_steps()
        finite = nonfinite == getattr(self, "_nonfinite_at_save", 0)
        self._nonfinite_at_save = nonfinite
        keep_good = self.step < self.total_steps
        if self.cfg.runtime.parallel == "ddp":
            state = self.state()
            if not self.rt.is_main:
                return None
            path = ckpt.save_checkpoint(self.out, self.step, state, self.cfg.runtime.keep_last, finite=finite,
                                        keep_good=keep_good)
        else:
            before = [p for s, p in ckpt.checkpoints(self.out) if s < self.step] if self.rt.is_main else []
            m = self.metrics
            meta = {**self._plain(), "metrics": {"names": list(m.names), "per_rank": sorted(m.per_rank)},
                    "scaler": self.scaler is not None, "rng": [ckpt.rng_plain(r) for r in self._rng_states()]}
            tensors = {**self._live_tensors(), "metrics": m.run_totals(self.rt.world)}
            path = sharded.save(self.out, self.step, tensors, meta, self.rt.rank, self.rt.world, finite)
            if not self.rt.is_main:
                return None
            ckpt.rotate(self.out, before, self.cfg.runtime.keep_last, finite, keep_good)
        log.info("saved %s%s", path, "" if finite else " (after non-finite steps)")
        return path

    def _nonfinite_steps(self) -> int:
        """Optimizer steps skipped as non-finite since the start of the run (reads the device)."""
        return int(self.metrics.get("nonfinite_steps").item())  # sync-ok: checkpoints and start only

    # ------------------------------------------------------------------ reading

    def agree_on_resume(self, resume: str) -> Path:
        """The checkpoint to resume from: the main process finds and verifies it, the others take its answer
        (one reading of a possibly large sharded checkpoint), and every process stops on its error."""
        if self.rt.world == 1:
            return ckpt.resolve_resume(resume, self.cfg.runtime.output_dir)
        box = [None, None]
        if self.rt.is_main:
            try:
                box[0] = str(ckpt.resolve_resume(resume, self.cfg.runtime.output_dir))
            except (FileNotFoundError, ckpt.CheckpointError) as e:
                box[1] = (type(e).__name__, str(e))
        dist.broadcast_object_list(box, src=0)
        if box[1] is not None:
            kind = FileNotFoundError if box[1][0] == "FileNotFoundError" else ckpt.CheckpointError
            raise kind(box[1][1])
        return Path(box[0])

    def load(self, path: Path) -> None:
        """Restore in place (every tensor keeps its storage: a captured step reads these buffers)."""
        if sharded.is_sharded_checkpoint(path):
            meta = sharded.read_meta(path)
            self._check_resumable(meta["config"], int(meta["world"]), meta.get("parallel", "fsdp"))
            self._load_sharded(path, meta)
            step, rng = int(meta["step"]), [ckpt.rng_from_plain(r) for r in meta["rng"]]
        else:
            state = ckpt.load_checkpoint(path, verify=False)  # agree_on_resume has just verified it
            world = int(state.get("world", len(state["rng"])))
            self._check_resumable(state.get("config", {}), world, state.get("parallel", "ddp"))
            try:
                self._load_file(state)
            except (RuntimeError, ValueError) as e:  # tensors of another shape, or parameters the model lacks
                raise self._misfit(path, state.get("config", {}), e) from None
            step, rng = int(state["step"]), state["rng"]
        self.step = step
        self.stepper.step_t.fill_(step)
        if len(rng) == self.rt.world:
            ckpt.set_rng_state(rng[self.rt.rank], self.rt.device)
        else:  # another world size: per-rank streams cannot continue; fresh ones, distinct per rank and step
            seed_everything(self.cfg.runtime.seed + self.rt.rank + 1_000_003 * (step + 1))
            log.info("random generators (drop path) start from fresh seeds: the checkpoint has %d processes' "
                     "streams, this run %d", len(rng), self.rt.world)
        if self.rt.is_main:
            ckpt.set_aside_after(self.out, self.step)
        self.writer.truncate_after(self.step)
        log.info("resumed from %s at step %d", path, self.step)

    def _check_resumable(self, old_cfg: dict, old_world: int, old_parallel: str) -> None:
        _warn_config_changes(old_cfg, self.cfg.to_dict())
        if "data" in old_cfg and "optim" in old_cfg:
            old, new = global_batch(old_cfg, old_world), global_batch(self.cfg.to_dict(), self.rt.world)
            if old != new:
                a, w = self.cfg.optim.accum_steps, self.rt.world
                fix = (f"data.batch_size={old // (a * w)}" if old % (a * w) == 0 else
                       f"a data.batch_size × optim.accum_steps × {w} processes that makes {old}")
                raise TrainingError(
                    f"the checkpoint was trained with a global batch of {old} images per step ({old_world} processes), "
                    f"this run has {new} (data.batch_size={self.cfg.data.batch_size} × optim.accum_steps={a} × {w} "
                    f"processes): schedules and data order follow the step, so resume with {fix}")
        if old_world != self.rt.world or old_parallel != self.cfg.runtime.parallel:
            log.info("resuming a %s run of %d processes as %s on %d", old_parallel, old_world,
                     self.cfg.runtime.parallel, self.rt.world)

    def _misfit(self, path: Path, old_cfg: dict, e: Exception) -> ckpt.CheckpointError:
        """The error for a checkpoint whose tensors do not fit this run: the first mismatch, and the model and
        crop keys (the shapes follow from them) that differ from the checkpoint's."""
        new = self.cfg.to_dict()
        changed = [f"{part}.{k}={old_cfg[part][k]!r} (this run: {v!r})" for part in ("model", "crops")
                   for k, v in new[part].items() if k in old_cfg.get(part, {}) and old_cfg[part][k] != v]
        fix = (f"resume with the checkpoint's settings: {', '.join(changed)}" if changed else
               "resume with the config the checkpoint was trained with (config.yaml in its run folder)")
        return ckpt.CheckpointError(f"checkpoint {str(path)!r} does not fit this run's model "
                                    f"({ckpt.error_tail(e)}); {fix}")

    def _load_file(self, state: dict) -> None:
        opt = self.opt
        if self.cfg.runtime.parallel == "ddp":
            self.student.load_state_dict(state["student"])
            self.teacher.load_state_dict(state["teacher"])
            opt.load_state_dict(state["optimizer"])
        else:  # whole tensors into this rank's shards
            for part, model in (("student", self.student), ("teacher", self.teacher)):
                _copy_all(model.state_dict(), state[part], part)
            named = opt.named_from_state_dict(state["optimizer"])
            _copy_all(opt.named_state(), named, "optimizer")
        self.centers.load_state_dict(state["centers"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.metrics.load_state_dict(state["metrics"], keep_per_rank=self.rt.is_main)

    def _load_sharded(self, path: Path, meta: dict) -> None:
        tensors = self._live_tensors()
        if not meta.get("scaler"):
            tensors.pop("scaler", None)  # saved without loss scaling: this fp16 run starts its scale afresh
        tensors["metrics"] = torch.zeros_like(self.metrics.buf)
        try:
            sharded.load(path, tensors, distributed=dist.is_initialized())
        except sharded.errors() as e:
            raise ckpt.CheckpointError(f"checkpoint {str(path)!r} cannot be loaded into this run "
                                       f"({sharded.describe(e)})") from None
        names = meta["metrics"]
        self.metrics.load_state_dict({**names, "values": tensors["metrics"].cpu()},  # sync-ok: resume only
                                     keep_per_rank=self.rt.is_main)


def _copy_all(targets: dict, source: dict, what: str) -> None:
    """Copy nested dicts of whole tensors into ``targets`` (whole or sharded), every key accounted for."""
    missing = sorted(set(targets) - set(source))
    if missing:
        raise ckpt.CheckpointError(f"the checkpoint's {what} lacks {', '.join(missing[:5])}")
    for k, t in targets.items():
        if isinstance(t, dict):
            _copy_all(t, source[k], what)
        else:
            copy_full_(t, source[k])


def _warn_config_changes(old: dict, new: dict, prefix: str = "") -> None:
    for k, v in new.items():
        if k not in old or prefix == "" and k == "runtime":
            continue
        if isinstance(v, dict):
            _warn_config_changes(old[k], v, f"{prefix}{k}.")
        elif old[k] != v:
            log.warning("resume: %s%s changed from %r to %r", prefix, k, old[k], v)
