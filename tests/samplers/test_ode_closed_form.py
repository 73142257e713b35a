"""ODE samplers fed the exact velocity field of Gaussian data (closed form in tests/samplers/gaussian.py)."""
import math

import pytest
import torch

from ditkit.samplers.ode import dopri5, euler, heun, shift_time, shifted_grid, uniform_grid
from tests.samplers.gaussian import GaussianFlow, assert_gaussian, linear_flow_map

FLOW = GaussianFlow()


def noise(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 2, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("name", ["euler", "heun", "dopri5"])
def test_lands_on_the_data_gaussian(name):
    x0 = noise(20_000)
    if name == "dopri5":
        x, nfe = dopri5(FLOW.velocity, x0, 0.0, 1.0)
        assert 6 < nfe < 200
    else:
        x, nfe = {"euler": euler, "heun": heun}[name](FLOW.velocity, x0, uniform_grid(50))
        assert nfe == (50 if name == "euler" else 100)
    assert_gaussian(x)


def _trajectory_errors(sampler, x0, steps_list):
    exact = linear_flow_map(x0)
    return [(sampler(FLOW.velocity, x0, uniform_grid(n))[0] - exact).norm().item() for n in steps_list]


def test_euler_is_first_order_and_heun_second_order():
    x0 = torch.tensor([[0.8, -1.3], [-0.4, 0.2]], dtype=torch.float64)  # two deterministic trajectories
    steps = [32, 64, 128, 256]
    for sampler, order in [(euler, 1), (heun, 2)]:
        err = _trajectory_errors(sampler, x0, steps)
        ratios = [a / b for a, b in zip(err, err[1:])]
        for r in ratios:  # doubling the steps divides the error by 2^order
            assert abs(math.log2(r) - order) < 0.15, f"{sampler.__name__}: errors {err}, ratios {ratios}"


def test_dopri5_meets_its_tolerance_and_adapts():
    x0 = noise(8, seed=1)
    exact = linear_flow_map(x0)
    x_tight, nfe_tight = dopri5(FLOW.velocity, x0, 0.0, 1.0, rtol=1e-10, atol=1e-10)
    x_loose, nfe_loose = dopri5(FLOW.velocity, x0, 0.0, 1.0, rtol=1e-3, atol=1e-6)
    assert (x_tight - exact).abs().max() < 1e-8
    assert (x_loose - exact).abs().max() < 1e-2
    assert nfe_loose < nfe_tight
    assert (nfe_tight - 2) % 6 == 0  # 1 start + 1 probe + 6 per attempted step (FSAL)


def test_dopri5_backwards_inverts_the_flow():
    x0 = noise(4, seed=2)
    x1, _ = dopri5(FLOW.velocity, x0, 0.0, 1.0, rtol=1e-9, atol=1e-9)
    back, _ = dopri5(FLOW.velocity, x1, 1.0, 0.0, rtol=1e-9, atol=1e-9)
    assert (back - x0).abs().max() < 1e-6


def test_shifted_grid_spends_steps_at_high_noise():
    g = shifted_grid(10, 3.0)
    assert g[0] == 0 and g[-1] == 1 and (g.diff() > 0).all()
    assert (g[1:-1] < uniform_grid(10)[1:-1]).all()  # every interior time moved towards noise (t = 0)
    # SD3's τ' = sτ/(1 + (s−1)τ) on τ = 1 − t
    tau = 1 - uniform_grid(10)
    torch.testing.assert_close(1 - g, 3 * tau / (1 + 2 * tau))
    torch.testing.assert_close(shift_time(uniform_grid(7), 1.0), uniform_grid(7))


def test_shifted_grid_sampling_still_lands():
    x, nfe = heun(FLOW.velocity, noise(20_000, seed=3), shifted_grid(25, 3.0))
    assert nfe == 50
    assert_gaussian(x)


def test_heun_euler_last_saves_one_evaluation():
    x, nfe = heun(FLOW.velocity, noise(20_000, seed=4), uniform_grid(40), euler_last=True)
    assert nfe == 79
    assert_gaussian(x)


def test_dopri5_refuses_an_infinite_velocity():
    with pytest.raises(ValueError, match="not finite"):
        dopri5(lambda x, t: x / (1 - t), torch.ones(2, 2), 0.0, 1.0)  # blows up at t = 1
