"""The MLP's bias + GELU kernel (``kernels/gelu_bias.py``) against autograd of ``gelu(h0 + b)``, the fused MLP
against the plain one (values and every gradient), compiled whole, and a training run with it on. On the
CPU the kernel runs in Triton's interpreter."""
import pytest
import torch

from fastibot.kernels.gelu_bias import bias_gelu, reference_backward
from fastibot.models.vit import Mlp
from conftest import tiny_config

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-6), torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows, cols", [(37, 1000), (5, 7), (130, 67), (64, 128)])
def test_backward_equals_autograd_of_gelu_of_the_biased_product(rows, cols, dtype):
    if dtype == torch.bfloat16 and DEVICE == "cpu":
        pytest.skip("bf16 runs on the GPU; the interpreter covers fp32 (the kernel's math is fp32 either way)")
    g = torch.Generator().manual_seed(rows * cols)
    h0 = (torch.randn(rows, cols, generator=g) * 2).to(DEVICE, dtype).requires_grad_()
    b = torch.randn(cols, generator=g).to(DEVICE).requires_grad_()
    da = torch.randn(rows, cols, generator=g).to(DEVICE, dtype)
    a = bias_gelu(h0, b)
    torch.testing.assert_close(a.float(), torch.nn.functional.gelu(h0.float() + b.float()), **TOL[dtype])
    a.backward(da)
    dh, db = reference_backward(h0, b, da)
    torch.testing.assert_close(h0.grad.float(), dh, **TOL[dtype])
    # the bias gradient sums every row: bf16 rows summed in fp32 stay close to the fp32 sum
    torch.testing.assert_close(b.grad, db, rtol=TOL[dtype]["rtol"], atol=TOL[dtype]["atol"] * rows ** 0.5)
    assert b.grad.dtype == torch.float32


@pytest.fixture
def fp32_products():
    """fp32 products on the GPU too (a CUDA runtime turns TF32 on for the process)."""
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    yield
    torch.set_float32_matmul_precision(before)


def test_the_fused_mlp_equals_the_plain_one_and_compiles_whole(fp32_products):
    torch.manual_seed(0)
    plain = Mlp(24, 96).to(DEVICE)
    fused = Mlp(24, 96).to(DEVICE)
    fused.load_state_dict(plain.state_dict())
    fused.fused_gelu = True
    assert list(dict(plain.named_parameters())) == ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"]  # timm's
    x = torch.randn(3, 41, 24, device=DEVICE)
    gy = torch.randn(3, 41, 24, device=DEVICE)
    outs = {}
    for name, m in (("plain", plain), ("fused", fused), ("compiled", torch.compile(fused, fullgraph=True))):
        xi = x.clone().requires_grad_()
        y = m(xi)
        y.backward(gy)
        outs[name] = [y.detach(), xi.grad] + [p.grad.clone() for p in (m if name != "compiled" else fused).parameters()]
        for p in fused.parameters():
            p.grad = None
    for name in ("fused", "compiled"):
        for i, (a, b) in enumerate(zip(outs[name], outs["plain"])):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=f"{name} {i}")


def test_training_with_the_kernel_follows_autograds_gelu(tmp_path):
    """Three steps with kernels.gelu=triton and =torch from the same seed: the same losses to fp32 rounding
    (on the GPU where there is one, else on the CPU under the interpreter)."""
    from fastibot.runtime import Runtime
    from fastibot.train import Trainer
    losses = {}
    for impl in ("torch", "triton"):
        (tmp_path / impl).mkdir()
        tr = Trainer(tiny_config(tmp_path / impl, **{"kernels.gelu": impl, "runtime.device": DEVICE,
                                                     "runtime.precision": "fp32"}),
                     Runtime(torch.device(DEVICE)))
        assert tr.gelu_impl == impl and tr.student.backbone.blocks[0].mlp.fused_gelu == (impl == "triton")
        it = iter(tr.data)
        rows = []
        for _ in range(3):
            tr.train_step([next(it)])
            rows.append(tr.log_metrics()["loss"])
        losses[impl] = rows
    assert losses["triton"] == pytest.approx(losses["torch"], rel=1e-4)


def test_the_backward_op_has_a_schema_and_a_fake_kernel():
    h0 = torch.randn(37, 19, device=DEVICE)
    torch.library.opcheck(torch.ops.fastibot.gelu_bias_backward.default,
                          (h0, torch.randn(19, device=DEVICE), torch.randn(37, 19, device=DEVICE)),
                          test_utils=("test_schema", "test_faketensor"))
