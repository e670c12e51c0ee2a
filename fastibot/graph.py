"""Replay a whole training step as one CUDA graph.

The first ``warmup`` calls run the step eagerly on a side stream (this is where ``torch.compile``
compiles, cuBLAS and NCCL set up, the optimizer makes its state and autograd finds the gradient
buffers). The next call captures the step once, with static copies of its batches as inputs, and
every call after that copies its batches into those buffers and replays the graph: the teacher
forward, the student forward and backward, the fused loss kernels, the center update, gradient
all-reduce, norms and clipping, AdamW, the EMA and the metric counters, as one launch.

What makes that legal is the step's contract (``fastibot.step``): fixed shapes from the config,
schedules read from the device, no host reads. Random numbers (drop path) come from the CUDA
generator, which a graph replay advances like an eager step.
"""
from __future__ import annotations

import gc
import logging
from typing import Callable, List, Optional

import torch

from .data.batch import Batch

log = logging.getLogger("fastibot")


class CapturedStep:
    def __init__(self, step: Callable[[List[Batch]], None], device: torch.device, warmup: int = 3):
        if device.type != "cuda":
            raise RuntimeError(f"runtime.cuda_graph=true needs a CUDA device (this run uses {device})")
        self.step, self.device, self.warmup = step, device, max(1, warmup)
        self.calls = 0
        self.graph: Optional[torch.cuda.CUDAGraph] = None
        self.static: List[Batch] = []
        self._side = torch.cuda.Stream(device)

    @property
    def captured(self) -> bool:
        return self.graph is not None

    def __call__(self, micro: List[Batch]) -> None:
        if self.graph is not None:
            for dst, src in zip(self.static, micro):
                dst.copy_(src)
            self.graph.replay()
            return
        self._side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self._side):
            if self.calls < self.warmup:
                self.step(micro)
            else:
                self._capture(micro)
        torch.cuda.current_stream(self.device).wait_stream(self._side)
        self.calls += 1
        if self.graph is not None:
            self.graph.replay()  # this call's step: capturing records the work without running it

    def _capture(self, micro: List[Batch]) -> None:
        self.static = [b.clone() for b in micro]
        torch.cuda.synchronize(self.device)
        gc.collect()
        torch.cuda.empty_cache()  # the warm-up's cached blocks go back before the graph's pool is made
        graph = torch.cuda.CUDAGraph()
        # thread-local: loader threads (pinning, DALI's prefetch) may use CUDA while this thread captures
        with torch.cuda.graph(graph, stream=self._side, capture_error_mode="thread_local"):
            self.step(self.static)
        self.graph = graph
        after = getattr(self.step, "after_capture", None)
        if after is not None:
            after()
        log.info("captured the training step as a CUDA graph after %d eager steps", self.warmup)
