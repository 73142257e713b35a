"""Sampling precisions (ditkit.fast.inference) against the float32 network they wrap."""
import pytest
import torch
from torch import nn

from ditkit.fast.fp8 import Float8Linear, quantize_rows
from ditkit.fast.inference import compiled, for_inference
from ditkit.models.dit import build_model


def _model(**extra) -> nn.Module:
    torch.manual_seed(0)
    model = build_model("custom", depth=2, hidden_size=64, num_heads=4, patch_size=2, input_size=8, in_channels=4,
                        num_classes=10, **extra)
    with torch.no_grad():  # adaLN-Zero starts at an identity; give every gate and the output layer weights
        for m in model.modules():
            if isinstance(m, nn.Linear) and not m.weight.any():
                nn.init.normal_(m.weight, std=0.05)
    return model.eval()


def _inputs():
    g = torch.Generator().manual_seed(1)
    return torch.randn(3, 4, 8, 8, generator=g), torch.tensor([10.0, 500.0, 990.0]), torch.tensor([1, 2, 3])


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@torch.no_grad()
def test_fp32_is_the_model_itself():
    model = _model()
    x, t, y = _inputs()
    ref = model(x, t, y)
    out = for_inference(model, "fp32")(x, t, y=y)
    assert torch.equal(out, ref)


@torch.no_grad()
@pytest.mark.parametrize("precision", ["amp-bf16"])
def test_bf16_precisions_stay_within_bf16_error(precision):
    model = _model()
    x, t, y = _inputs()
    ref = model(x, t, y)
    net = for_inference(model, precision)
    out = net(x, t, y=y)
    assert out.dtype == torch.float32 and out.shape == ref.shape
    err = _rel(out, ref)
    assert 0 < err < 0.02, err  # bf16 keeps 8 bits: ~0.4% per rounding, a few roundings deep
    assert next(model.parameters()).dtype == torch.float32  # the embeddings: autocast leaves them alone


@torch.no_grad()
def test_amp_bf16_casts_once_what_autocast_casts_every_call():
    """The weights are stored in bf16 up front; the output is bit for bit autocast's on the
    untouched float32 model (autocast rounds the same weights to the same bf16 values)."""
    model = _model()
    x, t, y = _inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = model(x, t, y).float()
    net = for_inference(model, "amp-bf16")
    assert model.blocks[0].adaLN_modulation[1].weight.dtype == torch.bfloat16
    assert model.y_embedder.embedding_table.weight.dtype == torch.float32  # autocast leaves embeddings alone
    assert torch.equal(net(x, t, y=y), ref)


@torch.no_grad()
@pytest.mark.parametrize("field_mode", ["cross_attention", "concat"])
def test_amp_bf16_is_autocast_for_field_conditioned_models_too(field_mode):
    model = _model(num_params=3, cond_channels=2, field_mode=field_mode)
    x, t, y = _inputs()
    kw = {"y": y, "params": torch.randn(3, 3), "field": torch.randn(3, 2, 8, 8)}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = model(x, t, **kw).float()
    assert torch.equal(for_inference(model, "amp-bf16")(x, t, **kw), ref)


@torch.no_grad()
@pytest.mark.parametrize("precision", ["fp32", "amp-bf16"])
def test_fp8_quantizes_the_weights_before_any_bf16_cast_of_the_rest(precision):
    model, twin = _model(), _model()
    x, t, y = _inputs()
    ref = model(x, t, y)
    net = for_inference(model, precision, fp8=True)
    assert net.fp8_layers == 2 * 4  # qkv, proj, fc1, fc2 in each of the 2 blocks
    fc1 = model.blocks[0].mlp.fc1
    assert isinstance(fc1, Float8Linear)
    expected_q, _ = quantize_rows(twin.blocks[0].mlp.fc1.weight)  # from float32, not a bf16 rounding of it
    assert torch.equal(fc1.weight_fp8.float(), expected_q.float())
    assert _rel(net(x, t, y=y), ref) < 0.08  # e4m3 keeps 3 bits (emulated in float32 on the CPU)


def test_bad_choices_are_named():
    with pytest.raises(ValueError, match="precision must be one of fp32, amp-bf16; got 'bf16'"):  # bf16 weights: removed
        for_inference(_model(), "bf16")
    with pytest.raises(ValueError, match="compile mode must be one of none, default, cudagraphs"):
        compiled(_model(), "fast")
    net = for_inference(_model(), "fp32")
    assert compiled(net, "none") is net
