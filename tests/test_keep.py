"""The compiled backward keeps the residual stream (fastibot.models.keep) instead of rebuilding it."""
import pytest
import torch
from torch.utils.checkpoint import CheckpointPolicy

from fastibot.models import keep
from fastibot.models.vit import VisionTransformer
from fastibot.runtime import compile_options

GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="the tile attention kernels and bf16 autocast "
                         "of the production step need a GPU; the CPU case runs everywhere")


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=GPU)])
def test_residual_adds_are_saved_for_the_backward_except_in_checkpointed_blocks(monkeypatch, device):
    """CPU: inductor's CPU backend, fp32. CUDA: as the training step runs it (bf16 autocast, the tile
    attention kernels, the ViT-B recipe's activation budget 0.6, where the chain was rebuilt)."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    depth, dim = 3, 192
    vit = VisionTransformer("vit_tiny", patch_size=8, img_size=32, drop_path_rate=0.1, depth=depth)
    vit = vit.to(device).train()
    vit.set_recompute(1)  # block 0 is activation-checkpointed: its adds must stay recomputed
    if device == "cuda":
        vit.set_attention_backend("triton")
    crops = [torch.randn(3, 3, 32, 32, device=device), torch.randn(5, 3, 16, 16, device=device)]
    masks = [torch.rand(3, 16, device=device) < 0.4, None]
    tokens = 3 * 17 + 5 * 5

    marked, saved = [], []
    from torch._inductor import compile_fx
    partition = compile_fx.min_cut_rematerialization_partition

    def partition_and_record(joint, *args, **kwargs):  # the joint graph as the partitioner sees it
        marked.extend((n.name, str(n.target), tuple(n.meta["val"].shape), n.meta.get("recompute"))
                      for n in keep.marked_forward_nodes(joint.graph))
        fw, bw = partition(joint, *args, **kwargs)  # the forward returns its outputs, then what it saves
        saved.extend(a for a in next(iter(reversed(fw.graph.nodes))).args[0] if isinstance(a, torch.fx.Node)
                     and a.target is torch.ops.aten.add.Tensor and tuple(a.meta["val"].shape) == (tokens, dim))
        return fw, bw

    monkeypatch.setattr(compile_fx, "min_cut_rematerialization_partition", partition_and_record)
    fn = torch.compile(lambda c, m: vit.forward_packed(c, m)[0].square().sum(), fullgraph=True,
                       options=compile_options("none"))
    torch.manual_seed(1)
    # the passes must run, not a cached graph; config.patch restores the option (a monkeypatch would
    # delete it from torch's config module on undo, breaking every later compile in the process)
    budget = 0.6 if device == "cuda" else torch._functorch.config.activation_memory_budget
    with torch.compiler.config.patch(force_disable_caches=True), \
            torch._functorch.config.patch(activation_memory_budget=budget), \
            torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
        fn(crops, masks).backward()

    assert len(marked) == 2 * depth, marked  # two residual adds per block, none lost in tracing
    assert all(t == "aten.add.Tensor" and shape == (tokens, dim) for _, t, shape, _ in marked), marked
    plain = [(name, tag) for name, _, _, tag in marked[2:]]
    checkpointed = [(name, tag) for name, _, _, tag in marked[:2]]
    assert all(tag == CheckpointPolicy.MUST_SAVE for _, tag in plain), plain
    assert all(tag in (CheckpointPolicy.PREFER_RECOMPUTE, CheckpointPolicy.MUST_RECOMPUTE)
               for _, tag in checkpointed), checkpointed
    # the forward hands the plain blocks' residuals to the backward, not the checkpointed block's
    assert len(saved) == len(plain), (saved, plain)


def test_residual_add_is_a_plain_add_outside_compile():
    x, y = torch.randn(5, 7), torch.randn(5, 7)
    torch.testing.assert_close(keep.residual_add(x, y), x + y, rtol=0, atol=0)
