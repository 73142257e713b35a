"""The FP8 sampling MLP with GELU in fc1's product (ditkit.fast.fp8_mlp): the operator against the equations it
states (and, on a GPU, cuBLASLt's result against the float32 emulation), the fused MLP against the MLP of two
``Float8Linear`` layers and against float32, and its place in ``for_inference``."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.library import opcheck

from ditkit.fast.fp8 import FP8, FP8_MAX, Float8Linear, calibrate_fp8, convert_to_fp8, fp8_matmul_supported, quantize
from ditkit.fast.fp8_mlp import Float8Mlp, convert_to_fp8_mlp, fp8_gelu_linear
from ditkit.fast.inference import for_inference
from ditkit.kernels import cublaslt
from ditkit.models.dit import Mlp
from tests.conftest import rel_err
from tests.fast.fp8_cases import dit_with_real_weights

G = torch.Generator().manual_seed(0)
ON_LT = torch.cuda.is_available() and fp8_matmul_supported(torch.device("cuda")) and cublaslt.available(torch.device("cuda"))


def _operands(m=48, k=64, n=96, device="cpu"):
    x, w = torch.randn(m, k, generator=G), torch.randn(n, k, generator=G) * 0.1
    sx, sw = x.abs().amax().view(1) / FP8_MAX, w.abs().amax().view(1) / FP8_MAX
    xq, wq = quantize(x, sx), quantize(w, sw)
    b = (torch.randn(n, generator=G) * 0.1).to(torch.bfloat16)
    return [t.to(device) for t in (xq, sx, wq, sw, b)]


def test_operator_is_gelu_of_the_dequantized_product_quantized_by_the_next_scale():
    xq, sx, wq, sw, b = _operands()
    s_out = torch.tensor([1 / 3])
    out = fp8_gelu_linear(xq, sx, wq, sw, b, s_out)
    y = (xq.double() * sx.double()) @ (wq.double() * sw.double()).t() + b.double()
    a = F.gelu(y, approximate="tanh") / s_out.double()
    assert out.dtype == FP8 and out.shape == (48, 96)
    # e4m3 rounding: within half a step (2^-4 relative) of the exact value, and saturated beyond ±448
    assert ((out.double() - a.clamp(-FP8_MAX, FP8_MAX)).abs() <= a.abs() * 2**-4 + 2**-10).all()
    big = fp8_gelu_linear(xq, sx, wq, sw, b, torch.tensor([1e-6]))
    assert big.float().abs().max() == FP8_MAX and not big.float().isnan().any()


def test_operator_without_bias_and_its_registration():
    xq, sx, wq, sw, _ = _operands(16, 32, 48)
    s_out = torch.tensor([0.5])
    torch.testing.assert_close(fp8_gelu_linear(xq, sx, wq, sw, None, s_out).float(),
                               fp8_gelu_linear(xq, sx, wq, sw, torch.zeros(48, dtype=torch.bfloat16), s_out).float())
    # test_schema compares inputs by arithmetic that e4m3 tensors lack on the CPU
    opcheck(fp8_gelu_linear, (xq, sx, wq, sw, None, s_out), test_utils=("test_faketensor", "test_aot_dispatch_dynamic"))


@pytest.mark.skipif(not ON_LT, reason="cuBLASLt's FP8 product needs a GPU with FP8 tensor cores")
@pytest.mark.parametrize("m", [256, 1000])
def test_cublaslt_result_equals_the_float32_emulation_but_for_rounding_ties(m):
    """The GPU's e4m3 result against the emulation's: the product's float32 sum differs by accumulation order (and
    FP8's fast accumulation), so a value near a rounding boundary may land one e4m3 step away; GELU's tanh differs
    by a little in absolute terms where GELU is near zero."""
    xq, sx, wq, sw, b = _operands(m, 1152, 4608, "cuda")
    s_out = torch.tensor([1 / 20], device="cuda")
    d_scale = 1 / s_out  # what the result is multiplied by
    got = fp8_gelu_linear(xq, sx, wq, sw, b, s_out).float()
    y = (xq.float() * sx) @ (wq.float() * sw).t() + b.float()
    ref = (F.gelu(y, approximate="tanh") * d_scale).clamp(-FP8_MAX, FP8_MAX)
    step = ref.abs().clamp_min(2**-6) * 2**-3  # one e4m3 step (3 mantissa bits; subnormals below 2^-6)
    # cuBLASLt's GELU is off by up to ~2.5e-3 in the far negative tail (-4 < y < -3, GELU ≈ 0; measured on an H100)
    steps = ((got - ref).abs() - 4e-3 * d_scale).clamp_min(0) / step
    worst = steps.argmax()
    summary = (f"{int((steps > 1).sum())} of {steps.numel()} beyond one e4m3 step, worst {steps.max().item():.2f} steps: "
               f"got {got.flatten()[worst].item()} for {ref.flatten()[worst].item()}")
    assert (steps > 1).float().mean() < 0.005 and steps.max() < 2, summary
    same = (got == ref.to(FP8).float()).float().mean().item()
    assert same > 0.97, (same, summary)
    assert (got - ref).norm() < 1.2 * (ref.to(FP8).float() - ref).norm(), summary  # as close as rounding ref itself
    over = fp8_gelu_linear(xq, sx, wq, sw, b, torch.tensor([1e-4], device="cuda")).float()
    assert over.abs().max() == FP8_MAX and not over.isnan().any()  # saturates, as the emulation does


def _calibrated_pair(device="cpu", dim=64):
    class Holder(nn.Module):
        def __init__(self):
            super().__init__()
            self.mlp = Mlp(dim, 4 * dim)

    torch.manual_seed(0)
    ref = Holder().to(device)
    fused = Holder().to(device)
    fused.load_state_dict(ref.state_dict())
    assert convert_to_fp8_mlp(fused) == 1 and convert_to_fp8(fused) == 2
    assert convert_to_fp8_mlp(fused) == 0  # fc1 is FP8 now: nothing left to convert
    x = torch.randn(3, 40, dim, generator=G).to(device)
    calibrate_fp8(fused, lambda: fused.mlp(x))
    return ref, fused, x


def test_fused_mlp_is_close_to_the_two_fp8_linears_and_to_float32():
    ref, fused, x = _calibrated_pair()
    assert type(fused.mlp) is Float8Mlp and all(isinstance(m, Float8Linear) and m.calibrated
                                                 for m in (fused.mlp.fc1, fused.mlp.fc2))
    with torch.no_grad():
        full, out = ref.mlp(x), fused.mlp(x)
        two_linears = Mlp.forward(fused.mlp, x)  # the same FP8 layers without the fused product
    assert out.shape == full.shape and out.dtype == full.dtype
    fused_err, plain_err = rel_err(out, full), rel_err(two_linears, full)  # FP8 quantization noise against float32
    assert fused_err < 0.08 and fused_err < 1.1 * plain_err, (fused_err, plain_err)  # no less accurate
    assert rel_err(out, two_linears) < 0.06  # fc1's weight per tensor instead of per row, GELU on fc1's float32 result
    assert not torch.equal(out, two_linears)  # the fused path ran


def test_uncalibrated_or_calibrating_mlp_computes_as_the_plain_one():
    _, fused, x = _calibrated_pair()
    with torch.no_grad():
        fused.mlp.fc2.static = False  # dynamic scales: no static scale for fc2's input
        torch.testing.assert_close(fused.mlp(x), Mlp.forward(fused.mlp, x))
        fused.mlp.fc2.static = True
        seen = []
        calibrate_fp8(fused, lambda: seen.append(fused.mlp(x)))  # calibrating: dynamic, recording fc2's input range
        for m in (fused.mlp.fc1, fused.mlp.fc2):
            m.static = False
        torch.testing.assert_close(seen[0], Mlp.forward(fused.mlp, x))


def test_emulation_ignores_autocast():
    xq, sx, wq, sw, b = _operands()
    s_out = torch.tensor([1 / 3])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = fp8_gelu_linear(xq, sx, wq, sw, b, s_out)
    assert torch.equal(inside.float(), fp8_gelu_linear(xq, sx, wq, sw, b, s_out).float())


def test_fused_mlp_compiles():
    _, fused, x = _calibrated_pair()
    with torch.no_grad():
        eager = fused.mlp(x)
        compiled = torch.compile(fused.mlp, fullgraph=True)(x)
    torch.testing.assert_close(compiled, eager, rtol=0.02, atol=0.02)


@pytest.mark.parametrize("precision", ["fp32", "amp-bf16"])
def test_for_inference_fuses_the_mlps_unless_asked_not_to(precision):
    """The fused network against the same FP8 network without the fused MLPs (the same calibration): close, not equal;
    the e4m3 copy of fc1's weight stays e4m3 under every precision's casts, and is not in the state dict."""
    x, t, y = torch.randn(2, 4, 8, 8, generator=G), torch.tensor([10, 500]), torch.tensor([1, 2])
    outs = []
    for fp8_mlp in (True, False):
        model = dit_with_real_weights()
        net = for_inference(model, precision, fp8=True, fp8_mlp=fp8_mlp)
        assert all(type(b.mlp) is (Float8Mlp if fp8_mlp else Mlp) for b in model.blocks)
        with torch.no_grad():
            calibrate_fp8(model, lambda: net(x, t, y=y))
            outs.append(net(x, t, y=y))
        if fp8_mlp:
            assert all(b.mlp.w1_fp8.dtype == FP8 and b.mlp.w1_scale.dtype == torch.float32 for b in model.blocks)
            assert not any("w1_" in k for k in model.state_dict())
    rel = rel_err(outs[0], outs[1])
    assert 0 < rel < 0.05, rel
