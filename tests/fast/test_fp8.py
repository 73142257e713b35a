"""FP8 sampling layers (ditkit.fast.fp8) against full precision: a closed-form quantization
bound per layer, a whole DiT's output, and the conversion's bookkeeping.  On the CPU the FP8
product is emulated with the same quantized operands as the GPU kernel."""
import torch
from torch import nn

from ditkit.fast.fp8 import FP8_MAX, Float8Linear, convert_to_fp8, quantize_rows
from ditkit.models.dit import build_model
from tests.fast.fp8_cases import dit_with_real_weights

G = torch.Generator().manual_seed(0)


def test_row_quantization_error_is_within_e4m3_rounding():
    x = torch.randn(64, 96, generator=G) * torch.logspace(-3, 2, 64)[:, None]  # rows of very different scale
    q, scale = quantize_rows(x)
    assert q.dtype == torch.float8_e4m3fn and scale.shape == (64, 1)
    assert (q.float().abs().amax(1) == FP8_MAX).all()  # each row uses the full range
    back = q.float() * scale
    # e4m3 keeps 3 mantissa bits: relative rounding error ≤ 2^-4 for normal numbers; subnormals
    # (below 2^-6 of the unit) are off by at most half their spacing 2^-9, times the row's scale.
    err = (back - x).abs()
    assert (err <= x.abs() * 2**-4 + scale * 2**-10 + 1e-12).all()


def test_linear_matches_float_within_quantization_noise():
    lin = nn.Linear(128, 384)
    f8 = Float8Linear.from_linear(lin)
    x = torch.randn(4, 50, 128, generator=G)
    ref, out = lin(x), f8(x)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    rel = (out - ref).norm() / ref.norm()
    assert 1e-4 < rel < 0.04  # quantized (not a copy of the float layer), yet close
    torch.testing.assert_close(f8.dequantized_weight(), lin.weight.detach(), rtol=2**-4, atol=1e-3)
    assert not list(f8.parameters())


def test_dit_converted_to_fp8_stays_close_to_the_float_model():
    model = dit_with_real_weights()
    x, t, y = torch.randn(6, 4, 8, 8, generator=G), torch.randint(0, 1000, (6,), generator=G), torch.arange(6)
    with torch.no_grad():
        ref = model(x, t, y)
        n = convert_to_fp8(model)
        out = model(x, t, y)
    assert n == 3 * 4 and sum(isinstance(m, Float8Linear) for m in model.modules()) == 12
    assert isinstance(model.blocks[0].adaLN_modulation[1], nn.Linear)  # small layers stay as they were
    rel = (out - ref).norm() / ref.norm()
    assert rel < 0.05, rel


def test_layers_not_multiple_of_16_are_kept():
    model = nn.Sequential()
    model.add_module("mlp", nn.Module())
    model.mlp.fc1 = nn.Linear(24, 40)
    model.mlp.fc2 = nn.Linear(32, 48)
    assert convert_to_fp8(model) == 1
    assert isinstance(model.mlp.fc1, nn.Linear) and isinstance(model.mlp.fc2, Float8Linear)


def test_static_scales_from_calibration_stay_close_and_saturate_beyond_the_range():
    from ditkit.fast.fp8 import calibrate_fp8

    model = dit_with_real_weights()
    x, t, y = torch.randn(6, 4, 8, 8, generator=G), torch.randint(0, 1000, (6,), generator=G), torch.arange(6)
    with torch.no_grad():
        ref = model(x, t, y)
        convert_to_fp8(model)
        dynamic = model(x, t, y)
        assert calibrate_fp8(model, lambda: model(x, t, y), margin=2.0) == 12
        static = model(x, t, y)
    layers = [m for m in model.modules() if isinstance(m, Float8Linear)]
    assert all(m.static and m.input_scale > 0 for m in layers) and "static per-layer" in repr(layers[0])
    assert (static - dynamic).abs().max() > 0  # a different quantizer, not the dynamic one
    assert (static - ref).norm() / ref.norm() < 0.05
    # One layer at its calibrated scale: values past the range saturate instead of overflowing to inf/nan.
    fc = layers[0]
    big = torch.full((2, fc.in_features), 1e6)
    out = fc(big)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, fc(torch.full((2, fc.in_features), FP8_MAX * fc.input_scale.item())))


def test_calibration_needs_converted_layers():
    import pytest

    from ditkit.fast.fp8 import calibrate_fp8

    with pytest.raises(ValueError, match="convert_to_fp8 first"):
        calibrate_fp8(nn.Linear(16, 16), lambda: None)


def test_names_match_whole_components_so_cross_attention_is_kept():
    model = build_model("custom", depth=2, hidden_size=64, num_heads=4, patch_size=2, input_size=8, in_channels=2,
                        num_classes=0, cond_channels=1, field_mode="cross_attention")
    assert convert_to_fp8(model) == 2 * 4
    assert isinstance(model.blocks[0].cross_attn.proj, nn.Linear) and isinstance(model.blocks[0].attn.proj, Float8Linear)


@torch.no_grad()
def test_bias_is_added_where_the_fp8_kernel_cannot_take_it():
    """A layer converted on an FP8 GPU puts its bias into the product (``bias_in_gemm``); moved to
    a device without the FP8 kernel (here the CPU's emulation) it must add the bias itself."""
    torch.manual_seed(0)
    linear = nn.Linear(32, 16)
    nn.init.constant_(linear.bias, 5.0)
    layer = Float8Linear.from_linear(linear)
    assert not layer.bias_in_gemm  # no FP8 kernel on the CPU: probed, not assumed
    x = torch.randn(8, 32)
    plain = layer(x)
    layer.bias_in_gemm = True  # as if converted on a Hopper GPU, then moved here
    torch.testing.assert_close(layer(x), plain)
    assert abs(plain.mean().item() - (linear(x)).mean().item()) < 0.1  # the bias of 5 is in
