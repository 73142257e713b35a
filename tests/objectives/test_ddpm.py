"""Properties of the DDPM objective: the hybrid loss, the variance parametrisation, the likelihood
helpers against torch.distributions, and the objective protocol."""
import math

import pytest
import torch

from ditkit.objectives.ddpm import (
    approx_standard_normal_cdf,
    create_ddpm,
    discretized_gaussian_log_likelihood,
    normal_kl,
)

B, C, H, W = 4, 3, 4, 4


def batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.rand(B, C, H, W, generator=g) * 2 - 1
    return x0, torch.randn(B, C, H, W, generator=g), torch.tensor([0, 1, 500, 999])


def test_vb_does_not_train_the_mean():
    """The vb term sees a detached ε: its gradient reaches only the variance channels, and the
    MSE's only the ε channels."""
    x0, noise, t = batch()
    out = torch.randn(B, 2 * C, H, W, requires_grad=True)
    terms = create_ddpm().training_losses(lambda x, t_net: out, x0, t, noise=noise)
    (grad_vb,) = torch.autograd.grad(terms["vb"].sum(), out, retain_graph=True)
    (grad_mse,) = torch.autograd.grad(terms["mse"].sum(), out)
    assert torch.count_nonzero(grad_vb[:, :C]) == 0 and torch.count_nonzero(grad_vb[:, C:]) > 0
    assert torch.count_nonzero(grad_mse[:, C:]) == 0 and torch.count_nonzero(grad_mse[:, :C]) > 0
    torch.testing.assert_close(terms["loss"], terms["mse"] + terms["vb"])


def test_plain_mse_without_learned_sigma():
    x0, noise, t = batch()
    eps = torch.randn(B, C, H, W)
    terms = create_ddpm(learn_sigma=False).training_losses(lambda x, t_net: eps, x0, t, noise=noise)
    assert set(terms) == {"mse", "loss"}
    expected = ((noise - eps) ** 2).flatten(1).mean(1)
    torch.testing.assert_close(terms["mse"], expected)
    assert torch.equal(terms["loss"], terms["mse"])


def test_learned_range_spans_posterior_to_beta():
    """v = −1 gives β̃_t (log clipped at t = 0), v = +1 gives β_t (Nichol & Dhariwal, Eq. 15)."""
    process = create_ddpm()
    x_t, _, t = batch()
    betas = process.betas
    alpha_bar = torch.cumprod(1 - betas, 0)
    alpha_bar_prev = torch.cat([torch.ones(1, dtype=torch.float64), alpha_bar[:-1]])
    posterior = betas * (1 - alpha_bar_prev) / (1 - alpha_bar)
    posterior[0] = posterior[1]
    for v, expected in ((-1.0, posterior), (1.0, betas)):
        out = process.p_mean_variance(torch.cat([torch.zeros_like(x_t), torch.full_like(x_t, v)], 1), x_t, t)
        torch.testing.assert_close(out["variance"][:, 0, 0, 0], expected[t].float(), rtol=1e-5, atol=0)


def test_fixed_variances():
    x_t, _, t = batch()
    eps = torch.zeros_like(x_t)
    large = create_ddpm(learn_sigma=False).p_mean_variance(eps, x_t, t)["variance"][:, 0, 0, 0]
    small = create_ddpm(learn_sigma=False, sigma_small=True).p_mean_variance(eps, x_t, t)["variance"][:, 0, 0, 0]
    betas = create_ddpm().betas
    torch.testing.assert_close(large[1:], betas[t[1:]].float())
    assert (small <= large).all() and small[2] < large[2]


def test_wrong_channel_count_is_named():
    x_t, _, t = batch()
    with pytest.raises(ValueError, match="model output has 3 channels; a DDPM with learn_sigma=True on 3-channel data needs 6"):
        create_ddpm().p_mean_variance(x_t, x_t, t)


def test_normal_kl_matches_torch_distributions():
    g = torch.Generator().manual_seed(1)
    m1, m2, lv1, lv2 = (torch.randn(100, generator=g, dtype=torch.float64) for _ in range(4))
    expected = torch.distributions.kl_divergence(
        torch.distributions.Normal(m1, (0.5 * lv1).exp()), torch.distributions.Normal(m2, (0.5 * lv2).exp())
    )
    torch.testing.assert_close(normal_kl(m1, lv1, m2, lv2), expected)


def test_approx_cdf_is_close_to_the_normal_cdf():
    x = torch.linspace(-6, 6, 1001, dtype=torch.float64)
    assert (approx_standard_normal_cdf(x) - torch.special.ndtr(x)).abs().max() < 2e-4


def test_discretized_likelihood_sums_to_one_over_the_256_bins():
    bins = torch.linspace(-1, 1, 256, dtype=torch.float64)[:, None].expand(256, 3)  # 3 Gaussians
    means = torch.tensor([-0.3, 0.0, 0.9], dtype=torch.float64).expand(256, 3)
    log_scales = torch.log(torch.tensor([0.05, 0.4, 0.2], dtype=torch.float64)).expand(256, 3)
    total = discretized_gaussian_log_likelihood(bins, means=means, log_scales=log_scales).exp().sum(0)
    torch.testing.assert_close(total, torch.ones(3, dtype=torch.float64), rtol=0, atol=1e-9)


def test_loss_protocol():
    """loss() draws t per sample on x0's device and passes original timestep indices."""
    x0, _, _ = batch()
    seen = {}

    def model(x, t_net, y):
        seen["t"], seen["y"] = t_net, y
        return torch.zeros(x.shape[0], 2 * C, H, W)

    terms = create_ddpm().loss(model, x0, {"y": torch.arange(B)})
    assert {"mse", "vb", "loss"} <= set(terms) and all(v.shape == (B,) for v in terms.values())
    assert seen["t"].dtype == torch.long and ((0 <= seen["t"]) & (seen["t"] < 1000)).all()
    assert torch.equal(seen["y"], torch.arange(B))


def test_respaced_training_calls_the_network_with_original_steps():
    x0, noise, _ = batch()
    seen = {}

    def model(x, t_net):
        seen["t"] = t_net
        return torch.zeros(x.shape[0], 2 * C, H, W)

    create_ddpm("ddim25").training_losses(model, x0, torch.tensor([0, 1, 2, 24]), noise=noise)
    assert seen["t"].tolist() == [0, 40, 80, 960]


def test_noise_level_is_the_flow_time_of_equal_snr():
    """σ/(1+σ), σ = √((1−ᾱ)/ᾱ): increasing in t, inside (0, 1), the same on a respaced process."""
    process = create_ddpm()
    t = torch.arange(1000)
    level = process.noise_level(t)
    assert (level.diff() > 0).all() and 0 < level[0] < 0.02 and 0.99 < level[-1] < 1
    alpha_bar = torch.cumprod(1 - process.betas, 0)[500].item()
    sigma = math.sqrt((1 - alpha_bar) / alpha_bar)
    assert abs(level[500].item() - sigma / (1 + sigma)) < 1e-6
    assert torch.equal(process.respaced("ddim25").noise_level(t), level)


def test_loss_never_reads_a_value_back():
    """The training step runs on the meta device, where any host read raises; the schedule tables
    follow x0's device."""
    x0 = torch.randn(B, C, H, W, device="meta")
    terms = create_ddpm().loss(lambda x, t_net: torch.zeros(B, 2 * C, H, W, device=x.device), x0)
    assert all(v.device.type == "meta" and v.shape == (B,) for v in terms.values())
