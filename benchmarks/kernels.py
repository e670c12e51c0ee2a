"""Fused iBOT kernels against eager PyTorch: distillation CE (patch rows and [CLS]) and the EMA.

    python benchmarks/kernels.py [--json out.json] [--no-compile]

Distillation CE floor (bf16 in): read S and T, write dS -> 6·M·K bytes for
fwd+bwd (the backward scale is skipped when grad_output == 1). [CLS]: the V·B
student rows are read and written once, the G·B teacher rows read once. EMA
floor (fp32): read θt, θs, write θt -> 12 bytes per parameter. Percentages are
of the device-to-device copy bandwidth measured in the same run.
"""
from __future__ import annotations

import argparse
import copy
import itertools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))  # a source checkout works without installing
from common import (copy_bandwidth_gbs, device_info, peak_mib, print_table, time_graph_ms, time_ms,  # noqa: E402
                    write_json)

from fastibot.config import Config  # noqa: E402
from fastibot.kernels import distill_ce as dce  # noqa: E402
from fastibot.kernels.distill_ce import cls_distill_loss, distill_ce  # noqa: E402
from fastibot.kernels.ema import FlatEMA  # noqa: E402
from fastibot.loss import cls_loss_reference, weighted_ce_reference  # noqa: E402
from fastibot.models.ibot import build_model  # noqa: E402
from fastibot.teacher import ema_foreach, ema_pairs, ema_reference  # noqa: E402

ROTATE = 3  # input sets cycled between calls so repeated runs do not measure the L2 cache


def _rows_inputs(M, K, dev):
    return [(torch.randn(M, K, device=dev).mul_(3).bfloat16(), torch.randn(M, K, device=dev).mul_(3).bfloat16(),
             torch.rand(M, device=dev) / max(M, 1), torch.randn(K, device=dev) * 0.1) for _ in range(ROTATE)]


def _cls_inputs(V, G, B, K, dev):
    return [(torch.randn(V * B, K, device=dev).mul_(3).bfloat16(), torch.randn(G * B, K, device=dev).mul_(3).bfloat16(),
             torch.randn(1, K, device=dev) * 0.1) for _ in range(ROTATE)]


def _bench(fns: dict, sets, floor_bytes: float, copy_bw: float, label: str, rows: list):
    ref_ms = None
    for impl, (fwd, fwd_bwd) in fns.items():
        it = itertools.cycle(sets)
        try:
            f_ms = time_ms(lambda: fwd(*next(it)))
            fb_ms = time_ms(lambda: fwd_bwd(*next(it)))
            # one graph runs all input sets in turn: each call's inputs left L2 a set ago
            graph_ms = time_graph_ms(lambda: [fwd_bwd(*x) for x in sets], calls=len(sets))
            mem = peak_mib(lambda: fwd_bwd(*sets[0]))
        except Exception as e:  # a backend that fails here is reported, not hidden
            print(f"{label} {impl}: failed: {type(e).__name__}: {e}")
            continue
        gpu_ms = graph_ms if graph_ms == graph_ms else fb_ms
        ref_ms = ref_ms or gpu_ms
        gbs = floor_bytes / (gpu_ms * 1e-3) / 1e9
        rows.append({"shape": label, "impl": impl, "fwd ms": f_ms, "fwd+bwd ms": fb_ms, "graph fwd+bwd ms": graph_ms,
                     "GB/s": gbs, "% copy bw": 100 * gbs / copy_bw, "x vs eager": ref_ms / gpu_ms, "peak MiB": mem})


def _grad_step(loss_fn):
    def run(*args):
        s = args[0].detach().requires_grad_(True)
        loss_fn(s, *args[1:]).backward()
    return run


def bench_distill(copy_bw, compile_eager, rows):
    dev = "cuda"
    for B, K in ((64, 8192), (128, 8192), (64, 65536)):
        M = int(0.15 * 2 * B * 196)
        sets = _rows_inputs(M, K, dev)
        eager = lambda s, t, w, c: weighted_ce_reference(s, t, w, c, teacher_temp=0.07)  # noqa: E731
        fns = {"eager": (eager, _grad_step(eager))}
        if compile_eager:
            comp = torch.compile(weighted_ce_reference, dynamic=False)
            ce = lambda s, t, w, c: comp(s, t, w, c, teacher_temp=0.07)  # noqa: E731
            fns["torch.compile"] = (ce, _grad_step(ce))
        tri = lambda s, t, w, c: distill_ce(s, t, w, c, teacher_temp=0.07)  # noqa: E731
        fns["triton"] = (tri, _grad_step(tri))
        _bench(fns, sets, 6.0 * M * K, copy_bw, f"patch M={M} K={K}", rows)
        del sets
    for B, K in ((64, 8192), (128, 8192), (64, 65536)):
        V, G = 12, 2
        sets = _cls_inputs(V, G, B, K, dev)
        eager = lambda s, t, c: cls_loss_reference(s, t, c, n_global=G, teacher_temp=0.07)  # noqa: E731
        fns = {"eager": (eager, _grad_step(eager))}
        if compile_eager:
            comp = torch.compile(cls_loss_reference, dynamic=False)
            ce = lambda s, t, c: comp(s, t, c, n_global=G, teacher_temp=0.07)  # noqa: E731
            fns["torch.compile"] = (ce, _grad_step(ce))
        tri = lambda s, t, c: cls_distill_loss(s, t, c, n_global=G, teacher_temp=0.07)  # noqa: E731
        fns["triton"] = (tri, _grad_step(tri))
        _bench(fns, sets, 2.0 * (2 * V * B + G * B) * K, copy_bw, f"[CLS] {V}x{B} K={K}", rows)
        del sets


SWEEP = (  # (M, K, grid): neighbourhoods of earlier bests (benchmarks/RESULTS.md); 2 stages never won
    (3763, 8192, dict(warps=(16, 32), prefetch=(False, True), c_regs=(True, False), evict_first=(False, True))),
    (3763, 8192, dict(warps=(16,), per_sm=(2,), prefetch=(False, True))),
    (7526, 8192, dict(warps=(16, 32), prefetch=(False, True))),
    (3763, 2048, dict(warps=(8,), rows=(1, 2, 4), per_sm=(2, 4), prefetch=(False, True))),
    (3763, 65536, dict(rows=(1, 2, 4), per_sm=(1, 2), reverse=(True, False))),
    (3763, 65536, dict(block=(2048,), rows=(4, 8), per_sm=(1, 2))),
)


def sweep(copy_bw):
    """Kernel-only time of the patch-row kernel over launch configurations (picks CONFIGS); each
    configuration's gradient is checked against the default's."""
    from triton.testing import do_bench
    rows = []
    for M, K, grid in SWEEP:
        s, t, w, c = _rows_inputs(M, K, "cuda")[0]
        tt = torch.full((1,), 1 / 14.0, device="cuda")
        base_loss, base_grad = dce._launch_ce(s, t, None, c, w, 1, 0, 10.0, tt, True)
        keys = list(grid)
        for values in itertools.product(*grid.values()):
            over = dict(zip(keys, values))
            try:
                fn = lambda: dce._launch_ce(s, t, None, c, w, 1, 0, 10.0, tt, True, over)  # noqa: E731
                loss, grad = fn()
                diff = (grad.float() - base_grad.float()).abs().max().item()
                ms = do_bench(fn, warmup=10, rep=50, return_mode="median")
            except Exception as e:
                print(f"sweep {M}x{K} {over}: {type(e).__name__}: {str(e)[:80]}")
                continue
            gbs = 6.0 * M * K / (ms * 1e-3) / 1e9
            rows.append({"shape": f"M={M} K={K}", **{k: str(v) for k, v in over.items()}, "kernel ms": ms,
                         "GB/s": gbs, "% copy bw": 100 * gbs / copy_bw, "max |dgrad|": f"{diff:.1e}",
                         "dloss": f"{abs(loss.item() - base_loss.item()):.1e}"})
        rows.sort(key=lambda r: (r["shape"], r["kernel ms"]))
    print_table("patch-row kernel launch configurations (kernel only, do_bench median; |d| against the default)",
                rows, ["shape", "single", "warps", "rows", "per_sm", "block", "prefetch", "c_regs", "evict_first",
                       "reverse", "kernel ms", "GB/s", "% copy bw", "max |dgrad|", "dloss"])
    return rows


def breakdown(M=3763, K=8192):
    """Graph-timed pieces of the patch-row op: the kernel alone, the op's forward, forward + backward."""
    s, t, w, c = _rows_inputs(M, K, "cuda")[0]
    tt = torch.full((1,), 1 / 14.0, device="cuda")
    pieces = {
        "kernel alone": lambda: dce._launch_ce(s, t, None, c, w, 1, 0, 10.0, tt, True),
        "op forward": lambda: distill_ce(s, t, w, c, teacher_temp=0.07),
        "fwd + bwd": lambda: _grad_step(lambda *a: distill_ce(*a, teacher_temp=0.07))(s, t, w, c),
    }
    rows = [{"piece": name, "graph ms": time_graph_ms(fn, rep=50)} for name, fn in pieces.items()]
    print_table(f"patch-row op pieces, M={M} K={K} (CUDA graph, one input set)", rows, ["piece", "graph ms"])
    return rows


def _gpu_ms(fn):
    """CUDA-graph replay time; event timing around host launches where a graph cannot be captured."""
    ms = time_graph_ms(fn, rep=50)
    return ms if ms == ms else time_ms(fn, warmup=3, rep=50)


def bench_ema(copy_bw, rows):
    for arch in ("vit_small", "vit_base"):
        cfg = Config()
        cfg.model.arch = arch
        student = build_model(cfg, student=True).cuda()
        teacher = build_model(cfg, student=False).cuda()
        t_params, s_params = ema_pairs(student, teacher)
        n = sum(p.numel() for p in t_params)
        label = f"{arch} + head: {n / 1e6:.1f}M params, {len(t_params)} tensors"
        ref_ms = None
        impls = {
            "loop (official)": lambda: ema_reference(t_params, s_params, 0.996),
            "foreach lerp": lambda: ema_foreach(t_params, s_params, 0.996),
            "foreach mul+add": lambda: (torch._foreach_mul_(t_params, 0.996),
                                        torch._foreach_add_(t_params, s_params, alpha=0.004)),
        }
        for impl, fn in impls.items():
            with torch.no_grad():  # GPU time (graph replay): a ~0.1 ms update is shorter than its host launch
                ms = _gpu_ms(fn)
            ref_ms = ref_ms or ms
            gbs = 12.0 * n / (ms * 1e-3) / 1e9
            rows.append({"shape": label, "impl": impl, "ms": ms, "GB/s": gbs, "% copy bw": 100 * gbs / copy_bw,
                         "x vs loop": ref_ms / ms})
        for bf16 in (False, True):
            ts, ss = copy.deepcopy(teacher), copy.deepcopy(student)
            tp, sp = ema_pairs(ss, ts)
            flat = FlatEMA(tp, sp, bf16_copy=bf16)
            ms = _gpu_ms(lambda: flat(0.996))
            nbytes = (14.0 if bf16 else 12.0) * n
            gbs = nbytes / (ms * 1e-3) / 1e9
            rows.append({"shape": label, "impl": "triton flat" + (" + bf16 copy" if bf16 else ""), "ms": ms,
                         "GB/s": gbs, "% copy bw": 100 * gbs / copy_bw, "x vs loop": ref_ms / ms})
        del student, teacher


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    ap.add_argument("--only", choices=("distill", "ema"), help="run one kernel's table")
    ap.add_argument("--sweep", action="store_true", help="time the patch kernel's launch configurations first")
    ap.add_argument("--breakdown", action="store_true", help="time the kernel, the op and fwd+bwd separately")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("benchmarks/kernels.py needs a CUDA GPU (the CPU tests cover correctness)")
    info = device_info()
    copy_bw = copy_bandwidth_gbs()
    print(" | ".join(f"{k}: {v}" for k, v in info.items()) + f" | copy bandwidth: {copy_bw:,.0f} GB/s")
    distill_rows, ema_rows, sweep_rows = [], [], []
    if args.sweep:
        sweep_rows = sweep(copy_bw)
    if args.breakdown:
        breakdown()
    if args.only in (None, "distill"):
        bench_distill(copy_bw, not args.no_compile, distill_rows)
        print_table("distillation cross-entropy (bf16 logits, K prototypes); GB/s, % and x from the graph-replayed "
                    "fwd+bwd (GPU time)", distill_rows,
                    ["shape", "impl", "fwd ms", "fwd+bwd ms", "graph fwd+bwd ms", "GB/s", "% copy bw", "x vs eager",
                     "peak MiB"])
    if args.only in (None, "ema"):
        bench_ema(copy_bw, ema_rows)
        print_table("teacher EMA (fp32 parameters)", ema_rows, ["shape", "impl", "ms", "GB/s", "% copy bw", "x vs loop"])
    write_json(args.json, {"device": info, "copy_gbs": copy_bw, "distill": distill_rows, "ema": ema_rows,
                           "sweep": sweep_rows})


if __name__ == "__main__":
    main()
