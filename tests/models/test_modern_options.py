"""LightningDiT's architecture options of DiT (ditkit.models.layers): RoPE, RMSNorm, QK-norm and SwiGLU,
each against an independent reference, and every combination trained one step and saved."""
import itertools

import pytest
import torch
import torch.nn.functional as F

import ditkit
from ditkit.checkpoints import save_weights
from ditkit.checkpoints.training import save_checkpoint
from ditkit.config import ConfigError, load_config
from ditkit.models.dit import DiT, build_model
from ditkit.models.layers import RMSNorm, SwiGLU, apply_rope, rope_angles, swiglu_hidden
from tests.models.dit_cases import randomised

SMALL = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=2, num_heads=4, num_classes=10)
COMBINATIONS = list(itertools.product(("sincos", "rope"), ("layernorm", "rmsnorm"), (False, True), ("gelu", "swiglu")))



@pytest.mark.parametrize("axis", ["row", "col"])
def test_rotary_scores_depend_only_on_relative_offsets(axis):
    torch.manual_seed(0)
    d, n = 16, 5
    q, k = torch.randn(n, d, dtype=torch.float64), torch.randn(n, d, dtype=torch.float64)
    rows, cols = torch.randint(0, 9, (n,)), torch.randint(0, 9, (n,))
    shift = 7
    # q at token i's position, k at token j's: q_i·k_j with both shifted by s along one axis is unchanged.
    qa, ka = rope_angles(d, rows, cols), rope_angles(d, rows + shift * (axis == "row"), cols + shift * (axis == "col"))
    for i, j in itertools.product(range(n), range(n)):
        pair = torch.stack([rows[[i, j]], cols[[i, j]]])
        moved = pair + torch.tensor([[shift], [0]] if axis == "row" else [[0], [shift]])
        base = rope_angles(d, *pair).double()
        other = rope_angles(d, *moved).double()
        s0 = apply_rope(q[i], base[0]) @ apply_rope(k[j], base[1])
        s1 = apply_rope(q[i], other[0]) @ apply_rope(k[j], other[1])
        torch.testing.assert_close(s1, s0, rtol=1e-5, atol=1e-5)  # apply_rope computes in float32
    assert qa.shape == ka.shape == (n, d // 2)
    # and a shift along an axis moves only the angles of that axis's half of the dims
    moved_half = slice(0, d // 4) if axis == "row" else slice(d // 4, d // 2)
    kept_half = slice(d // 4, d // 2) if axis == "row" else slice(0, d // 4)
    assert torch.equal(qa[:, kept_half], ka[:, kept_half]) and not torch.equal(qa[:, moved_half], ka[:, moved_half])
    # RoPE at offset 0 is the identity
    zero = rope_angles(d, torch.zeros(n, dtype=torch.long), torch.zeros(n, dtype=torch.long))
    torch.testing.assert_close(apply_rope(q.float(), zero), q.float())


def test_rms_norm_is_scale_invariant_and_equals_torch():
    torch.manual_seed(0)
    x = torch.randn(3, 7, 32)
    norm = RMSNorm(32, eps=1e-6)
    for c in (0.5, 3.0, 40.0):
        torch.testing.assert_close(norm(c * x), norm(x), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(norm(x), F.rms_norm(x, (32,), eps=1e-6))
    affine = RMSNorm(32, eps=1e-6, elementwise_affine=True)
    affine.weight.data.normal_()
    torch.testing.assert_close(affine(x), F.rms_norm(x, (32,), affine.weight, eps=1e-6))


def test_qk_norm_makes_attention_independent_of_the_scale_of_q_and_k():
    torch.manual_seed(0)
    model = randomised(DiT(**SMALL, qk_norm=True))
    attn = model.blocks[0].attn
    x = torch.randn(2, 16, 64)
    ref = attn(x)
    D = 64
    with torch.no_grad():  # q and k scaled by 5, v left alone
        attn.qkv.weight[: 2 * D] *= 5
        attn.qkv.bias[: 2 * D] *= 5
    torch.testing.assert_close(attn(x), ref, rtol=1e-4, atol=1e-5)
    plain = randomised(DiT(**SMALL)).blocks[0].attn
    out = plain(x)
    with torch.no_grad():
        plain.qkv.weight[: 2 * D] *= 5
        plain.qkv.bias[: 2 * D] *= 5
    assert not torch.allclose(plain(x), out, atol=1e-3)  # the official attention does depend on it


def test_swiglu_equals_the_product_by_hand_and_keeps_the_parameter_count():
    torch.manual_seed(0)
    mlp = SwiGLU(64, 96)
    x = torch.randn(2, 5, 64)
    w1, w3 = mlp.w12.weight[:96], mlp.w12.weight[96:]
    b1, b3 = mlp.w12.bias[:96], mlp.w12.bias[96:]
    by_hand = (F.silu(x @ w1.T + b1) * (x @ w3.T + b3)) @ mlp.w3.weight.T + mlp.w3.bias
    torch.testing.assert_close(mlp(x), by_hand)
    assert swiglu_hidden(1152, 4.0) == 3072 and swiglu_hidden(64, 4.0) == 170  # int(2/3 · int(r · D))
    for name in ("DiT-S/2", "DiT-XL/2"):
        gelu, swiglu = (sum(p.numel() for p in build_model(name, mlp=m).parameters()) for m in ("gelu", "swiglu"))
        assert abs(swiglu - gelu) / gelu < 0.01, (name, gelu, swiglu)


@pytest.mark.parametrize("pos_embed, norm, qk_norm, mlp", COMBINATIONS)
def test_every_combination_builds_runs_and_trains(pos_embed, norm, qk_norm, mlp):
    torch.manual_seed(0)
    model = randomised(DiT(**SMALL, pos_embed=pos_embed, norm=norm, qk_norm=qk_norm, mlp=mlp))
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([3, 700]), torch.tensor([1, 2])
    out = model(x, t, y)
    assert out.shape == (2, 8, 8, 8) and torch.isfinite(out).all()
    out.square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)
    keys = set(model.state_dict())
    official = set(DiT(**SMALL).state_dict())
    assert ("pos_embed" in keys) == (pos_embed == "sincos")
    assert any(".q_norm.weight" in k for k in keys) == qk_norm
    assert any(".mlp.w12.weight" in k for k in keys) == (mlp == "swiglu")
    if (pos_embed, norm, qk_norm, mlp) == COMBINATIONS[0]:
        assert keys == official


def test_rope_alone_carries_the_positions():
    """Without a table the tokens' order matters only through RoPE: with it, permuting the patches changes
    the output beyond moving it; with neither table nor RoPE attention would be permutation-equivariant."""
    model = randomised(DiT(**SMALL, pos_embed="rope")).eval()
    x, t, y = torch.randn(1, 4, 8, 8), torch.tensor([10]), torch.tensor([3])
    flipped = model(x.flip(-1), t, y).flip(-1)
    assert not torch.allclose(flipped, model(x, t, y), atol=1e-4)


def test_unknown_options_are_one_clear_error():
    with pytest.raises(ValueError, match="norm must be 'layernorm' or 'rmsnorm', got 'batchnorm'"):
        DiT(**SMALL, norm="batchnorm")
    with pytest.raises(ValueError, match="head size divisible by 4"):
        DiT(**{**SMALL, "hidden_size": 72, "num_heads": 4}, pos_embed="rope")
    with pytest.raises(ConfigError, match="model.mlp must be gelu or swiglu, got 'relu'"):
        load_config("digits", overrides=["model.mlp=relu"])
    with pytest.raises(ConfigError, match=r"model.pos_embed=rope needs a head size \(model.hidden_size / "
                                          r"model.num_heads = 6\) divisible by 4"):  # at load, before any training
        load_config("digits", overrides=["model.hidden_size=24", "model.num_heads=4", "model.pos_embed=rope"])
    with pytest.raises(ConfigError, match="model.hidden_size=30 is not divisible by model.num_heads=4"):
        load_config("digits", overrides=["model.hidden_size=30", "model.num_heads=4"])


def test_a_checkpoint_with_options_loads_back_with_the_same_outputs(tmp_path):
    cfg = load_config("digits", overrides=["model.pos_embed=rope", "model.norm=rmsnorm", "model.qk_norm=true",
                                           "model.mlp=swiglu"])
    model = randomised(build_model(cfg.model.name, **cfg.model.kwargs())).eval()
    assert model.options == {"pos_embed": "rope", "norm": "rmsnorm", "qk_norm": True, "mlp": "swiglu"}
    state = {"model": model.state_dict(), "ema": model.state_dict(), "config": cfg.to_dict(), "step": 1}
    path = save_checkpoint(state, tmp_path, 1, keep_last=1)
    loaded, loaded_cfg = ditkit.load_model(path, device="cpu")
    assert loaded_cfg.model == cfg.model and loaded.options == model.options
    H, W = model.input_size
    x = torch.randn(2, model.in_channels, H, W)
    t = torch.tensor([5, 500])
    y = torch.tensor([1, 2]) if model.num_classes else None
    save_weights(model.state_dict(), model, cfg, tmp_path / "ema.safetensors")  # what a run writes at its end
    from_weights, weights_cfg = ditkit.load_model(tmp_path / "ema.safetensors", device="cpu")
    assert weights_cfg.model.mlp == "swiglu" and from_weights.options == model.options
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, t, y), model(x, t, y), rtol=0, atol=0)
        torch.testing.assert_close(from_weights(x, t, y), model(x, t, y), rtol=0, atol=0)
