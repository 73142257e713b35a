"""fc1's ∂x product in FP8 (ditkit.fast.fp8_backward; qkv's in test_fp8_backward_qkv.py): the rows kernel against its equations (Triton's interpreter on
the CPU), the per-row and per-column scales, the product against the float32 product of the same quantized operands,
the fused MLP's backward against ∂pre computed independently by autograd, a block and a compiled block against the
plain block, and the config's checks."""
import pytest
import torch
from torch import nn
from torch.library import opcheck

from ditkit.fast import TrainRun, TrainSpeed, train_speed
from ditkit.fast.blocks import enable_fp8_backward, enable_fp8_forward
from ditkit.fast.fp8_backward import fp8_dx, quantize_weight_columns
from ditkit.fast.fused_mlp import gelu_mlp
from ditkit.kernels import fp8_rows
from ditkit.kernels.fp8_rows import quantize_rows, row_scales, rows_fp8_and_column_sums, rows_fp8_reference
from tests.conftest import rel_err
from tests.fast.fp8_cases import DEVICE, assert_e4m3_close, block_output_and_grads, mlp_operands, plain_and_fused_blocks

G = torch.Generator().manual_seed(0)


def _gradient(m, n):
    """Rows of very different sizes (as ∂pre's are), one of them all zero."""
    g = torch.randn(m, n, generator=G) * torch.exp2(torch.randint(-12, 4, (m, 1), generator=G).float())
    g[m // 3] = 0
    return g.bfloat16()


def test_row_scales_map_each_rows_largest_value_to_448():
    g = _gradient(9, 40)
    s = row_scales(g)
    q = quantize_rows(g, s)
    assert s.shape == (9,) and s.dtype == torch.float32 and q.dtype == torch.float8_e4m3fn
    nonzero = g.float().abs().amax(1) > 0
    assert (q.float().abs().amax(1)[nonzero] == 448).all()
    assert (q.float()[~nonzero] == 0).all() and torch.isfinite(s).all() and (s > 0).all()
    scaled = g.float() / s[:, None]  # e4m3 keeps 3 mantissa bits: a normal value within 2⁻⁴ relative
    normal = scaled.abs() >= 2 ** -6
    assert ((q.float() - scaled).abs()[normal] <= scaled.abs()[normal] * 2 ** -4).all()


def test_weight_columns_are_quantized_transposed_with_one_scale_per_input_channel():
    w = (torch.randn(48, 16, generator=G) * torch.rand(1, 16, generator=G)).bfloat16()
    wtq, s = quantize_weight_columns(w)
    assert wtq.shape == (16, 48) and wtq.is_contiguous() and s.shape == (16,)
    assert torch.equal(s, w.float().abs().amax(0) / 448)
    assert (wtq.float().abs().amax(1) == 448).all()
    w.requires_grad_()
    assert not quantize_weight_columns(w)[0].requires_grad


@pytest.mark.skipif(fp8_rows.triton is None, reason="Triton is not installed")
@pytest.mark.parametrize("shape", [(37, 100), (70, 1152), (5, 4608), (9, 24), (9, 64), (9, 65)])
def test_rows_kernel_against_its_equations(shape):
    """q, s and the column sums (summed over the programs' rows) from one pass, against the reference."""
    g = _gradient(*shape).to(DEVICE)
    q, s, sums = fp8_rows.rows_fp8_triton(g)
    q_ref, s_ref, _ = rows_fp8_reference(g)
    assert torch.equal(s, s_ref)
    assert sums.shape[1] == shape[1] and sums.dtype == torch.float32
    torch.testing.assert_close(sums.sum(0), g.float().sum(0), rtol=1e-5, atol=1e-6)
    assert_e4m3_close(q, q_ref)


def test_product_is_the_float32_product_of_the_quantized_operands():
    gpre = _gradient(24, 64).to(DEVICE)
    w1 = (torch.randn(64, 32, generator=G) * 0.1).bfloat16().to(DEVICE)
    q, s, _ = rows_fp8_and_column_sums(gpre)
    wtq, sw = quantize_weight_columns(w1)
    want = (q.float() * s[:, None]) @ (wtq.float() * sw[:, None]).t()
    got = fp8_dx(q, s, wtq, sw, torch.bfloat16)
    assert got.dtype == torch.bfloat16 and got.shape == (24, 32)
    assert rel_err(got.float(), want) < (1e-2 if DEVICE == "cuda" else 4e-3)  # one rounding to bf16
    assert rel_err(got.float(), gpre.float() @ w1.float()) < 0.1  # and FP8's error against the exact product


def test_operators_pass_opcheck():
    g = _gradient(12, 40)
    opcheck(rows_fp8_and_column_sums, (g,), test_utils=("test_faketensor",))
    q, s, _ = rows_fp8_reference(g)
    wtq, sw = quantize_weight_columns(torch.randn(40, 8, generator=G))
    opcheck(fp8_dx, (q, s, wtq, sw, torch.float32), test_utils=("test_faketensor",))


def test_mlp_backward_runs_fc1_dx_through_e4m3_and_leaves_the_rest_unchanged():
    """With fp8_dx: y, ∂W₁, ∂b₁, ∂W₂, ∂b₂ those of the bf16 operator; ∂x the product of ∂pre (from autograd of the
    plain MLP) quantized per row and W₁ quantized per input channel."""
    dtype = torch.bfloat16 if DEVICE == "cuda" else torch.float32
    operands = mlp_operands(G, dtype=dtype)
    gy = torch.randn(20, 32, generator=G).to(DEVICE, dtype)
    plain = [t.clone().requires_grad_() for t in operands]
    y_plain, _, _ = gelu_mlp(*plain)
    y_plain.backward(gy)
    fp8 = [t.clone().requires_grad_() for t in operands]
    y, _, _ = gelu_mlp(*fp8, fp8_dx=True)
    y.backward(gy)
    assert torch.equal(y, y_plain)
    for got, want in zip(fp8[1:], plain[1:]):
        assert torch.equal(got.grad, want.grad)
    x, w1, b1, w2, b2 = (t.detach().float().requires_grad_() for t in operands)
    pre = nn.functional.linear(x, w1, b1)
    (gpre,) = torch.autograd.grad(nn.functional.linear(nn.functional.gelu(pre, approximate="tanh"), w2, b2), pre,
                                  gy.float())
    s = row_scales(gpre)
    wtq, sw = quantize_weight_columns(w1)
    want = (quantize_rows(gpre, s).float() * s[:, None]) @ (wtq.float() * sw[:, None]).t()
    assert rel_err(fp8[0].grad.float(), want) < (2e-2 if dtype == torch.bfloat16 else 1e-4)
    assert 1e-3 < rel_err(fp8[0].grad.float(), plain[0].grad.float()) < 0.1  # FP8 ran, within its rounding


def test_block_with_fp8_forward_and_backward_is_within_fp8_rounding_of_the_plain_block():
    """Under bf16 autocast, a fused block with FP8 forward products and fc1's and qkv's ∂x in FP8 against the plain
    block in float32: every gradient within a few FP8 roundings; the block input's gradient moved against FP8 forward
    alone, and again once qkv's ∂x joins fc1's."""
    plain, fused = plain_and_fused_blocks()
    x, c = torch.randn(2, 16, 64, generator=G).to(DEVICE), torch.randn(2, 64, generator=G).to(DEVICE)
    gy = torch.randn(2, 16, 64, generator=G).to(DEVICE)
    ref = block_output_and_grads(plain, x, c, gy, autocast=False)
    enable_fp8_forward(fused)
    forward_only = block_output_and_grads(fused, x, c, gy)
    fused.zero_grad()
    assert enable_fp8_backward(fused, parts=("fc1",)) == 1
    fc1_only = block_output_and_grads(fused, x, c, gy)
    fused.zero_grad()
    assert enable_fp8_backward(fused) == 2
    both = block_output_and_grads(fused, x, c, gy)
    errs = [rel_err(b, r) for b, r in zip(both, ref)]
    assert max(errs) < 0.06, errs
    assert torch.equal(both[0], forward_only[0])  # the forward is unchanged
    assert not torch.equal(fc1_only[1], forward_only[1])  # ∂x went through fc1's FP8 product
    assert not torch.equal(both[1], fc1_only[1])  # and through qkv's


def test_compiled_block_with_fp8_backward_equals_eager():
    """fc1's and qkv's ∂x in FP8, within FP8's rounding: compiled code rounds ∂pre's and ∂qkv's bf16 values in
    another order, and a one-ulp change moves a value to the next e4m3 step (2⁻³ relative) now and then."""
    _, block = plain_and_fused_blocks()
    enable_fp8_backward(block)
    x, c = torch.randn(2, 16, 64, generator=G).to(DEVICE), torch.randn(2, 64, generator=G).to(DEVICE)
    gy = torch.randn(2, 16, 64, generator=G).to(DEVICE)
    eager = block_output_and_grads(block, x, c, gy)
    block.zero_grad()
    compiled = block_output_and_grads(torch.compile(block), x, c, gy)
    assert torch.equal(eager[0], compiled[0]) or rel_err(compiled[0], eager[0]) < 1e-2  # the forward: bf16's rounding
    for a, b in zip(eager[1:], compiled[1:]):
        assert torch.equal(a, b) or rel_err(b, a) < 3e-2


def test_enable_switches_the_parts_asked_for():
    _, block = plain_and_fused_blocks()
    assert enable_fp8_backward(block, parts=("qkv",)) == 1
    assert block.attn.fp8_backward and not block.mlp.fp8_backward
    assert enable_fp8_backward(block, enabled=False) == 2 and not block.attn.fp8_backward
    with pytest.raises(ValueError, match="unknown parts.*proj"):
        enable_fp8_backward(block, parts=("proj",))
    with pytest.raises(TypeError, match="tuple of names"):
        enable_fp8_backward(block, parts="qkv")


@pytest.mark.parametrize("fused", ["fused_mlp", "fused_attention"])
def test_fp8_backward_needs_a_fused_mlp_or_attention_and_bf16(fused):
    run = TrainRun(torch.device("cpu"), torch.bfloat16)
    with pytest.raises(ValueError, match="fp8_backward.*fused MLP or attention"):
        train_speed(TrainSpeed(fp8_backward=True), run)
    train_speed(TrainSpeed(fp8_backward=True, **{fused: True}), run)
    with pytest.raises(ValueError, match="fp8_backward.*bf16 arithmetic"):
        train_speed(TrainSpeed(fp8_backward=True, **{fused: True}), TrainRun(torch.device("cpu"), None))
