"""Registers and spills of the tile-attention kernels per block shape, compiled for a GPU without one.

    python benchmarks/kernel_resources.py --warps 4,8
    python benchmarks/kernel_resources.py --configs 37:64/64,197:64/32+64/64 --sm 90

Compiles each kernel with Triton for ``sm_<SM>`` (no GPU needed: ``triton.compile`` with a ``GPUTarget``)
and reads the register count and spill bytes from the ``ptxas -v`` that ships with Triton. On Hopper a
program of 4 warps at 255 registers leaves room for two programs per SM; a spilling one pays local-memory
traffic. This is a compile-time reading, not a timing: it narrows which block shapes are worth device time
(``benchmarks/attention.py --groups --tile-configs`` times them). Each configuration ``L:BM/BN`` is a sequence
length (37: the locals, 197: the globals) and the blocks of ``kernels/tile_attention.py``; one row per kernel
the op launches for it.
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

from common import print_table, tile_settings, write_json  # noqa: E402

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
    # what a launch specialises on: 16-byte-aligned pointers and strides that are multiples of 16 (the recipe's
    # heads of 64 features); the lengths and head counts are not
    aligned = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names) if n not in constexprs and
               (n.endswith("_ptr") or n.startswith(("s_", "o_", "g_", "d_")))}
    src = ASTSource(fn=fn, signature=_signature(fn, constexprs),
                    constexprs={(names.index(k),): v for k, v in constexprs.items()}, attrs=aligned)
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


LABELS = {"_tile_attn_fwd": "forward", "_tile_attn_bwd_kv": "dK/dV", "_tile_attn_bwd_q": "dQ"}


def rows_for(config: str, warps: int, head_dim: int, sm: int):
    """One row per kernel launch of the op for ``config`` = "L:BM/BN" or "L:BM/BN+BM/BN" (L the sequence length;
    the forward's blocks, then the backward's): the op's own launch plan with these blocks in ``TUNING``."""
    length, _, shapes = config.partition(":")
    length = int(length)
    seq = ta.seq_tile(length)
    fwd, _, bwd = shapes.partition("+")
    entry = f"{seq}:{fwd}/{warps}+{bwd or fwd}/{warps}"  # --tile-configs' syntax
    with tile_settings(entry):
        plan = ta._plan(length) + ta._plan(length, backward=True)
    for kernel, _, meta, _ in plan:
        label = LABELS[kernel.fn.__name__] + (" + dQ" if meta.get("WITH_DQ") else "")
        yield {"length": length, "blocks": shapes, "warps": warps, "kernel": label,
               "program rows": meta["BLOCK_N"] if kernel is ta._tile_attn_bwd_kv else meta["BLOCK_M"],
               "loops": bool(meta.get("LOOP_N", meta.get("LOOP_M", True))),
               **ptxas_info(kernel, dict(meta, D=head_dim, F32=False), warps, sm)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", default="37:64/64,197:64/32+64/64,197:64/64,197:128/64",
                    help="comma-separated L:BM/BN (sequence length L, query block BM, key block BN), or "
                         "L:BM/BN+BM/BN (the forward's blocks, then the backward's)")
    ap.add_argument("--warps", default="4,8", help="comma-separated warp counts")
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--sm", type=int, default=90, help="compute capability, e.g. 90 (Hopper), 80 (Ampere)")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    rows = [r for w in args.warps.split(",") if w for c in args.configs.split(",") if c
            for r in rows_for(c, int(w), args.head_dim, args.sm)]
    print_table(f"tile attention, head size {args.head_dim}, compiled for sm_{args.sm} by triton "
                f"{triton.__version__} (registers per thread; spill bytes)", rows,
                ["length", "blocks", "warps", "kernel", "program rows", "loops", "registers", "spill stores",
                 "spill loads"])
    write_json(args.json, {"triton": triton.__version__, "sm": args.sm, "rows": rows})
    return rows


if __name__ == "__main__":
    main()
