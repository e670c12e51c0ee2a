"""Swin-T next to ViT-S/16: images/s and peak memory of real iBOT training steps, in one process.

    python benchmarks/backbones.py --batch 64 --steps 20

Each variant is its packaged recipe (2 x 224 + 10 x 96 crops, K = 8192, bf16) with the default fast
settings (fused loss and EMA kernels, compiled step replayed as a CUDA graph), fed the synthetic
loader's device-resident crops with real block masks drawn on the backbone's own mask grid (14 x 14
for ViT-S/16, 7 x 7 for Swin-T). A Swin runs the dense path (its one path); ViT-S/16 runs both its
dense path, the like-for-like comparison, and its packed fast path. Timing and memory are
``step_time.py``'s (median of timed windows, the allocator's peak). The numbers help choose a
backbone; there is no target ratio.
"""
from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import device_info, matmul_tflops, print_table, write_json  # noqa: E402
from step_time import landed, run_variant  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
VARIANTS = {  # name: (packaged config, arch, overrides)
    "vit_small/16 dense": ("vit_small_16", "vit_small", {"model.packed": False}),
    "vit_small/16 packed": ("vit_small_16", "vit_small", {}),
    "swin_tiny/7": ("swin_tiny_7", "swin_tiny", {}),
    "swin_tiny/14": ("swin_tiny_7", "swin_tiny", {"model.window_size": 14}),
}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=64, help="images per step")
    ap.add_argument("--steps", type=int, default=20, help="steps per timed window")
    ap.add_argument("--windows", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=6)
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--set", nargs="*", default=[], help="extra config overrides key=value for every variant")
    ap.add_argument("--json", help="write results here")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("benchmarks/backbones.py needs a CUDA GPU")
    info, matmul = device_info(), matmul_tflops()
    base = argparse.Namespace(batch=args.batch, steps=args.steps, windows=args.windows, warmup=args.warmup,
                              data="synthetic", data_path="", workers=0, dali_threads=None, phases=False,
                              profile=False, set=args.set, parallel="ddp", sync_debug="error")
    results = []
    for name in args.variants:
        config, arch, overrides = VARIANTS[name]
        a = copy.copy(base)
        a.config, a.arch = str(REPO / "configs" / f"{config}.yaml"), arch
        try:
            results.append(run_variant(name, overrides, a, matmul))
            print(landed(name, results[-1]), flush=True)
        except Exception:  # one backbone failing must not cost the others' numbers
            import traceback
            traceback.print_exc()
    if not results:
        sys.exit("every variant failed (tracebacks above)")
    print_table(f"iBOT step by backbone, batch {args.batch}, {info.get('gpu')}, torch {info['torch']}", results,
                ["variant", "compile", "cuda_graph", "img/s", "spread %", "ms/step", "peak GiB", "reserved GiB"])
    write_json(args.json, {"device": info, "args": vars(args), "results": results})


if __name__ == "__main__":
    main()
