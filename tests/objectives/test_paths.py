"""Interpolant paths: coefficients against autograd and SiT's formulas; prediction conversions."""

import pytest
import torch

from ditkit.objectives.paths import PATHS, PREDICTIONS, VPPath, convert, g2, interpolate, make_path, to_noise

T = torch.linspace(0.05, 0.95, 19, dtype=torch.float64)


@pytest.mark.parametrize("name", sorted(PATHS))
def test_derivatives_match_autograd(name):
    path = make_path(name)
    t = T.clone().requires_grad_(True)
    alpha, sigma, d_alpha, d_sigma = path.coefficients(t)
    da, ds = (torch.autograd.grad(c.sum(), t, retain_graph=True)[0] for c in (alpha, sigma))
    torch.testing.assert_close(d_alpha, da)
    torch.testing.assert_close(d_sigma, ds)


def test_endpoints_and_sits_vp_schedule():
    one, zero = torch.ones(1, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)
    for name in PATHS:
        alpha, sigma, *_ = make_path(name).coefficients(one)
        torch.testing.assert_close((alpha, sigma), (one, zero), msg=name)  # t = 1 is data
    for name in ("linear", "gvp"):
        alpha, sigma, *_ = make_path(name).coefficients(zero)
        torch.testing.assert_close((alpha, sigma), (zero, one), msg=name)  # t = 0 is noise
    for name in ("gvp", "vp"):
        alpha, sigma, *_ = make_path(name).coefficients(T)
        torch.testing.assert_close(alpha**2 + sigma**2, torch.ones_like(T))  # variance preserving
    # SiT's VP: log α_t = −¼(1−t)²(β_max − β_min) − ½(1−t)β_min with β ∈ [0.1, 20]; g² = β(1 − t)
    alpha, *_ = VPPath().coefficients(T)
    torch.testing.assert_close(alpha, torch.exp(-0.25 * (1 - T) ** 2 * 19.9 - 0.05 * (1 - T)))
    torch.testing.assert_close(g2(VPPath(), T), 0.1 + (1 - T) * 19.9)
    torch.testing.assert_close(g2(make_path("linear"), T), 2 * (1 - T) / T)


@pytest.mark.parametrize("name", sorted(PATHS))
def test_conversions_are_exact_on_a_known_pair(name):
    """Given x_t = α x1 + σ x0 with known x0, x1, the noise is x0, the velocity α̇ x1 + σ̇ x0 and
    the conditional score −x0/σ; the conversions are affine identities in x_t, so they map each
    of these onto the others exactly."""
    path = make_path(name)
    g = torch.Generator().manual_seed(0)
    x0, x1 = torch.randn(19, 3, 4, 4, generator=g, dtype=torch.float64), torch.randn(19, 3, 4, 4, generator=g, dtype=torch.float64)
    x_t, u_t = interpolate(path, T, x0, x1)
    sigma = path.coefficients(T)[1].reshape(-1, 1, 1, 1)
    known = {"velocity": u_t, "noise": x0, "score": -x0 / sigma}
    for source in PREDICTIONS:
        for target in PREDICTIONS:
            torch.testing.assert_close(convert(path, known[source], source, target, x_t, T), known[target], msg=f"{source}->{target}")


@pytest.mark.parametrize("name", sorted(PATHS))
def test_round_trips(name):
    path = make_path(name)
    g = torch.Generator().manual_seed(1)
    x, pred = torch.randn(19, 2, 3, generator=g, dtype=torch.float64), torch.randn(19, 2, 3, generator=g, dtype=torch.float64)
    for source in PREDICTIONS:
        for target in PREDICTIONS:
            back = convert(path, convert(path, pred, source, target, x, T), target, source, x, T)
            torch.testing.assert_close(back, pred, msg=f"{source}->{target}->{source}")


@pytest.mark.parametrize("name", sorted(PATHS))
def test_velocity_score_relation(name):
    """v = (α̇/α) x + ½ g² s  (the drift SiT's SDE builds on)."""
    path = make_path(name)
    x, s = torch.randn(19, 5, dtype=torch.float64), torch.randn(19, 5, dtype=torch.float64)
    alpha, _, d_alpha, _ = (c.reshape(-1, 1) for c in path.coefficients(T))
    v = convert(path, s, "score", "velocity", x, T)
    torch.testing.assert_close(v, d_alpha / alpha * x + 0.5 * g2(path, T).reshape(-1, 1) * s)


def test_velocity_to_score_is_finite_at_pure_noise():
    x = torch.randn(4, 2)
    s = convert(make_path("linear"), torch.randn(4, 2), "velocity", "score", x, torch.zeros(4))
    torch.testing.assert_close(s, -x)  # the score of N(0, I)


def test_bad_names():
    with pytest.raises(ValueError, match="unknown path 'cosine'"):
        make_path("cosine")
    with pytest.raises(ValueError, match="unknown prediction 'x0'"):
        to_noise(make_path("linear"), torch.zeros(1, 2), "x0", torch.zeros(1, 2), torch.zeros(1))
    with pytest.raises(ValueError, match="beta_min < beta_max"):
        VPPath(20.0, 0.1)
