"""Where each millisecond of an iBOT training step goes.

    python benchmarks/step_time.py --arch vit_small --batch 64 --variants reference,eager,compiled,default

Runs real training steps (``fastibot.train.Trainer``) after a warm-up (where compiling and the CUDA-graph
capture happen) and times ``--windows`` windows of ``--steps`` steps each with CUDA events, reporting the
median img/s and the spread of the windows. The timed steps run under
``torch.cuda.set_sync_debug_mode("error")``: a host-device sync inside the step stops the benchmark.
Variants, each in the same process so ratios are measured side by side:

- ``reference``: the official computation, eager (dense student, heads on every token, eager loss,
  per-tensor EMA loop, no compile, no graph);
- ``eager``: the fast path, eager (packed student, masked-only heads, fused loss and EMA kernels);
- ``compiled``: ``eager`` with the teacher and the student + loss each compiled as one graph;
- ``default``: what ``fastibot train`` runs on a GPU: ``compiled`` replayed as one CUDA graph;
- ``mixed``, ``triton``: ``default`` with ``model.attention=mixed`` or ``triton`` (``auto``, the default's, is
  ``triton`` on CUDA);
- ``tuned`` and ``max-autotune``: ``default`` with ``runtime.autotune=kernels`` and ``max``;
- ``torch-update``: ``default`` with ``kernels.update=torch`` (foreach clipping and decay, PyTorch's fused AdamW,
  then the EMA kernel, instead of the one fused pass);
- ``flat-grads``: ``default`` with the gradients in one zeroed flat buffer that every backward adds into (what
  several processes all-reduce; one process keeps autograd's own gradient tensors).

Several GPUs: ``torchrun --nproc_per_node N benchmarks/step_time.py --parallel ddp|fsdp|hsdp ...``;
``--batch`` is then per GPU, ``img/s`` the whole step's (all GPUs) and ``img/s/GPU`` that divided by N, and
rank 0 prints. ``model+opt GiB`` is what one GPU holds of student and teacher parameters, gradients and
AdamW state (sharded under fsdp). Under fsdp|hsdp the variants' ``kernels.ema=triton`` becomes the EMA on
local shards, and the CUDA graph of ``default`` is off (FSDP2 gathers from Python hooks).

``--phases`` adds CUDA-event phase times for the uncaptured variants; ``--profile`` adds, per variant,
kernels per step, GPU busy share and GPU time by kind (GEMM, attention, fastibot's Triton kernels,
compiler-generated Triton, other), and recompiles after warm-up; ``--memory-sweep`` runs the default
at several ``runtime.activation_memory`` budgets (``A/R``: with ``runtime.recompute_blocks`` R) and prints
img/s against peak memory; ``--tile-configs`` runs the default again under other tile-kernel block shapes
(the syntax of ``benchmarks/attention.py``). Peak memory is
the allocator's peak over the whole variant (warm-up and capture included), and what it reserved;
``warm-up s`` is the wall time of the untimed steps, compiling and capturing included.
``--stream-priority -1`` runs every variant's steps (and the loader's copies into them) on a
high-priority CUDA stream, so that a GPU loader's kernels (DALI runs on its own streams) only fill the
gaps the step leaves.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))  # a source checkout works without installing
from common import (PEAK_BF16_TFLOPS, device_info, endless, matmul_tflops, peak_tflops, print_table,  # noqa: E402
                    tile_settings, write_json)

from fastibot.config import load_config  # noqa: E402
from fastibot.flops import step_flops_per_image  # noqa: E402
from fastibot.train import Trainer, init_runtime  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PHASES = ["data wait", "teacher forward", "student forward + loss", "backward", "optimizer", "EMA", "other"]
OFF = {"runtime.compile": "false", "runtime.cuda_graph": "false"}
VARIANTS = {
    # the official computation keeps every activation (eager, activation_memory < 1 would recompute blocks)
    "reference": {"model.packed": False, "kernels.loss": "reference", "kernels.ema": "reference",
                  "model.attention": "sdpa", "runtime.activation_memory": 1.0, **OFF},
    "eager": {"kernels.loss": "triton", "kernels.ema": "triton", **OFF},
    "compiled": {"kernels.loss": "triton", "kernels.ema": "triton", "runtime.compile": "true",
                 "runtime.cuda_graph": "false"},
    "default": {},
    "mixed": {"model.attention": "mixed"},
    "triton": {"model.attention": "triton"},
    "tuned": {"runtime.autotune": "kernels"},
    "max-autotune": {"runtime.autotune": "max"},
    "flat-grads": {},  # default with the flat gradient buffer several processes use (AFTER_BUILD)
    "torch-update": {"kernels.update": "torch"},
}


def _flat_grads(tr) -> None:
    from fastibot.optim import GradBuffer
    tr.grads = tr.stepper.grads = GradBuffer(tr.grads.params)


AFTER_BUILD = {"flat-grads": _flat_grads}  # variants that change a built trainer before its first step


class PhaseMarker:
    """Records (phase, CUDA event) pairs; phase time = its event minus the previous one."""

    def __init__(self):
        self.steps, self.current = [], None

    def begin(self):
        self.current = [("start", self._event())]
        self.steps.append(self.current)

    def __call__(self, name: str):
        if self.current is not None:
            self.current.append((name, self._event()))

    @staticmethod
    def _event():
        e = torch.cuda.Event(enable_timing=True)
        e.record()
        return e

    def summary(self):
        torch.cuda.synchronize()
        totals = {p: 0.0 for p in PHASES}
        for marks in self.steps:
            for (_, a), (name, b) in zip(marks, marks[1:]):
                totals[name if name in totals else "other"] += a.elapsed_time(b)
        return {k: v / max(len(self.steps), 1) for k, v in totals.items()}


def kernel_kind(name: str) -> str:
    n = name.lower()
    if any(k in n for k in ("flash", "fmha", "attention", "sdpa", "efficient_attention", "_tile_attn")):
        return "attention"
    if any(k in n for k in ("gemm", "xmma", "cutlass", "nvjet", "matmul", "cublas", "sm90_", "wgmma")):
        return "GEMM"
    if any(k in n for k in ("_distill_ce", "_softmax_rows", "_scale_inplace", "_ema_kernel", "_block_mask",
                            "_fused_update")):
        return "fastibot Triton"
    if n.startswith("triton"):
        return "compiled Triton"
    return "other"


def profile_steps(tr, batches, steps: int) -> dict:
    """Kernels per step, GPU busy share and GPU time by kind over ``steps`` steps (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        start.record()
        for _ in range(steps):
            tr.train_step([next(batches)])
        end.record()
        torch.cuda.synchronize()
    wall_ms = start.elapsed_time(end)
    kinds, count, busy, by_name, calls = {}, 0, 0.0, {}, {}
    for e in prof.events():
        if e.device_type != torch.autograd.DeviceType.CUDA:
            continue
        ms = e.time_range.elapsed_us() / 1e3
        kinds[kernel_kind(e.name)] = kinds.get(kernel_kind(e.name), 0.0) + ms
        by_name[e.name[:90]] = by_name.get(e.name[:90], 0.0) + ms
        calls[e.name[:90]] = calls.get(e.name[:90], 0) + 1
        count += 1
        busy += ms
    top = sorted(by_name.items(), key=lambda kv: -kv[1])[:40]
    print_table(f"top kernels of {getattr(tr, 'variant_name', '')} (ms per step)",
                [{"kernel": k, "ms/step": v / steps, "calls/step": calls[k] / steps, "kind": kernel_kind(k)}
                 for k, v in top],
                ["kernel", "kind", "calls/step", "ms/step"])
    out = {"kernels/step": count / steps, "GPU busy %": 100 * busy / max(wall_ms, 1e-9),
           "GPU ms/step": busy / steps}
    out.update({f"{k} ms": v / steps for k, v in sorted(kinds.items())})
    return out


def _recompiles() -> int:
    """Graphs dynamo has compiled so far in this process (after a variant's warm-up, any new one is a
    recompile)."""
    from torch._dynamo.utils import counters
    return int(counters["stats"]["unique_graphs"])


def state_gib(tr) -> float:
    """GiB this GPU holds of student and teacher parameters, gradients and AdamW state (local shards)."""
    from fastibot.parallel import local
    tensors = [local(p) for m in (tr.student, tr.teacher) for p in m.parameters()] + list(tr.grads.grads)
    tensors += [local(t) for st in tr.opt.named_state().values() for t in st.values()]
    return sum(t.numel() * t.element_size() for t in tensors) / 2 ** 30


def run_variant(name, overrides, args, matmul):
    out = tempfile.mkdtemp(prefix="fastibot-bench-")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    n_steps = args.warmup + args.windows * args.steps + (5 if args.profile else 0) + 2
    if args.parallel != "ddp":  # FSDP2 owns the shards' storage: the EMA runs on local shards (kernels.ema auto)
        overrides = {k: v for k, v in overrides.items() if k != "kernels.ema"}
    o = {"model.arch": args.arch, "data.batch_size": args.batch, "data.loader": args.data,
         "runtime.output_dir": out, "runtime.tensorboard": False, "runtime.progress": False,
         "runtime.precision": "bf16", "data.synthetic_size": args.batch * world * n_steps,
         "data.num_workers": args.workers, "runtime.parallel": args.parallel, **overrides}
    if args.data != "synthetic":
        o.update({"data.source": "imagefolder", "data.path": args.data_path})
    if args.dali_threads is not None:
        o["data.dali_threads"] = args.dali_threads
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    cfg = load_config(args.config, [f"{k}={v}" for k, v in o.items()] + args.set)
    tr = Trainer(cfg, init_runtime(cfg))
    tr.variant_name = name
    if name in AFTER_BUILD:
        AFTER_BUILD[name](tr)
    batches = endless(tr.data)
    t0 = time.perf_counter()
    for _ in range(args.warmup):
        tr.train_step([next(batches)])
    torch.cuda.synchronize()
    warmup_s = time.perf_counter() - t0  # compile and capture included: what a run pays before its first fast step
    compiles_after_warmup = _recompiles()
    rates, masked = [], []
    for _ in range(args.windows):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        with _SyncDebug(args.sync_debug):
            start.record()
            for _ in range(args.steps):
                b = next(batches)
                masked.append(b.masks.sum())  # read after the timed windows
                tr.train_step([b])
            end.record()
        end.synchronize()
        rates.append(world * args.batch * args.steps / (start.elapsed_time(end) * 1e-3))
    res = {"variant": name, "attention": tr.attention, "compile": tr.compile, "cuda_graph": tr.cuda_graph,
           "parallel": f"{args.parallel} x{world}"}
    res["img/s"] = statistics.median(rates)
    res["img/s/GPU"] = res["img/s"] / world
    res["model+opt GiB"] = state_gib(tr)
    res["spread %"] = 100 * (max(rates) - min(rates)) / res["img/s"]
    res["windows"] = [round(r, 1) for r in rates]
    res["ms/step"] = 1e3 * world * args.batch / res["img/s"]
    res["peak GiB"] = torch.cuda.max_memory_allocated() / 2 ** 30
    res["reserved GiB"] = torch.cuda.max_memory_reserved() / 2 ** 30
    res["recompiles"] = _recompiles() - compiles_after_warmup
    res["warm-up s"] = warmup_s
    if args.phases and not tr.cuda_graph:
        marker = PhaseMarker()
        tr.stepper.mark = marker
        for _ in range(args.steps):
            marker.begin()
            b = next(batches)
            marker("data wait")
            tr.train_step([b])
            marker("other")
        res["phases"] = marker.summary()
        tr.stepper.mark = lambda _: None
    if args.profile:
        res.update(profile_steps(tr, batches, 5))
    masked_per_crop = float(torch.stack(masked).double().mean()) / (args.batch * cfg.crops.n_global)
    try:
        gflop = step_flops_per_image(cfg, masked_per_crop) / 1e9
    except KeyError:  # no FLOP model for this backbone (Swin)
        gflop = float("nan")
    res["GFLOP/img"], res["TFLOP/s"] = gflop, gflop * res["img/s/GPU"] / 1e3  # per GPU
    res["MFU %"] = 100 * res["TFLOP/s"] / (peak_tflops(torch.cuda.get_device_name()) or float("nan"))
    res["% matmul"] = 100 * res["TFLOP/s"] / matmul
    del tr, batches
    gc.collect()
    torch.cuda.empty_cache()
    return res


def patch_embed_table(arch: str, batch: int) -> list:
    """Forward + backward of the patch embedding as a strided convolution and as one matmul over unfolded
    patches (``PatchEmbed.IMPL``), eager and compiled, on the recipe's crops (bf16, CUDA graph timing)."""
    from common import time_graph_ms

    from fastibot.models.vit import ARCHS, PatchEmbed
    rows = []
    for n, size in ((2 * batch, 224), (10 * batch, 96)):
        x = torch.randn(n, 3, size, size, device="cuda", dtype=torch.bfloat16)
        for impl in ("conv", "matmul"):
            for compiled in (False, True):
                pe = PatchEmbed(16, ARCHS[arch]["embed_dim"]).cuda().to(torch.bfloat16)
                pe.IMPL = impl
                fn = torch.compile(pe) if compiled else pe

                def step():
                    fn(x).float().square().mean().backward()
                try:
                    ms = time_graph_ms(step, rep=20)
                except Exception as e:  # noqa: BLE001 - reported in the table
                    ms = float("nan")
                    print(f"patch embed {impl} compiled={compiled}: {type(e).__name__}: {e}")
                rows.append({"crops": f"{n} x {size}px", "impl": impl, "compiled": compiled, "fwd+bwd ms": ms})
    print_table("patch embedding, forward + backward (CUDA graph)", rows, ["crops", "impl", "compiled", "fwd+bwd ms"])
    return rows


class _SyncDebug:
    """``torch.cuda.set_sync_debug_mode`` for a block (older torch has no context manager for it)."""

    def __init__(self, mode):
        self.mode = mode

    def __enter__(self):
        self.old = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode(self.mode)

    def __exit__(self, *exc):
        torch.cuda.set_sync_debug_mode(self.old)


def sweep_point(spec: str):
    """``A`` or ``A/R`` -> (name, overrides): runtime.activation_memory A (and runtime.recompute_blocks R)."""
    a, _, r = spec.partition("/")
    if not r:
        return f"default, activation_memory={a}", {"runtime.activation_memory": float(a)}
    return (f"default, activation_memory={a}, recompute_blocks={r}",
            {"runtime.activation_memory": float(a), "runtime.recompute_blocks": float(r)})


def landed(name: str, r: dict) -> str:
    """One line per finished variant, printed as it lands (a time limit must not cost the finished ones)."""
    return (f"{name}: {r['img/s']:.0f} img/s (windows {r['windows']}), peak {r['peak GiB']:.2f} GiB, "
            f"reserved {r['reserved GiB']:.2f} GiB, recompiles {r['recompiles']}, warm-up {r['warm-up s']:.0f} s")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=None,
                    help="recipe file; default configs/<arch>_16.yaml (the file a user trains that arch with)")
    ap.add_argument("--arch", default="vit_small", choices=("vit_tiny", "vit_small", "vit_base", "vit_large"))
    ap.add_argument("--batch", type=int, default=64, help="images per step")
    ap.add_argument("--variants", default="reference,eager,compiled,default",
                    help=f"comma-separated, from {', '.join(VARIANTS)}")
    ap.add_argument("--steps", type=int, default=20, help="steps per timed window")
    ap.add_argument("--windows", type=int, default=3, help="timed windows (the median is reported)")
    ap.add_argument("--warmup", type=int, default=None,
                    help="untimed steps first (compile and capture happen here); default 8 on synthetic crops, 40 "
                         "with a real loader (DALI's rate still rose after 12)")
    ap.add_argument("--data", default="synthetic", choices=("synthetic", "torchvision", "dali"))
    ap.add_argument("--data-path", default="", help="image folder for --data torchvision|dali")
    ap.add_argument("--workers", type=int, default=15, help="worker processes of --data torchvision")
    ap.add_argument("--dali-threads", type=int, default=None,
                    help="CPU threads of --data dali (default: the config's data.dali_threads)")
    ap.add_argument("--phases", action="store_true", help="CUDA-event phase times of the uncaptured variants")
    ap.add_argument("--profile", action="store_true", help="kernels per step and GPU time by kind")
    ap.add_argument("--memory-sweep", default="", help="comma-separated runtime.activation_memory values for the "
                                                       "default variant, e.g. 1,0.5,0.2; A/R also sets "
                                                       "runtime.recompute_blocks=R, e.g. 1/0.75")
    ap.add_argument("--patch-embed", action="store_true", help="time the patch embedding's two forms first")
    ap.add_argument("--parallel", default="ddp", choices=("ddp", "fsdp", "hsdp"),
                    help="runtime.parallel (under torchrun: --batch is per GPU)")
    ap.add_argument("--sync-debug", default="error", choices=("error", "warn", "default"),
                    help="torch.cuda.set_sync_debug_mode during the timed steps")
    ap.add_argument("--stream-priority", type=int, default=None,
                    help="run the steps on a new CUDA stream of this priority (lower is higher; -1 is high on "
                         "current GPUs); default: the current stream")
    ap.add_argument("--tile-configs", default="",
                    help="comma-separated tile-kernel block shapes, one more default run each, as "
                         "benchmarks/attention.py takes them (e.g. 64/64/4,64/32/4+64/64/8)")
    ap.add_argument("--set", nargs="*", default=[], help="extra config overrides key=value")
    ap.add_argument("--json", help="write results here")
    args = ap.parse_args(argv)
    if args.config is None:
        args.config = str(REPO / "configs" / f"{args.arch}_16.yaml")
        if not Path(args.config).exists():  # vit_tiny has no recipe file of its own
            args.config = str(REPO / "configs" / "vit_small_16.yaml")
    if not torch.cuda.is_available():
        sys.exit("benchmarks/step_time.py needs a CUDA GPU")
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))  # under torchrun: before anything touches a GPU
    main_rank = int(os.environ.get("RANK", "0")) == 0
    if not main_rank:  # every rank runs every step; rank 0 reports
        sys.stdout = open(os.devnull, "w")
    if args.data != "synthetic" and not args.data_path:
        sys.exit(f"--data {args.data} needs --data-path")
    if args.warmup is None:
        args.warmup = 8 if args.data == "synthetic" else 40
    info = device_info()
    matmul = matmul_tflops()
    print(" | ".join(f"{k}: {v}" for k, v in info.items()) + f" | bf16 matmul measured: {matmul:.0f} TFLOP/s")
    print("datasheet dense bf16 peaks used for MFU: " + ", ".join(f"{k} {v:.0f}" for k, v in PEAK_BF16_TFLOPS.items()))
    extra = {"patch_embed": patch_embed_table(args.arch, args.batch)} if args.patch_embed else {}
    names = [v for v in args.variants.split(",") if v]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        sys.exit(f"unknown variant(s) {unknown}; choose from {', '.join(VARIANTS)}")
    runs = [(n, VARIANTS[n], "") for n in names]
    runs += [(*sweep_point(a), "") for a in args.memory_sweep.split(",") if a]
    runs += [(f"default, tiles {c}", VARIANTS["default"], c) for c in args.tile_configs.split(",") if c]
    results = []
    for n, o, tiles in runs:
        try:
            with (contextlib.nullcontext() if args.stream_priority is None
                  else torch.cuda.stream(torch.cuda.Stream(priority=args.stream_priority))), \
                    tile_settings(tiles):
                results.append(run_variant(n, o, args, matmul))
        except Exception:  # report and go on: one broken variant must not cost the others' numbers
            import traceback
            traceback.print_exc()
            print(f"variant {n} failed", flush=True)
            gc.collect()
            torch.cuda.empty_cache()
            continue
        print(landed(n, results[-1]), flush=True)
    ref = next((r for r in results if r["variant"] == "reference"), None)
    for r in results:
        r["x reference"] = r["img/s"] / ref["img/s"] if ref else float("nan")
        r["memory x reference"] = r["peak GiB"] / ref["peak GiB"] if ref else float("nan")
    with_phases = [r for r in results if "phases" in r]
    if with_phases:
        rows = [{"phase": p, **{r["variant"]: f"{r['phases'][p]:.2f} ms" for r in with_phases}} for p in PHASES]
        print_table(f"{args.arch}, {args.batch} images/step: time per phase (eager variants)", rows,
                    ["phase"] + [r["variant"] for r in with_phases])
    if args.profile:
        keys = sorted({k for r in results for k in r if k.endswith(" ms") or k in ("kernels/step", "GPU busy %",
                                                                                  "GPU ms/step")})
        print_table("profile (5 steps per variant)", results, ["variant"] + keys)
    print_table(f"{args.arch}, {args.batch} images/step, data={args.data}: median of {args.windows} windows of "
                f"{args.steps} steps", results,
                ["variant", "parallel", "attention", "img/s", "img/s/GPU", "spread %", "ms/step", "GFLOP/img",
                 "TFLOP/s", "MFU %", "% matmul", "peak GiB", "reserved GiB", "model+opt GiB", "recompiles",
                 "warm-up s", "x reference", "memory x reference"])
    if main_rank:
        write_json(args.json, {"device": info, "matmul_tflops": matmul, "args": vars(args),
                               "world": int(os.environ.get("WORLD_SIZE", "1")), "results": results, **extra})
    if torch.distributed.is_initialized():  # ranks leave together (a DDP run with graphs once hung at exit)
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
