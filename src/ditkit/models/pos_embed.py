"""Fixed sin-cos position embeddings of a token grid with 1, 2 or 3 axes.  The 2D table is the official
DiT's (MAE's), for square and non-square grids; 1D and 3D follow the same conventions (base 10000,
sines then cosines, float64 then float32)."""
from __future__ import annotations

from typing import Sequence

import torch


def sincos_1d_pos_embed(dim: int, pos: torch.Tensor) -> torch.Tensor:
    """(M,) positions -> (M, dim): [sin(pos ω_k), cos(pos ω_k)], ω_k = 10000^(-2k/dim), in float64."""
    if dim % 2:
        raise ValueError(f"position embedding dimension {dim} must be even")
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0))
    out = pos.reshape(-1).to(torch.float64)[:, None] * omega[None]  # (M, dim/2)
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)


def sincos_2d_pos_embed(dim: int, grid_size: int | tuple[int, int]) -> torch.Tensor:
    """(h·w, dim) for a row-major grid of h×w tokens.  As in the official code, the first half of
    the channels encodes the column index and the second half the row index."""
    h, w = (grid_size, grid_size) if isinstance(grid_size, int) else grid_size
    if dim % 4:
        raise ValueError(f"hidden size {dim} must be divisible by 4 for the 2D sin-cos embedding")
    rows, cols = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64), indexing="ij")
    emb = torch.cat([sincos_1d_pos_embed(dim // 2, cols), sincos_1d_pos_embed(dim // 2, rows)], dim=1)
    return emb.float()  # (h*w, dim)


def sincos_3d_pos_embed(dim: int, grid_size: tuple[int, int, int]) -> torch.Tensor:
    """(t·h·w, dim) for a row-major grid of t×h×w tokens, factorised into a temporal and a spatial part
    as video DiTs do (CogVideoX's split): the first dim/4 channels are the 1D table of the frame index
    (ω_k = 10000^(-2k/(dim/4))), the other 3·dim/4 the 2D table above of (row, column).  So every frame's
    tokens share the temporal part, and at a fixed frame the rest is the 2D table of width 3·dim/4."""
    t, h, w = grid_size
    if dim % 16:
        raise ValueError(f"hidden size {dim} must be divisible by 16 for the 3D sin-cos embedding "
                         "(a quarter for T, three quarters for H and W)")
    temporal = sincos_1d_pos_embed(dim // 4, torch.arange(t)).float()  # (t, dim/4)
    spatial = sincos_2d_pos_embed(dim - dim // 4, (h, w))  # (h·w, 3·dim/4)
    return torch.cat([temporal.repeat_interleave(h * w, dim=0), spatial.repeat(t, 1)], dim=1)  # (t·h·w, dim)


def sincos_pos_embed(dim: int, grid_size: Sequence[int]) -> torch.Tensor:
    """(N, dim), the table of a token grid of 1, 2 or 3 axes: the 1D table of the positions 0..L−1
    (MAE's 1D sin-cos), the official 2D table, or the factorised 3D table."""
    if len(grid_size) == 1:
        return sincos_1d_pos_embed(dim, torch.arange(grid_size[0])).float()
    if len(grid_size) == 2:
        return sincos_2d_pos_embed(dim, tuple(grid_size))
    return sincos_3d_pos_embed(dim, tuple(grid_size))
