"""The building blocks of the post-2023 DiT options (LightningDiT, Yao et al. 2025), each off by
default in ``DiT``: RMSNorm, 2D axial rotary position embeddings (RoPE) and the SwiGLU feed-forward.
QK-normalisation is RMSNorm applied to each head's q and k (in ``dit.Attention``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """RMSNorm(x) = x / sqrt(mean(x²) + ε) (· w with ``elementwise_affine``), over the last dim.

    Unlike LayerNorm it does not subtract the mean: one reduction fewer, and it is invariant to a
    positive scale of x, which is what keeps QK-normalised attention logits bounded."""

    def __init__(self, dim: int, eps: float = 1e-6, elementwise_affine: bool = False):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim)) if elementwise_affine else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x.float()
        y = (y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)
        return y * self.weight if self.weight is not None else y


def rope_angles(head_dim: int, rows: torch.Tensor, cols: torch.Tensor, base: float = 10000.0) -> torch.Tensor:
    """Axial 2D rotary angles (N, head_dim/2) for tokens at (rows, cols), each (N,).

    Pair i = (x_2i, x_2i+1) of a head turns by θ_i = pos · base^(-k/(head_dim/4)), k = i mod head_dim/4,
    with pos the row index for the first head_dim/4 pairs (the first half of the dims) and the column
    index for the rest: q·k then depends only on the offsets (Δrow, Δcol) (RoFormer, Eq. 16, per axis)."""
    quarter = head_dim // 4
    omega = base ** (-torch.arange(quarter, dtype=torch.float64) / quarter)  # (head_dim/4,)
    row_angles = rows.double()[:, None] * omega  # (N, head_dim/4)
    col_angles = cols.double()[:, None] * omega
    return torch.cat([row_angles, col_angles], dim=-1).float()  # (N, head_dim/2)


def grid_rope_angles(head_dim: int, grid: tuple[int, int], device: torch.device | None = None) -> torch.Tensor:
    """``rope_angles`` of the h × w patch grid in the model's row-major token order: (h·w, head_dim/2)."""
    h, w = grid
    rows = torch.arange(h, device=device).repeat_interleave(w)
    cols = torch.arange(w, device=device).repeat(h)
    return rope_angles(head_dim, rows, cols)


def apply_rope(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """Rotate each pair (x_2i, x_2i+1) of x (..., N, head_dim) by angles (N, head_dim/2):
    (a, b) -> (a cos θ − b sin θ, a sin θ + b cos θ), in float32."""
    pairs = x.float().unflatten(-1, (-1, 2))  # (..., N, head_dim/2, 2)
    a, b = pairs.unbind(-1)
    cos, sin = angles.cos(), angles.sin()
    out = torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1)
    return out.flatten(-2).to(x.dtype)


def swiglu_hidden(dim: int, mlp_ratio: float) -> int:
    """SwiGLU's hidden width as LightningDiT sizes it: int(2/3 · int(mlp_ratio · dim)).  Three
    matrices of that width hold as many weights as the GELU MLP's two of width mlp_ratio · dim."""
    return int(2 / 3 * int(dim * mlp_ratio))


class SwiGLU(nn.Module):
    """SwiGLU feed-forward (Shazeer 2020): w3(silu(x W1) ⊙ x W2), W1 and W2 stacked in ``w12``."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w12 = nn.Linear(dim, 2 * hidden_dim)
        self.w3 = nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, value = self.w12(x).chunk(2, dim=-1)  # each (B, N, hidden)
        return self.w3(F.silu(gate) * value)
