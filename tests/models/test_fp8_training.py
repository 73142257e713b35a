"""FP8 training products (ditkit.models.fp8_training): each of the three products against a direct
float64 computation from the same quantized operands, against the exact linear within e4m3/e5m2
rounding, the conversion's bookkeeping, and a DiT's forward and gradients.  On the CPU the FP8
product is emulated with the operands the GPU kernel would get."""
import pytest
import torch
from torch import nn

from ditkit.models.dit import build_model
from ditkit.models.fp8 import FP8
from ditkit.models.fp8_training import Float8TrainingLinear, convert_for_fp8_training, revert_fp8_training

G = torch.Generator().manual_seed(0)


def _dequant(t: torch.Tensor, dim: int) -> torch.Tensor:
    """t rounded to e4m3 after scaling each slice along ``dim`` to the full range (±448), in float64."""
    s = t.detach().abs().amax(dim, keepdim=True).double() / 448
    return (t.double() / s).to(FP8).double() * s


def _layer(i=96, o=160):
    lin = nn.Linear(i, o)
    f8 = nn.Linear(i, o)
    f8.load_state_dict(lin.state_dict())
    convert = nn.Sequential()
    convert.add_module("mlp", nn.Module())
    convert.mlp.fc1 = f8
    assert convert_for_fp8_training(convert) == 1
    return lin, convert.mlp.fc1


def test_products_equal_the_quantized_operands_multiplied_exactly():
    _, f8 = _layer()
    x = (torch.randn(4, 8, 96, generator=G) * 3).requires_grad_()
    size = torch.logspace(-6, 0, 8)[:, None]
    gy = torch.randn(4, 8, 160, generator=G) * size  # tokens of very different size
    y = f8(x)
    y.backward(gy)
    xq, wq_rows, wq_cols, gq = _dequant(x, -1), _dequant(f8.weight, 1), _dequant(f8.weight, 0), _dequant(gy, -1)
    torch.testing.assert_close(y.double(), xq @ wq_rows.T + f8.bias.double(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x.grad.double() / size, gq @ wq_cols / size, rtol=1e-5, atol=1e-6)  # each token to its size
    gw = gy.reshape(-1, 160).double().T @ x.detach().reshape(-1, 96).double()  # ∂W in the compute dtype, unquantized
    torch.testing.assert_close(f8.weight.grad.double(), gw, rtol=1e-5, atol=1e-5)  # float32 sums of size ~10
    torch.testing.assert_close(f8.bias.grad, gy.sum((0, 1)), rtol=1e-5, atol=1e-9)  # the bias gradient is exact


def test_products_are_close_to_the_exact_linear_and_not_a_copy_of_it():
    lin, f8 = _layer()
    x = torch.randn(2, 16, 96, generator=G)
    gy = torch.randn(2, 16, 160, generator=G)
    outs = []
    for layer in (lin, f8):
        xi = x.clone().requires_grad_()
        y = layer(xi)
        y.backward(gy)
        outs.append((y, xi.grad, layer.weight.grad))
    for (ref, got), bound in zip(zip(outs[0], outs[1]), (0.04, 0.04)):  # e4m3: 2^-4 rounding of each operand
        rel = ((got - ref).norm() / ref.norm()).item()
        assert 1e-4 < rel < bound, rel
    torch.testing.assert_close(outs[1][2], outs[0][2], rtol=1e-5, atol=1e-6)  # ∂W is not quantized


def test_token_count_not_a_multiple_of_16_runs_the_plain_linear():
    lin, f8 = _layer()
    x = torch.randn(3, 5, 96, generator=G)
    torch.testing.assert_close(f8(x), lin(x), rtol=0, atol=0)


def test_autocast_gives_bf16_outputs_and_float32_weight_gradients():
    _, f8 = _layer()
    x = torch.randn(32, 96, generator=G, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = f8(x)
    assert y.dtype == torch.bfloat16
    y.float().square().mean().backward()
    assert x.grad.dtype == torch.float32 and f8.weight.grad.dtype == torch.float32 and f8.bias.grad.dtype == torch.float32


def test_dit_conversion_keeps_parameters_state_dict_and_stays_close():
    torch.manual_seed(0)
    model = build_model("custom", depth=2, hidden_size=64, num_heads=4, patch_size=2, input_size=8,
                        in_channels=4, num_classes=10)
    for m in model.modules():  # adaLN-Zero starts at identity: give the blocks real weights
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.05)
    params, keys = [p for p in model.parameters() if p.requires_grad], list(model.state_dict())
    x, t, y = torch.randn(4, 4, 8, 8, generator=G), torch.randint(0, 1000, (4,), generator=G), torch.arange(4)

    def run():
        model.zero_grad()
        out = model(x, t, y, force_drop_ids=torch.zeros(4, dtype=torch.long))
        out.square().mean().backward()
        return out.detach(), [p.grad.clone() for p in params]

    ref_out, ref_grads = run()
    assert convert_for_fp8_training(model) == 2 * 4
    assert isinstance(model.blocks[1].mlp.fc2, Float8TrainingLinear)
    assert type(model.blocks[0].adaLN_modulation[1]) is nn.Linear  # small products stay as they were
    assert [p for p in model.parameters() if p.requires_grad] == params and list(model.state_dict()) == keys
    out, grads = run()
    assert (out - ref_out).norm() / ref_out.norm() < 0.05
    for (name, _), g, r in zip([(n, p) for n, p in model.named_parameters() if p.requires_grad], grads, ref_grads):
        if r.norm() > 0:
            assert (g - r).norm() / r.norm() < 0.15, name
    assert revert_fp8_training(model) == 8
    torch.testing.assert_close(run()[0], ref_out, rtol=0, atol=0)


@pytest.mark.parametrize("scale", [1e-8, 1e4])
def test_gradient_scale_far_from_one_keeps_its_precision(scale):
    _, f8 = _layer()
    x = torch.randn(16, 96, generator=G, requires_grad=True)
    gy = torch.randn(16, 160, generator=G)
    f8(x).backward(gy * scale)
    exact = gy.double() @ f8.weight.double()
    rel = (x.grad.double() / scale - exact).norm() / exact.norm()
    assert rel < 0.05, rel


@pytest.mark.parametrize("grad_op", [False, True])
def test_compiled_layer_under_autocast_has_the_eager_gradients(grad_op):
    """The layer's product is a torch.library operator with its backward registered: traced by
    torch.compile (AOTAutograd, as inductor sees it) under bf16 autocast, the output and the
    gradients of x, W and b are those of the eager layer, with ∂y quantized in traced code or by
    the quantization operator."""
    _, f8 = _layer()
    assert f8.grad_op  # mlp.fc1: fp8_training.GRAD_OP
    f8.grad_op = grad_op
    x = torch.randn(2, 16, 96, generator=G)
    gy = torch.randn(2, 16, 160, generator=G)

    def run(layer):
        f8.zero_grad()
        xi = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = layer(xi)
        y.backward(gy.to(y.dtype))
        return y, xi.grad, f8.weight.grad, f8.bias.grad

    torch._dynamo.reset()
    for ref, got in zip(run(f8), run(torch.compile(f8, backend="aot_eager", fullgraph=True))):
        assert got.abs().sum() > 0
        torch.testing.assert_close(got, ref, rtol=0, atol=0)


def test_operators_pass_torch_library_opcheck():
    """The schema, fake (meta) functions and registered autograd of both operators, as torch.compile
    relies on them (torch.library.opcheck: schema, autograd registration, fake tensors, AOT dispatch)."""
    from ditkit.models.fp8 import quantize_rows
    from ditkit.models.fp8_kernels import quantize_rows_op
    from ditkit.models.fp8_training import _fp8_linear

    x = torch.randn(32, 96, generator=G)
    q, s = quantize_rows_op(x)
    q_ref, s_ref = quantize_rows(x)
    assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8)) and torch.equal(s, s_ref)
    torch.library.opcheck(quantize_rows_op, (x,))
    w, b = torch.randn(160, 96, generator=G, requires_grad=True), torch.randn(160, generator=G, requires_grad=True)
    wq, sw = quantize_rows(w.detach())
    # Not test_schema: its check of unmutated inputs multiplies them, which float8 tensors refuse on the CPU.
    tests = ("test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
    for grad_op in (False, True):
        torch.library.opcheck(_fp8_linear, (x.clone().requires_grad_(), w, b, q, s, wq, sw, False, grad_op), test_utils=tests)
