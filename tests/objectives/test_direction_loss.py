"""The velocity-direction term 1 − cos(prediction, target) over each sample's channels and positions:
closed forms on hand-made cases, its place in the flow and DDPM losses, and a bounded gradient at the
zero output of a fresh DiT."""
import math

import pytest
import torch

from ditkit.objectives import direction_loss, mean_flat
from ditkit.objectives.ddpm import create_ddpm
from ditkit.objectives.flow import FlowMatching


def test_closed_forms():
    target = torch.tensor([[[[4.0, 3.0]]], [[[1.0, 0.0]]]])  # (2, 1, 1, 2)
    pred = torch.tensor([[[[3.0, 4.0]]], [[[0.0, 2.0]]]])
    # cos = (12 + 12) / 25 for the first sample; orthogonal for the second
    torch.testing.assert_close(direction_loss(pred, target), torch.tensor([1 - 24 / 25, 1.0]))
    torch.testing.assert_close(direction_loss(3 * target, target), torch.zeros(2))
    torch.testing.assert_close(direction_loss(-target, target), torch.full((2,), 2.0))
    a = torch.tensor([[[[1.0, 0.0], [0.0, 0.0]]]])  # one sample over 2×2 positions: 45° away
    b = torch.tensor([[[[1.0, 1.0], [0.0, 0.0]]]])
    torch.testing.assert_close(direction_loss(a, b), torch.tensor([1 - math.cos(math.pi / 4)]))


def test_the_gradient_at_a_zero_prediction_is_bounded():
    target = torch.randn(2, 4, 8, 8)
    pred = torch.zeros_like(target, requires_grad=True)
    loss = direction_loss(pred, target)
    torch.testing.assert_close(loss, torch.ones(2))
    loss.sum().backward()
    # Below 1% of the target's norm the term is −⟨p, u⟩ / (0.01 ‖u‖²): its gradient is −u / (0.01 ‖u‖²).
    want = -target / (0.01 * target.flatten(1).norm(dim=1) ** 2).view(-1, 1, 1, 1)
    torch.testing.assert_close(pred.grad, want)


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
    cos = (v * u).flatten(1).sum(1) / (v.flatten(1).norm(dim=1) * u.flatten(1).norm(dim=1))
    torch.testing.assert_close(terms["cos"], 1 - cos)
    torch.testing.assert_close(terms["loss"], mean_flat((v - u) ** 2) + 0.25 * (1 - cos))
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
