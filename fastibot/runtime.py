"""Process setup for training: device, distributed group, precision, seeds, switches, stop signals."""
from __future__ import annotations

import os
import random
import signal
import threading
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from .config import Config


class TrainingError(RuntimeError):
    """Training cannot go on (diverged, data unusable); the message says what to do."""


@dataclass
class Runtime:
    device: torch.device
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    amp_dtype: Optional[torch.dtype] = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_runtime(cfg: Config) -> Runtime:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    want = cfg.runtime.device
    if want == "cuda" and not torch.cuda.is_available():
        raise TrainingError("runtime.device=cuda but no CUDA device is visible")
    use_cuda = want == "cuda" or (want == "auto" and torch.cuda.is_available())
    device = torch.device("cuda", local) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    precision = cfg.runtime.precision
    if precision == "auto":
        precision = "bf16" if use_cuda else "fp32"
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[precision]
    return Runtime(device, rank, world, local, amp)


def resolve_switch(key: str, value: str, device: torch.device, runs_on_cpu: bool) -> bool:
    """An ``auto|true|false`` switch: auto is on on CUDA; true where it cannot run is an error that says why."""
    if value == "auto":
        return device.type == "cuda"
    if value == "true" and not runs_on_cpu and device.type != "cuda":
        raise TrainingError(f"{key}=true needs a CUDA device (this run uses {device}); set {key}=false or auto")
    return value == "true"


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


class StopSignals:
    """While active, SIGINT and SIGTERM only set ``received`` (the loop then saves and stops); a second
    signal of the same kind acts as it would without this (Ctrl-C twice interrupts at once)."""

    def __enter__(self) -> "StopSignals":
        self.received: Optional[str] = None
        self._old = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.received = signal.Signals(signum).name
        signal.signal(signum, self._old[signum] or signal.SIG_DFL)

    def __exit__(self, *exc) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler or signal.SIG_DFL)
