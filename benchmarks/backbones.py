"""Swin-T next to ViT-S/16: images/s and peak memory of real iBOT training steps, in one process.

    python benchmarks/backbones.py --batch 64 --steps 20

Each variant is its packaged recipe (2 x 224 + 10 x 96 crops, K = 8192, bf16) with the fused loss
and EMA kernels, fed device-resident random crops and real block masks drawn on the backbone's own
mask grid (``models.backbones.mask_grid``: 14 x 14 for ViT-S/16, 7 x 7 for Swin-T). A Swin runs the
dense path only (its one path); ViT-S/16 runs both its dense path, the like-for-like comparison,
and its packed fast path. Steps are timed with CUDA events after a warm-up; peak memory is
``torch.cuda.max_memory_allocated`` over the timed steps. The numbers help choose a backbone;
there is no target ratio.
"""
from __future__ import annotations

import argparse
import gc
import random
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))  # a source checkout works without installing
from common import device_info, print_table, write_json  # noqa: E402

from fastibot.config import load_config  # noqa: E402
from fastibot.data.datasets import collate_multicrop  # noqa: E402
from fastibot.data.masking import MaskGenerator  # noqa: E402
from fastibot.models.backbones import mask_grid  # noqa: E402
from fastibot.train import Trainer, init_runtime  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
KERNELS = {"kernels.loss": "triton", "kernels.ema": "triton", "runtime.precision": "bf16"}
VARIANTS = {
    "vit_small/16 dense": ("vit_small_16", {"model.packed": False, "model.attention": "sdpa"}),
    "vit_small/16 packed": ("vit_small_16", {"model.packed": True}),
    "swin_tiny/7": ("swin_tiny_7", {}),
    "swin_tiny/14": ("swin_tiny_7", {"model.window_size": 14}),
}


def batches(cfg, device, n: int = 2, seed: int = 0):
    """``n`` batches of random crops with block masks on the backbone's mask grid, on ``device``."""
    c, m = cfg.crops, cfg.masking
    gen = MaskGenerator(m.pred_ratio, m.pred_ratio_var, m.aspect_ratio, m.shape)
    rng, g = random.Random(seed), torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        samples = [{"crops": [torch.randn(3, c.global_size, c.global_size, generator=g) for _ in range(c.n_global)]
                    + [torch.randn(3, c.local_size, c.local_size, generator=g) for _ in range(c.n_local)],
                    "masks": gen.batch(c.n_global, *mask_grid(cfg, c.global_size), rng), "label": 0, "n_bad": 0}
                   for _ in range(cfg.data.batch_size)]
        batch = collate_multicrop(samples, c.n_global)
        out.append({k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()})
    return out


def run_variant(name: str, args) -> dict:
    config, overrides = VARIANTS[name]
    o = {"data.batch_size": args.batch, "data.loader": "synthetic", "data.source": "synthetic",
         "data.synthetic_size": args.batch * 4, "data.num_workers": 0, "runtime.output_dir": tempfile.mkdtemp(),
         "runtime.tensorboard": False, "runtime.progress": False, **KERNELS, **overrides}
    cfg = load_config(REPO / "configs" / f"{config}.yaml", [f"{k}={v}" for k, v in o.items()] + args.set)
    rt = init_runtime(cfg)
    tr = Trainer(cfg, rt)
    pool = batches(cfg, rt.device)
    for i in range(args.warmup):
        tr.train_step([pool[i % len(pool)]])
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for i in range(args.steps):
        tr.train_step([pool[i % len(pool)]])
    end.record()
    end.synchronize()
    ms = start.elapsed_time(end) / args.steps
    params = sum(p.numel() for p in tr.student_module.backbone.parameters()) / 1e6
    res = {"variant": name, "backbone M params": params, "ms/step": ms, "img/s": args.batch / (ms * 1e-3),
           "peak GiB": torch.cuda.max_memory_allocated() / 2 ** 30,
           "masked cells/crop": float(pool[0]["masks"].float().sum(1).mean())}
    del tr, pool
    gc.collect()
    torch.cuda.empty_cache()
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=64, help="images per step")
    ap.add_argument("--steps", type=int, default=20, help="timed steps")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--set", nargs="*", default=[], help="extra config overrides key=value for every variant")
    ap.add_argument("--json", help="write results here")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("benchmarks/backbones.py needs a CUDA GPU")
    info = device_info()
    results = [run_variant(v, args) for v in args.variants]
    print_table(f"iBOT step by backbone, batch {args.batch}, {info.get('gpu')}, torch {info['torch']}", results,
                ["variant", "backbone M params", "ms/step", "img/s", "peak GiB", "masked cells/crop"])
    write_json(args.json, {"device": info, "args": vars(args), "results": results})


if __name__ == "__main__":
    main()
