"""SDE sampler for flow models (SiT, Ma et al. 2024, Sec. 2.3):

    dx = [v(x, t) + ½ w(t) s(x, t)] dt + sqrt(w(t)) dW̄_t,

which has the same marginals p_t as the ODE dx = v dt for any w(t) ≥ 0 (the score term undoes
the diffusion).  Euler–Maruyama on a time grid, the last interval taken deterministically
(SiT's "Mean" last step:  x + [v + ½ w s] Δt,  no noise).

The sampler takes ``velocity_score_fn(x, t) -> (v, s)`` (one network evaluation gives both) and
``diffusion(t) -> w(t)``; ``diffusion_fn`` builds SiT's choices of w.  No network knowledge here.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from tqdm.auto import tqdm

TimeFn = Callable[[torch.Tensor], torch.Tensor]
VelocityScoreFn = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]

DIFFUSION_FORMS = ("constant", "SBDM", "sigma", "linear", "decreasing", "increasing-decreasing")


def diffusion_fn(form: str = "sigma", norm: float = 1.0, sigma: TimeFn | None = None, g2: TimeFn | None = None) -> TimeFn:
    """w(t) for SiT's ``--diffusion-form`` / ``--diffusion-norm`` (default "sigma", 1.0).

    SiT's code writes the SDE as  dx = [v + D s] dt + sqrt(2D) dW,  so w = 2D; the same form and
    norm give the same SDE as SiT:
        constant               w = 2·norm
        SBDM                   w = norm·g²(t)    (g² = 2(σ² α̇/α − σσ̇): the reverse of the noising
                                                  SDE; infinite at t = 0 on linear/GVP paths)
        sigma                  w = 2·norm·σ_t
        linear                 w = 2·norm·(1 − t)
        decreasing             w = ½ (norm·cos(πt) + 1)²
        increasing-decreasing  w = 2·norm·sin²(πt)
    ``sigma`` and ``g2`` are the path's σ_t and g_t² as functions of t (needed by "sigma", "SBDM")."""
    if form not in DIFFUSION_FORMS:
        raise ValueError(f"unknown diffusion form {form!r}; choose one of {DIFFUSION_FORMS}")
    if norm < 0:
        raise ValueError(f"diffusion norm must be non-negative, got {norm}")
    if form == "sigma" and sigma is None or form == "SBDM" and g2 is None:
        raise ValueError(f"diffusion form {form!r} needs the path's {'sigma' if form == 'sigma' else 'g2'}(t)")
    forms = {
        "constant": lambda t: torch.full_like(t, 2 * norm),
        "SBDM": lambda t: norm * g2(t),
        "sigma": lambda t: 2 * norm * sigma(t),
        "linear": lambda t: 2 * norm * (1 - t),
        "decreasing": lambda t: 0.5 * (norm * torch.cos(math.pi * t) + 1) ** 2,
        "increasing-decreasing": lambda t: 2 * norm * torch.sin(math.pi * t) ** 2,
    }
    return forms[form]


def euler_maruyama(
    velocity_score_fn: VelocityScoreFn,
    x: torch.Tensor,
    t_grid: torch.Tensor,
    diffusion: TimeFn,
    generator: torch.Generator | None = None,
    progress: bool = False,
) -> tuple[torch.Tensor, int]:
    """Euler–Maruyama from t_grid[0] to t_grid[-1], one velocity_score_fn evaluation per interval:

        x_{i+1} = x_i + [v + ½ w s](x_i, t_i) Δt_i + sqrt(w(t_i) Δt_i) z_i,     z_i ~ N(0, I)

    except the last interval, which drops the noise (SiT's "Mean" last step).  With SiT's grid,
    linspace(t0, 1 − 0.04, N) followed by 1.0, this is SiT's Euler SDE sampler with N steps.
    ``generator`` makes the noise reproducible.  Returns (x, nfe)."""
    if t_grid.ndim != 1 or t_grid.numel() < 2:
        raise ValueError(f"a time grid is a 1-D tensor of at least 2 times, got shape {tuple(t_grid.shape)}")
    t_grid = t_grid.to(device=x.device, dtype=x.dtype)
    ones = x.new_ones(x.shape[0])
    n = len(t_grid) - 1
    steps = tqdm(range(n), leave=False) if progress else range(n)
    for i in steps:
        t = t_grid[i] * ones  # (B,)
        dt = t_grid[i + 1] - t_grid[i]
        v, s = velocity_score_fn(x, t)
        w = diffusion(t_grid[i])  # () the same for the whole batch
        x = x + (v + 0.5 * w * s) * dt
        if i < n - 1:
            z = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            x = x + torch.sqrt(w * dt) * z
    return x, n
