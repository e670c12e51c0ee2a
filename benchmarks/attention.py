"""Attention backends on the iBOT multi-crop shapes: attention alone and the whole student.

    python benchmarks/attention.py [--xformers-pt-shim] [--json out.json]
    python benchmarks/attention.py --groups [--arch vit_base]

For ViT-S/16 and ViT-B/16 with 64 images (2 masked globals of 197 tokens and
10 locals of 37 tokens each), every backend runs the packed student
(block-diagonal attention over all 768 crops at once); ``sdpa (unpacked)``
runs the globals and the locals as two dense batches, as the official code
does. Columns: attention fwd+bwd over all 12 layers' shapes (one layer's call
x depth), whole student backbone fwd+bwd, peak memory.

``--groups`` times one layer's attention for each crop size alone (the 2·B globals of 197 tokens, the
10·B locals of 37), forward + backward from a packed ``(T, 3, H, Dh)`` qkv buffer as the model holds it (so
the gradient's copy back into that buffer is counted), by each SDPA kernel and by a compiled
matmul-softmax-matmul (fp32 softmax) and by fastibot's tile kernels (``--tile-configs`` adds block shapes),
replayed as a CUDA graph; then the packed layer with both sizes, ``mixed`` against ``triton``.

``--xformers-pt-shim`` marks xformers as built with CUDA so that its ``-pt``
operators (which call PyTorch's own flash and memory-efficient kernels) can
run where xformers' compiled extension does not load; it is off by default.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))  # a source checkout works without installing
from common import device_info, peak_mib, print_table, tile_config, tile_settings, time_ms, write_json  # noqa: E402

from fastibot.data.masking import MaskGenerator  # noqa: E402
from fastibot.models.attention import BackendUnavailable, PackedLayout, attention, check_backend  # noqa: E402
from fastibot.models.vit import VisionTransformer  # noqa: E402


def enable_xformers_pt_shim() -> str:
    """Let xformers' PyTorch-backed operators run when its C++ extension failed to load."""
    import xformers.ops.fmha.common as common

    common._built_with_cuda = True
    check_backend.cache_clear()
    return "xformers (-pt ops, shim)"


def _inputs(b, dev):
    import random
    gen = MaskGenerator([0.0, 0.3], [0.0, 0.2])
    masks = gen.batch(2 * b, 14, 14, random.Random(0)).reshape(2 * b, -1).to(dev)
    return (torch.randn(2 * b, 3, 224, 224, device=dev), masks, torch.randn(10 * b, 3, 96, 96, device=dev))


def bench_arch(arch, b, backends, rows):
    dev = "cuda"
    model = VisionTransformer(arch, 16, 224, drop_path_rate=0.1).to(dev)
    g, m, loc = _inputs(b, dev)
    layout = PackedLayout(((2 * b, 197), (10 * b, 37)))
    h, dh = model.num_heads, model.embed_dim // model.num_heads
    qkv = [torch.randn(layout.total, h, dh, device=dev, dtype=torch.bfloat16, requires_grad=True) for _ in range(3)]
    ref_ms = None
    for label, backend, packed in backends:
        try:
            check_backend(backend, "cuda", torch.bfloat16)
        except BackendUnavailable as e:
            rows.append({"arch": arch, "backend": label, "note": str(e)[:90]})
            continue
        model.set_attention_backend(backend)

        def attn_step():
            out = attention(*qkv, backend, layout)
            out.backward(torch.ones_like(out))

        def student_step():
            with torch.autocast("cuda", dtype=torch.bfloat16):
                if packed:
                    tokens, _ = model.forward_packed([g, loc], [m, None])
                    loss = tokens.float().square().mean()
                else:
                    loss = model.forward_features(g, m).float().square().mean() + \
                        model.forward_features(loc).float().square().mean()
            loss.backward()
            model.zero_grad(set_to_none=True)

        try:
            a_ms = time_ms(attn_step) * model.blocks.__len__()
            s_ms = time_ms(student_step, warmup=3, rep=10)
            mem = peak_mib(student_step)
        except Exception as e:  # reported in the table, not hidden
            rows.append({"arch": arch, "backend": label, "note": f"failed: {type(e).__name__}: {str(e)[:70]}"})
            continue
        ref_ms = ref_ms or s_ms
        rows.append({"arch": arch, "backend": label, "attn fwd+bwd ms (all layers)": a_ms,
                     "student fwd+bwd ms": s_ms, "x vs first": ref_ms / s_ms, "peak MiB": mem, "note": ""})


def _matmul_attention(q, k, v):
    """(n, L, H, Dh) -> (n, L, H, Dh): the explicit form, bf16 matmuls with an fp32 softmax."""
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    s = (q @ k.transpose(-2, -1)).float() * q.shape[-1] ** -0.5
    return (torch.softmax(s, -1).to(v.dtype) @ v).transpose(1, 2)


def bench_groups(arch: str, b: int, rows: list, tile_configs=()) -> None:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from common import time_graph_ms

    from fastibot.models.attention import _sdpa_dense
    from fastibot.models.vit import ARCHS
    dim = ARCHS[arch]["embed_dim"]
    h = ARCHS[arch]["num_heads"]
    dh = dim // h

    def via_sdpa(kernel):
        def fn(q, k, v):
            with sdpa_kernel([kernel]):
                return _sdpa_dense(q, k, v)
        return fn

    def from_qkv(fn):  # the SDPA-style kernels take q, k and v views of the buffer
        return lambda qkv, groups: fn(*qkv.view(groups[0][0], groups[0][1], 3, h, dh).unbind(2))

    ways = [("sdpa default", from_qkv(_sdpa_dense), None),  # (label, kernel, its --tile-configs entry)
            ("cudnn", from_qkv(via_sdpa(SDPBackend.CUDNN_ATTENTION)), None),
            ("flash", from_qkv(via_sdpa(SDPBackend.FLASH_ATTENTION)), None),
            ("efficient", from_qkv(via_sdpa(SDPBackend.EFFICIENT_ATTENTION)), None),
            ("matmul, compiled", from_qkv(torch.compile(_matmul_attention, fullgraph=True, dynamic=False)), None)]
    from fastibot.kernels import tile_attention as ta
    reach = {}  # label -> the key tiles its configuration sets
    for cfg in tile_configs or [None]:
        label = f"fastibot tile {cfg or 'default'}"
        ways.append((label, ta.tile_attention, cfg))
        if cfg:
            reach[label] = tile_config(cfg)[0]
    for n, length in ((2 * b, 197), (10 * b, 37)):
        qkv = torch.randn(n * length, 3, h, dh, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        flop = 4 * n * h * length * length * dh * 3.5  # forward 2 matmuls, backward 2.5x
        expected = _sdpa_dense(*qkv.detach().view(n, length, 3, h, dh).unbind(2)).float()
        for label, fn, cfg in ways:
            if label in reach and ta.seq_tile(length) not in reach[label]:
                label += " (defaults at this length)"
            def step():
                fn(qkv, ((n, length),)).sum().backward()
            def forward():  # the teacher's pass: no gradient
                with torch.no_grad():
                    fn(qkv.detach(), ((n, length),))
            try:
                with tile_settings(cfg):  # in force for the captured backward too
                    err = (fn(qkv.detach(), ((n, length),)).float().reshape(expected.shape)
                           - expected).abs().max().item()
                    ms = time_graph_ms(step, rep=20)
                    fwd_ms = time_graph_ms(forward, rep=20)
            except Exception as e:  # noqa: BLE001 - reported in the table
                ms = fwd_ms = err = float("nan")
                print(f"{label} {n}x{length}: {type(e).__name__}: {e}")
            rows.append({"arch": arch, "crops": f"{n} x {length} tokens", "kernel": label,
                         "fwd+bwd ms (one layer)": ms, "fwd ms": fwd_ms,
                         "TFLOP/s": flop / (ms * 1e9) if ms == ms else ms, "max |out - sdpa|": err})
            qkv.grad = None
    # the student's layer as the packed model runs it: both sizes in one buffer, the outputs and the gradient
    # in one tensor each (tile) against SDPA per size with the outputs concatenated (mixed)
    from fastibot.models.attention import PackedLayout, attention_qkv
    layout = PackedLayout(((2 * b, 197), (10 * b, 37)))
    qkv = torch.randn(layout.total, 3, h, dh, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    for label, backend in (("packed layer: mixed", "mixed"), ("packed layer: triton (tile)", "triton")):
        ms = time_graph_ms(lambda: attention_qkv(qkv, backend, layout).sum().backward(), rep=20)
        rows.append({"arch": arch, "crops": "both sizes, packed", "kernel": label, "fwd+bwd ms (one layer)": ms})
        qkv.grad = None


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--xformers-pt-shim", action="store_true")
    ap.add_argument("--groups", action="store_true", help="each crop size's attention alone, by kernel")
    ap.add_argument("--arch", default="", choices=("", "vit_small", "vit_base", "vit_large"),
                    help="--groups: one architecture (default: ViT-S and ViT-B)")
    ap.add_argument("--tile-configs", default="",
                    help="--groups: comma-separated BM/BN/W block shapes for the tile kernels on the global crops "
                         "(BM/BN/W+BM/BN/W: the forward's, then the backward's), or S:... for key tile S only "
                         "(e.g. 64/64/8,64/32/4+64/64/8,64:64/64/4+64/64/8)")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("benchmarks/attention.py needs a CUDA GPU")
    info = device_info()
    print(" | ".join(f"{k}: {v}" for k, v in info.items()))
    if args.groups:
        rows = []
        for arch in ([args.arch] if args.arch else ["vit_small", "vit_base"]):
            bench_groups(arch, args.batch, rows, [c for c in args.tile_configs.split(",") if c])
        print_table(f"attention per crop size, one layer, {args.batch} images, bf16, CUDA graph", rows,
                    ["arch", "crops", "kernel", "fwd+bwd ms (one layer)", "fwd ms", "TFLOP/s", "max |out - sdpa|"])
        write_json(args.json, {"device": info, "rows": rows})
        return
    xf_label = "xformers"
    if args.xformers_pt_shim:
        try:
            xf_label = enable_xformers_pt_shim()
        except ImportError as e:
            print(f"xformers not importable: {e}")
    backends = [("sdpa (unpacked)", "sdpa", False), ("sdpa (per size)", "sdpa", True),
                ("varlen", "varlen", True), (xf_label, "xformers", True), ("reference", "reference", True)]
    rows = []
    for arch in ("vit_small", "vit_base"):
        bench_arch(arch, args.batch, backends, rows)
    print_table(f"attention backends, {args.batch} images (2x224 masked + 10x96), bf16", rows,
                ["arch", "backend", "attn fwd+bwd ms (all layers)", "student fwd+bwd ms", "x vs first", "peak MiB",
                 "note"])
    write_json(args.json, {"device": info, "rows": rows})


if __name__ == "__main__":
    main()
