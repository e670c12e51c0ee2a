"""Activations the compiled backward keeps instead of recomputing: the residual stream.

Below ``runtime.activation_memory = 1`` the partitioner (``torch._functorch``) lifts its ban on
recomputing long chains of pointwise ops, and a ViT's residual stream is such a chain:
``x[k+1] = x[k] + drop_path(branch[k])``. Left alone it keeps each branch output (attention proj
and fc2, (T, D) bf16 each) in place of the stream itself (also (T, D) bf16 each: the same memory),
and the backward rebuilds all 2·depth residuals up front in one kernel that also writes every
LayerNorm's normalised input in fp32 ((T, D) fp32 each, all alive at the start of the backward).
ViT-B/16, batch 64, H100: one 1.4 ms launch per step, and every LayerNorm backward reading fp32.

``residual_add`` marks the add; ``KeepMarked``, a joint-graph pass that ``runtime.compile_options``
installs, tags the marked forward nodes ``MUST_SAVE``. Each LayerNorm backward then reads its bf16
input and its row statistics. Nodes inside an activation-checkpointed block keep the tag the
checkpoint gave them (``runtime.recompute_blocks`` still recomputes those blocks whole).
"""
from __future__ import annotations

import torch
import torch.fx as fx
import torch.fx.traceback as fx_traceback
from torch.utils.checkpoint import CheckpointPolicy

try:  # torch >= 2.6: a pass with a uuid takes part in inductor's cache key
    from torch._inductor.custom_graph_pass import CustomGraphPass as _PassBase
except ImportError:  # older torch takes any callable (and bypasses its graph cache for it)
    _PassBase = object

KEEP = "fastibot_keep"  # key in node.meta["custom"] (torch.fx.traceback.annotate)
_ANNOTATE = getattr(fx_traceback, "annotate", None)  # torch >= 2.9


def residual_add(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``x + y``; under torch.compile the node is marked for ``KeepMarked``."""
    if _ANNOTATE is not None and torch.compiler.is_compiling():
        with _ANNOTATE({KEEP: True}):
            return x + y
    return x + y


def marked_forward_nodes(graph: fx.Graph) -> list:
    """The marked nodes of a joint graph that do not depend on a tangent (the forward's own)."""
    backward = set()
    for n in graph.nodes:
        if (n.op == "placeholder" and n.name.startswith("tangents")) or any(a in backward for a in n.all_input_nodes):
            backward.add(n)
    return [n for n in graph.nodes if n not in backward and n.op == "call_function"
            and (n.meta.get("custom") or {}).get(KEEP)]


class KeepMarked(_PassBase):
    """Joint-graph pass (``torch._inductor.config.joint_custom_pre_pass``): marked forward nodes are
    saved for the backward, never recomputed, unless an activation checkpoint already tagged them."""

    def __call__(self, graph: fx.Graph) -> None:
        for n in marked_forward_nodes(graph):
            if n.meta.get("recompute") is None:
                n.meta["recompute"] = CheckpointPolicy.MUST_SAVE

    def uuid(self) -> str:  # part of inductor's cache key
        return "fastibot.keep-marked.v1"
