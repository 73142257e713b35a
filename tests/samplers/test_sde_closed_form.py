"""The Euler–Maruyama SDE sampler fed the exact velocity and score of Gaussian data."""
import math

import pytest
import torch

from ditkit.samplers.ode import uniform_grid
from ditkit.samplers.sde import DIFFUSION_FORMS, diffusion_fn, euler_maruyama
from tests.samplers.gaussian import GaussianFlow, assert_gaussian

FLOW = GaussianFlow()


def sit_grid(steps: int, t0: float = 0.0, last_step_size: float = 0.04) -> torch.Tensor:
    """SiT's SDE grid: steps − 1 stochastic steps on [t0, 1 − last_step_size], then to 1."""
    return torch.cat([uniform_grid(steps - 1, t0, 1 - last_step_size), torch.ones(1, dtype=torch.float64)])


def sigma_linear(t):
    return 1 - t


def g2_linear(t):
    return 2 * (1 - t) / t  # 2(σ² α̇/α − σσ̇) with α = t, σ = 1 − t


@pytest.mark.parametrize(
    "form, t0, last_step_size",
    [
        ("sigma", 0.0, 0.04),  # SiT's default
        ("SBDM", 1e-3, 0.04),  # infinite at t = 0: starts at SiT's sample_eps
        ("linear", 0.0, 0.04),
        ("decreasing", 0.0, 0.04),
        ("increasing-decreasing", 0.0, 0.04),
        # w does not vanish at data: the noiseless last step then contracts by ½ w Δt C⁻¹, which
        # costs 0.07 in covariance at Δt = 0.04, 0.01 at Δt = 0.01.
        ("constant", 0.0, 0.01),
    ],
)
def test_lands_on_the_data_gaussian(form, t0, last_step_size):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(20_000, 2, generator=gen, dtype=torch.float64)
    w = diffusion_fn(form, 1.0, sigma=sigma_linear, g2=g2_linear)
    x, nfe = euler_maruyama(FLOW.velocity_score, x, sit_grid(100, t0, last_step_size), w, generator=gen)
    assert nfe == 100
    assert_gaussian(x, tol=0.04)


def test_noise_matters_and_is_reproducible():
    """With w > 0 the same start gives different endpoints for different noise, the same for the same seed."""
    x = torch.randn(512, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    w = diffusion_fn("constant", 1.0)
    run = lambda seed: euler_maruyama(FLOW.velocity_score, x, sit_grid(20), w, generator=torch.Generator().manual_seed(seed))[0]
    a, b, c = run(0), run(0), run(1)
    assert torch.equal(a, b)
    assert (a - c).abs().mean() > 0.05


def test_zero_diffusion_is_the_euler_ode_step():
    x = torch.randn(64, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    grid = sit_grid(30)
    x_sde, _ = euler_maruyama(FLOW.velocity_score, x, grid, diffusion_fn("constant", 0.0))
    x_ode = x
    for i in range(len(grid) - 1):
        x_ode = x_ode + (grid[i + 1] - grid[i]) * FLOW.velocity(x_ode, grid[i].expand(64))
    torch.testing.assert_close(x_sde, x_ode)


def test_diffusion_forms_are_sits():
    """w = 2·D of SiT's compute_diffusion for the same form and norm (SiT: dx = [v + D s]dt + sqrt(2D) dW)."""
    t = torch.tensor([0.1, 0.3, 0.5, 0.9], dtype=torch.float64)
    norm = 0.7
    sit_D = {
        "constant": norm * torch.ones_like(t),
        "SBDM": norm * (1 - t) / t,
        "sigma": norm * (1 - t),
        "linear": norm * (1 - t),
        "decreasing": 0.25 * (norm * torch.cos(math.pi * t) + 1) ** 2,
        "increasing-decreasing": norm * torch.sin(math.pi * t) ** 2,
    }
    assert set(sit_D) == set(DIFFUSION_FORMS)
    for form, D in sit_D.items():
        torch.testing.assert_close(diffusion_fn(form, norm, sigma=sigma_linear, g2=g2_linear)(t), 2 * D, msg=form)
    with pytest.raises(ValueError, match="unknown diffusion form"):
        diffusion_fn("cosine")
    with pytest.raises(ValueError, match="needs the path's sigma"):
        diffusion_fn("sigma")
