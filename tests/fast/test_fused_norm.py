"""adaLN's fused LayerNorm, modulation and gated residual (ditkit.fast.fused_norm, norm_kernels).

The operators' equations (their CPU path) against autograd of the plain block's ops; the Triton
kernels against those equations, run by Triton's interpreter on the CPU (tests/conftest.py sets
TRITON_INTERPRET=1 where there is no GPU); the block, the final layer and a whole DiT against the
plain modules; the conversion's bookkeeping; compilation."""
import copy

import pytest
import torch
from torch import nn
from torch.library import opcheck

from ditkit.fast.blocks import checkpoint_blocks
from ditkit.fast.fused_norm import (
    FusedNormBlock,
    FusedNormFinalLayer,
    convert_to_fused_norm,
    modulated_norm_backward_op,
    modulated_norm_op,
    residual_modulated_norm,
    revert_fused_norm,
)
from ditkit.kernels import norm as norm_kernels
from ditkit.models.dit import DiT, DiTBlock, FinalLayer, build_model, modulate
from tests.conftest import rel_err

G = torch.Generator().manual_seed(0)
EPS = 1e-6


def _plain_residual_norm(x, o, gate, shift, scale, bias=None):
    """The official block's ops: x' = x + α (o + b), h = modulate(LN(x'), β, γ)."""
    stream = x + gate.unsqueeze(1) * (o if bias is None else o + bias)
    return stream, modulate(nn.functional.layer_norm(stream, stream.shape[-1:], eps=EPS), shift, scale)


def _inputs(n=3, tokens=10, width=48, dtype=torch.float32):
    x, o = torch.randn(n, tokens, width, generator=G), torch.randn(n, tokens, width, generator=G)
    cond = torch.randn(n, 3 * width, generator=G)  # a view per chunk, as adaLN's output is split
    gate, shift, scale = (c.to(dtype) for c in cond.chunk(3, dim=1))
    return x.to(dtype), o.to(dtype), gate, shift, scale


def _grads(fn, tensors, outs_grad):
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    outs = fn(*leaves)
    torch.autograd.backward(outs, outs_grad)
    return [o.detach() for o in outs], [t.grad for t in leaves]


@pytest.mark.parametrize("with_bias", [False, True])
def test_residual_operator_and_gradients_equal_the_plain_ops(with_bias):
    """With o's bias handed to the operator, its gradient (Σ_n α ⊙ Σ_t ∂x') and α's (with the bias term) too."""
    x, o, gate, shift, scale = _inputs()
    tensors = (x, o, gate, shift, scale) + ((torch.randn(x.shape[-1], generator=G),) if with_bias else ())
    g_stream, g_h = torch.randn_like(x), torch.randn_like(x)
    ref_out, ref_grads = _grads(_plain_residual_norm, tensors, (g_stream, g_h))
    got_out, got_grads = _grads(lambda *t: residual_modulated_norm(*t[:5], eps=EPS, bias=t[5] if with_bias else None),
                                tensors, (g_stream, g_h))
    assert len(got_grads) == 6 if with_bias else 5
    for a, b in zip(ref_out + ref_grads, got_out + got_grads):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)


def test_plain_norm_operator_and_gradients_equal_the_plain_ops():
    x, _, _, shift, scale = _inputs()
    g_h = torch.randn_like(x)

    def plain(x, shift, scale):
        return modulate(nn.functional.layer_norm(x, x.shape[-1:], eps=EPS), shift, scale)

    def fused(x, shift, scale):
        return modulated_norm_op(x, None, None, None, shift, scale, EPS, x.dtype)[1]

    ref_out, ref_grads = _grads(plain, (x, shift, scale), g_h)
    got_out, got_grads = _grads(fused, (x, shift, scale), g_h)
    for a, b in zip(ref_out + ref_grads, got_out + got_grads):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)


def test_operators_pass_opcheck():
    x, o, gate, shift, scale = _inputs(2, 5, 16)
    bias = torch.randn(16, generator=G)
    opcheck(modulated_norm_op, (x.requires_grad_(), o.requires_grad_(), gate.requires_grad_(), None,
                                shift.requires_grad_(), scale.requires_grad_(), EPS, torch.float32))
    opcheck(modulated_norm_op, (x, o, gate, bias.requires_grad_(), shift, scale, EPS, torch.float32))
    opcheck(modulated_norm_op, (x, None, None, None, shift, scale, EPS, torch.bfloat16))
    _, _, mean, rstd, _ = modulated_norm_op(x, None, None, None, shift, scale, EPS, torch.float32)
    opcheck(modulated_norm_backward_op, (torch.randn_like(x), torch.randn_like(x), x.detach(), o.detach(), gate.detach(),
                                         scale.detach(), mean, rstd))


needs_triton = pytest.mark.skipif(norm_kernels.triton is None, reason="Triton is not installed")


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, "mixed"])
@pytest.mark.parametrize("residual", [True, False])
# Token counts that are not multiples of the row tile; (12, 70, 1152): DiT-XL's width, whose launch
# configuration takes four rows per step and per forward program, and 64-token slices with a short last one.
@pytest.mark.parametrize("shape", [(2, 7, 48), (3, 33, 96), (12, 70, 1152)])
def test_triton_kernels_equal_the_equations(shape, residual, dtype):
    """The kernels (by Triton's interpreter on the CPU, by the GPU where there is one) against the reference
    equations: bf16 inputs and outputs round once, so each output agrees to bf16's precision or better.
    "mixed": autocast's default, a float32 stream with bf16 branch outputs, modulation and h."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    x, o, gate, shift, scale = (t.to(device) for t in _inputs(*shape, dtype=torch.float32 if dtype == "mixed" else dtype))
    if dtype == "mixed":
        o, gate, shift, scale, dtype = o.bfloat16(), gate.bfloat16(), shift.bfloat16(), scale.bfloat16(), torch.bfloat16
    o, gate = (o, gate) if residual else (None, None)
    bias = torch.randn(shape[-1], generator=G).to(device) if residual else None  # o's bias, float32 as a parameter
    # bf16: a rounding may go the other way (2⁻⁹ relative); Triton's interpreter truncates to bf16 (up to 2⁻⁸).
    tol = 1e-6 if dtype == torch.float32 else (4e-3 if device == "cuda" else 1e-2)
    ref = norm_kernels.forward_reference(x, o, gate, bias, shift, scale, EPS, dtype)
    got = norm_kernels.forward_triton(x, o, gate, bias, shift, scale, EPS, dtype)
    for a, b in zip(ref, got):
        assert (a is None) == (b is None)
        if a is not None:
            assert rel_err(b.float(), a.float()) < tol
    stream, _, mean, rstd = ref
    stream = stream if residual else x
    gh, g_next = torch.randn_like(x), (torch.randn_like(x) if residual else None)
    ref = norm_kernels.backward_reference(gh, g_next, stream, o, gate, scale, mean, rstd)
    got = norm_kernels.backward_triton(gh, g_next, stream, o, gate, scale, mean, rstd,
                                       (stream.dtype, o.dtype if o is not None else stream.dtype))
    assert got[2].shape == (4 if residual else 2, shape[0], shape[2])
    for a, b in zip(ref[:2] + tuple(ref[2]), got[:2] + tuple(got[2])):  # each token sum on its own
        assert (a is None) == (b is None)
        if a is not None:
            assert rel_err(b.float(), a) < 2 * tol
    storages = [t.untyped_storage().data_ptr() for t in got if t is not None]
    assert len(set(storages)) == len(storages)  # no two share memory: the operator's outputs may not alias


def _block_pair(cross=False):
    torch.manual_seed(0)
    plain = DiTBlock(48, num_heads=4, cross_attention=cross)
    for p in plain.parameters():  # adaLN-Zero starts at zero; random weights exercise every term
        nn.init.normal_(p, std=0.2)
    parent = nn.ModuleDict({"block": copy.deepcopy(plain)})
    assert convert_to_fused_norm(parent) == 1
    assert isinstance(parent["block"], FusedNormBlock)
    return plain, parent["block"]


def _run_block(block, x, c, gy, context=None, autocast=False):
    x, c = x.clone().requires_grad_(), c.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y = block(x, c, context)
    y.float().backward(gy)
    return [y.detach().float(), x.grad, c.grad] + [p.grad for p in block.parameters()]


@pytest.mark.parametrize("cross", [False, True])
def test_block_equals_the_plain_block(cross):
    plain, fused = _block_pair(cross)
    x, c, gy = torch.randn(2, 12, 48, generator=G), torch.randn(2, 48, generator=G), torch.randn(2, 12, 48, generator=G)
    context = torch.randn(2, 5, 48, generator=G) if cross else None
    for a, b in zip(_run_block(plain, x, c, gy, context), _run_block(fused, x, c, gy, context)):
        assert rel_err(b, a) < 1e-5  # float32 rounding: the fused form sums in another order


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_block_under_bf16_autocast_within_bf16_rounding(seed):
    """Against the float32 block, the fused block under bf16 autocast errs no more than twice the plain block
    under autocast (each output and gradient; the weights are large, std 0.2, so both err by a few %)."""
    plain, fused = _block_pair()
    g = torch.Generator().manual_seed(seed)
    x, c, gy = torch.randn(2, 12, 48, generator=g), torch.randn(2, 48, generator=g), torch.randn(2, 12, 48, generator=g)
    ref = _run_block(copy.deepcopy(plain), x, c, gy)
    got, bf16 = _run_block(fused, x, c, gy, autocast=True), _run_block(plain, x, c, gy, autocast=True)
    for r, f, b in zip(ref, got, bf16):
        err, err_plain = rel_err(f, r), rel_err(b, r)
        assert err < 5e-2 and err < 2 * err_plain + 1e-3, (err, err_plain)


def test_final_layer_equals_the_plain_one():
    torch.manual_seed(0)
    plain = FinalLayer(48, 2, 8)
    for p in plain.parameters():
        nn.init.normal_(p, std=0.2)
    parent = nn.ModuleDict({"final": copy.deepcopy(plain)})
    convert_to_fused_norm(parent)
    assert isinstance(parent["final"], FusedNormFinalLayer)
    x, c = torch.randn(2, 12, 48, generator=G), torch.randn(2, 48, generator=G)
    gy = torch.randn(2, 12, 32, generator=G)

    def run(m):
        xx = x.clone().requires_grad_()
        m(xx, c).backward(gy)
        return [xx.grad] + [p.grad for p in m.parameters()]

    for a, b in zip(run(plain), run(parent["final"])):
        assert rel_err(b, a) < 1e-5


def _randomised(model):
    for p in model.parameters():  # adaLN-Zero starts at zero; random weights exercise every term
        nn.init.normal_(p, std=0.05)
    return model


def test_conversion_shares_parameters_and_reverts():
    torch.manual_seed(0)
    model = _randomised(build_model("DiT-S/8", input_size=16, in_channels=4, num_classes=10))
    before = model.state_dict().keys()
    params = {id(p) for p in model.parameters()}
    x, t, y = torch.randn(2, 4, 16, 16), torch.tensor([5, 500]), torch.tensor([1, 2])
    ref = model(x, t, y)
    assert convert_to_fused_norm(model) == len(model.blocks) + 1
    assert all(isinstance(b, FusedNormBlock) and b.defer_residual for b in model.blocks)
    assert isinstance(model.final_layer, FusedNormFinalLayer)
    assert {id(p) for p in model.parameters()} == params and model.state_dict().keys() == before
    assert rel_err(model(x, t, y), ref) < 1e-5
    assert revert_fused_norm(model) == len(model.blocks) + 1
    assert all(type(b) is DiTBlock for b in model.blocks) and type(model.final_layer) is FinalLayer
    assert rel_err(model(x, t, y), ref) == 0


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # on a GPU, through the Triton kernels


@pytest.mark.parametrize("kwargs, deferred", [
    ({}, 2),
    ({"cond_mode": "in_context"}, 1),  # the extra tokens are dropped after the last block: it adds its own residual
    ({"cond_mode": "cross_attention"}, 2),
    ({"num_params": 2, "cond_channels": 1, "field_mode": "cross_attention"}, 2),
    ({"num_params": 2, "cond_channels": 1, "field_mode": "concat"}, 2),
    ({"checkpointing": True}, 0),  # a pending residual would keep two tensors per checkpointed block
])
def test_whole_model_with_pending_residuals_equals_the_plain_one(kwargs, deferred):
    """Each block's last residual added by the next block's kernel: outputs and every gradient as the plain DiT's."""
    kwargs = dict(kwargs)
    checkpointing = kwargs.pop("checkpointing", False)
    torch.manual_seed(0)
    plain = _randomised(build_model("custom", input_size=8, patch_size=4, in_channels=4, num_classes=10, depth=2,
                                    hidden_size=48, num_heads=4, **kwargs)).train().to(DEVICE)
    fused = copy.deepcopy(plain)
    convert_to_fused_norm(fused, defer_residual=not checkpointing)
    if checkpointing:
        checkpoint_blocks(fused)
        checkpoint_blocks(plain)
    assert sum(b.defer_residual for b in fused.blocks) == deferred
    inputs = {"x": torch.randn(2, 4, 8, 8, generator=G), "t": torch.tensor([3, 700]), "y": torch.tensor([1, 2]),
              "force_drop_ids": torch.tensor([0, 1])}
    if kwargs.get("num_params"):
        inputs.update(params=torch.randn(2, 2, generator=G), field=torch.randn(2, 1, 8, 8, generator=G))
    inputs = {k: v.to(DEVICE) for k, v in inputs.items()}
    gy = torch.randn(2, 8, 8, 8, generator=G).to(DEVICE)

    def run(model):
        model(**inputs).backward(gy)
        return [model(**inputs).detach()] + [p.grad for p in model.parameters()]

    for a, b in zip(run(plain), run(fused)):
        assert (a is None) == (b is None)
        assert a is None or torch.equal(a, b) or rel_err(b, a) < 1e-5  # equal: zero (adaLN's weights when c = 0)


def test_whole_model_with_fused_mlp_and_norm_equals_the_plain_one():
    """Both conversions: fc2's bias left to the next norm kernel through ``FusedMlp.forward(with_bias=False)``,
    proj's through ``Attention.attend``; the output and every gradient as the plain DiT's."""
    from ditkit.fast.fused_mlp import convert_to_fused_mlp
    torch.manual_seed(0)
    plain = _randomised(build_model("custom", input_size=8, patch_size=4, in_channels=4, num_classes=10, depth=2,
                                    hidden_size=48, num_heads=4)).train().to(DEVICE)
    fused = copy.deepcopy(plain)
    convert_to_fused_mlp(fused)
    convert_to_fused_norm(fused)
    x, t, y = torch.randn(2, 4, 8, 8, generator=G).to(DEVICE), torch.tensor([3, 700]).to(DEVICE), torch.tensor([1, 2]).to(DEVICE)

    drop = torch.tensor([0, 1]).to(DEVICE)  # in training mode labels drop at random unless forced

    def run(model):
        out = model(x, t, y, force_drop_ids=drop)
        out.square().sum().backward()
        return [out.detach()] + [p.grad for p in model.parameters()]

    ref, got = run(plain), run(fused)
    assert [g is None for g in got] == [g is None for g in ref]  # proj's and fc2's biases get theirs too
    for a, b in zip(ref, got):
        assert a is None or torch.equal(a, b) or rel_err(b, a) < 1e-5


def test_compiled_model_equals_eager():
    """torch.compile of a converted DiT (pending residuals, the operators opaque to inductor): the same
    output and gradients as eager."""
    torch.manual_seed(0)
    model = _randomised(build_model("custom", input_size=8, patch_size=4, in_channels=4, num_classes=10, depth=2,
                                    hidden_size=48, num_heads=4)).train().to(DEVICE)
    convert_to_fused_norm(model)
    x, t, y = torch.randn(2, 4, 8, 8, generator=G).to(DEVICE), torch.tensor([3, 700]).to(DEVICE), torch.tensor([1, 2]).to(DEVICE)
    drop = torch.tensor([0, 1]).to(DEVICE)

    def run(net):
        model.zero_grad()
        out = net(x, t, y, force_drop_ids=drop)
        out.square().sum().backward()
        return [out.detach()] + [p.grad.clone() for p in model.parameters() if p.grad is not None]

    eager, got = run(model), run(torch.compile(model))
    assert len(eager) == len(got)
    for a, b in zip(eager, got):
        assert torch.equal(a, b) or rel_err(b, a) < 1e-5


def test_under_fsdp_a_fused_block_returns_no_view():
    """FSDP2 hooks a block's output tensors for its backward and warns of a view, whose in-place change would drop
    the hook: the fused blocks under FSDP hand on copies where a tensor would be a view (the adaLN gate's chunk)."""
    import warnings

    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        model = DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=2, num_classes=10)
        assert convert_to_fused_norm(model) == 3
        for block in model.blocks:
            fully_shard(block)
        fully_shard(model)
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            out = model(torch.randn(2, 4, 8, 8), torch.randint(0, 1000, (2,)), torch.randint(0, 10, (2,)))
            out.square().mean().backward()
        assert not [w for w in seen if "view tensor" in str(w.message)]
    finally:
        dist.destroy_process_group()
