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
from .models.keep import KeepMarked


class TrainingError(RuntimeError):
    """Training cannot go on (diverged, data unusable); the message says what to do."""


@dataclass
class Runtime:
    device: torch.device
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    amp_dtype: Optional[torch.dtype] = None
    local_world: int = 1  # processes on this node (torchrun's LOCAL_WORLD_SIZE)
    owns_group: bool = False  # this process made the process group (and ends it)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None:
        return default
    try:
        return int(raw)
    except ValueError:
        raise TrainingError(f"environment variable {name}={raw!r} is not an integer (set by torchrun)") from None


def compile_options(autotune: str) -> dict:
    """``runtime.autotune`` -> inductor options for ``torch.compile(options=...)``. The CUDA graph is the
    step's own (``fastibot.graph``), so inductor's is off at every level. The residual stream is saved
    for the backward, not rebuilt there (``fastibot.models.keep``)."""
    opts = {"triton.cudagraphs": False, "joint_custom_pre_pass": KeepMarked()}
    if autotune in ("kernels", "max"):
        opts["coordinate_descent_tuning"] = True
    if autotune == "max":
        opts["max_autotune"] = True  # GEMM templates benchmarked against cuBLAS, epilogues fused
    return opts


AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}  # runtime.precision -> autocast dtype


def init_runtime(cfg: Config) -> Runtime:
    """Device, rank and process group from torchrun's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
    ``LOCAL_WORLD_SIZE``, and ``MASTER_ADDR``/``MASTER_PORT`` for the rendezvous); one process without them.
    Multi-node launches (``torchrun --nnodes N --rdzv_backend c10d ...``) set the same variables on every node."""
    world, rank = _env_int("WORLD_SIZE", 1), _env_int("RANK", 0)
    local, local_world = _env_int("LOCAL_RANK", 0), _env_int("LOCAL_WORLD_SIZE", world)
    if not (0 <= rank < world and 0 <= local < local_world <= world):
        raise TrainingError(f"inconsistent launch environment: RANK={rank} WORLD_SIZE={world} LOCAL_RANK={local} "
                            f"LOCAL_WORLD_SIZE={local_world}; start several processes with torchrun")
    want = cfg.runtime.device
    if want == "cuda" and not torch.cuda.is_available():
        raise TrainingError("runtime.device=cuda but no CUDA device is visible")
    use_cuda = want == "cuda" or (want == "auto" and torch.cuda.is_available())
    if use_cuda and local >= torch.cuda.device_count():
        raise TrainingError(f"LOCAL_RANK={local} but this node shows {torch.cuda.device_count()} GPUs: start at most "
                            "one process per GPU (torchrun --nproc_per_node)")
    device = torch.device("cuda", local) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    owns = False
    if not dist.is_initialized() and (world > 1 or cfg.runtime.parallel != "ddp"):
        backend = "nccl" if use_cuda else "gloo"
        if world > 1:
            dist.init_process_group(backend)
        else:  # FSDP2 and sharded checkpoints need a process group, even of one process
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
        owns = True
    precision = cfg.runtime.precision
    if precision == "auto":
        precision = "bf16" if use_cuda else "fp32"
    amp = AMP_DTYPES[precision]
    return Runtime(device, rank, world, local, amp, local_world, owns)


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


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)


class StopSignals:
    """While active, SIGINT, SIGTERM and SIGUSR1 only set ``received`` (the loop then saves and stops).

    SIGUSR1 is what SLURM sends ahead of a job's time limit (``--signal=USR1@seconds``), SIGTERM what it
    sends on preemption. Those two may arrive more than once (a scheduler signals every process of a job
    step, and torchrun forwards the signal it gets to its workers as well), so repeats change nothing. A
    second SIGINT acts as it would without this (Ctrl-C twice interrupts at once)."""

    def __enter__(self) -> "StopSignals":
        self.received: Optional[str] = None
        self._old = {}
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.received = self.received or signal.Signals(signum).name
        if signum == signal.SIGINT:
            signal.signal(signum, self._old[signum] or signal.SIG_DFL)

    def __exit__(self, *exc) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler or signal.SIG_DFL)
