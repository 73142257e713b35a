"""The velocity-direction term: 1 − cos(prediction, target) along the channels at each position, averaged
over the positions; closed forms on hand-made cases, torch's cosine_similarity(dim=1), its place in the flow
and DDPM losses, and a bounded gradient at the zero output of a fresh DiT."""
import math

import pytest
import torch
import torch.nn.functional as F

from ditkit.objectives import direction_loss, mean_flat
from ditkit.objectives.ddpm import create_ddpm
from ditkit.objectives.flow import FlowMatching


def test_closed_forms():
    # One sample, 2 channels at 2 positions: (4, 3)·(3, 4) at the first, orthogonal at the second.
    target = torch.tensor([[[[4.0, 1.0]], [[3.0, 0.0]]]])  # (1, 2, 1, 2): channels, then a 1×2 grid
    pred = torch.tensor([[[[3.0, 0.0]], [[4.0, 2.0]]]])
    torch.testing.assert_close(direction_loss(pred, target), torch.tensor([((1 - 24 / 25) + 1.0) / 2]))
    # Over the whole sample at once the cosine would be 24 / (√29 √26) instead.
    assert not math.isclose(direction_loss(pred, target).item(), 1 - 24 / math.sqrt(29 * 26), rel_tol=1e-3)
    torch.testing.assert_close(direction_loss(3 * target, target), torch.zeros(1))
    torch.testing.assert_close(direction_loss(-target, target), torch.full((1,), 2.0))
    # Scaling one position's prediction changes nothing: only its direction counts.
    scaled = pred.clone()
    scaled[..., 1] *= 7
    torch.testing.assert_close(direction_loss(scaled, target), direction_loss(pred, target))
    a = torch.tensor([[[[1.0]], [[0.0]]]])  # 45° away at the one position
    b = torch.tensor([[[[1.0]], [[1.0]]]])
    torch.testing.assert_close(direction_loss(a, b), torch.tensor([1 - math.cos(math.pi / 4)]))


def test_equals_torch_cosine_similarity_along_the_channels():
    g = torch.Generator().manual_seed(0)
    target = torch.randn(3, 16, 8, 8, generator=g)
    pred = target + torch.randn(3, 16, 8, 8, generator=g)
    want = mean_flat(1 - F.cosine_similarity(pred, target, dim=1))  # LightningDiT's transport loss
    torch.testing.assert_close(direction_loss(pred, target), want)


def test_the_gradient_at_a_zero_prediction_is_bounded():
    target = torch.randn(2, 4, 8, 8)
    pred = torch.zeros_like(target, requires_grad=True)
    loss = direction_loss(pred, target)
    torch.testing.assert_close(loss, torch.ones(2))
    loss.sum().backward()
    # Below 1% of the target's norm each position's term is −⟨p, u⟩ / (0.01 ‖u‖²), averaged over the
    # 64 positions: its gradient is −u / (0.01 ‖u‖² · 64), ‖u‖ the position's norm over the channels.
    want = -target / (0.01 * target.norm(dim=1, keepdim=True) ** 2 * 64)
    torch.testing.assert_close(pred.grad, want)
    assert pred.grad.abs().max() < 1e3  # torch's exact cosine gives about 1e6 here


class Fixed(torch.nn.Module):
    """A network that outputs a given tensor, whatever it is fed."""

    def __init__(self, out):
        super().__init__()
        self.out = out

    def forward(self, x, t):
        return self.out


def test_flow_adds_the_weighted_term_to_the_mse():
    x1, noise, t = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8), torch.tensor([0.3, 0.8])
    u = x1 - noise  # the linear path's velocity
    v = u + 0.5 * torch.randn_like(u)
    terms = FlowMatching(cos_weight=0.25).loss(Fixed(v), x1, noise=noise, t=t)
    cos = mean_flat(1 - F.cosine_similarity(v, u, dim=1))
    torch.testing.assert_close(terms["cos"], cos)
    torch.testing.assert_close(terms["loss"], mean_flat((v - u) ** 2) + 0.25 * cos)
    assert "cos" not in FlowMatching().loss(Fixed(v), x1, noise=noise, t=t)


def test_flow_noise_prediction_aims_at_the_noise():
    x1, noise, t = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8), torch.tensor([0.3, 0.8])
    terms = FlowMatching(prediction="noise", cos_weight=1.0).loss(Fixed(2 * noise), x1, noise=noise, t=t)
    torch.testing.assert_close(terms["cos"], torch.zeros(2), atol=1e-6, rtol=0)


def test_ddpm_aims_the_eps_prediction_at_the_noise():
    ddpm = create_ddpm(cos_weight=0.5)
    x0, noise, t = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8), torch.tensor([10, 500])
    out = torch.cat([-noise, torch.zeros_like(noise)], dim=1)  # ε̂ = −ε, then the variance channels
    terms = ddpm.training_losses(Fixed(out), x0, t, noise=noise)
    torch.testing.assert_close(terms["cos"], torch.full((2,), 2.0))
    torch.testing.assert_close(terms["loss"], terms["mse"] + terms["vb"] + 0.5 * 2.0)
    assert ddpm.respaced("ddim25").cos_weight == 0.5
    assert "cos" not in create_ddpm().training_losses(Fixed(out), x0, t, noise=noise)


def test_a_negative_weight_is_refused():
    with pytest.raises(ValueError, match="cos_weight must be non-negative"):
        FlowMatching(cos_weight=-1.0)


def test_one_channel_data_is_refused_at_load():
    """Along one channel the cosine is the sign of each value: no direction to learn (the digits collapsed)."""
    from ditkit.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="objective.cos_weight must be 0 for one-channel data"):
        load_config("digits", ["objective.name=flow", "sample.sampler=euler", "objective.cos_weight=1"])
    assert load_config("images32", ["objective.cos_weight=1"]).objective.cos_weight == 1.0
