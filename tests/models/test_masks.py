"""Variable lengths: a 1D DiT on a batch padded to its longest sequence, with a (B, L) padding mask.  The key
property: the output on a sequence's real positions is the output of that sequence alone, whatever the
padding holds and whatever the position embedding (sin-cos table or RoPE); the errors; the speed door."""
from pathlib import Path

import pytest
import torch

from ditkit.fast.recipes import TrainRun, TrainSpeed, resolve_train_speed
from ditkit.models.dit import DiT
from tests.models.dit_cases import randomised

TINY = dict(in_channels=3, hidden_size=32, depth=2, num_heads=2, num_classes=5)
L, P = 24, 4  # the model's length and patch size
LENGTHS = [8, 16, 12]  # padded to 16, shorter than L


def _padded(lengths: list[int], channels: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, C, max) sequences whose padding is large noise (it must change nothing), and the (B, max) mask."""
    longest = max(lengths)
    mask = torch.arange(longest) < torch.tensor(lengths)[:, None]
    x = torch.where(mask[:, None], torch.randn(len(lengths), channels, longest), 100 * torch.randn(len(lengths), channels, longest))
    return x, mask


@pytest.mark.parametrize("pos_embed, cond_mode", [("sincos", "adaln"), ("rope", "adaln"), ("sincos", "in_context")])
def test_real_positions_match_each_sequence_alone(pos_embed, cond_mode):
    model = randomised(DiT(input_size=(L,), patch_size=P, pos_embed=pos_embed, cond_mode=cond_mode, **TINY)).eval()
    torch.manual_seed(0)
    x, mask = _padded(LENGTHS)
    t, y = torch.tensor([3.0, 500.0, 999.0]), torch.tensor([0, 4, 2])
    out = model(x, t, y, mask=mask)
    assert out.shape == (3, 6, max(LENGTHS)) and torch.isfinite(out).all()
    for i, n in enumerate(LENGTHS):
        alone = model(x[i:i + 1, :, :n], t[i:i + 1], y[i:i + 1])
        torch.testing.assert_close(out[i:i + 1, :, :n], alone, rtol=1e-5, atol=1e-5)
    full = torch.cat([x, torch.randn(3, 3, L - max(LENGTHS))], dim=2)  # padded to the model's L instead
    out_full = model(full, t, y, mask=torch.cat([mask, mask.new_zeros(3, L - max(LENGTHS))], dim=1))
    torch.testing.assert_close(out_full[:, :, :max(LENGTHS)] * mask[:, None], out * mask[:, None], rtol=1e-5, atol=1e-5)


def test_an_all_real_mask_changes_nothing_and_none_is_the_plain_model():
    model = randomised(DiT(input_size=(L,), patch_size=P, **TINY)).eval()
    x, t, y = torch.randn(2, 3, L), torch.tensor([1.0, 700.0]), torch.tensor([1, 3])
    plain = model(x, t, y)
    torch.testing.assert_close(model(x, t, y, mask=torch.ones(2, L, dtype=torch.bool)), plain, rtol=1e-5, atol=1e-5)
    assert torch.equal(model(x, t, y, mask=None), plain)


def test_padded_inputs_get_no_gradient():
    model = randomised(DiT(input_size=(L,), patch_size=P, pos_embed="rope", **TINY)).eval()
    x, mask = _padded(LENGTHS)
    x.requires_grad_(True)
    out = model(x, torch.tensor([5.0, 50.0, 500.0]), torch.tensor([0, 1, 2]), mask=mask)
    (out * mask[:, None]).square().sum().backward()  # a loss of the real positions only
    assert x.grad[~mask[:, None].expand_as(x)].abs().max() == 0 and x.grad[mask[:, None].expand_as(x)].abs().sum() > 0


def test_errors_name_the_rule():
    model = DiT(input_size=(L,), patch_size=P, **TINY)
    t, y = torch.zeros(2), torch.zeros(2, dtype=torch.long)
    with pytest.raises(ValueError, match="sequence length 10 is not a multiple of the patch size 4"):
        model(torch.randn(2, 3, 10), t, y)
    mask = torch.arange(12) < torch.tensor([8, 6])[:, None]
    with pytest.raises(ValueError, match="not a multiple of the patch size 4"):
        model(torch.randn(2, 3, 12), t, y, mask=mask)
    with pytest.raises(ValueError, match="at least one token"):
        model(torch.randn(2, 3, 12), t, y, mask=torch.arange(12) < torch.tensor([8, 0])[:, None])
    with pytest.raises(ValueError, match=r"bool tensor of shape \(B, L\)"):
        model(torch.randn(2, 3, 12), t, y, mask=torch.ones(2, 8, dtype=torch.bool))
    with pytest.raises(ValueError, match="takes"):
        model(torch.randn(2, 3, 28), t, y)  # longer than the model's length
    with pytest.raises(ValueError, match="pos_embed='rope' does not combine with cond_mode='in_context'"):
        DiT(input_size=(L,), patch_size=P, pos_embed="rope", cond_mode="in_context", **TINY)
    image = DiT(input_size=8, patch_size=4, **TINY)
    with pytest.raises(ValueError, match=r"bool tensor of shape \(B, H, W\) = \(2, 8, 8\)"):
        image(torch.randn(2, 3, 8, 8), t, y, mask=torch.ones(2, 8, dtype=torch.bool))
    volume = DiT(input_size=(4, 8, 8), patch_size=(1, 4, 4), **TINY)
    with pytest.raises(ValueError, match=r"input axis 2 \(W\) has size 6 is not a multiple of the patch size 4"):
        volume(torch.randn(2, 3, 4, 8, 6), t, y)
    rope = DiT(input_size=(4, 8, 8), patch_size=(1, 4, 4), pos_embed="rope", **TINY)
    with pytest.raises(ValueError, match="RoPE|pos_embed='rope' takes inputs smaller than the model's size in 1D only"):
        rope(torch.randn(2, 3, 2, 8, 8), t, y)


@pytest.mark.parametrize("size, patch, extents", [
    ((4, 8, 8), (1, 4, 4), [(2, 8, 4), (3, 4, 8), (1, 4, 4)]),   # videos: frames × height × width
    ((8, 8, 8), (2, 2, 2), [(4, 4, 6), (6, 2, 4), (2, 6, 6)]),   # volumes
    ((12, 16), 4, [(8, 12), (12, 4), (4, 16)]),                 # images of different sizes
])
def test_volumes_and_images_of_different_sizes_match_each_alone(size, patch, extents):
    model = randomised(DiT(input_size=size, patch_size=patch, **TINY)).eval()
    torch.manual_seed(2)
    largest = tuple(max(e[a] for e in extents) for a in range(len(size)))
    mask = torch.zeros(len(extents), *largest, dtype=torch.bool)
    for i, e in enumerate(extents):
        mask[(i, *[slice(0, n) for n in e])] = True
    x = torch.where(mask[:, None], torch.randn(len(extents), 3, *largest), 100 * torch.randn(len(extents), 3, *largest))
    t, y = torch.tensor([3.0, 500.0, 999.0]), torch.tensor([0, 4, 2])
    out = model(x, t, y, mask=mask)
    for i, e in enumerate(extents):
        region = (slice(i, i + 1), slice(None), *[slice(0, n) for n in e])
        alone = model(x[region], t[i:i + 1], y[i:i + 1])
        torch.testing.assert_close(out[region], alone, rtol=1e-5, atol=1e-5)
    full = model(torch.zeros(1, 3, *size), t[:1], y[:1])  # the model's own size: the plain path, no mask
    assert full.shape == (1, 6, *size)


def test_the_speed_door_leaves_the_fused_attention_out_of_masked_runs():
    gpu = torch.device("cuda")
    speed, notes = resolve_train_speed("fast", TrainRun(gpu, torch.bfloat16, masked=True))
    assert not speed.fused_attention and not speed.fused_norm and speed.fused_mlp
    assert any("left out fused_attention: its operator takes no attention mask" in n for n in notes)
    assert resolve_train_speed("fast", TrainRun(gpu, torch.bfloat16))[0].fused_attention
    with pytest.raises(ValueError, match="fused_attention=True cannot serve this run: its operator takes no attention mask"):
        resolve_train_speed(TrainSpeed(fused_attention=True), TrainRun(gpu, torch.bfloat16, masked=True))


def test_the_guide_runs_as_written():
    """docs/training.md#variable-lengths: its Python block, as a user types it."""
    text = (Path(__file__).parents[2] / "docs" / "training.md").read_text()
    code = text.split("### Variable lengths", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    scope = {}
    exec(code, scope)
    assert [tuple(s.shape) for s in scope["seqs"]] == [(2, 8), (2, 40), (2, 64)] and scope["nfe"] == 5


def test_volumes_of_requested_sizes_are_generated_and_their_loss_counts_real_positions():
    from ditkit.config import SampleConfig
    from ditkit.objectives.flow import FlowMatching
    from ditkit.sampling import generate_sizes

    model = randomised(DiT(input_size=(4, 8, 8), patch_size=(1, 4, 4), learn_sigma=False, **TINY)).eval()
    objective = FlowMatching()
    sizes = [(2, 8, 4), (4, 4, 8)]
    y = torch.tensor([1, 2])
    out, nfe = generate_sizes(model, objective, sizes, {"y": y}, SampleConfig(sampler="euler", steps=3, cfg_scale=2.0),
                              channels=3, generator=torch.Generator().manual_seed(0))
    assert [tuple(o.shape) for o in out] == [(3, *s) for s in sizes] and nfe == 3
    alone, _ = generate_sizes(model, objective, sizes[1:], {"y": y[1:]}, SampleConfig(sampler="euler", steps=3,
                              cfg_scale=2.0), channels=3, generator=torch.Generator().manual_seed(0))
    assert alone[0].shape == out[1].shape  # its noise differs (drawn for its own batch); the shapes are asked ones
    mask = torch.zeros(2, 4, 8, 8, dtype=torch.bool)
    mask[0, :2, :, :4] = True
    mask[1, :, :4, :] = True
    x0 = torch.randn(2, 3, 4, 8, 8) * mask[:, None]
    model.train()
    losses = objective.loss(model, x0, {"y": y}, mask=mask)["loss"]
    assert losses.shape == (2,) and torch.isfinite(losses).all()


def test_the_masked_loss_compiles_as_one_graph_for_every_length():
    """Under torch.compile the mask's rules are not read back on the host (that would split the graph each step,
    and dynamo then ran the network eagerly); lengths other than the first share one dynamic graph."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    from ditkit.objectives.flow import FlowMatching

    torch._dynamo.reset()
    counters.clear()
    model = randomised(DiT(input_size=(L,), patch_size=P, **TINY))
    loss = torch.compile(FlowMatching().loss, backend="eager", fullgraph=True)  # a graph break raises
    y = torch.tensor([1, 2, 3])
    for lengths in ([8, 16, 12], [4, 8, 8], [12, 20, 16], [8, 4, 4]):
        x, mask = _padded(lengths)
        assert torch.isfinite(loss(model, x, {"y": y}, mask=mask)["loss"]).all()
    assert counters["stats"]["unique_graphs"] <= 2  # the first length, then one graph for any length
    x, mask = _padded([8, 6, 12])
    with pytest.raises(ValueError, match="not a multiple of the patch size"):  # eager calls still check the rules
        model(x, torch.tensor([1.0, 2.0, 3.0]), y=y, mask=mask)


def test_the_graph_count_script_runs():
    from tests.benchmark_scripts import load_benchmark

    result = load_benchmark("compile_graphs").main(["--steps", "6"])
    assert 1 <= result["graphs"] <= 4 and result["cases"] >= 1
