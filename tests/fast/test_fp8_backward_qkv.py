"""qkv's ∂x product in FP8 (ditkit.fast.fp8_backward with ditkit.kernels.qkv.stack_rows_fp8): the kernel
that stacks ∂q, ∂k, ∂v and writes ∂qkv's e4m3 copy against its equations (Triton's interpreter on the CPU), the
backward operator against the bf16 one, and the fused attention's ∂x against ∂qkv from autograd of the plain
attention quantized the same way, every other gradient unchanged."""
import pytest
import torch
import torch.nn.functional as F
from torch.library import opcheck

from ditkit.fast.fp8_backward import quantize_weight_columns
from ditkit.fast.fused_attention import qkv_attention, qkv_attention_backward, qkv_attention_backward_fp8
from ditkit.kernels import qkv as qkv_kernels
from ditkit.kernels.fp8_rows import quantize_rows, row_scales
from tests.conftest import rel_err
from tests.fast.fp8_cases import DEVICE, assert_e4m3_close

G = torch.Generator().manual_seed(1)


def _grads(n, heads, tokens, dh, dtype=torch.bfloat16):
    """∂q, ∂k, ∂v (N, H, T, Dh) in cuDNN's (N, T, H, Dh) memory, token rows of very different sizes, one all zero."""
    size = torch.exp2(torch.randint(-12, 4, (n, tokens, 1, 1), generator=G).float())
    size[0, tokens // 2] = 0
    return [(torch.randn(n, tokens, heads, dh, generator=G) * size).to(DEVICE, dtype).transpose(1, 2) for _ in range(3)]


@pytest.mark.skipif(qkv_kernels.triton is None, reason="Triton is not installed")
@pytest.mark.parametrize("shape", [(2, 3, 5, 8), (1, 16, 3, 72), (3, 2, 70, 24)])
def test_stack_rows_kernel_against_its_equations(shape):
    """∂qkv bit-equal to the stacking, each row's scale from its amax over all three gradients, its e4m3 values,
    and the column sums (summed over the programs) in one pass.  Other layouts are refused."""
    grads = _grads(*shape)
    with pytest.raises(ValueError, match="laid out as"):
        qkv_kernels.stack_rows_fp8(grads[0].contiguous(), grads[1], grads[2])
    dqkv, sums, q, s = qkv_kernels.stack_rows_fp8(*grads)
    want, want_sums = qkv_kernels.stack_reference(*grads)
    assert torch.equal(dqkv, want)
    torch.testing.assert_close(sums.sum(0), want_sums, rtol=1e-5, atol=1e-6)
    assert torch.equal(s, row_scales(want))
    assert s[shape[2] // 2] > 0 and (q[shape[2] // 2].float() == 0).all()  # the zero row: no NaN, all zero
    assert_e4m3_close(q, quantize_rows(want, s))


def _attention_inputs(n=2, tokens=8, dim=64, heads=4, dtype=torch.float32):
    """x, W, b and ∂o for head size 16 (cuDNN takes multiples of 8)."""
    x = torch.randn(n * tokens, dim, generator=G)
    w, b = torch.randn(3 * dim, dim, generator=G) * 0.2, torch.randn(3 * dim, generator=G) * 0.1
    g = torch.randn(n * tokens, dim, generator=G)
    return [t.to(DEVICE, dtype) for t in (x, w, b, g)]


def test_backward_operator_adds_the_e4m3_copy_to_the_bf16_ones_outputs():
    """On a GPU the two operators run different kernels (the tile copy, the rows kernel); on the CPU both take the
    torch equations, and what this checks there is the fake implementation (opcheck) and the outputs' form."""
    x, w, b, g = _attention_inputs(dtype=torch.bfloat16 if DEVICE == "cuda" else torch.float32)
    o, qkv, lse, seed, offset = qkv_attention(x, w, b, 2, 4)
    args = (g, qkv, o, lse, seed, offset, 2, 4)
    dqkv, tiles = qkv_attention_backward(*args)
    got, sums, q, s = qkv_attention_backward_fp8(*args)
    assert torch.equal(got, dqkv)
    torch.testing.assert_close(sums.sum(0), tiles.sum(0), rtol=1e-5, atol=1e-5)
    assert q.dtype == torch.float8_e4m3fn and q.shape == dqkv.shape and s.shape == (dqkv.shape[0],)
    assert torch.equal(s, row_scales(dqkv))
    assert_e4m3_close(q, quantize_rows(dqkv, s))
    opcheck(qkv_attention_backward_fp8, args, test_utils=("test_faketensor",))


def test_fp8_dx_runs_through_e4m3_and_leaves_the_rest_unchanged():
    """With fp8_dx: the output, ∂W and ∂b those of the bf16 operator; ∂x the product of ∂qkv (from autograd of the
    plain attention in float32) quantized per token row and W quantized per input channel."""
    dtype = torch.bfloat16 if DEVICE == "cuda" else torch.float32
    operands = _attention_inputs(dtype=dtype)
    g = operands.pop()
    plain = [t.clone().requires_grad_() for t in operands]
    qkv_attention(*plain, 2, 4)[0].backward(g)
    fp8 = [t.clone().requires_grad_() for t in operands]
    o = qkv_attention(*fp8, 2, 4, fp8_dx=True)[0]
    o.backward(g)
    assert torch.equal(o, qkv_attention(*operands, 2, 4)[0])
    assert torch.equal(fp8[1].grad, plain[1].grad)  # ∂W: the same bf16 ∂qkv and product
    torch.testing.assert_close(fp8[2].grad, plain[2].grad, rtol=1e-5, atol=1e-5)  # ∂b: other partial sums, same total
    x, w, b = (t.detach().float() for t in operands)
    qkv = F.linear(x, w, b).requires_grad_()
    q, k, v = qkv.view(2, 8, 3, 4, 16).permute(2, 0, 3, 1, 4).unbind(0)
    F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(16, 64).backward(g.float())
    s = row_scales(qkv.grad)
    wtq, sw = quantize_weight_columns(w)
    want = (quantize_rows(qkv.grad, s).float() * s[:, None]) @ (wtq.float() * sw[:, None]).t()
    assert rel_err(fp8[0].grad.float(), want) < (2e-2 if dtype == torch.bfloat16 else 5e-3)  # a last-bit change may
    # move a value to the next e4m3 step
    assert 1e-3 < rel_err(fp8[0].grad.float(), plain[0].grad.float()) < 0.1  # FP8 ran, within its rounding
