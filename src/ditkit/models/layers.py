"""The building blocks of the post-2023 DiT options (LightningDiT, Yao et al. 2025), each off by
default in ``DiT``: RMSNorm, axial rotary position embeddings (RoPE, per axis of a 1D, 2D or 3D token grid)
and the SwiGLU feed-forward.
QK-normalisation is RMSNorm applied to each head's q and k (in ``dit.Attention``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ditkit.models.grid import token_coords


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


def rope_axis_pairs(head_dim: int, dims: int) -> tuple[int, ...]:
    """How many of a head's head_dim/2 rotation pairs each of ``dims`` axes gets: an equal share, the first
    axis also taking the remainder (2D: half each; 3D with head_dim 64: T 12, H 10, W 10, Wan 2.1's split)."""
    pairs = head_dim // 2
    return tuple(pairs // dims + (a == 0) * (pairs % dims) for a in range(dims))


def rope_angles(head_dim: int, *coords: torch.Tensor, base: float = 10000.0) -> torch.Tensor:
    """Axial rotary angles (N, head_dim/2) for tokens at ``coords``, one (N,) tensor of indices per axis
    (rows, cols in 2D; frames, rows, cols in 3D).

    The pairs i = (x_2i, x_2i+1) of a head are split between the axes in order (``rope_axis_pairs``); the
    k-th pair of an axis with n pairs turns by θ = pos · base^(-k/n), with pos the token's index along that
    axis (2D: n = head_dim/4).  q·k then depends only on the offsets along each axis (RoFormer, Eq. 16,
    per axis)."""
    angles = []
    for pos, n in zip(coords, rope_axis_pairs(head_dim, len(coords))):
        omega = base ** (-torch.arange(n, dtype=torch.float64, device=pos.device) / n)  # (n,)
        angles.append(pos.double()[:, None] * omega)  # (N, n)
    return torch.cat(angles, dim=-1).float()  # (N, head_dim/2)


def grid_rope_angles(head_dim: int, grid: tuple[int, ...], device: torch.device | None = None) -> torch.Tensor:
    """``rope_angles`` of a patch grid of shape ``grid`` (1, 2 or 3 axes) in the model's token order:
    (N, head_dim/2)."""
    return rope_angles(head_dim, *token_coords(grid, device))


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
