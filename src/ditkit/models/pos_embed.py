"""Fixed 2D sin-cos position embeddings (MAE / the official DiT), for square and non-square grids."""
from __future__ import annotations

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
