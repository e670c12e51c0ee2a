"""Registers and spills of the tile-attention kernels per block shape, compiled for a GPU without one.

    python benchmarks/kernel_resources.py --warps 4,8
    python benchmarks/kernel_resources.py --configs 64:64/64/4,256:64/64/8 --sm 90

Compiles each kernel with Triton for ``sm_<SM>`` (no GPU needed: ``triton.compile`` with a ``GPUTarget``)
and reads the register count and spill bytes from the ``ptxas -v`` that ships with Triton. On Hopper a
program of 4 warps at 255 registers leaves room for two programs per SM; a spilling one pays local-memory
traffic. This is a compile-time reading, not a timing: it narrows which block shapes are worth device time
(``benchmarks/attention.py --groups --tile-configs`` times them). Each configuration ``S:BM/BN`` is the key
tile S (64: the 37-token locals, 256: the 197-token globals) and the blocks of ``kernels/tile_attention.py``.
"""
from __future__ import annotations

import argparse
import inspect
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ["TRITON_INTERPRET"] = "0"  # compiled kernels, not the interpreter's (decided when they are defined)

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from common import print_table, write_json  # noqa: E402

from fastibot.kernels import tile_attention as ta  # noqa: E402

FLOATS = ("scale_log2", "scale")


def _signature(fn, constexprs: dict) -> dict:
    """Triton types of ``fn``'s arguments: bf16 tensors, an fp32 log-sum-exp, fp32 scales, i32 the rest."""
    sig = {}
    for name in inspect.signature(fn.fn).parameters:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name == "lse_ptr":
            sig[name] = "*fp32"
        elif name.endswith("_ptr"):
            sig[name] = "*bf16"
        else:
            sig[name] = "fp32" if name in FLOATS else "i32"
    return sig


def ptxas_info(fn, constexprs: dict, warps: int, sm: int) -> dict:
    """{"registers", "spill stores", "spill loads"} of ``fn`` compiled for ``sm_<sm>`` with ``warps`` warps."""
    names = list(inspect.signature(fn.fn).parameters)
    src = ASTSource(fn=fn, signature=_signature(fn, constexprs),
                    constexprs={(names.index(k),): v for k, v in constexprs.items()})
    compiled = triton.compile(src, target=GPUTarget("cuda", sm, 32), options={"num_warps": warps})
    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    with tempfile.TemporaryDirectory() as tmp:
        ptx = os.path.join(tmp, "kernel.ptx")
        Path(ptx).write_text(compiled.asm["ptx"])
        arch = f"sm_{sm}a" if sm >= 90 else f"sm_{sm}"
        out = subprocess.run([str(ptxas), "-v", "--gpu-name", arch, ptx, "-o", os.devnull],
                             capture_output=True, text=True, check=True).stderr
    regs = re.search(r"Used (\d+) registers", out)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", out)
    if not regs or not spills:
        raise RuntimeError(f"no register report in ptxas' output:\n{out}")
    return {"registers": int(regs.group(1)), "spill stores": int(spills.group(1)),
            "spill loads": int(spills.group(2))}


def rows_for(config: str, warps: int, head_dim: int, sm: int):
    """One row per kernel the op launches for ``config`` = "S:BM/BN" (S the key tile)."""
    tile, _, shape = config.partition(":")
    seq = int(tile)
    bm, bn = (int(x) for x in shape.split("/"))
    bm, bn = min(bm, seq), min(bn, seq)
    base = dict(SEQ=seq, BLOCK_M=bm, BLOCK_N=bn, D=head_dim, F32=False)
    whole = bn >= seq  # as the launcher decides for a sequence that fills its tile
    kernels = [("forward", ta._tile_attn_fwd, base),
               ("dK/dV" + (" + dQ" if whole else ""), ta._tile_attn_bwd_kv, dict(base, WITH_DQ=whole))]
    if not whole:
        kernels.append(("dQ", ta._tile_attn_bwd_q, base))
    for label, fn, constexprs in kernels:
        yield {"tile": seq, "blocks": f"{bm}/{bn}", "warps": warps, "kernel": label,
               **ptxas_info(fn, constexprs, warps, sm)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", default="64:64/64,256:64/64,256:64/32,256:128/64",
                    help="comma-separated S:BM/BN (key tile S, query block BM, key block BN)")
    ap.add_argument("--warps", default="4,8", help="comma-separated warp counts")
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--sm", type=int, default=90, help="compute capability, e.g. 90 (Hopper), 80 (Ampere)")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    rows = [r for w in args.warps.split(",") if w for c in args.configs.split(",") if c
            for r in rows_for(c, int(w), args.head_dim, args.sm)]
    print_table(f"tile attention, head size {args.head_dim}, compiled for sm_{args.sm} by triton "
                f"{triton.__version__} (registers per thread; spill bytes)", rows,
                ["tile", "blocks", "warps", "kernel", "registers", "spill stores", "spill loads"])
    write_json(args.json, {"triton": triton.__version__, "sm": args.sm, "rows": rows})
    return rows


if __name__ == "__main__":
    main()
