"""Linears through cuBLASLt's fastest candidate (ditkit.fast.tuned_linear): the operators against
nn.Linear's autograd, the in-place retyping, a whole converted DiT against the plain one (also with the
fused MLP and the fused norm, whose blocks leave proj's and fc2's bias to the norm kernel), and
compilation.  On the CPU the operators compute with torch's ops; on a GPU the last test runs the
cuBLASLt products themselves."""
import copy

import pytest
import torch
from torch import nn
from torch.library import opcheck

from ditkit.fast.fused_mlp import convert_to_fused_mlp
from ditkit.fast.fused_norm import convert_to_fused_norm
from ditkit.fast.tuned_linear import (
    TunedLinear,
    convert_to_tuned_linear,
    revert_tuned_linear,
    tuned_linear,
    tuned_matmul,
    weight_grad,
)
from ditkit.models.dit import build_model
from tests.models.dit_cases import assert_compiled_equals_eager, assert_converted_equals_plain

G = torch.Generator().manual_seed(0)


def _grads(m: nn.Module, x: torch.Tensor, gy: torch.Tensor, **kwargs) -> list[torch.Tensor]:
    x = x.clone().requires_grad_()
    y = m(x, **kwargs)
    y.backward(gy)
    return [y.detach(), x.grad] + [p.grad for p in m.parameters() if p.grad is not None]


@pytest.mark.parametrize("bias", [True, False])
def test_forward_and_gradients_equal_nn_linear(bias):
    plain = nn.Linear(24, 40, bias=bias)
    tuned = copy.deepcopy(plain)
    assert convert_to_tuned_linear(tuned) == 1 and type(tuned) is TunedLinear
    x, gy = torch.randn(3, 5, 24, generator=G), torch.randn(3, 5, 40, generator=G)
    ref, got = _grads(plain, x, gy), _grads(tuned, x, gy)
    assert len(got) == len(ref) == (4 if bias else 3)
    for a, b in zip(ref, got):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-6)


def test_without_bias_leaves_the_bias_to_the_caller():
    plain = nn.Linear(16, 32)
    tuned = copy.deepcopy(plain)
    convert_to_tuned_linear(tuned)
    x, gy = torch.randn(7, 16, generator=G), torch.randn(7, 32, generator=G)
    ref = _grads(plain, x, gy)
    got = _grads(tuned, x, gy, with_bias=False)
    torch.testing.assert_close(got[0] + tuned.bias.detach(), ref[0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got[1], ref[1], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(tuned.weight.grad, plain.weight.grad, rtol=1e-6, atol=1e-6)
    assert tuned.bias.grad is None


def test_operators_pass_opcheck():
    x, w, b = torch.randn(6, 16, generator=G), torch.randn(24, 16, generator=G), torch.randn(24, generator=G)
    opcheck(tuned_linear, [t.requires_grad_() for t in (x, w, b)])
    opcheck(tuned_linear, [x, w, None])
    opcheck(tuned_matmul, (torch.randn(6, 16, generator=G), torch.randn(16, 8, generator=G)))
    opcheck(weight_grad, (torch.randn(6, 16, generator=G), torch.randn(6, 8, generator=G)))


def test_conversion_is_in_place_and_reverts():
    model = build_model("DiT-S/8", input_size=16, in_channels=4, num_classes=10)
    linears = [m for m in model.modules() if type(m) is nn.Linear]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    params = [id(p) for p in model.parameters()]
    assert convert_to_tuned_linear(model) == len(linears) > 4 * len(model.blocks)
    assert all(type(m) is TunedLinear for m in linears)
    assert [id(p) for p in model.parameters()] == params and model.state_dict().keys() == state.keys()
    assert revert_tuned_linear(model) == len(linears) and all(type(m) is nn.Linear for m in linears)


@pytest.mark.parametrize("with_fused", [False, True])
def test_converted_dit_equals_the_plain_dit(with_fused):
    if with_fused:
        assert_converted_equals_plain(convert_to_fused_mlp, convert_to_tuned_linear, convert_to_fused_norm)
    else:
        assert_converted_equals_plain(convert_to_tuned_linear)


def test_compiled_gradients_equal_eager():
    assert_compiled_equals_eager(convert_to_tuned_linear)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="cuBLASLt needs a GPU")
@pytest.mark.parametrize("bias", [True, False])
def test_cublaslt_products_equal_float32(bias):
    """The GPU path: bf16 products through cuBLASLt (bias in the epilogue), against float32 autograd."""
    lin = nn.Linear(64, 96, bias=bias, device="cuda")
    x, gy = torch.randn(256, 64, device="cuda"), torch.randn(256, 96, device="cuda")
    ref = _grads(lin, x, gy)
    tuned = copy.deepcopy(lin).bfloat16()
    convert_to_tuned_linear(tuned)
    got = _grads(tuned, x.bfloat16(), gy.bfloat16())
    for r, g in zip(ref, got):
        assert ((g.float() - r).norm() / r.norm()).item() < 8e-3
