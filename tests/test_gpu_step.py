"""The default GPU step (compiled whole, replayed as a CUDA graph) against the eager step, resume with
graphs on, and no host syncs in the step. CUDA only: the CPU counterparts (compiled == eager, no
recompiles, exact resume) are in tests/test_step.py and tests/test_train.py."""

import math

import pytest
import torch

from fastibot.optim import LossScaler
from fastibot.train import Trainer, init_runtime, train
from conftest import metrics_rows, tiny_config

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs and the GPU step need a GPU")

GPU = {"runtime.device": "cuda", "runtime.precision": "bf16", "data.loader": "synthetic", "model.depth": 2,
       "data.synthetic_size": 128, "data.batch_size": 8, "optim.epochs": 4}


def _eager_and_graph(tmp_path, n: int, **extra):
    """The metrics rows of n eager steps and of n compiled, captured steps (the defaults), both checked to
    hold n rows whose loss terms agree within bf16 tolerance at every step."""
    extra = {**GPU, **extra, "runtime.max_steps": n, "model.drop_path": 0.0}  # compiled and eager draw other numbers
    train(tiny_config(tmp_path / "eager", **extra, **{"runtime.compile": "false", "runtime.cuda_graph": "false"}))
    train(tiny_config(tmp_path / "graph", **extra))
    a, b = metrics_rows(tmp_path / "eager"), metrics_rows(tmp_path / "graph")
    assert len(a) == len(b) == n
    for ra, rb in zip(a, b):
        for k in ("loss", "cls", "patch"):
            assert float(rb[k]) == pytest.approx(float(ra[k]), rel=2e-2), (ra["step"], k)
    return a, b


def test_graph_replayed_step_equals_the_eager_step_over_20_steps(tmp_path):
    a, b = _eager_and_graph(tmp_path, 20)
    assert float(b[-1]["loss"]) != float(b[0]["loss"])  # it trained


@pytest.mark.parametrize("extra", [{"optim.accum_steps": 2}, {"runtime.precision": "fp16"},
                                   {"runtime.recompute_blocks": 1.0}, {"model.attention": "triton"}],
                         ids=["accum2", "fp16", "recompute_blocks", "triton_attention"])
def test_graph_replayed_step_equals_eager_with_accumulation_fp16_and_recompute(tmp_path, monkeypatch, extra):
    """The captured step with gradient accumulation (two micro-batches inside one graph), fp16 with the
    device-side loss scaler, and every block recomputed in the backward trains the numbers the eager step
    trains. fp16 starts at a loss scale of 2**7 here, so that no step overflows in either run and every step
    updates the weights (the overflow path is the next test's)."""
    monkeypatch.setattr(LossScaler.__init__, "__defaults__", (2.0 ** 7, 2000))
    a, b = _eager_and_graph(tmp_path, 16, **extra)
    assert int(a[-1]["nonfinite_steps"]) == int(b[-1]["nonfinite_steps"]) == 0
    assert float(b[-1]["loss"]) != float(b[0]["loss"])  # it trained


def test_fp16_graph_skips_overflowing_steps_and_trains_on(tmp_path):
    """From the default scale (2**16) the first fp16 steps overflow: the captured step skips them (weights
    untouched, scale halved on the device) exactly as the eager step does, then trains on. Where the two
    runs' overflows part (eager fp16 rounds between ops that the compiled graph fuses in fp32: on an H100
    eager skipped steps 6 and 7, the graph did not), only the graph's own run is checked further."""
    n = 12
    extra = {**GPU, "runtime.precision": "fp16", "runtime.max_steps": n, "model.drop_path": 0.0}
    train(tiny_config(tmp_path / "eager", **extra, **{"runtime.compile": "false", "runtime.cuda_graph": "false"}))
    train(tiny_config(tmp_path / "graph", **extra))
    a, b = metrics_rows(tmp_path / "eager"), metrics_rows(tmp_path / "graph")
    assert int(a[0]["nonfinite_steps"]) == int(b[0]["nonfinite_steps"]) == 1  # 2**16 overflows at once
    for ra, rb in zip(a, b):  # the same steps skipped, the same losses, up to where the overflows part
        if ra["nonfinite_steps"] != rb["nonfinite_steps"]:
            break
        assert float(rb["loss"]) == pytest.approx(float(ra["loss"]), rel=2e-2), ra["step"]
    skipped = [int(r["nonfinite_steps"]) for r in b]
    assert skipped[-1] <= n - 4  # the later steps updated the weights
    assert all(math.isfinite(float(r["loss"])) for r in b)
    assert float(b[-1]["loss"]) != float(b[skipped.index(skipped[-1])]["loss"])  # it trained after the skips


@pytest.mark.parametrize("loader,accum", [("torchvision", 1), ("dali", 2)])
def test_graph_replayed_step_fed_by_real_loaders_equals_eager(tmp_path, shared_images, loader, accum):
    """Once the step is captured the loaders fill its input buffers themselves (torchvision: pinned host
    batches copied once to the device; DALI: crops written in place, micro-batch i into buffer i): the
    numbers stay the eager step's, batch after batch."""
    if loader == "dali":
        pytest.importorskip("nvidia.dali", reason="NVIDIA DALI is not installed (pip install 'fastibot[dali]')")
    _eager_and_graph(tmp_path, 8, **{"data.loader": loader, "data.source": "imagefolder", "optim.accum_steps": accum,
                                     "data.path": str(shared_images / "train"), "data.num_workers": 2})


def test_resume_with_graphs_on(tmp_path):
    extra = {**GPU, "model.drop_path": 0.0}
    train(tiny_config(tmp_path / "whole", **extra, **{"runtime.max_steps": 12}))
    train(tiny_config(tmp_path / "split", **extra, **{"runtime.max_steps": 6}))
    summary = train(tiny_config(tmp_path / "split", **extra, **{"runtime.max_steps": 12}), resume="auto")
    assert summary["step"] == 12
    a, b = metrics_rows(tmp_path / "whole"), metrics_rows(tmp_path / "split")
    assert [r["step"] for r in b] == [str(i) for i in range(1, 13)]
    for ra, rb in zip(a[6:], b[6:]):
        assert float(rb["loss"]) == pytest.approx(float(ra["loss"]), rel=1e-2), ra["step"]


@pytest.mark.parametrize("loader,packed,graph", [("synthetic", True, "true"), ("synthetic", True, "false"),
                                                 ("synthetic", False, "false"), ("torchvision", True, "true")])
def test_no_host_sync_inside_the_step(tmp_path, loader, packed, graph):
    cfg = tiny_config(tmp_path, **{**GPU, "data.loader": loader, "model.packed": packed, "runtime.cuda_graph": graph,
                                   "runtime.compile": graph, "data.num_workers": 2 if loader == "torchvision" else 0})
    tr = Trainer(cfg, init_runtime(cfg))
    it = iter(tr.data)
    for _ in range(4):  # warm-up (compile, capture)
        tr.train_step([next(it)])
    torch.cuda.synchronize()
    old = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            tr.train_step([next(it)])
    finally:
        torch.cuda.set_sync_debug_mode(old)
    assert tr.log_metrics()["nonfinite_steps"] == 0
