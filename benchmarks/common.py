"""Shared benchmark helpers: device facts, timing, measured ceilings, table printing, JSON."""
from __future__ import annotations

import contextlib
import datetime
import json
import platform
import statistics
from typing import Callable, Dict, List, Optional

import torch

# Dense bf16 tensor-core peak per GPU (datasheet, TFLOP/s); MFU is reported against it.
PEAK_BF16_TFLOPS = {
    "H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0, "A10": 125.0, "V100": 125.0,
    "RTX 4090": 165.0,
}


def device_info() -> Dict[str, str]:
    import triton

    info = {"date": datetime.date.today().isoformat(), "torch": torch.__version__, "triton": triton.__version__,
            "python": platform.python_version()}
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update(gpu=p.name, sms=str(p.multi_processor_count), memory_gib=f"{p.total_memory / 2**30:.0f}")
    else:
        info["gpu"] = "none (CPU)"
    return info


def peak_tflops(name: str) -> Optional[float]:
    for key, value in PEAK_BF16_TFLOPS.items():
        if key in name:
            return value
    return None


def time_ms(fn: Callable[[], object], warmup: int = 5, rep: int = 30) -> float:
    """Median milliseconds of ``fn`` with CUDA events (host clock on CPU)."""
    for _ in range(warmup):
        fn()
    if not torch.cuda.is_available():
        import time
        times = []
        for _ in range(rep):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)
    times = []
    for _ in range(rep):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def time_graph_ms(fn: Callable[[], object], rep: int = 30, calls: int = 1) -> float:
    """Median milliseconds of ``fn`` captured in a CUDA graph and replayed: GPU time without
    the host's launch overhead, divided by ``calls`` when ``fn`` makes that many calls (e.g. one per
    input set, so that no call finds its inputs in L2). NaN if ``fn`` cannot be captured."""
    if not torch.cuda.is_available():
        return float("nan")
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
    except Exception:
        return float("nan")
    return time_ms(graph.replay, warmup=3, rep=rep) / calls


def copy_bandwidth_gbs(nbytes: int = 1 << 30) -> float:
    """Device-to-device copy, counting bytes read plus written (GB/s)."""
    if not torch.cuda.is_available():
        return float("nan")
    src = torch.empty(nbytes // 4, dtype=torch.float32, device="cuda").normal_()
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), warmup=3, rep=20)
    return 2 * nbytes / (ms * 1e-3) / 1e9


def matmul_tflops(n: int = 8192) -> float:
    if not torch.cuda.is_available():
        return float("nan")
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    ms = time_ms(lambda: a @ b, warmup=3, rep=10)
    return 2 * n ** 3 / (ms * 1e-3) / 1e12


def peak_mib(fn: Callable[[], object]) -> float:
    """Peak memory allocated while ``fn`` runs, above what was allocated before (MiB)."""
    if not torch.cuda.is_available():
        return float("nan")
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2 ** 20


def print_table(title: str, rows: List[Dict[str, object]], columns: List[str]) -> None:
    def fmt(v):
        if isinstance(v, float):
            if v != v:
                return "-"
            return f"{v:.3f}" if abs(v) < 10 else (f"{v:.1f}" if abs(v) < 1000 else f"{v:,.0f}")
        return str(v)

    cells = [[fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(x[i]) for x in cells]) for i, c in enumerate(columns)]  # rows may be none
    print(f"\n{title}")
    print("| " + " | ".join(c.ljust(w) for c, w in zip(columns, widths)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for x in cells:
        print("| " + " | ".join(v.ljust(w) for v, w in zip(x, widths)) + " |")


def write_json(path: Optional[str], payload: dict) -> None:
    if path:
        with open(path, "w") as f:
            json.dump(payload, f, indent=2, default=str)


def endless(data):
    """A loader's batches across epoch boundaries (a small folder holds fewer batches than warm-up + timed)."""
    epoch = 0
    while True:
        data.set_position(epoch, 0)
        yield from data
        epoch += 1


def tile_config(cfg: str):
    """A ``--tile-configs`` entry -> (the key tiles it sets, their ``TUNING`` value). ``cfg``: "BM/BN/W" for both
    passes, or "BM/BN/W+BM/BN/W" (the forward's, then the backward's), for key tiles of 128 and 256 (the global
    crops); "S:..." for key tile S only (e.g. 64: the locals)."""
    tile, _, spec = cfg.rpartition(":")
    shapes = [p.split("/") for p in spec.split("+")]
    if len(shapes) > 2 or any(len(s) != 3 or not all(x.isdigit() for x in s) for s in shapes) or \
            not (tile == "" or tile.isdigit()):
        raise SystemExit(f"--tile-configs: {cfg!r} is not BM/BN/W or BM/BN/W+BM/BN/W, optionally after S:")
    shapes = [tuple(int(x) for x in s) for s in shapes]
    return ((int(tile),) if tile else (128, 256)), shapes[0] if len(shapes) == 1 else (shapes[0], shapes[1])


@contextlib.contextmanager
def tile_settings(cfg: str):
    """The tile kernels' module settings as the ``--tile-configs`` entry ``cfg`` sets them (an empty entry: the
    shipped settings), restored on exit."""
    from fastibot.kernels import tile_attention as ta
    saved = dict(ta.TUNING)
    if cfg:
        tiles, blocks = tile_config(cfg)
        ta.TUNING.update({seq: blocks for seq in tiles})
    try:
        yield
    finally:
        ta.TUNING.clear()
        ta.TUNING.update(saved)
