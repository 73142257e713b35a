"""REPA's term: equal to a hand computation with torch's cosine_similarity, −1 for projections along the
features at any positive scale, added to either objective's loss with the same draws, and the
objective's own terms unchanged."""
import pytest
import torch
import torch.nn.functional as F

from ditkit.objectives.ddpm import create_ddpm
from ditkit.objectives.flow import FlowMatching
from ditkit.objectives.repa import RepaObjective, repa_loss


def test_repa_loss_is_minus_the_mean_cosine_over_tokens():
    g = torch.Generator().manual_seed(0)
    z_hat, z = torch.randn(2, 3, 5, generator=g), torch.randn(2, 3, 5, generator=g)
    by_hand = torch.stack([-sum(F.cosine_similarity(z_hat[b, n], z[b, n], dim=0) for n in range(3)) / 3
                           for b in range(2)])
    torch.testing.assert_close(repa_loss(z_hat, z), by_hand)


def test_projections_along_the_features_give_minus_one_and_opposite_plus_one():
    z = torch.randn(2, 4, 6)
    scale = torch.rand(2, 4, 1) * 10 + 0.1  # a positive scale per token
    torch.testing.assert_close(repa_loss(scale * z, z), torch.full((2,), -1.0))
    torch.testing.assert_close(0.5 * repa_loss(scale * z, z), torch.full((2,), -0.5))  # −λ at λ = 0.5
    torch.testing.assert_close(repa_loss(-scale * z, z), torch.full((2,), 1.0))


def test_mismatched_widths_name_the_key():
    with pytest.raises(ValueError, match="model.repa_dim must be the encoder's width"):
        repa_loss(torch.randn(1, 4, 8), torch.randn(1, 4, 6))


class Net(torch.nn.Module):
    """A network with REPA's seam: (output, projection) when asked; the projection is a linear map of x."""

    def __init__(self, out_channels):
        super().__init__()
        self.out = torch.nn.Conv2d(4, out_channels, 1)
        self.proj = torch.nn.Linear(4, 6)

    def forward(self, x, t, y=None, return_repa=False):
        out = self.out(x) * (1 + t.view(-1, 1, 1, 1) / 1000)
        return (out, self.proj(x.flatten(2).transpose(1, 2))) if return_repa else out  # (B, N=64, 6)


@pytest.mark.parametrize("objective", [create_ddpm(), FlowMatching()], ids=["ddpm", "flow"])
def test_the_term_is_added_to_either_objective_with_the_same_draws(objective):
    torch.manual_seed(0)
    net = Net(8 if hasattr(objective, "num_timesteps") else 4)
    x0, y = torch.randn(2, 4, 8, 8), torch.tensor([1, 2])
    z = torch.randn(2, 64, 6)
    seen = []

    def encoder(image):
        seen.append(image)
        return z

    torch.manual_seed(1)
    plain = objective.loss(net, x0, {"y": y})
    torch.manual_seed(1)
    terms = RepaObjective(objective, encoder, weight=0.5).loss(net, x0, {"y": y})
    assert seen[0] is x0  # no image given: the encoder reads x0 (a model on pixels)
    for k in plain:
        if k != "loss":
            torch.testing.assert_close(terms[k], plain[k])
    # The projection is of the noisy input the objective drew; repeat the draw to get it.
    torch.manual_seed(1)
    captured = []
    objective.loss(lambda x_t, t, **kw: (captured.append(x_t), net(x_t, t, **kw))[1], x0, {"y": y})
    want = repa_loss(net.proj(captured[0].flatten(2).transpose(1, 2)), z)
    torch.testing.assert_close(terms["repa"], want)
    torch.testing.assert_close(terms["loss"], plain["loss"] + 0.5 * (1 + want))

    image = torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8)
    RepaObjective(objective, encoder).loss(net, x0, {"y": y}, image=image)
    assert seen[-1] is image  # the pixels beside cached latents


def test_the_weight_must_be_positive():
    with pytest.raises(ValueError, match="REPA weight must be positive"):
        RepaObjective(FlowMatching(), lambda image: image, weight=0.0)
