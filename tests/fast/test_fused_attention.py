"""The qkv linear and the attention as one operator (ditkit.fast.fused_attention): the ∂qkv kernel
against its torch form (Triton's interpreter on the CPU), the operators against the plain module's
autograd, the closed-form attention gradients against autograd, whole DiTs with every fused module, and
compilation.  On a GPU the operator runs cuDNN's attention, checked against float32 by the last test."""
import copy

import pytest
import torch
from torch.library import opcheck

from ditkit.fast.fused_attention import (
    FusedAttention,
    _attention_grads_reference,
    convert_to_fused_attention,
    qkv_attention,
    qkv_attention_backward,
    revert_fused_attention,
)
from ditkit.fast.fused_mlp import convert_to_fused_mlp
from ditkit.fast.fused_norm import convert_to_fused_norm
from ditkit.fast.tuned_linear import convert_to_tuned_linear
from ditkit.kernels import qkv as qkv_kernels
from ditkit.models.dit import Attention, build_model
from tests.models.dit_cases import assert_compiled_equals_eager, assert_converted_equals_plain

G = torch.Generator().manual_seed(0)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.skipif(qkv_kernels.triton is None, reason="Triton is not installed")
@pytest.mark.parametrize("shape", [(2, 3, 5, 8), (3, 4, 70, 72), (2, 2, 9, 24)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_stack_kernel_equals_torch(shape, dtype):
    """∂q, ∂k, ∂v laid out as cuDNN returns them ((N, T, H, Dh) memory); widths that are not multiples of
    the column tile, token counts that are not multiples of the row tile.  Other layouts are refused."""
    n, heads, tokens, dh = shape
    grads = [torch.randn(n, tokens, heads, dh, generator=G).to(DEVICE, dtype).transpose(1, 2) for _ in range(3)]
    assert all(map(qkv_kernels.rows_layout, grads))
    with pytest.raises(ValueError, match="laid out as"):
        qkv_kernels.stack_triton(grads[0].contiguous(), grads[1], grads[2])
    ref = qkv_kernels.stack_reference(*grads)
    got = qkv_kernels.stack_triton(*grads, block_m=16, block_n=32)
    assert got[0].shape == (n * tokens, 3 * heads * dh) and got[0].dtype == dtype
    assert torch.equal(got[0], ref[0])
    torch.testing.assert_close(got[1], ref[1], rtol=1e-5, atol=1e-5)
    _, partial = qkv_kernels.stack_partial(*grads, block_m=16, block_n=32)  # the per-tile sums the operator returns
    torch.testing.assert_close(partial, qkv_kernels.tile_sums(ref[0], 16), rtol=1e-5, atol=1e-5)
    # the layout: row m, column (j, h, d) is ∂{q,k,v}[n, h, t, d]
    m, h, d = n * tokens - 1, heads - 1, dh - 1
    assert got[0][m, 2 * heads * dh + h * dh + d] == grads[2][n - 1, h, tokens - 1, d]


def test_closed_form_attention_gradients_equal_autograd():
    q, k, v, g = (torch.randn(2, 3, 7, 8, generator=G, dtype=torch.float64) for _ in range(4))
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    torch.nn.functional.scaled_dot_product_attention(q, k, v).backward(g)
    for got, ref in zip(_attention_grads_reference(g, q.detach(), k.detach(), v.detach()), (q.grad, k.grad, v.grad)):
        torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5)


def _pair(dim=48, heads=4, bias=True):
    torch.manual_seed(0)
    plain = Attention(dim, heads, qkv_bias=bias)
    fused = copy.deepcopy(plain)
    assert convert_to_fused_attention(fused) == 1 and type(fused) is FusedAttention
    return plain, fused


def _run(m, x, gy):
    x = x.clone().requires_grad_()
    y = m(x)
    y.backward(gy)
    return [y.detach(), x.grad] + [p.grad for p in m.parameters()]


@pytest.mark.parametrize("bias", [True, False])
def test_module_equals_the_plain_attention(bias):
    plain, fused = _pair(bias=bias)
    x, gy = torch.randn(2, 9, 48, generator=G), torch.randn(2, 9, 48, generator=G)
    for a, b in zip(_run(plain, x, gy), _run(fused, x, gy)):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)


def test_operators_pass_opcheck():
    x, w, b = torch.randn(12, 16, generator=G), torch.randn(48, 16, generator=G), torch.randn(48, generator=G)
    opcheck(qkv_attention, (x, w, b, 2, 2))
    opcheck(qkv_attention, (x, w, None, 3, 4))
    o, qkv, lse, seed, offset = qkv_attention(x, w, b, 2, 2)
    opcheck(qkv_attention_backward, (torch.randn(12, 16, generator=G), qkv, o, lse, seed, offset, 2, 2))


def test_conversion_is_in_place_and_reverts():
    model = build_model("DiT-S/8", input_size=16, in_channels=4, num_classes=10)
    state = model.state_dict().keys()
    params = [id(p) for p in model.parameters()]
    assert convert_to_fused_attention(model) == len(model.blocks)
    assert all(type(b.attn) is FusedAttention for b in model.blocks)
    assert [id(p) for p in model.parameters()] == params and model.state_dict().keys() == state
    assert revert_fused_attention(model) == len(model.blocks) and all(type(b.attn) is Attention for b in model.blocks)


@pytest.mark.parametrize("others", [False, True])
def test_converted_dit_equals_the_plain_dit(others):
    """Alone, and with the fused MLP, the tuned linears and the fused norm (whose blocks take the attention's
    output without proj's bias)."""
    if others:
        assert_converted_equals_plain(convert_to_fused_mlp, convert_to_tuned_linear, convert_to_fused_attention,
                                      convert_to_fused_norm)
    else:
        assert_converted_equals_plain(convert_to_fused_attention)


def test_compiled_gradients_equal_eager():
    assert_compiled_equals_eager(convert_to_fused_attention)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="cuDNN's attention needs a GPU")
@pytest.mark.parametrize("bias", [True, False])
def test_cudnn_path_equals_float32(bias):
    """bf16 through cuDNN (DiT-XL's head size 72) and the ∂qkv kernel, against float32 autograd of the plain
    module; the plain module in bf16 for scale."""
    plain = Attention(1152, 16, qkv_bias=bias).cuda()
    x, gy = torch.randn(4, 64, 1152, device="cuda"), torch.randn(4, 64, 1152, device="cuda")
    ref = _run(plain, x, gy)
    fused = copy.deepcopy(plain)
    convert_to_fused_attention(fused)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        got = _run(fused, x, gy)
        bf16 = _run(copy.deepcopy(plain), x, gy)
    for r, g, b in zip(ref, got, bf16):
        assert rel_err(g, r) < max(2 * rel_err(b, r), 1e-2), (rel_err(g, r), rel_err(b, r))
