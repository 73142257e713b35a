"""The fused MLP (ditkit.fast.fused_mlp): its operators against the plain MLP's autograd, the
conversion's bookkeeping, and compilation.  On the CPU the operators compute with torch's ops; the
cuBLASLt products themselves are checked on a GPU by benchmarks/fused_mlp_check.py."""
import copy

import pytest
import torch
from torch import nn
from torch.library import opcheck

from ditkit.fast.fp8_backward import quantize_weight_columns
from ditkit.fast.fused_mlp import FusedMlp, convert_to_fused_mlp, dgelu_matmul, gelu_mlp, gelu_mlp_backward, revert_fused_mlp
from ditkit.fast.tuned_linear import weight_grad
from ditkit.kernels import cublaslt
from ditkit.models.dit import Mlp, build_model

G = torch.Generator().manual_seed(0)


def _pair(d=24, h=96):
    plain = Mlp(d, h)
    parent = nn.ModuleDict({"mlp": copy.deepcopy(plain)})
    assert convert_to_fused_mlp(parent) == 1
    return plain, parent["mlp"]


def _run(m, x, gy, autocast=False):
    x = x.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y = m(x)
    y.float().backward(gy)
    return [y.detach().float(), x.grad] + [p.grad for p in m.parameters()]


def test_forward_and_gradients_equal_the_plain_mlp():
    plain, fused = _pair()
    x, gy = torch.randn(3, 7, 24, generator=G), torch.randn(3, 7, 24, generator=G)
    for a, b in zip(_run(plain, x, gy), _run(fused, x, gy)):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-6)


def test_under_bf16_autocast_within_bf16_rounding():
    plain, fused = _pair()
    x, gy = torch.randn(3, 7, 24, generator=G), torch.randn(3, 7, 24, generator=G)
    ref = _run(copy.deepcopy(plain), x, gy)
    got, bf16 = _run(fused, x, gy, autocast=True), _run(plain, x, gy, autocast=True)
    for r, g, b in zip(ref, got, bf16):
        err, err_plain = ((g - r).norm() / r.norm()).item(), ((b - r).norm() / r.norm()).item()
        assert err < 2e-2 and err < 2 * err_plain + 1e-3, (err, err_plain)


def test_operators_pass_opcheck():
    x, w1, b1 = torch.randn(6, 16, generator=G), torch.randn(64, 16, generator=G), torch.randn(64, generator=G)
    w2, b2 = torch.randn(16, 64, generator=G), torch.randn(16, generator=G)
    opcheck(gelu_mlp, [t.requires_grad_() for t in (x, w1, b1, w2, b2)])
    opcheck(dgelu_matmul, (torch.randn(6, 16, generator=G), w2.detach(), torch.randn(6, 64, generator=G)))
    opcheck(gelu_mlp, [x, w1, b1, w2, None])
    opcheck(weight_grad, (torch.randn(6, 16, generator=G), torch.randn(6, 64, generator=G)))


def _backward_operands(device="cpu", m=6, d=16, h=64, dtype=torch.float32):
    gen = torch.Generator(device).manual_seed(1)
    r = lambda *s: torch.randn(*s, generator=gen, device=device).to(dtype)  # noqa: E731
    gy, x, w1, w2 = r(m, d), r(m, d), r(h, d) / d**0.5, r(d, h) / h**0.5
    pre = (x.float() @ w1.float().t()).to(dtype)  # b₁ = 0
    return gy, x, w1, w2, torch.nn.functional.gelu(pre, approximate="tanh"), pre


def test_backward_operator_passes_opcheck_and_equals_autograd():
    """``gelu_mlp_backward`` (bf16 ∂x, FP8 ∂x, without b₂) against opcheck, and its bf16 form against the plain MLP's
    autograd."""
    gy, x, w1, w2, a, pre = _backward_operands()
    for extra in ({}, {"has_b2": False}):
        opcheck(gelu_mlp_backward, (gy, x, w1, w2, a, pre), extra)
    opcheck(gelu_mlp_backward, (gy, x, w1, w2, a, pre, *quantize_weight_columns(w1)), {},
            test_utils=("test_faketensor",))  # the schema check's copies multiply e4m3 tensors, which a CPU cannot
    xx, ww1, ww2 = (t.clone().requires_grad_() for t in (x, w1, w2))
    bb1, bb2 = torch.zeros(w1.shape[0], requires_grad=True), torch.zeros(w2.shape[0], requires_grad=True)
    y = torch.nn.functional.gelu(xx @ ww1.t() + bb1, approximate="tanh") @ ww2.t() + bb2
    y.backward(gy)
    gx, gw1, sums, gw2, gb2 = gelu_mlp_backward(gy, x, w1, w2, a, pre)
    for got, want in ((gx, xx.grad), (gw1, ww1.grad), (sums.sum(0), bb1.grad), (gw2, ww2.grad), (gb2, bb2.grad)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_without_bias_leaves_fc2_bias_to_the_caller():
    """``forward(x, with_bias=False)`` + fc2's bias is the MLP's output; b₂ gets no gradient from it."""
    plain, fused = _pair()
    x, gy = torch.randn(3, 7, 24, generator=G), torch.randn(3, 7, 24, generator=G)
    ref = _run(plain, x, gy)
    xx = x.clone().requires_grad_()
    y = fused(xx, with_bias=False)
    y.backward(gy)
    torch.testing.assert_close(y.detach() + fused.fc2.bias.detach(), ref[0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(xx.grad, ref[1], rtol=1e-6, atol=1e-6)
    assert fused.fc2.bias.grad is None
    grads = {n: p.grad for n, p in fused.named_parameters() if n != "fc2.bias"}
    for (n, p), r in zip(plain.named_parameters(), ref[2:]):
        if n != "fc2.bias":
            torch.testing.assert_close(grads[n], r, rtol=1e-6, atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="cuBLASLt needs a GPU")
@pytest.mark.parametrize("trans_a, trans_b", [(False, False), (False, True), (True, False), (True, True)])
def test_cublaslt_mm_equals_torch(trans_a, trans_b):
    """``cublaslt.mm``'s mapping of row-major operands onto cuBLAS's column-major product, every transpose."""
    a = torch.randn(*((64, 48) if trans_a else (48, 64)), device="cuda", dtype=torch.bfloat16)
    b = torch.randn(*((80, 64) if trans_b else (64, 80)), device="cuda", dtype=torch.bfloat16)
    ref = (a.t() if trans_a else a).float() @ (b.t() if trans_b else b).float()
    got = cublaslt.mm(a, b, trans_a, trans_b)
    assert got.shape == (48, 80) and ((got.float() - ref).norm() / ref.norm()).item() < 4e-3
    gy, x = torch.randn(256, 80, device="cuda", dtype=torch.bfloat16), torch.randn(256, 48, device="cuda", dtype=torch.bfloat16)
    ref = gy.float().t() @ x.float()
    got = weight_grad(gy, x)
    assert got.shape == (80, 48) and ((got.float() - ref).norm() / ref.norm()).item() < 4e-3


def test_conversion_shares_parameters_and_reverts():
    torch.manual_seed(0)
    model = build_model("DiT-S/8", input_size=16, in_channels=4, num_classes=10)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params = {id(p) for p in model.parameters()}
    x, t, y = torch.randn(2, 4, 16, 16), torch.tensor([5, 500]), torch.tensor([1, 2])
    ref = model(x, t, y)
    assert convert_to_fused_mlp(model) == len(model.blocks)
    assert all(isinstance(b.mlp, FusedMlp) for b in model.blocks)
    assert {id(p) for p in model.parameters()} == params and model.state_dict().keys() == before.keys()
    torch.testing.assert_close(model(x, t, y), ref, rtol=1e-5, atol=1e-5)
    assert revert_fused_mlp(model) == len(model.blocks) and all(type(b.mlp) is Mlp for b in model.blocks)


def test_compiled_gradients_equal_eager():
    plain, fused = _pair()
    x, gy = torch.randn(2, 8, 24, generator=G), torch.randn(2, 8, 24, generator=G)
    eager = _run(copy.deepcopy(fused), x, gy)
    compiled = torch.compile(fused)
    got = _run(compiled, x, gy)
    for a, b in zip(eager, got):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)


def test_cublaslt_products_refuse_what_they_cannot_take():
    assert not cublaslt.available(torch.device("cpu"))
    x = torch.randn(4, 8)
    with pytest.raises(TypeError, match="bf16 or fp16"):
        cublaslt.linear_gelu(x, torch.randn(16, 8), torch.randn(16))
    with pytest.raises(ValueError, match="contiguous"):
        cublaslt.matmul_dgelu(x.bfloat16().t(), torch.randn(4, 16).bfloat16(), torch.randn(8, 16).bfloat16())
