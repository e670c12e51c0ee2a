"""Attention backends behind one interface.

Tokens arrive either dense, ``(B, N, H, Dh)``, or packed: the tokens of many
sequences of possibly different lengths concatenated into ``(T, H, Dh)`` with a
:class:`PackedLayout` that says where each sequence starts. Attention never
crosses a sequence boundary (block-diagonal).

Backends (``model.attention``):

- ``reference``: matmul + softmax + matmul in fp32, the ground truth.
- ``sdpa``: ``F.scaled_dot_product_attention``, once per group of equal-length
  sequences (no padding, no packing inside attention).
- ``mixed``: ``sdpa``, except that on CUDA a group of sequences of at most ``SHORT_TOKENS`` tokens (the
  recipe's 96-px local crops, 37 tokens) runs PyTorch's memory-efficient kernel instead of SDPA's own pick
  (cuDNN flash on Hopper, whose 64–128-row tiles are mostly padding at 37 tokens).
- ``triton``: fastibot's tile-attention kernels (``fastibot.kernels.tile_attention``) for sequences of up to
  ``MAX_SEQ`` (256) tokens, every crop size of the recipe: q, k and v read straight from the qkv projection's
  ``(T, 3, H, Dh)`` buffer, every group's output written into one tensor and the gradient as one tensor (no
  per-size concatenation, no q/k/v gradient stack); SDPA for longer sequences. The kernels run on CUDA with
  bf16/fp16 activations (or in the Triton interpreter on the CPU); elsewhere every group runs SDPA.
- ``varlen``: ``torch.nn.attention.varlen.varlen_attn`` (flash attention with
  cumulative sequence lengths, :func:`cu_seqlens`) over the whole packed batch;
  CUDA, bf16/fp16. It takes packed sequences only: dense calls (the teacher's
  pass over the global crops) run SDPA, which :func:`resolve_backend` logs once,
  and ``model.packed=false`` with varlen is a config error (nothing would run it).
- ``xformers``: ``xformers.ops.memory_efficient_attention`` with a
  ``BlockDiagonalMask`` over the whole packed batch (cached per layout).
- ``auto``: the first backend of a fixed per-device order (``AUTO_ORDER``) that
  can run here, logged once. The order comes from measurements on an H100
  (``benchmarks/RESULTS.md``), not from timing on the machine at hand: ``triton``
  then ``mixed`` on CUDA, ``sdpa`` on the CPU (where ``mixed`` would run SDPA anyway).
"""
from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from typing import Tuple

import torch
import torch.nn.functional as F

log = logging.getLogger("fastibot")

BACKENDS = ("reference", "sdpa", "mixed", "triton", "varlen", "xformers")
# ``mixed``: sequences up to this long run the memory-efficient kernel. Measured on an H100 (one layer's
# fwd+bwd, 64 images, benchmarks/attention.py --groups): 37 tokens 0.55 ms vs SDPA's cuDNN 0.73 (ViT-B),
# 0.29 vs 0.38 (ViT-S); at 197 tokens cuDNN is faster (0.68 vs 1.19). Lengths in between were not measured.
SHORT_TOKENS = 64


class BackendUnavailable(RuntimeError):
    """The requested attention backend cannot run here; the message says why."""


@dataclass(frozen=True)
class PackedLayout:
    """Sequences in token order, as groups ``(count, length)`` of equal length.

    E.g. 2·B global crops of 197 tokens then 10·B local crops of 37 tokens:
    ``PackedLayout(((2 * B, 197), (10 * B, 37)))``.
    """

    groups: Tuple[Tuple[int, int], ...]

    @property
    def total(self) -> int:
        return sum(n * length for n, length in self.groups)

    @property
    def max_len(self) -> int:
        return max(length for n, length in self.groups if n > 0)

    def seqlens(self):
        return [length for n, length in self.groups for _ in range(n)]


def cu_seqlens(layout: PackedLayout) -> torch.Tensor:
    """Sequence start offsets for varlen attention, (number of sequences + 1,) int32 on the CPU:
    ``[0, len_0, len_0 + len_1, ..., layout.total]``; sequence i is tokens ``[cu[i], cu[i + 1])``."""
    lens = torch.tensor([0] + layout.seqlens(), dtype=torch.int32)
    return torch.cumsum(lens, 0, dtype=torch.int32)


@functools.lru_cache(maxsize=32)
def _cu_seqlens(layout: PackedLayout, device: torch.device) -> torch.Tensor:
    return cu_seqlens(layout).to(device)  # once per layout and device: no copy per call


@functools.lru_cache(maxsize=32)
def _xformers_bias(layout: PackedLayout, device: torch.device):
    from xformers.ops import fmha

    bias = fmha.BlockDiagonalMask.from_seqlens(layout.seqlens())
    # Materialise the device-side sequence starts once, not at every call.
    if hasattr(bias, "to"):
        bias = bias.to(device)
    return bias


# ----------------------------------------------------------------------- dense kernels


def _reference_dense(q, k, v):
    """(B, N, H, Dh) -> (B, N, H, Dh) with an explicit fp32 softmax."""
    scale = q.shape[-1] ** -0.5
    qf, kf, vf = (t.float().transpose(1, 2) for t in (q, k, v))  # (B, H, N, Dh)
    attn = torch.softmax((qf * scale) @ kf.transpose(-2, -1), dim=-1)
    return (attn @ vf).transpose(1, 2).to(q.dtype)


def _sdpa_dense(q, k, v):
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)


def _mixed_dense(q, k, v):
    if not q.is_cuda or q.shape[1] > SHORT_TOKENS:
        return _sdpa_dense(q, k, v)
    # the op SDPA itself dispatches to when it picks this kernel; called directly, the pick is ours. The last
    # argument computes the log-sum-exp the backward needs: short sequences are the student's local crops,
    # which always take a backward (the teacher sees only the 197-token globals)
    out = torch.ops.aten._scaled_dot_product_efficient_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), None, True)[0]
    return out.transpose(1, 2)


def _per_group(fn, q, k, v, layout: PackedLayout):
    """Run a dense kernel on each group of equal-length sequences of a packed batch."""
    outs, start = [], 0
    for n, length in layout.groups:
        if n == 0:
            continue
        stop = start + n * length
        shape = (n, length) + q.shape[1:]
        outs.append(fn(q[start:stop].view(shape), k[start:stop].view(shape), v[start:stop].view(shape))
                    .reshape((n * length,) + q.shape[1:]))
        start = stop
    return outs[0] if len(outs) == 1 else torch.cat(outs, 0)


def _tile_takes(qkv: torch.Tensor, length: int) -> bool:
    """Whether ``triton`` runs sequences of ``length`` tokens from this qkv buffer on the tile kernels."""
    from fastibot.kernels import interpreting
    from fastibot.kernels.tile_attention import fits

    if qkv.is_cuda:
        if qkv.dtype not in (torch.float16, torch.bfloat16):
            return False
    elif not interpreting():
        return False
    return fits(length, qkv.shape[-1])


def _triton_qkv(qkv: torch.Tensor, layout: PackedLayout | None):
    """``triton`` on a dense ``(B, N, 3, H, Dh)`` or packed ``(T, 3, H, Dh)`` qkv buffer: runs of consecutive
    groups that the tile kernels take go through one op each, the other groups through SDPA."""
    from fastibot.kernels.tile_attention import tile_attention

    if layout is None:  # one group of B sequences
        b, n = qkv.shape[:2]
        out = _triton_qkv(qkv.reshape((b * n,) + qkv.shape[2:]), PackedLayout(((b, n),)))
        return out.view(qkv.shape[:2] + qkv.shape[3:])
    outs, start, run = [], 0, []  # run: consecutive tile groups not yet computed

    def flush(stop):
        if run:
            first = stop - sum(c * n for c, n in run)
            outs.append(tile_attention(qkv[first:stop], tuple(run)))
            run.clear()

    for count, length in layout.groups:
        if count == 0:
            continue
        if _tile_takes(qkv, length):
            run.append((count, length))
        else:
            flush(start)
            part = qkv[start: start + count * length]
            outs.append(_per_group(_sdpa_dense, *part.unbind(-3), PackedLayout(((count, length),))))
        start += count * length
    flush(start)
    return outs[0] if len(outs) == 1 else torch.cat(outs, 0)


def _triton_dense(q, k, v):
    """``triton`` on separate (B, N, H, Dh) q, k and v (``attention``'s callers): a sequence length the tile
    kernels take is stacked into the buffer they read (the copy ``attention_qkv`` avoids), others run SDPA."""
    if not _tile_takes(q, q.shape[1]):
        return _sdpa_dense(q, k, v)
    return _triton_qkv(torch.stack((q, k, v), -3), None)


def _varlen_packed(q, k, v, layout: PackedLayout):
    from torch.nn.attention.varlen import varlen_attn

    cu = _cu_seqlens(layout, q.device)
    return varlen_attn(q, k, v, cu, cu, layout.max_len, layout.max_len)


def _xformers_packed(q, k, v, layout: PackedLayout):
    from xformers.ops import memory_efficient_attention

    bias = _xformers_bias(layout, q.device)
    return memory_efficient_attention(q[None], k[None], v[None], attn_bias=bias)[0]


def _xformers_dense(q, k, v):
    from xformers.ops import memory_efficient_attention

    return memory_efficient_attention(q, k, v)


# ------------------------------------------------------------------------ availability


def _probe(fn, device: torch.device, dtype: torch.dtype) -> None:
    """Run a tiny packed call; raise BackendUnavailable with the reason if it fails."""
    layout = PackedLayout(((2, 5), (1, 3)))
    q = torch.randn(layout.total, 2, 16, device=device, dtype=dtype)
    fn(q, q, q, layout)


@functools.lru_cache(maxsize=16)
def check_backend(name: str, device_type: str, dtype: torch.dtype = torch.bfloat16) -> None:
    """Raise :class:`BackendUnavailable` (saying why) if ``name`` cannot run on ``device_type``."""
    if name in ("reference", "sdpa", "mixed"):
        return
    if name == "triton":
        try:
            from fastibot.kernels import interpreting
            from fastibot.kernels.tile_attention import tile_attention  # noqa: F401
        except ImportError as e:
            raise BackendUnavailable(f"model.attention=triton needs Triton: {e}") from None
        if device_type != "cuda" and not interpreting():
            raise BackendUnavailable("model.attention=triton runs Triton kernels, which need a CUDA device "
                                     "(or TRITON_INTERPRET=1 on the CPU)")
        if device_type == "cuda" and dtype not in (torch.float16, torch.bfloat16):
            raise BackendUnavailable("model.attention=triton needs bf16 or fp16 activations "
                                     "(runtime.precision=bf16|fp16)")
        try:
            qkv = torch.randn(7, 3, 2, 16, device=device_type, dtype=dtype)
            _triton_qkv(qkv, PackedLayout(((1, 5), (1, 2))))
        except Exception as e:  # the reason goes into the message
            raise BackendUnavailable(f"model.attention=triton failed a test call: {e}") from None
        return
    if name == "varlen":
        try:
            from torch.nn.attention.varlen import varlen_attn  # noqa: F401
        except ImportError as e:
            raise BackendUnavailable(
                f"model.attention=varlen needs torch.nn.attention.varlen (torch >= 2.10); "
                f"this torch {torch.__version__} has none ({e})") from None
        if device_type != "cuda":
            raise BackendUnavailable("model.attention=varlen runs flash attention, which needs a CUDA device")
        if dtype not in (torch.float16, torch.bfloat16):
            raise BackendUnavailable("model.attention=varlen needs bf16 or fp16 activations "
                                     "(runtime.precision=bf16|fp16)")
        try:
            _probe(_varlen_packed, torch.device("cuda"), dtype)
        except Exception as e:  # the reason goes into the message
            raise BackendUnavailable(f"model.attention=varlen failed a test call: {e}") from None
        return
    if name == "xformers":
        try:
            import xformers.ops  # noqa: F401
        except Exception as e:
            raise BackendUnavailable(
                f"model.attention=xformers needs the xformers package (pip install 'fastibot[xformers]'): {e}"
            ) from None
        try:
            _probe(_xformers_packed, torch.device(device_type), dtype)
        except Exception as e:
            raise BackendUnavailable(
                f"model.attention=xformers: memory_efficient_attention cannot run on {device_type} "
                f"with {dtype}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
        return
    raise BackendUnavailable(f"model.attention: unknown backend {name!r} (one of auto, {', '.join(BACKENDS)})")


# ``auto`` takes the first of these that check_backend accepts. Measured on an H100
# (benchmarks/RESULTS.md): for the recipe's two crop sizes, attention once per size is the
# fastest (15.7 ms vs 18.7 for varlen over ViT-S's 12 layers, fwd+bwd, 64 images), and
# ``mixed`` (the memory-efficient kernel for the 37-token local crops) made the whole
# compiled, captured step 3.1% faster than ``sdpa`` for ViT-S (1,542 vs 1,495 img/s) and
# 1.4% for ViT-B (649 vs 640), same call; ``triton`` with fastibot's tile kernels on the locals
# (cuDNN for the globals) beat ``mixed`` by 2.1% for ViT-S (1,810 vs 1,773) and 1.1% for ViT-B
# (713 vs 705), same call; with the kernels on both sizes ``triton`` ran 2.4% faster again for
# ViT-S at 0.36 GiB less (1,846 vs 1,803 img/s, 6.76 vs 7.12 GiB) and 2.7% for ViT-B (719 vs 700),
# same H100 host. Where triton cannot run (fp32 activations on CUDA), mixed. varlen and xformers
# stay explicit choices (they pay off with many sizes).
AUTO_ORDER = {"cuda": ("triton", "mixed", "sdpa"), "cpu": ("sdpa",)}


def resolve_backend(name: str, device_type: str, dtype: torch.dtype = torch.bfloat16) -> str:
    """Turn ``auto`` into a concrete backend; check that a named one can run. Logs what runs where."""
    if name == "auto":
        order = AUTO_ORDER.get(device_type, ("sdpa",))
        reasons = []
        for cand in order:
            try:
                check_backend(cand, device_type, dtype)
            except BackendUnavailable as e:
                reasons.append(str(e))
                continue
            log.info("model.attention=auto: %s (the first of the fixed order %s that runs on %s)",
                     cand, ", ".join(order), device_type)
            return cand
        raise BackendUnavailable(f"model.attention=auto: no backend of {', '.join(order)} runs on "
                                 f"{device_type}: {'; '.join(reasons)}")
    check_backend(name, device_type, dtype)
    if name == "varlen":
        log.info("model.attention=varlen: varlen_attn runs the packed student pass; dense attention "
                 "(the teacher over the global crops) runs SDPA, as varlen_attn takes packed sequences only")
    return name


# varlen has no dense form: dense calls run SDPA (logged by resolve_backend, see the module docstring)
_DENSE = {"reference": _reference_dense, "sdpa": _sdpa_dense, "mixed": _mixed_dense, "varlen": _sdpa_dense,
          "xformers": _xformers_dense, "triton": _triton_dense}
_PACKED = {
    "reference": functools.partial(_per_group, _reference_dense),
    "sdpa": functools.partial(_per_group, _sdpa_dense),
    "mixed": functools.partial(_per_group, _mixed_dense),
    "varlen": _varlen_packed,
    "xformers": _xformers_packed,
    "triton": functools.partial(_per_group, _triton_dense),
}


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str, layout: PackedLayout | None = None):
    """Multi-head attention: dense ``(B, N, H, Dh)`` or packed ``(T, H, Dh)`` with ``layout``."""
    if layout is None:
        return _DENSE[backend](q, k, v)
    return _PACKED[backend](q, k, v, layout)


def attention_qkv(qkv: torch.Tensor, backend: str, layout: PackedLayout | None = None):
    """Multi-head attention from the qkv projection's output: dense ``(B, N, 3, H, Dh)`` -> ``(B, N, H, Dh)``,
    or packed ``(T, 3, H, Dh)`` with ``layout`` -> ``(T, H, Dh)``. ``triton`` reads the buffer in place; the
    other backends take its q, k and v views."""
    if backend == "triton":
        return _triton_qkv(qkv, layout)
    q, k, v = qkv.unbind(-3)
    return attention(q, k, v, backend, layout)
