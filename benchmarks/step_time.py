"""Where each millisecond of an iBOT training step goes.

    python benchmarks/step_time.py --arch vit_small --batch 64 --steps 30 --data synthetic --compare reference

Runs real training steps (fastibot.train.Trainer) after a warm-up and times
them with CUDA events placed between the named parts of a step: data wait,
teacher forward, student forward, heads, loss, backward, optimizer, EMA,
other. Prints a table of phases, then img/s, achieved TFLOP/s (FLOPs counted
analytically, fastibot.flops), MFU against the datasheet bf16 peak of the GPU
(table printed) and the matmul rate measured in the same run, and peak memory.
``--compare reference`` also runs the eager faithful path (unpacked, heads on
every token, reference loss, per-tensor EMA loop) in the same process, so the
ratio is measured side by side; ``--ablate`` adds the steps in between.
"""
from __future__ import annotations

import argparse
import gc
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))  # a source checkout works without installing
from common import PEAK_BF16_TFLOPS, device_info, matmul_tflops, peak_tflops, print_table, write_json  # noqa: E402

from fastibot.config import load_config  # noqa: E402
from fastibot.flops import step_flops_per_image  # noqa: E402
from fastibot.train import Trainer, init_runtime  # noqa: E402

PHASES = ["data wait", "teacher forward", "student forward", "heads", "loss", "backward", "optimizer", "EMA", "other"]
REPO = Path(__file__).resolve().parents[1]

FAST = {"model.packed": True, "kernels.loss": "triton", "kernels.ema": "triton"}
REFERENCE = {"model.packed": False, "kernels.loss": "reference", "kernels.ema": "reference",
             "model.attention": "sdpa"}
ABLATIONS = [  # cumulative steps from the reference to the fast path
    ("reference", REFERENCE),
    ("+ packed, masked-only heads", {**REFERENCE, "model.packed": True, "model.attention": "auto"}),
    ("+ fused loss", {**REFERENCE, "model.packed": True, "model.attention": "auto", "kernels.loss": "triton"}),
    ("fast (+ fused EMA)", FAST),
]


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
        n = max(len(self.steps), 1)
        wall = self.steps[0][0][1].elapsed_time(self.steps[-1][-1][1])
        return {k: v / n for k, v in totals.items()}, wall / n


def run_variant(name, overrides, args, matmul):
    out = tempfile.mkdtemp(prefix="fastibot-bench-")
    o = {"model.arch": args.arch, "data.batch_size": args.batch, "data.loader": args.data,
         "runtime.output_dir": out, "runtime.tensorboard": False, "runtime.progress": False,
         "runtime.precision": "bf16", "data.synthetic_size": args.batch * (args.steps + args.warmup + 2),
         "data.num_workers": args.workers, **overrides}
    if args.data != "synthetic" and args.data_path:
        o.update({"data.source": "imagefolder", "data.path": args.data_path})
    cfg = load_config(args.config, [f"{k}={v}" for k, v in o.items()] + args.set)
    rt = init_runtime(cfg)
    tr = Trainer(cfg, rt)
    marker = PhaseMarker()
    tr.data.set_position(0, 0)
    batches = iter(tr.data)
    masked = []
    for i in range(args.warmup + args.steps):
        if i == args.warmup:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            tr.mark = tr.student_module.mark = marker
        marker.begin() if i >= args.warmup else None
        batch = next(batches)
        tr.mark("data wait")
        masked.append(batch["masks"].sum())  # read after the timed steps
        tr.train_step([batch])
        tr.mark("other")
    phases, ms = marker.summary()
    peak = torch.cuda.max_memory_allocated() / 2 ** 30
    imgs = args.batch / (ms * 1e-3)
    masked_per_crop = float(sum(m.item() for m in masked)) / (len(masked) * args.batch * cfg.crops.n_global)
    gflop = step_flops_per_image(cfg, masked_per_crop) / 1e9
    tflops = gflop * imgs / 1e3
    peak_tf = peak_tflops(torch.cuda.get_device_name()) or float("nan")
    res = {"variant": name, "attention": tr.attention, "ms/step": ms, "img/s": imgs, "GFLOP/img": gflop,
           "TFLOP/s": tflops, "MFU %": 100 * tflops / peak_tf, "% matmul": 100 * tflops / matmul,
           "peak GiB": peak, "phases": phases}
    del tr, batches
    gc.collect()
    torch.cuda.empty_cache()
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(REPO / "configs" / "vit_small_16.yaml"))
    ap.add_argument("--arch", default="vit_small", choices=("vit_tiny", "vit_small", "vit_base", "vit_large"))
    ap.add_argument("--batch", type=int, default=64, help="images per step")
    ap.add_argument("--steps", type=int, default=30, help="timed steps")
    ap.add_argument("--warmup", type=int, default=8)
    ap.add_argument("--data", default="synthetic", choices=("synthetic", "torchvision", "dali"))
    ap.add_argument("--data-path", default="", help="image folder for --data torchvision|dali")
    ap.add_argument("--workers", type=int, default=15)
    ap.add_argument("--compare", choices=("reference",), help="also run the eager faithful path")
    ap.add_argument("--ablate", action="store_true", help="run reference -> fast one change at a time")
    ap.add_argument("--compile", action="store_true", help="also run the fast path with torch.compile'd blocks")
    ap.add_argument("--set", nargs="*", default=[], help="extra config overrides key=value")
    ap.add_argument("--json", help="write results here")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("benchmarks/step_time.py needs a CUDA GPU")
    info = device_info()
    matmul = matmul_tflops()
    name = torch.cuda.get_device_name()
    print(" | ".join(f"{k}: {v}" for k, v in info.items()) + f" | bf16 matmul measured: {matmul:.0f} TFLOP/s")
    print("datasheet dense bf16 peaks used for MFU: " + ", ".join(f"{k} {v:.0f}" for k, v in PEAK_BF16_TFLOPS.items())
          + f" (this GPU: {peak_tflops(name)})")
    variants = ABLATIONS if args.ablate else [("fast", FAST)] + ([("reference", REFERENCE)] if args.compare else [])
    if args.compile:
        variants = variants + [("fast + compiled blocks", {**FAST, "runtime.compile": True})]
    results = [run_variant(n, o, args, matmul) for n, o in variants]
    ref = next((r for r in results if r["variant"] == "reference"), None)
    cols = ["phase"] + [r["variant"] for r in results]
    rows = [{"phase": p, **{r["variant"]: f"{r['phases'][p]:.2f} ms ({100 * r['phases'][p] / r['ms/step']:.0f}%)"
                            for r in results}} for p in PHASES]
    print_table(f"{args.arch}, {args.batch} images/step, data={args.data}: time per phase", rows, cols)
    for r in results:
        r["x vs reference"] = ref["ms/step"] / r["ms/step"] if ref else float("nan")
        r["memory vs reference"] = r["peak GiB"] / ref["peak GiB"] if ref and ref["peak GiB"] else float("nan")
    print_table("summary", results, ["variant", "attention", "ms/step", "img/s", "GFLOP/img", "TFLOP/s", "MFU %",
                                     "% matmul", "peak GiB", "x vs reference", "memory vs reference"])
    write_json(args.json, {"device": info, "matmul_tflops": matmul, "args": vars(args), "results": results})


if __name__ == "__main__":
    main()
