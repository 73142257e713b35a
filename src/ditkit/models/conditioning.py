"""Conditioning beyond class labels: continuous parameters (added to c like the class embedding)
and spatial fields (patch-embedded into tokens that every block cross-attends to)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ditkit.models.grid import TokenGrid
from ditkit.models.pos_embed import sincos_pos_embed

CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}  # a patch embedding's convolution, by the input's number of axes


class CrossAttention(nn.Module):
    """Multi-head attention of the image tokens (queries) to conditioning tokens (keys, values).
    The output projection starts at zero so a new cross-attention leaves the block unchanged."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, dim * 2)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        B, N, D = x.shape
        M, H = context.shape[1], self.num_heads
        q = self.q(x).reshape(B, N, H, D // H).transpose(1, 2)  # (B, H, N, D/H)
        k, v = self.kv(context).reshape(B, M, 2, H, D // H).permute(2, 0, 3, 1, 4).unbind(0)  # (B, H, M, D/H)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(B, N, D))


class ConditionEmbedders(nn.Module):
    """Embedders for continuous parameters and spatial fields; each has a learned null used when
    the condition is dropped (training dropout, or ``force_drop_ids`` for guidance)."""

    def __init__(self, hidden_size: int, grid: TokenGrid, num_params: int = 0, param_dropout_prob: float = 0.1,
                 field_channels: int = 0):
        super().__init__()
        self.num_params = num_params
        self.field_channels = field_channels
        self.dropout_prob = param_dropout_prob
        if num_params:
            self.param_mlp = nn.Sequential(nn.Linear(num_params, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))
            self.param_null = nn.Parameter(torch.zeros(hidden_size))
        if field_channels:
            self.field_embedder = CONV[grid.dims](field_channels, hidden_size, kernel_size=grid.patch, stride=grid.patch)
            self.field_null = nn.Parameter(torch.zeros(hidden_size))
            self.register_buffer("field_pos_embed", sincos_pos_embed(hidden_size, grid.shape).unsqueeze(0), persistent=False)

    def initialize_weights(self) -> None:
        if self.num_params:
            nn.init.normal_(self.param_mlp[0].weight, std=0.02)
            nn.init.normal_(self.param_mlp[2].weight, std=0.02)
            nn.init.normal_(self.param_null, std=0.02)
        if self.field_channels:
            w = self.field_embedder.weight.data
            nn.init.xavier_uniform_(w.view([w.shape[0], -1]))
            nn.init.constant_(self.field_embedder.bias, 0)
            nn.init.normal_(self.field_null, std=0.02)

    def _drop_mask(self, batch: int, device: torch.device, train: bool, force_drop_ids: torch.Tensor | None) -> torch.Tensor | None:
        if force_drop_ids is not None:
            return force_drop_ids == 1
        if train and self.dropout_prob > 0:
            return torch.rand(batch, device=device) < self.dropout_prob
        return None

    def drop_field(self, field: torch.Tensor, train: bool, force_drop_ids: torch.Tensor | None) -> torch.Tensor:
        """For fields concatenated to the input: a dropped field becomes zeros (the mean of a
        standardised field), the null of that mode."""
        drop = self._drop_mask(len(field), field.device, train, force_drop_ids)
        return field if drop is None else torch.where(drop.view(-1, *[1] * (field.ndim - 1)), torch.zeros_like(field), field)

    def embed_params(self, params: torch.Tensor | None, train: bool, force_drop_ids: torch.Tensor | None) -> torch.Tensor | None:
        if not self.num_params:
            return None
        emb = self.param_mlp(params.to(self.param_mlp[0].weight.dtype))  # (B, D)
        drop = self._drop_mask(len(emb), emb.device, train, force_drop_ids)
        return emb if drop is None else torch.where(drop[:, None], self.param_null.to(emb.dtype), emb)

    def embed_field(self, field: torch.Tensor | None, train: bool, force_drop_ids: torch.Tensor | None) -> torch.Tensor:
        w = self.field_embedder.weight
        # the position table is added in its own dtype: as autocast would, whatever dtype w is stored in
        tokens = self.field_embedder(field.to(w.dtype)).flatten(2).transpose(1, 2) + self.field_pos_embed  # (B, M, D)
        drop = self._drop_mask(len(tokens), tokens.device, train, force_drop_ids)
        return tokens if drop is None else torch.where(drop[:, None, None], self.field_null.to(tokens.dtype), tokens)

    @staticmethod
    def combine(t_emb: torch.Tensor, y_emb: torch.Tensor | None, p_emb: torch.Tensor | None) -> torch.Tensor:
        """c = t + y (+ params): the conditioning vector of adaLN."""
        c = t_emb
        if y_emb is not None:
            c = c + y_emb
        if p_emb is not None:
            c = c + p_emb
        return c  # (B, D)
