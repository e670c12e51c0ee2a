"""The tile-attention kernels (``model.attention=triton``) against the fp64 eager reference.

On the CPU the kernels run in Triton's interpreter (conftest sets ``TRITON_INTERPRET=1``); on a GPU they run
compiled. Shapes are small but odd: lengths that are not powers of two, one-token sequences, a 197-token
group (the looped path: four blocks of keys and of queries), several groups at once.
"""
import pytest
import torch

from fastibot.kernels import tile_attention as ta
from fastibot.models.attention import (BackendUnavailable, PackedLayout, _reference_dense, attention_qkv,
                                       check_backend)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
REL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}  # norm-relative error bound


def _qkv(groups, heads, head_dim, dtype, seed=0, pad=0):
    """A (T, 3, H, Dh) buffer; with ``pad`` extra slots per token it is a strided view of a wider one,
    as a fused projection with more outputs would leave it."""
    total = sum(c * n for c, n in groups)
    g = torch.Generator().manual_seed(seed)
    wide = torch.randn(total, 3 + pad, heads, head_dim, generator=g).to(DEVICE, dtype)
    return wide[:, :3]


def _reference(qkv, groups):
    """fp64 attention per group from a (T, 3, H, Dh) buffer."""
    outs, start = [], 0
    for c, n in groups:
        q, k, v = qkv[start: start + c * n].reshape(c, n, *qkv.shape[1:]).unbind(2)
        outs.append(_reference_dense(q, k, v).reshape(c * n, *qkv.shape[2:]))
        start += c * n
    return torch.cat(outs)


def _rel(a, b):
    a, b = a.double(), b.double()
    assert torch.isfinite(a).all()
    return ((a - b).norm() / b.norm()).item()


def _run(groups, heads, head_dim, dtype, pad=0):
    qkv = _qkv(groups, heads, head_dim, dtype, pad=pad).requires_grad_(False)
    leaf = qkv.detach().clone().requires_grad_(True) if pad == 0 else None
    x = leaf if leaf is not None else qkv.detach().requires_grad_(True)
    out = ta.tile_attention(x, groups)
    g = torch.Generator().manual_seed(7)
    w = torch.randn(out.shape, generator=g).to(DEVICE, dtype)
    (grad,) = torch.autograd.grad((out.float() * w.float()).sum(), x)
    ref_in = qkv.detach().double().requires_grad_(True)
    ref = _reference(ref_in, groups)
    (ref_grad,) = torch.autograd.grad((ref * w.double()).sum(), ref_in)
    return out, grad, ref, ref_grad


CASES = [
    (((3, 5), (2, 37)), 2, 16),  # two short groups: one program per sequence and head
    (((2, 70), (1, 1)), 3, 32),  # 70 tokens: a block of 64 and a second one of 6 tokens and 58 padding
    (((1, 197), (2, 9)), 1, 16),  # a recipe-length global crop (three blocks of 64 and 5 more) and short locals
    (((1, 90), (1, 100)), 2, 16),  # a second block of 64 holding 26 and 36 tokens
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("groups,heads,head_dim", CASES)
def test_forward_and_gradient_match_the_reference(groups, heads, head_dim, dtype):
    if DEVICE == "cuda" and dtype == torch.float32:
        pytest.skip("on CUDA the products run on the tensor cores in bf16/fp16 (fp32 runs in the interpreter)")
    out, grad, ref, ref_grad = _run(groups, heads, head_dim, dtype)
    assert out.shape == (sum(c * n for c, n in groups), heads, head_dim) and out.dtype == dtype
    assert grad.shape == (out.shape[0], 3, heads, head_dim) and grad.is_contiguous()
    assert _rel(out, ref) < REL[dtype]
    for i, name in enumerate("qkv"):  # each of dQ, dK, dV on its own: a wrong one cannot hide behind the others
        assert _rel(grad[:, i], ref_grad[:, i]) < REL[dtype], name


@pytest.mark.filterwarnings("ignore:overflow encountered in exp2")  # the interpreter evaluates both sides of tl.where
@pytest.mark.parametrize("length", [37, 70])  # one program per sequence, and the separate dQ kernel
def test_logits_far_below_zero_stay_finite(length):
    """Every query opposite every key: the softmax is well defined (all logits ≈ -1,000 in base 2), but a
    padded key's logit of 0 would overflow exp2(0 - lse); the gradient must stay finite and right."""
    dtype = torch.bfloat16 if DEVICE == "cuda" else torch.float32
    groups = ((2, length),)
    qkv = _qkv(groups, 1, 16, dtype)
    qkv[:, 0] = 12.0 + 0.01 * qkv[:, 0]
    qkv[:, 1] = -12.0 + 0.01 * qkv[:, 1]
    x = qkv.detach().requires_grad_(True)
    out = ta.tile_attention(x, groups)
    (grad,) = torch.autograd.grad(out.float().square().sum(), x)
    ref_in = qkv.detach().double().requires_grad_(True)
    (ref_grad,) = torch.autograd.grad(_reference(ref_in, groups).square().sum(), ref_in)
    assert torch.isfinite(grad).all()
    assert _rel(grad[:, 2], ref_grad[:, 2]) < REL[dtype]


def test_reads_a_strided_qkv_buffer():
    """Token stride wider than 3·H·Dh (a view of a wider projection's output): the kernels follow the strides."""
    groups = ((2, 37), (1, 70))
    out, grad, ref, ref_grad = _run(groups, 2, 16, torch.bfloat16 if DEVICE == "cuda" else torch.float32, pad=2)
    tol = REL[out.dtype]
    assert _rel(out, ref) < tol and _rel(grad, ref_grad) < tol


@pytest.mark.parametrize("length,blocks", [
    (100, (16, 64, 4)),  # rows: 6 blocks of 16 and 4 more; keys: a block of 64 and 36 more
    (100, (64, 16, 4)),  # the same, transposed: each loop's rest must come from its own block
    (81, (32, 16, 4)),  # last blocks holding 17 rows and 1 key
    (90, (64, 32, 4)),  # a last key block holding 26 keys
    (128, (32, 64, 4)),  # exact multiples: no padding
    (50, (16, 64, 4)),  # one block of keys (dQ from the dK/dV program) over a loop of row blocks
])
def test_every_split_of_a_sequence_matches_the_reference(monkeypatch, length, blocks):
    """The host splits a sequence into programs and loop steps of full blocks, the last one partly padding;
    every split, with unequal query and key blocks, must give the reference's attention."""
    monkeypatch.setitem(ta.TUNING, ta.seq_tile(length), blocks)
    dtype = torch.bfloat16 if DEVICE == "cuda" else torch.float32
    out, grad, ref, ref_grad = _run(((2, length),), 1, 16, dtype)
    assert _rel(out, ref) < REL[dtype]
    for i, name in enumerate("qkv"):
        assert _rel(grad[:, i], ref_grad[:, i]) < REL[dtype], name


@pytest.mark.parametrize("blocks", [(16, 32, 4), ((128, 16, 4), (16, 64, 8)), ((32, 128, 4), (64, 16, 4))])
def test_other_block_shapes_give_the_same_answer(monkeypatch, blocks):
    """The block sizes are a tuning knob (``TUNING``: one shape for both passes, or the forward's and the
    backward's): query and key blocks of other sizes than the default, equal or not, and a backward blocked
    differently from its forward must compute the same attention."""
    monkeypatch.setitem(ta.TUNING, 128, blocks)
    fwd, bwd = blocks if isinstance(blocks[0], tuple) else (blocks, blocks)
    assert ta.blocks(70) == (128, *fwd) and ta.blocks(70, backward=True) == (128, *bwd)
    launched = []  # (sequence length, kernel, BLOCK_M, BLOCK_N, warps, programs per sequence) of each launch

    def spy(name):
        kernel = getattr(ta, name)
        length_at = 3 if name == "_tile_attn_fwd" else 6  # the position of L among the kernel's arguments

        class Spy:
            def __getitem__(self, grid):
                def launch(*args, **kw):
                    launched.append((args[length_at], name, kw["BLOCK_M"], kw["BLOCK_N"], kw["num_warps"],
                                     grid[0]))
                    return kernel[grid](*args, **kw)
                return launch
        monkeypatch.setattr(ta, name, Spy())

    for name in ("_tile_attn_fwd", "_tile_attn_bwd_kv", "_tile_attn_bwd_q"):
        spy(name)
    dtype = torch.bfloat16 if DEVICE == "cuda" else torch.float32
    out, grad, ref, ref_grad = _run(((2, 70), (3, 5)), 2, 16, dtype)
    assert _rel(out, ref) < REL[dtype] and _rel(grad, ref_grad) < REL[dtype]
    # each pass runs its own shapes: its warps, its loop's block, and enough programs of a full block to cover
    # the 70 tokens
    long = [x[1:] for x in launched if x[0] == 70]
    # dQ before dK/dV: the dQ programs store rowsum(dO ∘ O), which the dK/dV programs read
    assert [x[0] for x in long] == ["_tile_attn_fwd", "_tile_attn_bwd_q", "_tile_attn_bwd_kv"]
    for name, bm, bn, warps, programs in long:
        shape = fwd if name == "_tile_attn_fwd" else bwd
        per_program = bn if name == "_tile_attn_bwd_kv" else bm
        assert (bm, bn, warps) == shape and programs == -(-70 // per_program)


def test_attention_stays_inside_each_sequence():
    groups = ((3, 5), (2, 70))
    dtype = torch.bfloat16 if DEVICE == "cuda" else torch.float32
    qkv = _qkv(groups, 2, 16, dtype)
    out = ta.tile_attention(qkv, groups)
    changed = qkv.clone()
    changed[5:10] += 1.0  # the second 5-token sequence, its q, k and v
    changed[15 + 70:] -= 1.0  # the second 70-token sequence
    out2 = ta.tile_attention(changed, groups)
    same = torch.ones(out.shape[0], dtype=torch.bool)
    same[5:10] = False
    same[15 + 70:] = False
    torch.testing.assert_close(out2[same], out[same], rtol=0, atol=0)
    assert not torch.equal(out2[5:10], out[5:10]) and not torch.equal(out2[85:], out[85:])


def test_bad_input_is_refused_with_the_reason():
    qkv = _qkv(((1, 300),), 1, 16, torch.float32)
    with pytest.raises(ValueError, match="1..256 tokens"):
        ta.tile_attention(qkv, ((1, 300),))
    with pytest.raises(ValueError, match="do not cover"):
        ta.tile_attention(_qkv(((2, 5),), 1, 16, torch.float32), ((3, 5),))
    with pytest.raises(ValueError, match="head sizes"):
        ta.tile_attention(_qkv(((2, 5),), 1, 24, torch.float32), ((2, 5),))


def test_backend_runs_the_crops_on_the_kernels_and_longer_sequences_on_sdpa(monkeypatch):
    """``attention_qkv(..., "triton")``: consecutive groups of at most MAX_SEQ tokens (both crop sizes) go
    through one op, longer ones through SDPA, and the whole output is the reference's."""
    calls = []
    real = ta.tile_attention
    monkeypatch.setattr(ta, "tile_attention", lambda *a: calls.append(a[1]) or real(*a))
    dtype = torch.bfloat16 if DEVICE == "cuda" else torch.float32
    for groups, expected in ((((2, 37), (1, 197), (1, 300), (3, 5)), [((2, 37), (1, 197)), ((3, 5),)]),
                             (((3, 5), (2, 37)), [((3, 5), (2, 37))]),
                             (((1, 300), (0, 5)), [])):
        qkv = _qkv(groups, 2, 16, dtype)
        out = attention_qkv(qkv, "triton", PackedLayout(groups))
        assert _rel(out, _reference(qkv.double(), groups)) < REL[dtype]
        assert calls == expected
        calls.clear()
    for b, n, expected in ((3, 37, [((3, 37),)]), (2, 300, [])):  # the teacher's dense (B, N, 3, H, Dh) call
        dense = _qkv(((b, n),), 2, 16, dtype).reshape(b, n, 3, 2, 16)
        out = attention_qkv(dense, "triton")
        assert out.shape == (b, n, 2, 16) and calls == expected
        assert _rel(out.reshape(-1, 2, 16), _reference(dense.reshape(-1, 3, 2, 16).double(), ((b, n),))) < REL[dtype]
        calls.clear()


def test_backend_check_needs_cuda_or_the_interpreter(monkeypatch):
    check_backend.cache_clear()
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    try:
        with pytest.raises(BackendUnavailable, match="CUDA device"):
            check_backend("triton", "cpu", torch.float32)
        if torch.cuda.is_available():
            with pytest.raises(BackendUnavailable, match="bf16 or fp16"):
                check_backend("triton", "cuda", torch.float32)
    finally:
        check_backend.cache_clear()


def test_compiled_whole_with_the_op_inside():
    """A ViT block stack compiled fullgraph with the op inside equals the eager run (the op is opaque to the
    compiler: one node, its own backward)."""
    from fastibot.models.vit import VisionTransformer

    torch.manual_seed(0)
    vit = VisionTransformer("vit_tiny", patch_size=8, img_size=32, depth=2).to(DEVICE)
    vit.set_attention_backend("triton")
    dtype = torch.bfloat16 if DEVICE == "cuda" else torch.float32
    crops = [torch.randn(2, 3, 32, 32, device=DEVICE), torch.randn(4, 3, 16, 16, device=DEVICE)]
    masks = [torch.zeros(2, 16, dtype=torch.bool, device=DEVICE), None]
    w = torch.randn(2 * 17 + 4 * 5, vit.embed_dim, device=DEVICE)  # a loss whose gradient does not cancel

    def run(forward):
        with torch.autocast(DEVICE, dtype=dtype, enabled=dtype != torch.float32):
            tokens, _ = forward(crops, masks)
        loss = (tokens.float() * w).sum()
        return loss, torch.autograd.grad(loss, [p for p in vit.parameters() if p.requires_grad])

    loss, grads = run(vit.forward_packed)
    closs, cgrads = run(torch.compile(vit.forward_packed, fullgraph=True, dynamic=False))
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert abs(closs.item() - loss.item()) <= tol * abs(loss.item())
    assert max(_rel(a, b) for a, b in zip(cgrads, grads) if b.norm() > 0) < tol


def test_the_ops_have_schemas_and_fake_kernels():
    """The forward and backward custom ops pass opcheck's schema and fake-tensor checks (what a compiled graph
    needs of them; ``test_compiled_whole_with_the_op_inside`` runs one)."""
    dtype = torch.bfloat16 if DEVICE == "cuda" else torch.float32
    groups = ((2, 37), (1, 70))
    qkv = _qkv(groups, 2, 16, dtype)
    lengths, counts = [37, 70], [2, 1]
    torch.library.opcheck(torch.ops.fastibot.tile_attention.default, (qkv, lengths, counts),
                          test_utils=("test_schema", "test_faketensor"))
    out, lse = torch.ops.fastibot.tile_attention(qkv, lengths, counts)
    torch.library.opcheck(torch.ops.fastibot.tile_attention_backward.default,
                          (qkv, out, lse, torch.randn_like(out), lengths, counts),
                          test_utils=("test_schema", "test_faketensor"))
