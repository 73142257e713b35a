"""Samplers of a discrete Gaussian diffusion: ancestral DDPM and DDIM, as the official DiT code
(ADM's ``p_sample_loop`` / ``ddim_sample_loop``) runs them.

    x0 = sample_ddpm(model_fn, x_T, process, clip_denoised=False, generator=None, progress=False)
    x0 = sample_ddim(model_fn, x_T, process, eta=0.0, clip_denoised=False, generator=None, progress=False)

``model_fn(x_t, t_net) -> output`` is the network with its conditioning (and guidance) bound;
``process`` is any object with ``num_timesteps`` and the methods ``net_time(t)``,
``p_mean_variance(output, x_t, t, clip_denoised)``, ``predict_eps_from_x0(x_t, t, x0)``,
``alpha_bar(t, x)`` and ``alpha_bar_prev(t, x)`` (``ditkit.objectives.ddpm.DDPM``; respace it
first for fewer steps).  The loops walk t = T−1 … 0 over a tensor on x's device and mask the
noise at t = 0 with tensor ops, so a step never waits on the host.  One Gaussian draw of x's
shape per step, DDIM included, so a seeded run consumes the random stream as the official code.
"""
from __future__ import annotations

from typing import Callable

import torch
from tqdm.auto import tqdm

ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _timesteps(process, x: torch.Tensor, progress: bool):
    """T−1, …, 0 as 0-d tensors on x's device (optionally behind a progress bar)."""
    steps = torch.arange(process.num_timesteps - 1, -1, -1, device=x.device)
    return tqdm(steps, disable=not progress, leave=False)


def _nonzero_mask(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(B, 1, …, 1): 0 where t = 0 (the last step adds no noise), else 1."""
    return (t != 0).to(torch.promote_types(x.dtype, torch.float32)).view(-1, *([1] * (x.ndim - 1)))


@torch.no_grad()
def sample_ddpm(
    model_fn: ModelFn,
    x: torch.Tensor,
    process,
    clip_denoised: bool = False,
    generator: torch.Generator | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Ancestral sampling (Ho et al. 2020, Alg. 2): x_{t−1} = μ_θ(x_t, t) + σ_t z, z ~ N(0, I),
    with the process's variance σ_t² (learned or fixed) and no noise at t = 0."""
    for i in _timesteps(process, x, progress):
        t = i.expand(x.shape[0])  # (B,)
        out = process.p_mean_variance(model_fn(x, process.net_time(t)), x, t, clip_denoised)
        z = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        x = out["mean"] + _nonzero_mask(t, x) * torch.exp(0.5 * out["log_variance"]) * z
    return x


@torch.no_grad()
def sample_ddim(
    model_fn: ModelFn,
    x: torch.Tensor,
    process,
    eta: float = 0.0,
    clip_denoised: bool = False,
    generator: torch.Generator | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """DDIM (Song et al. 2021, Eq. 12):
        x_{t−1} = √ᾱ_{t−1} x̂_0 + √(1 − ᾱ_{t−1} − σ_t²) ε̂ + σ_t z,
        σ_t = η √((1 − ᾱ_{t−1})/(1 − ᾱ_t)) √(1 − ᾱ_t/ᾱ_{t−1});
    η = 0 is the deterministic sampler, η = 1 ancestral sampling with the posterior variance.
    ε̂ is re-derived from x̂_0 (so clipping x̂_0 is honoured), as the official code does."""
    for i in _timesteps(process, x, progress):
        t = i.expand(x.shape[0])  # (B,)
        out = process.p_mean_variance(model_fn(x, process.net_time(t)), x, t, clip_denoised)
        eps = process.predict_eps_from_x0(x, t, out["pred_xstart"])
        alpha_bar = process.alpha_bar(t, x)
        alpha_bar_prev = process.alpha_bar_prev(t, x)
        sigma = eta * torch.sqrt((1 - alpha_bar_prev) / (1 - alpha_bar)) * torch.sqrt(1 - alpha_bar / alpha_bar_prev)
        z = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        mean = out["pred_xstart"] * torch.sqrt(alpha_bar_prev) + torch.sqrt(1 - alpha_bar_prev - sigma**2) * eps
        x = mean + _nonzero_mask(t, x) * sigma * z
    return x
