"""DDPM and DDIM sampling fed the exact ε of Gaussian data, and classifier-free guidance through
ditkit's wrapper against the official forward_with_cfg path."""
import numpy as np
import pytest
import torch

from ditkit.guidance import guided_fn
from ditkit.models.dit import DiT
from ditkit.objectives.ddpm import create_ddpm
from tests.conftest import rel_err

MU, S = 0.5, 0.3  # the data: x_0 ~ N(μ, s²), one dimension
N = 10_000
ALPHA_BAR = torch.from_numpy(np.cumprod(1 - np.linspace(1e-4, 0.02, 1000)))  # the official linear ᾱ, built apart


def eps_star(x, t_net):
    """The optimal predictor E[ε | x_t] for Gaussian data: x_t ~ N(√ᾱ μ, ᾱ s² + 1 − ᾱ), so
    ε*(x_t, t) = √(1−ᾱ) (x_t − √ᾱ μ) / (ᾱ s² + 1 − ᾱ)."""
    a = ALPHA_BAR[t_net].view(-1, 1).float()
    return (1 - a).sqrt() * (x - a.sqrt() * MU) / (a * S**2 + 1 - a)


def prior(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(N, 1, generator=g), g


@pytest.mark.parametrize("sigma_small", [False, True])
def test_ancestral_ddpm_lands_on_the_data(sigma_small):
    z, g = prior()
    x0, nfe = create_ddpm(learn_sigma=False, sigma_small=sigma_small).sample(eps_star, z, "ddpm", steps=1000, generator=g)
    assert nfe == 1000
    # Standard errors at N = 10⁴: 0.003 (mean), 0.002 (std).
    assert abs(x0.mean().item() - MU) < 0.01 and abs(x0.std().item() - S) < 0.01


def test_ddim_eta0_follows_the_probability_flow():
    """For Gaussian data the ODE maps x_T to μ + s (x_T − √ᾱ_T μ)/√(ᾱ_T s² + 1 − ᾱ_T), sample by
    sample; DDIM is first order, so 4× the steps cut the error about 4×."""
    z, _ = prior()
    a_T = ALPHA_BAR[-1].item()
    exact = MU + S * (z - a_T**0.5 * MU) / (a_T * S**2 + 1 - a_T) ** 0.5
    process = create_ddpm(learn_sigma=False)
    err = {steps: (process.sample(eps_star, z, "ddim", steps=steps)[0] - exact).abs().max().item() for steps in (250, 1000)}
    assert err[1000] < 0.01 and err[250] / err[1000] > 3


def test_ddim_eta1_is_ancestral_sampling_with_the_posterior_variance():
    z, _ = prior()
    x_ddim, _ = create_ddpm(learn_sigma=False).sample(eps_star, z, "ddim", steps=100, eta=1.0, generator=torch.Generator().manual_seed(1))
    x_ddpm, _ = create_ddpm(learn_sigma=False, sigma_small=True).sample(eps_star, z, "ddpm", steps=100, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(x_ddim, x_ddpm, rtol=0, atol=1e-5)


def test_unknown_sampler_and_stray_eta():
    z, _ = prior()
    with pytest.raises(ValueError, match="unknown DDPM sampler 'euler'"):
        create_ddpm().sample(eps_star, z, "euler")
    with pytest.raises(ValueError, match="eta applies to the ddim sampler only"):
        create_ddpm().sample(eps_star, z, "ddpm", eta=1.0)


def test_guided_fn_matches_official_forward_with_cfg(golden):
    """The official sample.py: batch [z; z] with labels [y; null], model_fn = forward_with_cfg
    (guidance on 3 channels), keep the first half.  ditkit: guided_fn on the same doubled batch
    with labels [y; y].  Both draw the same (2B, …) noise each step, so the first halves agree."""
    model = DiT(**golden["small"]["config"])
    model.load_state_dict(golden["small"]["state_dict"])
    model.eval()
    z = golden["ddim_25"]["noise"][:2]
    y = golden["ddim_25"]["y"][:2]
    null = torch.full_like(y, model.num_classes)
    process = create_ddpm()

    official_y = torch.cat([y, null])
    official, _ = process.sample(
        lambda x, t: model.forward_with_cfg(x, t, official_y, 4.0), torch.cat([z, z]), "ddpm", steps=10,
        generator=torch.Generator().manual_seed(0),
    )
    ours, nfe = process.sample(
        guided_fn(model, {"y": torch.cat([y, y])}, cfg_scale=4.0, guided_channels=3), torch.cat([z, z]), "ddpm", steps=10,
        generator=torch.Generator().manual_seed(0),
    )
    assert nfe == 10
    assert rel_err(ours[:2], official[:2]) < 1e-5


@pytest.mark.parametrize("sampler, eta", [("ddpm", 0.0), ("ddim", 0.0), ("ddim", 1.0)])
def test_sampling_never_reads_a_value_back(sampler, eta):
    """On the meta device any host read (.item(), bool(), a data-dependent branch) raises: the
    loop, the schedule lookups and the t = 0 mask stay on the device."""
    x = torch.randn(2, 4, 8, 8, device="meta")
    out, nfe = create_ddpm().sample(lambda x, t: torch.zeros(2, 8, 8, 8, device=x.device), x, sampler, steps=5, eta=eta)
    assert out.device.type == "meta" and out.shape == x.shape and nfe == 5
