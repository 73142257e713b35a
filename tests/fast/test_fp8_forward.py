"""fc1's and qkv's forward in FP8 (ditkit.fast.fp8_forward): the scale bound against LayerNorm's extreme case,
the norm kernel's FP8 output against the equations, the operators against a direct computation from the same
quantized operands (and their gradients against the plain modules' at the same values), a block against the plain
one within FP8's rounding, compilation, and the config's checks.  The cuBLASLt FP8 product itself runs on a GPU
(``benchmarks/fp8_lt_products.py`` checks it against the float32 product of its operands; the GPU run of this
file compares the operator with the emulation)."""
import pytest
import torch
from torch import nn
from torch.library import opcheck

from ditkit.fast import TrainRun, TrainSpeed, train_speed
from ditkit.fast.blocks import enable_fp8_forward
from ditkit.fast.fp8_forward import norm_output_scale, quantize_weight
from ditkit.fast.fused_attention import qkv_attention
from ditkit.fast.fused_mlp import gelu_mlp
from ditkit.fast.fused_norm import modulated_norm_op
from ditkit.kernels import norm as norm_kernels
from ditkit.models.dit import Attention
from tests.conftest import rel_err
from tests.fast.fp8_cases import DEVICE, assert_e4m3_close, block_output_and_grads, mlp_operands, plain_and_fused_blocks

G = torch.Generator().manual_seed(0)
EPS = 1e-6


def test_scale_bounds_the_modulated_norm_and_is_reached_by_a_spike():
    """|h| ≤ 448 s_h for any input; a row with one spike (x̂ = ±√(D−1) there) under a constant γ and β = 0
    reaches the bound, so it is not looser than it has to be."""
    n, tokens, width = 3, 9, 64
    x = torch.randn(n, tokens, width, generator=G) * 5
    x[1, 4] = 0.0
    x[1, 4, 7] = 1e3  # the spike: x̂ = √(D−1) at column 7
    shift, scale = torch.randn(n, width, generator=G), torch.randn(n, width, generator=G) * 3
    _, h, _, _ = norm_kernels.forward_reference(x, None, None, None, shift, scale, EPS, torch.float32)
    s = norm_output_scale(shift, scale)
    assert s.shape == (1,) and s.dtype == torch.float32
    assert h.abs().max() <= 448 * s
    shift, scale = torch.zeros(n, width), torch.full((n, width), 0.5)
    _, h, _, _ = norm_kernels.forward_reference(x, None, None, None, shift, scale, EPS, torch.float32)
    assert h.abs().max() <= 448 * norm_output_scale(shift, scale) < 1.0001 * h.abs().max()


def test_quantized_weight_maps_its_largest_entry_to_448_and_rounds_the_rest_to_e4m3():
    w = torch.randn(32, 48, generator=G).bfloat16()
    q, s = quantize_weight(w)
    assert q.dtype == torch.float8_e4m3fn and s.shape == (1,)
    assert q.float().abs().max() == 448
    # e4m3 keeps 3 mantissa bits: a normal value is within 2⁻⁴ relative of the scaled weight
    scaled = w.float() / s
    normal = scaled.abs() >= 2 ** -6
    assert ((q.float() - scaled).abs()[normal] <= scaled.abs()[normal] * 2 ** -4).all()


def test_quantize_weight_passes_no_gradient():
    w = torch.randn(8, 16, requires_grad=True)
    q, s = quantize_weight(w)
    assert not q.requires_grad and not s.requires_grad


@pytest.mark.skipif(norm_kernels.triton is None, reason="Triton is not installed")
@pytest.mark.parametrize("residual", [True, False])
@pytest.mark.parametrize("shape", [(2, 7, 48), (3, 70, 1152)])
def test_norm_kernel_writes_the_fp8_copy_of_h(shape, residual):
    """The forward kernel's fifth output, q(h / s) from h's float32 value, against the reference.  On a GPU every
    element agrees.  Triton's interpreter (the CPU run) rounds to e4m3 its own way: some values land one e4m3 step
    off, and where rounding up crosses a power of two it drops the carry (127 -> 64, not 128)."""
    x, o = torch.randn(*shape, generator=G).to(DEVICE), torch.randn(*shape, generator=G).to(DEVICE)
    gate, shift, scale = (torch.randn(shape[0], shape[2], generator=G).bfloat16().to(DEVICE) for _ in range(3))
    o, gate = (o.bfloat16(), gate) if residual else (None, None)
    s = norm_output_scale(shift, scale)
    ref = norm_kernels.forward_reference(x, o, gate, None, shift, scale, EPS, torch.bfloat16, s)
    got = norm_kernels.forward_triton(x, o, gate, None, shift, scale, EPS, torch.bfloat16, s)
    assert len(got) == 5 and got[4].dtype == torch.float8_e4m3fn and got[4].shape == x.shape
    assert_e4m3_close(got[4], ref[4])
    assert rel_err(got[1].float(), ref[1].float()) < 1e-2  # h itself, as without FP8


def test_operator_multiplies_the_quantized_operands_and_backpropagates_as_the_bf16_mlp():
    """pre = sx sw · xq wqᵀ + b₁ (float32 from the same e4m3 operands); ∂x, ∂W₁, ∂b₁, ∂W₂, ∂b₂ those of the plain
    MLP evaluated at that pre (the quantization passes the gradient straight through)."""
    dtype = torch.bfloat16 if DEVICE == "cuda" else torch.float32
    x, w1, b1, w2, b2 = mlp_operands(G, dtype=dtype)
    sx = (x.float().abs().amax() / 448 * 1.5).reshape(1)  # a loose scale, as the bound gives
    xq = norm_kernels.quantize_fp8(x, sx)
    wq, sw = quantize_weight(w1)
    pre = (xq.float() * sx) @ (wq.float() * sw).t() + b1.float()
    leaves = [t.clone().requires_grad_() for t in (x, w1, b1, w2, b2)]
    y, a, got_pre = gelu_mlp(*leaves, xq, sx, wq, sw)
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-6
    assert rel_err(got_pre.float(), pre) < tol
    assert rel_err(a.float(), nn.functional.gelu(pre, approximate="tanh")) < tol
    gy = torch.randn(y.shape, generator=G).to(DEVICE, dtype)
    y.backward(gy)
    ref = [t.clone().requires_grad_() for t in (x, w1, b1, w2, b2)]
    linear = nn.functional.linear(ref[0], ref[1], ref[2])
    straight = linear + (got_pre - linear).detach()  # pre's value, the linear's gradient
    y_ref = nn.functional.linear(nn.functional.gelu(straight, approximate="tanh"), ref[3], ref[4])
    y_ref.backward(gy)
    assert rel_err(y.float(), y_ref.float()) < tol
    for got, want in zip(leaves, ref):
        assert rel_err(got.grad.float(), want.grad.float()) < (3e-2 if dtype == torch.bfloat16 else 1e-5)


class _StraightThrough(nn.Module):
    """A linear whose value is ``value`` and whose gradient is the linear's: what the FP8 forward backpropagates."""

    def __init__(self, weight, bias, value):
        super().__init__()
        self.weight, self.bias, self.value = weight, bias, value

    def forward(self, x):
        linear = nn.functional.linear(x, self.weight, self.bias)
        return linear + (self.value.reshape(linear.shape) - linear).detach()


def test_qkv_operator_multiplies_the_quantized_operands_and_backpropagates_straight_through():
    """qkv = sx sw · xq wqᵀ + b, then the attention; ∂x, ∂W, ∂b those of the plain ``Attention.attend`` at that qkv."""
    n, tokens, width, heads = 2, 6, 32, 4
    dtype = torch.bfloat16 if DEVICE == "cuda" else torch.float32
    x = torch.randn(n * tokens, width, generator=G).to(DEVICE, dtype)
    w, b = (torch.randn(3 * width, width, generator=G) * 0.2).to(DEVICE, dtype), torch.randn(3 * width, generator=G).to(DEVICE, dtype)
    sx = (x.float().abs().amax() / 448 * 1.5).reshape(1)
    xq = norm_kernels.quantize_fp8(x, sx)
    wq, sw = quantize_weight(w)
    exact = (xq.float() * sx) @ (wq.float() * sw).t() + b.float()
    leaves = [t.clone().requires_grad_() for t in (x, w, b)]
    o, qkv, *_ = qkv_attention(*leaves, n, heads, xq, sx, wq, sw)
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-6
    assert rel_err(qkv.float(), exact) < tol
    go = torch.randn(o.shape, generator=G).to(DEVICE, dtype)
    o.backward(go)
    attn = Attention(width, heads).to(DEVICE)
    ref = [t.clone().requires_grad_() for t in (x, w, b)]
    attn.qkv = _StraightThrough(ref[1], ref[2], qkv.detach())
    o_ref = attn.attend(ref[0].reshape(n, tokens, width)).reshape(n * tokens, width)
    o_ref.backward(go)
    assert rel_err(o.float(), o_ref.float()) < tol
    for got, want in zip(leaves, ref):
        assert rel_err(got.grad.float(), want.grad.float()) < (3e-2 if dtype == torch.bfloat16 else 1e-5)


def test_operators_with_fp8_inputs_pass_opcheck():
    x, w1, b1, w2, b2 = mlp_operands(G, m=6, d=16, hidden=32)
    sx = torch.tensor([0.01])
    wq, sw = quantize_weight(w1)
    # Not test_schema, nor (for the norm, whose output is float8) test_aot_dispatch_dynamic: they alter the inputs or
    # sum the outputs with ops the CPU has no float8 kernel for.  Compilation: the compiled-block test below.
    opcheck(gelu_mlp, [*(t.cpu().requires_grad_() for t in (x, w1, b1, w2, b2)), norm_kernels.quantize_fp8(x.cpu(), sx),
                       sx, wq.cpu(), sw.cpu()], test_utils=("test_autograd_registration", "test_faketensor",
                                                             "test_aot_dispatch_dynamic"))
    xn, shift, scale = torch.randn(2, 5, 16, generator=G), torch.randn(2, 16, generator=G), torch.randn(2, 16, generator=G)
    opcheck(modulated_norm_op, (xn.requires_grad_(), None, None, None, shift.requires_grad_(), scale, EPS, torch.float32,
                                norm_output_scale(shift, scale)), test_utils=("test_autograd_registration", "test_faketensor"))


def test_block_with_fp8_forward_is_within_fp8_rounding_of_the_plain_block():
    """Under bf16 autocast, a fused block (MLP, attention, norm) with qkv's and fc1's forward in FP8 against the plain
    block in float32: output and every gradient within a few FP8 roundings, and further off than the same fused
    block without FP8 (the FP8 path ran)."""
    plain, fused = plain_and_fused_blocks()
    x, c = torch.randn(2, 16, 64, generator=G).to(DEVICE), torch.randn(2, 64, generator=G).to(DEVICE)
    gy = torch.randn(2, 16, 64, generator=G).to(DEVICE)
    ref = block_output_and_grads(plain, x, c, gy, autocast=False)
    bf16 = block_output_and_grads(fused, x, c, gy)
    fused.zero_grad()
    assert enable_fp8_forward(nn.ModuleDict({"b": fused})) == 1
    fp8 = block_output_and_grads(fused, x, c, gy)
    errs = [(rel_err(f, r), rel_err(b, r)) for f, b, r in zip(fp8, bf16, ref)]
    assert max(e for e, _ in errs) < 0.05, errs
    assert errs[0][0] > errs[0][1]  # the output moved: FP8 ran


def test_compiled_block_with_fp8_forward_equals_eager():
    """torch.compile traces the scale bound, the weight's quantization and the operators: the same output and
    gradients as eager (the same quantized operands, so the same products)."""
    _, fused = plain_and_fused_blocks()
    enable_fp8_forward(nn.ModuleDict({"b": fused}))
    x, c = torch.randn(2, 16, 64, generator=G).to(DEVICE), torch.randn(2, 64, generator=G).to(DEVICE)
    gy = torch.randn(2, 16, 64, generator=G).to(DEVICE)
    eager = block_output_and_grads(fused, x, c, gy)
    fused.zero_grad()
    compiled = block_output_and_grads(torch.compile(fused), x, c, gy)
    for a, b in zip(eager, compiled):
        assert torch.equal(a, b) or rel_err(b, a) < 1e-2  # bf16 autocast: compiled code may round in another order


def test_fp8_forward_needs_the_fused_norm_and_a_fused_product():
    """The door refuses explicit levers that cannot run together, naming the lever."""
    run = TrainRun(torch.device("cpu"), torch.bfloat16)
    with pytest.raises(ValueError, match="fp8_forward.*fused norm"):
        train_speed(TrainSpeed(fp8_forward=True), run)
    with pytest.raises(ValueError, match="fp8_forward.*fused norm"):
        train_speed(TrainSpeed(fp8_forward=True, fused_norm=True), run)
    train_speed(TrainSpeed(fp8_forward=True, fused_norm=True, fused_attention=True), run)
    with pytest.raises(ValueError, match="fp8_forward.*bf16 arithmetic"):
        train_speed(TrainSpeed(fp8_forward=True, fused_norm=True, fused_attention=True),
                    TrainRun(torch.device("cpu"), torch.float16))
