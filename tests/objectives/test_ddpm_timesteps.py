"""How DDPM's training draws its steps: the official U{0..T−1} by default (the same draw as before), and
the logit-normal and shifted densities of flow matching mapped to t = floor(u·T), checked against the
closed-form distribution of t."""
import math

import pytest
import torch

from ditkit.config import load_config
from ditkit.objectives import build_objective
from ditkit.objectives.ddpm import create_ddpm, sample_timesteps


def phi(x: float) -> float:
    return 0.5 * (1 + math.erf(x / math.sqrt(2)))


def cdf_of_t(k: int, T: int, m: float, s: float, shift: float) -> float:
    """P(t ≤ k) = P(u' < (k+1)/T) with u' = shift·u / (1 + (shift − 1) u), u = sigmoid(m + s·n)."""
    v = (k + 1) / T
    if v >= 1:
        return 1.0
    w = v / (shift - (shift - 1) * v)  # the inverse of the shift
    return phi((math.log(w / (1 - w)) - m) / s)


def test_the_default_is_the_official_draw():
    torch.manual_seed(3)
    want = torch.randint(0, 1000, (64,))
    torch.manual_seed(3)
    assert torch.equal(sample_timesteps(64, 1000), want)


@pytest.mark.parametrize("m, s, shift", [(0.0, 1.0, 1.0), (0.5, 1.2, 3.0)])
def test_logit_normal_steps_follow_the_closed_form(m, s, shift):
    T, n = 1000, 200_000
    torch.manual_seed(0)
    t = sample_timesteps(n, T, "logit_normal", m, s, shift)
    assert t.dtype == torch.long and 0 <= int(t.min()) and int(t.max()) <= T - 1
    ecdf = torch.bincount(t, minlength=T).cumsum(0).double() / n
    cdf = torch.tensor([cdf_of_t(k, T, m, s, shift) for k in range(T)], dtype=torch.float64)
    ks = float((ecdf - cdf).abs().max())
    assert ks < 1.63 / math.sqrt(n), ks  # Kolmogorov's 1% level; a wrong m, s or shift misses by far more
    # The histogram against the density: P(t = k) over 20 bins of 50 steps.
    hist = torch.bincount(t // 50, minlength=20).double() / n
    want = torch.diff(torch.cat([torch.zeros(1, dtype=torch.float64), cdf[49::50]]))
    torch.testing.assert_close(hist, want, atol=3e-3, rtol=0)


def test_a_shifted_uniform_draw_moves_toward_noise():
    torch.manual_seed(0)
    t = sample_timesteps(100_000, 1000, "uniform", shift=3.0)
    # u' = 3u / (1 + 2u) < 1/2  <=>  u < 1/4
    assert abs(float((t < 500).double().mean()) - 0.25) < 0.005


def test_the_config_reaches_the_loss():
    cfg = load_config("digits", ["objective.time_sampling=logit_normal", "objective.logit_mean=2.0"])
    ddpm = build_objective(cfg)
    assert (ddpm.time_sampling, ddpm.logit_mean, ddpm.logit_std, ddpm.shift) == ("logit_normal", 2.0, 1.0, 1.0)
    assert ddpm.respaced("ddim25").time_sampling == "logit_normal"
    seen = []

    def net(x, t_net, y=None):
        seen.append(t_net)
        return torch.zeros(x.shape[0], 2 * x.shape[1], *x.shape[2:])

    torch.manual_seed(0)
    ddpm.loss(net, torch.zeros(4096, 1, 2, 2))
    assert float(seen[0].float().mean()) > 800  # sigmoid(N(2, 1)) has mean 0.83: mostly noisy steps
    with pytest.raises(ValueError, match="unknown time_sampling"):
        create_ddpm(time_sampling="beta")
