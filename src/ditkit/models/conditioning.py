"""Conditioning beyond class labels: continuous parameters (added to c like the class embedding),
spatial fields (patch-embedded into tokens that every block cross-attends to) and per-sample sequences of
embeddings of any length (projected into tokens that every block cross-attends to, padding masked out)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ditkit.models.grid import TokenGrid
from ditkit.models.pos_embed import sincos_pos_embed

CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}  # a patch embedding's convolution, by the input's number of axes


class CrossAttention(nn.Module):
    """Multi-head attention of the image tokens (queries) to conditioning tokens (keys, values).
    The output projection starts at zero so a new cross-attention leaves the block unchanged.
    ``key_mask`` (B, M) bool, True at the real conditioning tokens: padding gets no weight."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, dim * 2)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        B, N, D = x.shape
        M, H = context.shape[1], self.num_heads
        q = self.q(x).reshape(B, N, H, D // H).transpose(1, 2)  # (B, H, N, D/H)
        k, v = self.kv(context).reshape(B, M, 2, H, D // H).permute(2, 0, 3, 1, 4).unbind(0)  # (B, H, M, D/H)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=None if key_mask is None else key_mask[:, None, None, :])
        return self.proj(out.transpose(1, 2).reshape(B, N, D))


class SequenceEmbedder(nn.Module):
    """A per-sample sequence of embeddings (B, M, E) (a text encoder's output, or any set of vectors, M varying
    from sample to sample) as conditioning tokens (B, M, D):

        tokens_j = W₂ GELU(W₁ e_j) + pos_j,   pos: the fixed 1D sin-cos table over j = 0 … ``max_len`` − 1,

    so that the order of the sequence reaches the cross-attention (its keys are otherwise a set).  A dropped
    sample (guidance's unconditional half, training dropout) attends to a learned null sequence of one token;
    so does a sample whose mask holds no real token (an empty sequence is the unconditional one)."""

    def __init__(self, context_dim: int, hidden_size: int, max_len: int):
        super().__init__()
        self.max_len = max_len
        self.proj = nn.Sequential(nn.Linear(context_dim, hidden_size), nn.GELU(approximate="tanh"),
                                  nn.Linear(hidden_size, hidden_size))
        self.null = nn.Parameter(torch.zeros(1, hidden_size))
        self.register_buffer("pos", sincos_pos_embed(hidden_size, (max_len,)), persistent=False)

    def initialize_weights(self) -> None:
        nn.init.normal_(self.null, std=0.02)

    def forward(self, context: torch.Tensor, mask: torch.Tensor | None,
                drop: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(tokens (B, M, D), key mask (B, M) or None when every token is real and none is dropped)."""
        B, M, _ = context.shape
        if M > self.max_len:
            raise ValueError(f"a conditioning sequence of {M} tokens exceeds model.context_len={self.max_len}")
        w = self.proj[0].weight
        tokens = self.proj(context.to(w.dtype)) + self.pos[:M].to(w.dtype)
        if mask is None and drop is None:
            return tokens, None
        mask = torch.ones(B, M, dtype=torch.bool, device=tokens.device) if mask is None else mask.bool()
        drop = ~mask.any(dim=1) if drop is None else drop | ~mask.any(dim=1)
        first = torch.arange(M, device=tokens.device) == 0  # the null sequence: one token, at the first position
        null = torch.where(first[:, None], self.null.to(tokens.dtype), torch.zeros_like(self.null, dtype=tokens.dtype))
        tokens = torch.where(drop[:, None, None], null, tokens)
        return tokens, torch.where(drop[:, None], first, mask)


class ConditionEmbedders(nn.Module):
    """Embedders for continuous parameters and spatial fields; each has a learned null used when
    the condition is dropped (training dropout, or ``force_drop_ids`` for guidance)."""

    def __init__(self, hidden_size: int, grid: TokenGrid, num_params: int = 0, param_dropout_prob: float = 0.1,
                 field_channels: int = 0, context_dim: int = 0, context_len: int = 256):
        super().__init__()
        self.num_params = num_params
        self.field_channels = field_channels
        self.context_dim = context_dim
        self.dropout_prob = param_dropout_prob
        if num_params:
            self.param_mlp = nn.Sequential(nn.Linear(num_params, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))
            self.param_null = nn.Parameter(torch.zeros(hidden_size))
        if field_channels:
            self.field_embedder = CONV[grid.dims](field_channels, hidden_size, kernel_size=grid.patch, stride=grid.patch)
            self.field_null = nn.Parameter(torch.zeros(hidden_size))
            self.register_buffer("field_pos_embed", sincos_pos_embed(hidden_size, grid.shape).unsqueeze(0), persistent=False)
        if context_dim:
            self.sequence = SequenceEmbedder(context_dim, hidden_size, context_len)

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
        if self.context_dim:
            self.sequence.initialize_weights()

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

    def embed_sequence(self, context: torch.Tensor, mask: torch.Tensor | None, train: bool,
                       force_drop_ids: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.sequence(context, mask, self._drop_mask(len(context), context.device, train, force_drop_ids))

    @staticmethod
    def combine(t_emb: torch.Tensor, y_emb: torch.Tensor | None, p_emb: torch.Tensor | None) -> torch.Tensor:
        """c = t + y (+ params): the conditioning vector of adaLN."""
        c = t_emb
        if y_emb is not None:
            c = c + y_emb
        if p_emb is not None:
            c = c + p_emb
        return c  # (B, D)
