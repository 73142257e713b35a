"""Closed forms for Gaussian data x1 ~ N(μ, Σ) and noise x0 ~ N(0, I) on a path x_t = α x1 + σ x0.

x_t is Gaussian, jointly with x1 and x0:  m_t = α μ,  C_t = α² Σ + σ² I,
Cov(x1, x_t) = α Σ,  Cov(x0, x_t) = σ I, hence by Gaussian conditioning

    E[x0 | x_t] = σ C_t⁻¹ (x − m_t)
    E[x1 | x_t] = μ + α Σ C_t⁻¹ (x − m_t)
    v(x, t)    = α̇ E[x1|x_t] + σ̇ E[x0|x_t] = α̇ μ + (α α̇ Σ + σ σ̇ I) C_t⁻¹ (x − m_t)
    s(x, t)    = −C_t⁻¹ (x − m_t).

The ODE dx/dt = v is linear and all C_t commute with Σ, so its flow map is
x_t = m_t + C_t^{1/2} C_0^{-1/2} (x_0 − m_0); on the linear path (α = t, σ = 1 − t) the map from
t = 0 to t = 1 is  x ↦ μ + Σ^{1/2} x.
"""
from __future__ import annotations

import math

import torch

MU = torch.tensor([1.5, -0.5], dtype=torch.float64)
SIGMA = torch.tensor([[1.0, 0.6], [0.6, 0.5]], dtype=torch.float64)  # non-diagonal, eigenvalues ≈ 1.38, 0.12


def linear_coefficients(t: torch.Tensor):
    """(α, σ, α̇, σ̇) of the linear path, written out here independently of ditkit."""
    return t, 1 - t, torch.ones_like(t), -torch.ones_like(t)


def gvp_coefficients(t: torch.Tensor):
    a = t * math.pi / 2
    return torch.sin(a), torch.cos(a), math.pi / 2 * torch.cos(a), -math.pi / 2 * torch.sin(a)


class GaussianFlow:
    """Exact velocity, noise and score fields of N(μ, Σ) data on a path with given coefficients."""

    def __init__(self, coefficients=linear_coefficients, mu: torch.Tensor = MU, Sigma: torch.Tensor = SIGMA):
        self.coefficients, self.mu, self.Sigma = coefficients, mu, Sigma
        self.eye = torch.eye(len(mu), dtype=torch.float64)

    def _whitened(self, x: torch.Tensor, t: torch.Tensor):
        """C_t⁻¹ (x − m_t) for x (B, d), t (B,) and the path coefficients, each (B or 1, 1, 1)."""
        if (t == t[0]).all():  # samplers pass one time for the whole batch: one d×d solve
            t = t[:1]
        alpha, sigma, d_alpha, d_sigma = (c.double().reshape(-1, 1, 1) for c in self.coefficients(t.double()))
        C = alpha**2 * self.Sigma + sigma**2 * self.eye  # (B or 1, d, d)
        r = x.double() - alpha[:, :, 0] * self.mu  # (B, d)
        C_inv = torch.linalg.inv(C)
        z = r @ C_inv[0].T if len(C_inv) == 1 else (C_inv @ r.unsqueeze(-1)).squeeze(-1)  # (B, d)
        return z, (alpha, sigma, d_alpha, d_sigma)

    def velocity(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.velocity_score(x, t)[0]

    def noise(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        z, (_, sigma, _, _) = self._whitened(x, t)
        return (sigma[:, :, 0] * z).to(x.dtype)

    def score(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        z, _ = self._whitened(x, t)
        return (-z).to(x.dtype)

    def velocity_score(self, x: torch.Tensor, t: torch.Tensor):
        z, (alpha, sigma, d_alpha, d_sigma) = self._whitened(x, t)
        A = alpha * d_alpha * self.Sigma + sigma * d_sigma * self.eye  # (B or 1, d, d)
        Az = z @ A[0].T if len(A) == 1 else (A @ z.unsqueeze(-1)).squeeze(-1)
        return (d_alpha[:, :, 0] * self.mu + Az).to(x.dtype), (-z).to(x.dtype)


def sqrtm_psd(S: torch.Tensor) -> torch.Tensor:
    lam, U = torch.linalg.eigh(S)
    return U @ torch.diag(lam.sqrt()) @ U.T


def linear_flow_map(x0: torch.Tensor, mu: torch.Tensor = MU, Sigma: torch.Tensor = SIGMA) -> torch.Tensor:
    """Exact solution at t = 1 of the linear path's ODE started at x0 (t = 0): μ + Σ^{1/2} x0."""
    return mu + x0.double() @ sqrtm_psd(Sigma).T


def assert_gaussian(x: torch.Tensor, mu: torch.Tensor = MU, Sigma: torch.Tensor = SIGMA, tol: float = 0.05) -> None:
    """Sample mean and covariance within ``tol`` (absolute, entrywise) of N(μ, Σ)."""
    x = x.double()
    mean, cov = x.mean(0), torch.cov(x.T)
    assert (mean - mu).abs().max() < tol, f"mean {mean.tolist()} vs {mu.tolist()}"
    assert (cov - Sigma).abs().max() < tol, f"covariance {cov.tolist()} vs {Sigma.tolist()}"
