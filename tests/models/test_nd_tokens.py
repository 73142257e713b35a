"""The same DiT on (B, C, L) sequences and (B, C, T, H, W) volumes or videos: shapes, the token bookkeeping
against the patch convolution, the 1D and 3D sin-cos tables against their closed forms, RoPE's relative
offsets per axis, the errors, the config and the speed door."""
import copy
import itertools
import math
from pathlib import Path

import pytest
import torch

from ditkit.checkpoints.diffusers import to_diffusers_state_dict
from ditkit.checkpoints.official import model_config
from ditkit.config import ConfigError, load_config
from ditkit.fast.recipes import TrainRun, TrainSpeed, train_speed
from ditkit.models.dit import DiT, PatchEmbed, build_model
from ditkit.models.grid import TokenGrid
from ditkit.models.layers import (
    apply_rope,
    grid_rope_angles,
    rope_angles,
    rope_axis_pairs,
)
from ditkit.models.pos_embed import (
    sincos_2d_pos_embed,
    sincos_3d_pos_embed,
    sincos_pos_embed,
)
from tests.models.dit_cases import randomised

TINY = dict(in_channels=3, hidden_size=32, depth=2, num_heads=2, num_classes=5)
CASES = {"1d": ((24,), 4), "3d": ((4, 8, 12), (2, 4, 4))}  # non-cubic, a patch per axis



@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("pos_embed", ["sincos", "rope"])
def test_forward_and_backward_keep_the_input_shape(case, pos_embed):
    size, patch = CASES[case]
    model = randomised(DiT(input_size=size, patch_size=patch, pos_embed=pos_embed, **TINY))
    x, t, y = torch.randn(2, 3, *size), torch.tensor([3.0, 700.0]), torch.tensor([1, 4])
    out = model(x, t, y)
    assert out.shape == (2, 6, *size) and torch.isfinite(out).all()  # learn_sigma: ε and v, 2 × 3 channels
    out.square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)
    tokens = math.prod(n // p for n, p in zip(size, TokenGrid.of(size, patch).patch))
    assert model.grid.num_tokens == tokens and model.x_embedder.proj.weight.dim() == 2 + len(size)
    assert (model.pos_embed is None) == (pos_embed == "rope")
    plain = DiT(input_size=size, patch_size=patch, learn_sigma=False, **TINY)
    assert plain(x, t, y).shape == (2, 3, *size)


@pytest.mark.parametrize("field_mode", ["cross_attention", "concat"])
@pytest.mark.parametrize("case", CASES)
def test_conditioning_fields_and_tokens_of_any_dimension(case, field_mode):
    size, patch = CASES[case]
    kw = dict(TINY, num_classes=0, num_params=2, cond_channels=2, field_mode=field_mode, cond_mode="in_context")
    model = randomised(DiT(input_size=size, patch_size=patch, learn_sigma=False, **kw))
    out = model(torch.randn(2, 3, *size), torch.tensor([1.0, 9.0]), params=torch.randn(2, 2),
                field=torch.randn(2, 2, *size))
    assert out.shape == (2, 3, *size) and torch.isfinite(out).all()


@pytest.mark.parametrize("size, patch", [((10,), 5), ((6, 10), (3, 2)), ((4, 6, 10), (2, 3, 5)), ((2, 4, 6), 1)])
def test_patchify_and_unpatchify_are_inverse_and_order_tokens_as_the_patch_convolution(size, patch):
    grid = TokenGrid.of(size, patch)
    torch.manual_seed(0)
    x = torch.randn(2, 3, *size)
    tokens = grid.patchify(x)
    assert tokens.shape == (2, grid.num_tokens, grid.patch_numel * 3)
    assert torch.equal(grid.unpatchify(tokens), x)
    other = torch.randn_like(tokens)
    assert torch.equal(grid.patchify(grid.unpatchify(other)), other)
    # The convolution's tokens are the patchified values times its kernel laid out as (p_0, …, p_{d−1}, C).
    embed = PatchEmbed(grid.patch, 3, 8)
    w = embed.proj.weight.permute(0, *range(2, 2 + grid.dims), 1).reshape(8, -1)  # (D, patch_numel·C)
    torch.testing.assert_close(embed(x), tokens @ w.T + embed.proj.bias, rtol=1e-5, atol=1e-5)
    # each token's coordinates are those of its patch: token n holds the patch at grid.coords()[a][n] · p_a
    coords = grid.coords()
    n = grid.num_tokens - 2
    corner = x[(slice(None), 0, *[slice(int(c[n]) * p, int(c[n]) * p + 1) for c, p in zip(coords, grid.patch)])]
    assert torch.equal(tokens[:, n, 0], corner.reshape(2))


def test_unpatchify_in_2d_is_the_official_einsum():
    grid = TokenGrid.of((4, 6), 2)
    tokens = torch.randn(2, grid.num_tokens, 4 * 5)
    h, w = grid.shape
    official = torch.einsum("nhwpqc->nchpwq", tokens.reshape(2, h, w, 2, 2, 5)).reshape(2, 5, 4, 6)
    assert torch.equal(grid.unpatchify(tokens), official)


def test_sincos_1d_table_is_the_closed_form():
    D, L = 12, 9
    table = sincos_pos_embed(D, (L,))
    expected = [[math.sin(n * 10000 ** (-2 * k / D)) for k in range(D // 2)]
                + [math.cos(n * 10000 ** (-2 * k / D)) for k in range(D // 2)] for n in range(L)]
    torch.testing.assert_close(table, torch.tensor(expected, dtype=torch.float32), rtol=0, atol=1e-6)


def test_sincos_3d_table_is_the_closed_form_of_its_factorisation():
    """Token (t, h, w) in row-major order: D/4 channels [sin, cos](t ω) with ω_k = 10000^(-2k/(D/4)), then the
    official 2D layout of width 3D/4: [sin, cos](w ω'), [sin, cos](h ω') with ω'_k = 10000^(-2k/(3D/8))."""
    D, (T, H, W) = 32, (3, 2, 4)
    table = sincos_3d_pos_embed(D, (T, H, W))
    dt, ds = D // 4, 3 * D // 8  # temporal width, width of each spatial axis

    def part(pos, width):
        omegas = [10000 ** (-2 * k / width) for k in range(width // 2)]
        return [math.sin(pos * o) for o in omegas] + [math.cos(pos * o) for o in omegas]

    expected = [part(t, dt) + part(w, ds) + part(h, ds) for t, h, w in itertools.product(range(T), range(H), range(W))]
    torch.testing.assert_close(table, torch.tensor(expected, dtype=torch.float32), rtol=0, atol=1e-6)
    assert torch.equal(sincos_pos_embed(D, (T, H, W)), table)


def test_a_3d_table_at_a_fixed_frame_is_the_2d_table_beside_one_temporal_row():
    D, (T, H, W) = 64, (5, 3, 7)
    table = sincos_3d_pos_embed(D, (T, H, W)).reshape(T, H * W, D)
    flat_2d = sincos_2d_pos_embed(3 * D // 4, (H, W))
    for t in range(T):
        assert torch.equal(table[t, :, D // 4:], flat_2d)
        assert torch.equal(table[t, :, : D // 4], table[t, :1, : D // 4].expand(H * W, -1))  # the frame's own row
    assert not torch.equal(table[0, 0, : D // 4], table[1, 0, : D // 4])
    # the 2D table is still the official one, and a 3D model's pos_embed is this table
    assert torch.equal(sincos_pos_embed(D, (H, W)), sincos_2d_pos_embed(D, (H, W)))
    model = DiT(input_size=(10, 6, 14), patch_size=2, **dict(TINY, hidden_size=64))
    assert torch.equal(model.pos_embed[0], table.reshape(-1, D))


@pytest.mark.parametrize("grid", [(7,), (3, 4, 5)])
def test_rope_scores_depend_only_on_relative_offsets(grid):
    """With one q and one k for every token, q_i·k_j after RoPE at the tokens' positions depends only on the
    offset p_j − p_i along each axis, and does vary with it."""
    torch.manual_seed(0)
    head_dim = 24
    q, k = torch.randn(head_dim, dtype=torch.float64), torch.randn(head_dim, dtype=torch.float64)
    angles = grid_rope_angles(head_dim, grid)  # (N, head_dim/2)
    coords = torch.stack(TokenGrid.of(grid, 1).coords(), dim=1)  # (N, dims)
    scores = apply_rope(q.expand(len(angles), -1), angles) @ apply_rope(k.expand(len(angles), -1), angles).T
    by_offset = {}
    for i, j in itertools.product(range(len(coords)), repeat=2):
        by_offset.setdefault(tuple((coords[j] - coords[i]).tolist()), []).append(scores[i, j])
    assert all(torch.allclose(torch.stack(s), s[0], rtol=0, atol=1e-5) for s in by_offset.values())
    firsts = torch.stack([s[0] for s in by_offset.values()])
    assert firsts.std() > 0.1  # offsets along every axis matter
    # a shift along one axis moves only that axis's pairs, in the split rope_axis_pairs gives
    pairs = rope_axis_pairs(head_dim, len(grid))
    start = 0
    for axis, n in enumerate(pairs):
        moved = [c + 3 * (a == axis) for a, c in enumerate(TokenGrid.of(grid, 1).coords())]
        changed = (rope_angles(head_dim, *moved) != angles).any(dim=0)
        assert changed[start:start + n].all() and changed.sum() == n
        start += n


def test_rope_splits_the_pairs_between_axes():
    assert rope_axis_pairs(64, 2) == (16, 16)  # the 2D split: half each
    assert rope_axis_pairs(64, 3) == (12, 10, 10) and rope_axis_pairs(72, 3) == (12, 12, 12)
    assert rope_axis_pairs(128, 3) == (22, 21, 21) and rope_axis_pairs(16, 1) == (8,)


def test_errors_name_the_axis_and_the_key():
    with pytest.raises(ValueError, match=r"input axis 2 \(W\) has size 30, not divisible by patch size 4"):
        DiT(input_size=(8, 16, 30), patch_size=4, **TINY)
    with pytest.raises(ValueError, match=r"input axis 0 \(L\) has size 30, not divisible by patch size 4"):
        DiT(input_size=(30,), patch_size=4, **TINY)
    assert TokenGrid.of(8, [2, 4, 4]).size == (8, 8, 8) and TokenGrid.of(8, [4]).size == (8,)  # an int on every axis
    with pytest.raises(ValueError, match=r"patch_size \(1, 2\) has 2 axes but the input has 3 \(T, H, W\)"):
        DiT(input_size=(8, 16, 16), patch_size=(1, 2), **TINY)
    with pytest.raises(ValueError, match="input_size must be an int or 1 to 3 sizes"):
        DiT(input_size=(2, 2, 2, 2), patch_size=1, **TINY)
    with pytest.raises(ValueError, match=r"input of shape \(1, 3, 8, 16\); the model takes \(B, C, T, H, W\)"):
        DiT(input_size=(4, 8, 16), patch_size=2, **TINY)(torch.randn(1, 3, 8, 16), torch.ones(1), torch.ones(1).long())
    with pytest.raises(ValueError, match="divisible by 16 for the 3D sin-cos"):
        DiT(input_size=(4, 8, 16), patch_size=2, **dict(TINY, hidden_size=40))
    with pytest.raises(ValueError, match="a rotation pair for each of the 3 axes"):
        DiT(input_size=(4, 8, 16), patch_size=2, pos_embed="rope", **dict(TINY, hidden_size=16, num_heads=4))
    with pytest.raises(ConfigError, match=r"model.input_size=\[8, 16, 30\] with model.patch_size=4: input axis 2 \(W\)"):
        load_config("digits", ["model.input_size=[8, 16, 30]", "model.patch_size=4"])
    with pytest.raises(ConfigError, match=r"model.input_size must be a positive int or a list of 1 to 3 positive ints"):
        load_config("digits", ["model.input_size=[8, 0]"])
    with pytest.raises(ConfigError, match=r"model.patch_size must be a positive int or a list"):
        load_config("digits", ["model.patch_size=[1, 2.5]"])
    with pytest.raises(ConfigError, match=r"model.patch_size=\[1, 2\]: patch_size \[1, 2\] has 2 axes"):
        load_config("digits", ["model.input_size=[4, 8, 8]", "model.patch_size=[1, 2]"])


def test_a_config_builds_a_video_model_that_rebuilds_from_its_own_arguments():
    cfg = load_config("digits", ["model.input_size=[4, 8, 12]", "model.patch_size=[1, 4, 4]", "model.in_channels=2",
                                 "model.pos_embed=rope"])
    model = build_model(cfg.model.name, **cfg.model.kwargs())
    assert model.input_size == (4, 8, 12) and model.grid_size == (4, 2, 3) and model.patch_size == (1, 4, 4)
    rebuilt = DiT(**model_config(model))
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}
    one_d = build_model("custom", **load_config("digits", ["model.input_size=[16]"]).model.kwargs())
    assert one_d.grid_size == (8,) and model_config(one_d)["input_size"] == [16]


@pytest.mark.parametrize("case", CASES)
def test_the_speed_door_serves_models_of_any_dimension(case):
    """The fused levers work on tokens (B, N, D): through the door, a 1D or 3D model gives the plain outputs
    and gradients (on a CPU the fused modules compute with torch's ops)."""
    size, patch = CASES[case]
    plain = randomised(DiT(input_size=size, patch_size=patch, **TINY)).eval()
    fused = copy.deepcopy(plain)
    levers = TrainSpeed(fused_mlp=True, fused_attention=True, tuned_linear=True, fused_norm=True)
    plan = train_speed(levers, TrainRun(device=torch.device("cpu"), amp_dtype=None))
    assert len(plan.apply(fused)) == 4 and not plan.notes
    x, t, y = torch.randn(2, 3, *size), torch.tensor([5.0, 500.0]), torch.tensor([1, 2])
    outs = []
    for model in (plain, fused):
        out = model(x, t, y)
        out.square().mean().backward()
        outs.append([out.detach()] + [p.grad for p in model.parameters() if p.requires_grad])
    for a, b in zip(*outs):
        torch.testing.assert_close(b, a, rtol=2e-5, atol=2e-5)


def test_the_guide_runs_as_written():
    """docs/training.md#tokens-of-any-dimension: its Python block, as a user types it."""
    text = (Path(__file__).parents[2] / "docs" / "training.md").read_text()
    section = text.split("## Tokens of any dimension", 1)[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    scope = {}
    exec(code, scope)
    assert scope["out"].shape == (2, 8, 4, 8, 8) and scope["x"].shape == (8, 2, 64)
    assert scope["model"].grid_size == (16,) and scope["nfe"] == 20  # Heun: 2 per step


def test_diffusers_export_refuses_what_its_2d_model_cannot_hold():
    for size, patch in (((16,), 4), ((4, 8, 8), (1, 2, 2)), ((8, 8, 8), 2), ((8, 8), (2, 2))):
        model = DiT(input_size=size, patch_size=patch, **TINY)
        with pytest.raises(ValueError, match=r"cannot represent model\.(input_size|patch_size)="):
            to_diffusers_state_dict(model.state_dict(), model_config(model))
