"""Compile every Triton launch fastibot's ops make, for Hopper (sm_90), on a machine without a GPU.

Run as a script (``tests/test_kernel_compile.py`` does): the kernels are defined compiled, not interpreted, and
each launch is intercepted before it would reach a driver: its arguments become a Triton signature and
``triton.compile`` builds it for ``GPUTarget("cuda", 90, 32)``, down to PTX. What the interpreter accepts and the
compiler refuses (a plain module global read inside a kernel, a type the code generator rejects) fails here.
The ops run on small CPU tensors; their outputs are not looked at (no kernel runs). Prints one JSON line:
[{"kernel", "ptx lines"} or {"kernel", "error"}] per launch.
"""
import inspect
import json
import os
import sys
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "0"  # decided when the kernels are defined
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

TYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64",
         torch.int64: "i64", torch.int32: "i32", torch.int16: "i16", torch.int8: "i8", torch.uint8: "u8",
         torch.bool: "i1"}
OPTIONS = ("num_warps", "num_stages", "enable_fp_fusion")
results = []


def _type(value) -> str:
    if isinstance(value, torch.Tensor):
        return "*" + TYPES[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -2 ** 31 <= value < 2 ** 31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"no Triton type for {type(value).__name__}")


def _compile(self, *args, grid, warmup, **kwargs):
    """Stands in for ``JITFunction.run``: compile this launch for sm_90 instead of running it."""
    names = self.arg_names
    options = {k: kwargs.pop(k) for k in OPTIONS if k in kwargs}
    bound = dict(zip(names, args), **kwargs)
    for p in self.params:  # defaults of arguments the launch left out
        if p.name not in bound and p.default is not inspect.Parameter.empty:
            bound[p.name] = p.default
    const = {p.name for p in self.params if p.is_constexpr}
    signature, constexprs = {}, {}
    for i, name in enumerate(names):
        value = bound[name]
        if name in const or value is None:
            signature[name] = "constexpr"
            constexprs[(i,)] = value
        else:
            signature[name] = _type(value)
    try:
        k = triton.compile(ASTSource(fn=self, signature=signature, constexprs=constexprs),
                           target=GPUTarget("cuda", 90, 32), options=options)
        results.append({"kernel": self.__name__, "ptx lines": k.asm["ptx"].count("\n")})
    except Exception as e:  # report every launch, not only the first failure
        results.append({"kernel": self.__name__, "error": f"{type(e).__name__}: {e}"[:2000]})


def run_ops():
    from fastibot.kernels import block_mask, distill_ce, ema, tile_attention
    from fastibot.kernels import fused_update
    from fastibot.kernels.fused_update import FusedUpdate

    g = torch.Generator().manual_seed(0)
    # the two losses: masked-patch rows and [CLS] pairs, bf16 logits as under autocast
    s = torch.randn(37, 1000, generator=g).bfloat16().requires_grad_()
    t = torch.randn(37, 1000, generator=g).bfloat16()
    loss = distill_ce.distill_ce(s, t, torch.rand(37, generator=g), torch.zeros(1000), teacher_temp=0.05)
    loss.backward()
    sc = torch.randn(4 * 3, 1000, generator=g).bfloat16().requires_grad_()
    tc = torch.randn(2 * 3, 1000, generator=g).bfloat16()
    distill_ce.cls_distill_loss(sc, tc, torch.zeros(1000), n_global=2, teacher_temp=0.05).backward()
    # the EMA, the fused update (both its paths), the block masks
    tf, sf = torch.randn(1000), torch.randn(1000)
    ema.ema_update_(tf, sf, 0.99, block=ema.BLOCK)  # the GPU block (CPU tensors would pick the interpreter's)
    for shapes in (((36, 8), (8,)), ((37, 5), (7,))):
        params = [torch.nn.Parameter(torch.randn(sh, generator=g)) for sh in shapes]
        teach = [torch.nn.Parameter(torch.randn(sh, generator=g)) for sh in shapes]
        s_flat, t_flat = ema.flatten_params_(params), ema.flatten_params_(teach)
        fused = FusedUpdate(s_flat, t_flat, params, params, [True, False], [False, False], block=fused_update.BLOCK)
        fused.set_grads([torch.randn(p.shape, generator=g) for p in params])
        one = torch.tensor(1.0)
        fused(torch.ones(len(params)), one * 1e-3, one * 0.04, one * 0, one * 0, one * 0.99, one * 0.01)
    ratios = block_mask.sample_ratios(6, [0.0, 0.3], [0.0, 0.2], generator=g)
    block_mask.block_masks(ratios, 14, 14, seed=3)
    # tile attention, bf16: the 37- and 197-token crops (one block; row blocks looped, dQ in its own kernel)
    for groups in (((3, 37),), ((2, 197),)):
        T = sum(c * n for c, n in groups)
        qkv = torch.randn(T, 3, 2, 64, generator=g).bfloat16().requires_grad_()
        tile_attention.tile_attention(qkv, groups).float().sum().backward()


if __name__ == "__main__":
    JITFunction.run = _compile
    run_ops()
    print(json.dumps(results))
