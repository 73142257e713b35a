"""The fused MLP (ditkit.models.fused_mlp): its operators against the plain MLP's autograd, the
conversion's bookkeeping, and compilation.  On the CPU the operators compute with torch's ops; the
cuBLASLt products themselves are checked on a GPU by benchmarks/fused_mlp_check.py."""
import copy

import pytest
import torch
from torch import nn
from torch.library import opcheck

from ditkit.models import cublaslt
from ditkit.models.dit import Mlp, build_model
from ditkit.models.fused_mlp import FusedMlp, convert_to_fused_mlp, dgelu_matmul, gelu_mlp, revert_fused_mlp

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
