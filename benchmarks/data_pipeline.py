"""Images per second of each data loader for the full iBOT multi-crop recipe.

    python benchmarks/data_pipeline.py --images /path/to/jpegs [--make-from ../shared/data/imagenette2-128/train]

Each loader produces what a training step consumes: 2 global crops of 224 px,
10 local crops of 96 px and the block masks, as tensors on the training device.
``--make-from`` first writes ImageNet-sized copies (500x375 JPEG, quality 90)
of a folder's images under ``--images``, so decode cost is realistic.

Loaders: ``torchvision`` (CPU workers, the reference), ``dali`` (GPU decode and
augmentation, ``--dali-threads`` CPU threads) and ``synthetic`` (device-resident
crops: the ceiling a loader could reach).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))  # a source checkout works without installing
from common import device_info, endless, print_table, write_json  # noqa: E402

from fastibot.config import load_config  # noqa: E402
from fastibot.data.loaders import build_data  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def make_imagenet_sized(src: Path, dst: Path, limit: int) -> int:
    """Re-encode up to ``limit`` images of ``src`` (class subfolders kept) at 500x375."""
    from PIL import Image

    n = 0
    for f in sorted(src.rglob("*")):
        if f.suffix.lower() not in (".jpg", ".jpeg", ".png") or n >= limit:
            continue
        out = dst / f.parent.name / (f.stem + ".jpg")
        if not out.exists():
            out.parent.mkdir(parents=True, exist_ok=True)
            Image.open(f).convert("RGB").resize((500, 375), Image.BICUBIC).save(out, quality=90)
        n += 1
    return n


def in_flight(data) -> int:
    """Batches a loader may have made ahead of the consumer: the torchvision loader keeps
    ``prefetch_factor`` batches per worker in flight, DALI its prefetch queue. Warm-up must drain at
    least these, or batches made before the clock starts are counted as made inside it."""
    loader = getattr(data, "loader", None)
    if loader is not None and getattr(loader, "num_workers", 0) > 0:
        return loader.num_workers * (loader.prefetch_factor or 2)
    pipe = getattr(data, "pipe", None)
    if pipe is not None:
        depth = getattr(pipe, "prefetch_queue_depth", 2)
        return depth if isinstance(depth, int) else max(depth.values())
    return 0


def measure(kind: str, args, device: torch.device) -> dict:
    """Steady-state img/s: warm-up drains what the loader made ahead, then ``--windows`` timed windows of
    ``--batches`` batches each; the median window is reported with the slowest and fastest."""
    over = [f"data.loader={kind}", f"data.batch_size={args.batch}", "data.source=imagefolder",
            f"data.path={args.images}", f"data.num_workers={args.workers}",
            f"data.synthetic_size={args.batch * (args.batches + args.warmup + 1)}",
            f"runtime.device={device.type}"]
    if args.dali_threads is not None:
        over.append(f"data.dali_threads={args.dali_threads}")
    cfg = load_config(REPO / "configs" / "vit_small_16.yaml", over)
    data = build_data(cfg, 0, 1, device)
    it = endless(data)
    warmup = args.warmup + in_flight(data)
    for _ in range(warmup):
        next(it)
    rates = []
    for _ in range(args.windows):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        n = 0
        for _ in range(args.batches):
            b = next(it)
            n += b.globals.shape[0] // cfg.crops.n_global
        if device.type == "cuda":
            torch.cuda.synchronize()
        rates.append(n / (time.perf_counter() - t0))
    threads = args.workers if kind == "torchvision" else (cfg.data.dali_threads if kind == "dali" else 0)
    note = "pre-made device batches, cycled: no per-batch work (the ceiling)" if kind == "synthetic" else ""
    return {"loader": kind, "img/s": statistics.median(rates), "min img/s": min(rates), "max img/s": max(rates),
            "CPU threads": threads, "warm-up batches": warmup, "windows": f"{args.windows} x {args.batches}",
            "batch": args.batch, "note": note}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", default="", help="ImageFolder tree of JPEGs (created with --make-from)")
    ap.add_argument("--make-from", default="", help="re-encode this folder's images at 500x375 into --images")
    ap.add_argument("--limit", type=int, default=4000, help="images to re-encode")
    ap.add_argument("--loaders", nargs="+", default=["dali", "torchvision", "synthetic"])
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--batches", type=int, default=20, help="batches per timed window")
    ap.add_argument("--windows", type=int, default=5, help="timed windows (the median is reported)")
    ap.add_argument("--warmup", type=int, default=3, help="warm-up batches on top of those the loader keeps in flight")
    ap.add_argument("--workers", type=int, default=min(15, (os.cpu_count() or 2) - 1))
    ap.add_argument("--dali-threads", type=int, default=None, help="default: the config's data.dali_threads")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    if not args.images:
        args.images = tempfile.mkdtemp(prefix="fastibot-jpegs-")
    if args.make_from:
        n = make_imagenet_sized(Path(args.make_from), Path(args.images), args.limit)
        print(f"{n} images at 500x375 in {args.images}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    info = device_info()
    print(" | ".join(f"{k}: {v}" for k, v in info.items()) + f" | CPU cores: {os.cpu_count()}")
    rows = []
    for kind in args.loaders:
        try:
            rows.append(measure(kind, args, device))
        except Exception as e:  # a loader that cannot run here is reported, not hidden
            rows.append({"loader": kind, "note": f"{type(e).__name__}: {str(e)[:100]}"})
    print_table(f"data loaders, full recipe (2x224 + 10x96 + masks), batch {args.batch}, on {device}: "
                f"steady state, median of {args.windows} windows", rows,
                ["loader", "img/s", "min img/s", "max img/s", "CPU threads", "warm-up batches", "windows", "batch",
                 "note"])
    write_json(args.json, {"device": info, "rows": rows})


if __name__ == "__main__":
    main()
