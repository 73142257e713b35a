"""Variable lengths in the objectives and samplers: with a padding mask a loss is the mean over each sample's
real positions, equal to the loss of the unpadded sequences one by one (DDPM's learned-variance bound and the
direction term included), padded positions get no gradient, and a guided sampler makes sequences of mixed
lengths in one batch, each equal to that sequence made alone from the same noise."""
import pytest
import torch

from ditkit.config import SampleConfig
from ditkit.models.dit import DiT
from ditkit.objectives import mean_flat
from ditkit.objectives.ddpm import create_ddpm
from ditkit.objectives.flow import FlowMatching
from ditkit.sampling import generate, generate_lengths
from tests.models.dit_cases import randomised

LENGTHS = [8, 16, 12]
TINY = dict(input_size=(24,), patch_size=4, in_channels=2, hidden_size=32, depth=2, num_heads=2, num_classes=3)


def _batch():
    torch.manual_seed(0)
    longest = max(LENGTHS)
    mask = torch.arange(longest) < torch.tensor(LENGTHS)[:, None]  # (B, L)
    x0 = torch.where(mask[:, None], torch.randn(3, 2, longest), 50.0)  # padding far off the data
    return x0, torch.randn(3, 2, longest), mask, {"y": torch.tensor([0, 2, 1])}


def _losses(objective, model, x0, noise, t, kwargs, mask=None):
    if isinstance(objective, FlowMatching):
        return objective.loss(model, x0, kwargs, noise=noise, t=t, mask=mask)
    return objective.training_losses(model, x0, t, kwargs, noise=noise, mask=mask)


def test_mean_flat_averages_the_real_positions_only():
    x, mask = torch.arange(12.0).reshape(1, 2, 6), torch.tensor([[True, True, False, True, False, False]])
    assert mean_flat(x, mask).item() == pytest.approx((0 + 1 + 3 + 6 + 7 + 9) / 6)
    assert mean_flat(x[:, 0], mask).item() == pytest.approx((0 + 1 + 3) / 3)  # no channel axis
    assert torch.equal(mean_flat(x), x.mean(dim=(1, 2)))


@pytest.mark.parametrize("objective", ["ddpm", "flow"])
def test_masked_loss_is_the_loss_of_each_sequence_alone(objective):
    if objective == "ddpm":  # learned variance: the vb term too
        obj, t = create_ddpm(learn_sigma=True, cos_weight=0.3), torch.tensor([0, 400, 999])
    else:
        obj, t = FlowMatching(cos_weight=0.3), torch.tensor([0.1, 0.5, 0.9])
    model = randomised(DiT(learn_sigma=objective == "ddpm", **TINY)).eval()
    x0, noise, mask, kwargs = _batch()
    terms = _losses(obj, model, x0, noise, t, kwargs, mask)
    assert ("vb" in terms) == (objective == "ddpm") and "cos" in terms
    for i, n in enumerate(LENGTHS):
        alone = _losses(obj, model, x0[i:i + 1, :, :n], noise[i:i + 1, :, :n], t[i:i + 1], {"y": kwargs["y"][i:i + 1]})
        for name, value in alone.items():
            torch.testing.assert_close(terms[name][i:i + 1], value, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("objective", ["ddpm", "flow"])
def test_padded_positions_get_no_gradient(objective):
    obj = create_ddpm(learn_sigma=True, cos_weight=0.3) if objective == "ddpm" else FlowMatching(cos_weight=0.3)
    seen = {}

    def network(x_t, t_net, mask=None):  # an output that is a leaf, to read its gradient
        assert mask is not None  # the objective hands the mask on to the network
        seen["out"] = torch.randn(x_t.shape[0], 2 * x_t.shape[1], *x_t.shape[2:], requires_grad=True)
        return seen["out"]

    x0, _, mask, _ = _batch()
    obj.loss(network, x0, mask=mask)["loss"].sum().backward()
    grad = seen["out"].grad
    assert grad[~mask[:, None].expand_as(grad)].abs().max() == 0
    assert grad[:, :2][mask[:, None].expand(-1, 2, -1)].abs().min() > 0  # every real position of ε or v counts


@pytest.mark.parametrize("objective, sampler", [("flow", "euler"), ("ddpm", "ddim")])
def test_guided_sampler_makes_mixed_lengths_each_as_alone(objective, sampler):
    obj = create_ddpm(learn_sigma=True) if objective == "ddpm" else FlowMatching()
    model = randomised(DiT(learn_sigma=objective == "ddpm", class_dropout_prob=0.1, **TINY)).eval()
    cfg = SampleConfig(sampler=sampler, steps=4, cfg_scale=3.0, guided_channels=None)
    y = torch.tensor([0, 2, 1])
    out, nfe = generate_lengths(model, obj, LENGTHS, {"y": y}, cfg, channels=2, generator=torch.Generator().manual_seed(7))
    assert [tuple(s.shape) for s in out] == [(2, n) for n in LENGTHS] and nfe == 4
    noise = torch.randn(3, 2, max(LENGTHS), generator=torch.Generator().manual_seed(7))
    for i, n in enumerate(LENGTHS):
        alone, _ = generate(model, obj, noise[i:i + 1, :, :n], {"y": y[i:i + 1]}, cfg, progress=False)
        assert torch.isfinite(out[i]).all()
        torch.testing.assert_close(out[i], alone[0], rtol=1e-4, atol=1e-4)
