"""Interpolant paths of flow matching and the conversions between what a network may predict.

Time convention (SiT's, and ditkit's everywhere in flow code): t = 0 is pure noise, t = 1 is data,

    x_t = α_t x1 + σ_t x0,        x1 ~ data,  x0 ~ N(0, I),

so the path's velocity is  u_t = α̇_t x1 + σ̇_t x0  (linear path: u_t = x1 − x0).

The opposite convention (rectified-flow / SD3 papers) writes  x_τ = (1 − τ) x_data + τ ε  with
τ = 1 pure noise and v = ε − x_data.  Converting: τ = 1 − t, ε = x0, x_data = x1 and
v_SD3 = −u_t.  SD3's logit-normal density and timestep shift act on τ (the noise level); see
``FlowMatching`` for how they are applied here.

A network trained on the path predicts one of (all conditional expectations given x_t):
    velocity  v = E[u_t | x_t]
    noise     ε̂ = E[x0 | x_t]
    score     s = ∇ log p_t(x_t) = −ε̂ / σ_t
and every one of them is an affine function of the others and x_t, with the path's α, σ, α̇, σ̇.
"""
from __future__ import annotations

import math

import torch

Coefficients = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


class LinearPath:
    """α_t = t, σ_t = 1 − t (rectified flow; SiT's "Linear")."""

    def coefficients(self, t: torch.Tensor) -> Coefficients:
        """(α_t, σ_t, α̇_t, σ̇_t)."""
        return t, 1 - t, torch.ones_like(t), -torch.ones_like(t)


class GVPPath:
    """α_t = sin(πt/2), σ_t = cos(πt/2): variance preserving, α² + σ² = 1 (SiT's "GVP")."""

    def coefficients(self, t: torch.Tensor) -> Coefficients:
        a = t * (math.pi / 2)
        return torch.sin(a), torch.cos(a), (math.pi / 2) * torch.cos(a), -(math.pi / 2) * torch.sin(a)


class VPPath:
    """SiT's "VP" path: the VP-SDE of score-based diffusion (Song et al. 2021) with linear
    β(s) ∈ [β_min, β_max], read in flow time (noise-SDE time s = 1 − t):

        log α_t = −¼ (1−t)² (β_max − β_min) − ½ (1−t) β_min,     σ_t = sqrt(1 − α_t²)

    α_0 = exp(−¼(β_max − β_min) − ½β_min) ≈ 0.0066 for SiT's (0.1, 20): t = 0 is noise up to that."""

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0):
        if not 0 < beta_min < beta_max:
            raise ValueError(f"VP path needs 0 < beta_min < beta_max, got ({beta_min}, {beta_max})")
        self.beta_min, self.beta_max = beta_min, beta_max

    def coefficients(self, t: torch.Tensor) -> Coefficients:
        s = 1 - t
        log_alpha = -0.25 * s**2 * (self.beta_max - self.beta_min) - 0.5 * s * self.beta_min
        d_log_alpha = 0.5 * s * (self.beta_max - self.beta_min) + 0.5 * self.beta_min  # = β(s) / 2
        alpha = torch.exp(log_alpha)
        sigma = torch.sqrt(1 - alpha**2)
        d_alpha = alpha * d_log_alpha
        return alpha, sigma, d_alpha, -alpha * d_alpha / sigma  # σ σ̇ = −α α̇ since α² + σ² = 1


PATHS = {"linear": LinearPath, "gvp": GVPPath, "vp": VPPath}
PREDICTIONS = ("velocity", "noise", "score")


def make_path(path) -> LinearPath | GVPPath | VPPath:
    """A path from its name ("linear", "gvp", "vp"; case-insensitive) or a path object itself."""
    if isinstance(path, str):
        if path.lower() not in PATHS:
            raise ValueError(f"unknown path {path!r}; choose one of {sorted(PATHS)}")
        return PATHS[path.lower()]()
    if not hasattr(path, "coefficients"):
        raise ValueError(f"path must be a name or have coefficients(t), got {type(path).__name__}")
    return path


def expand_like(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(B,) -> (B, 1, ..., 1) broadcastable against x of shape (B, ...)."""
    return t.reshape(t.shape[0], *([1] * (x.ndim - 1))).to(x.dtype)


def interpolate(path, t: torch.Tensor, x0: torch.Tensor, x1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x_t = α_t x1 + σ_t x0 and its velocity u_t = α̇_t x1 + σ̇_t x0 (x0 noise, x1 data, t (B,))."""
    alpha, sigma, d_alpha, d_sigma = path.coefficients(expand_like(t, x1))
    return alpha * x1 + sigma * x0, d_alpha * x1 + d_sigma * x0


def g2(path, t: torch.Tensor) -> torch.Tensor:
    """g_t² = 2 (σ_t² α̇_t/α_t − σ_t σ̇_t): the squared diffusion of the noising SDE whose marginals
    are the path's, i.e. the velocity–score relation  v = (α̇/α) x + ½ g² s  (SiT's 2·"drift_var";
    VP: g² = β; linear: g² = 2(1−t)/t, infinite at pure noise)."""
    alpha, sigma, d_alpha, d_sigma = path.coefficients(t)
    return 2 * (sigma**2 * d_alpha / alpha - sigma * d_sigma)


def _coefficients_like(path, t: torch.Tensor, x: torch.Tensor) -> Coefficients:
    return path.coefficients(expand_like(t, x))


def to_noise(path, pred: torch.Tensor, kind: str, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """ε̂ from a velocity, noise or score prediction at (x_t, t).

    velocity:  ε̂ = (α̇ x − α v) / (α̇ σ − α σ̇)   (from v = α̇ x̂1 + σ̇ ε̂ with x̂1 = (x − σ ε̂)/α;
               linear: ε̂ = x − t v)
    score:     ε̂ = −σ s"""
    alpha, sigma, d_alpha, d_sigma = _coefficients_like(path, t, x)
    if kind == "velocity":
        return (d_alpha * x - alpha * pred) / (d_alpha * sigma - alpha * d_sigma)
    if kind == "score":
        return -sigma * pred
    if kind == "noise":
        return pred
    raise ValueError(f"unknown prediction {kind!r}; choose one of {PREDICTIONS}")


def from_noise(path, eps: torch.Tensor, kind: str, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A velocity, noise or score from ε̂ at (x_t, t); the inverse of ``to_noise``.

    velocity:  v = (α̇ x − (α̇ σ − α σ̇) ε̂) / α   (singular at α = 0: pure noise)
    score:     s = −ε̂ / σ                       (singular at σ = 0: data)"""
    alpha, sigma, d_alpha, d_sigma = _coefficients_like(path, t, x)
    if kind == "velocity":
        return (d_alpha * x - (d_alpha * sigma - alpha * d_sigma) * eps) / alpha
    if kind == "score":
        return -eps / sigma
    if kind == "noise":
        return eps
    raise ValueError(f"unknown prediction {kind!r}; choose one of {PREDICTIONS}")


def convert(path, pred: torch.Tensor, source: str, target: str, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """One prediction kind to another, through ε̂ (exact algebra, no network).  Velocity -> score
    never divides by α:  s = (α v − α̇ x) / (σ (α̇ σ − α σ̇))  (linear: s = (t v − x)/(1 − t), −x at t = 0)."""
    if source == target:
        return pred
    return from_noise(path, to_noise(path, pred, source, x, t), target, x, t)

