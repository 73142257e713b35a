"""The Diffusion Transformer (Peebles & Xie, ICCV 2023), parameter-for-parameter compatible with
the official ``models.py`` (facebookresearch/DiT): same module names, same state-dict keys and
shapes, same function.  An official checkpoint loads with ``strict=True``.

Read top to bottom: embedders, the adaLN-Zero block, the final layer, the model, then the table
of named variants.  The network maps (x_t, t, c) to an output; it knows nothing of the noise
process that trains it.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ditkit.models.conditioning import CONV, ConditionEmbedders, CrossAttention
from ditkit.models.grid import TokenGrid, as_size
from ditkit.models.layers import RMSNorm, SwiGLU, apply_rope, grid_rope_angles, swiglu_hidden
from ditkit.models.pos_embed import sincos_pos_embed


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: LN(x) * (1 + γ) + β, with (B, D) shift/scale broadcast over the N tokens."""
    return torch.addcmul(shift.unsqueeze(1), x, 1 + scale.unsqueeze(1))


#################################################################################
#               Embedding layers for timesteps, labels and patches               #
#################################################################################


class TimestepEmbedder(nn.Module):
    """Scalar timesteps -> vectors: sinusoidal features (dim 256) through a 2-layer MLP."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size, bias=True),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size, bias=True),
        )
        self.frequency_embedding_size = frequency_embedding_size

    @staticmethod
    def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
        """[cos(t ω_k), sin(t ω_k)] with ω_k = max_period^(-k/half), k < half (GLIDE / ADM)."""
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t[:, None].float() * freqs[None]  # (B, half)
        embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        if dim % 2:
            embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
        return embedding  # (B, dim)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        t_freq = self.timestep_embedding(t, self.frequency_embedding_size)
        return self.mlp(t_freq.to(self.mlp[0].weight.dtype))  # (B, D)


class LabelEmbedder(nn.Module):
    """Class labels -> vectors.  Row ``num_classes`` is the null class of classifier-free guidance;
    during training a label is replaced by it with probability ``dropout_prob``."""

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float):
        super().__init__()
        use_cfg_embedding = dropout_prob > 0
        self.embedding_table = nn.Embedding(num_classes + use_cfg_embedding, hidden_size)
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob

    def token_drop(self, labels: torch.Tensor, force_drop_ids: torch.Tensor | None = None) -> torch.Tensor:
        if force_drop_ids is None:
            drop_ids = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
        else:
            drop_ids = force_drop_ids == 1
        return torch.where(drop_ids, self.num_classes, labels)

    def forward(self, labels: torch.Tensor, train: bool, force_drop_ids: torch.Tensor | None = None) -> torch.Tensor:
        if (train and self.dropout_prob > 0) or force_drop_ids is not None:
            labels = self.token_drop(labels, force_drop_ids)
        return self.embedding_table(labels)  # (B, D)


class PatchEmbed(nn.Module):
    """(B, C, *size) -> (B, N, D) by a stride-p convolution with a kernel of one patch: in 2D (B, C, H, W)
    -> N = (H/p)(W/p) tokens by a p×p convolution; ``patch_size`` an int (p×p) or one size per axis."""

    def __init__(self, patch_size: int | Sequence[int], in_channels: int, hidden_size: int):
        super().__init__()
        patch = as_size(patch_size)
        self.proj = CONV[len(patch)](in_channels, hidden_size, kernel_size=patch, stride=patch, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, D, h, w) -> (B, N, D), any number of axes


#################################################################################
#                                 Core DiT block                                 #
#################################################################################


class Attention(nn.Module):
    """Multi-head self-attention through SDPA (flash / memory-efficient kernels where available).
    Module names ``qkv`` and ``proj`` are those of timm's Attention used by the official code.

    Options (off: the official attention): ``qk_norm`` puts an RMSNorm (learned weight) on each head's
    q and k, so the logits q·k/√d stay bounded whatever the scale of the activations; ``rope_grid``, the
    token grid's shape ((h, w) in 2D, (L,) or (t, h, w) otherwise), rotates q and k by the tokens' axial
    rotary angles, so q·k depends on relative offsets along each axis.

    ``mask`` (B, N) bool, True for real tokens, is a key padding mask: no query gives a padded key any
    weight.  Padded queries still attend to the real keys, so no row is empty (and none NaN) as long as
    every sample holds a real token (``TokenGrid.token_mask`` checks it)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, qk_norm: bool = False,
                 rope_grid: tuple[int, ...] | None = None):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden_size {dim} is not divisible by num_heads {num_heads}")
        head_dim = dim // num_heads
        if rope_grid is not None and (head_dim % 4 or head_dim // 2 < len(rope_grid)):  # a rotation pair per axis
            raise ValueError(f"pos_embed='rope' needs a head size divisible by 4, with a rotation pair for each of the "
                             f"{len(rope_grid)} axes (hidden_size/num_heads = {head_dim})")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.rope_grid = rope_grid
        if qk_norm:
            self.q_norm = RMSNorm(head_dim, elementwise_affine=True)
            self.k_norm = RMSNorm(head_dim, elementwise_affine=True)

    @property
    def is_official(self) -> bool:
        """Whether this is the official attention (no QK-norm, no RoPE)."""
        return self.rope_grid is None and not hasattr(self, "q_norm")

    def attend(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """The heads' outputs, concatenated (B, N, D): the input of ``proj``."""
        B, N, D = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (B, heads, N, D/heads)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        if self.rope_grid is not None:
            # A sequence may be shorter than the model's length (a padded batch): its tokens sit at 0..N−1.
            grid = self.rope_grid if len(self.rope_grid) > 1 else (N,)
            angles = grid_rope_angles(D // self.num_heads, grid, x.device)  # (N, D/heads/2)
            q, k = apply_rope(q, angles), apply_rope(k, angles)
        attn_mask = None if mask is None else mask[:, None, None, :]  # (B, 1, 1, N): keys, broadcast over heads, queries
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return x.transpose(1, 2).reshape(B, N, D)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.proj(self.attend(x) if mask is None else self.attend(x, mask=mask))


def make_norm(norm: str, dim: int) -> nn.Module:
    """The adaLN blocks' norm without weights, eps 1e-6: LayerNorm (official) or RMSNorm."""
    if norm == "rmsnorm":
        return RMSNorm(dim, eps=1e-6)
    return nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)


class Mlp(nn.Module):
    """fc1 -> tanh-GELU -> fc2 (timm's Mlp names)."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden_dim, dim)

    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        """GELU(fc1(x)): the input of ``fc2``."""
        return self.act(self.fc1(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.hidden(x))


class DiTBlock(nn.Module):
    """A transformer block with adaLN-Zero conditioning:
        x = x + α₁ · Attn(LN(x)(1+γ₁) + β₁)
        x = x + α₂ · MLP(LN(x)(1+γ₂) + β₂)
    where (β₁, γ₁, α₁, β₂, γ₂, α₂) = Linear(SiLU(c)), zero-initialised so each block starts as identity.
    With ``cross_attention`` a pre-norm cross-attention to the conditioning tokens sits between them.
    ``norm="rmsnorm"`` puts RMSNorm in place of LN (still without weights: adaLN supplies them),
    ``mlp="swiglu"`` the SwiGLU feed-forward in place of the MLP; ``qk_norm`` and ``rope_grid`` go to
    the attention."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0, cross_attention: bool = False,
                 norm: str = "layernorm", mlp: str = "gelu", qk_norm: bool = False,
                 rope_grid: tuple[int, ...] | None = None):
        super().__init__()
        self.norm1 = make_norm(norm, hidden_size)
        self.attn = Attention(hidden_size, num_heads=num_heads, qkv_bias=True, qk_norm=qk_norm, rope_grid=rope_grid)
        self.norm2 = make_norm(norm, hidden_size)
        if mlp == "swiglu":
            self.mlp = SwiGLU(hidden_size, swiglu_hidden(hidden_size, mlp_ratio))
        else:
            self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size, bias=True))
        if cross_attention:
            self.norm_cross = nn.LayerNorm(hidden_size, eps=1e-6)
            self.cross_attn = CrossAttention(hidden_size, num_heads)

    def forward(self, x: torch.Tensor, c: torch.Tensor, context: torch.Tensor | None = None,
                mask: torch.Tensor | None = None, context_mask: torch.Tensor | None = None) -> torch.Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa), mask)
        if context is not None:
            x = x + self.cross_attn(self.norm_cross(x), context, context_mask)
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class FinalLayer(nn.Module):
    """adaLN, then a linear map of each token to its patch values: p·p·C_out for an int ``patch_size`` (2D),
    p_0·…·p_{d−1}·C_out for one size per axis."""

    def __init__(self, hidden_size: int, patch_size: int | Sequence[int], out_channels: int, norm: str = "layernorm"):
        super().__init__()
        self.norm_final = make_norm(norm, hidden_size)
        self.linear = nn.Linear(hidden_size, math.prod(as_size(patch_size)) * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=True))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))  # (B, N, p_0·…·p_{d−1}·C_out)


#################################################################################
#                          REPA's representation projector                       #
#################################################################################

REPA_HIDDEN = 2048  # the width of REPA's projector MLP (Yu et al. 2024)


def repa_projector(hidden_size: int, z_dim: int) -> nn.Sequential:
    """REPA's MLP from a block's tokens to the encoder's feature space, token by token:
    Linear(D, 2048) → SiLU → Linear(2048, 2048) → SiLU → Linear(2048, z_dim)."""
    return nn.Sequential(
        nn.Linear(hidden_size, REPA_HIDDEN), nn.SiLU(),
        nn.Linear(REPA_HIDDEN, REPA_HIDDEN), nn.SiLU(),
        nn.Linear(REPA_HIDDEN, z_dim),
    )


#################################################################################
#                                 The DiT model                                  #
#################################################################################


class DiT(nn.Module):
    """Diffusion model with a Transformer backbone.

    The first ten keyword arguments are those of the official constructor.  The rest extend it
    (all off by default, so the official state dict is unchanged):

    - ``input_size``: an int is a square H × W image (the official meaning); a sequence gives one size
      per axis and, by its length, the input's axes: (L,) for (B, C, L) sequences, (H, W) for images,
      (T, H, W) for (B, C, T, H, W) volumes or videos.  ``patch_size``: an int for every axis, or one size
      per axis (e.g. (1, 2, 2) for video).  The token bookkeeping is ``ditkit.models.grid.TokenGrid``.

    - ``num_classes=0``: unconditional (no label embedder).
    - ``num_params``: a vector of continuous parameters, embedded and added to c (own guidance dropout).
    - ``cond_channels``: spatial conditioning fields of the input's size, either attended by
      cross-attention in every block (``field_mode="cross_attention"``) or concatenated to the
      input channels (``field_mode="concat"``, where a dropped field is zeros).
    - ``context_dim``: per-sample sequences of embeddings (B, M, context_dim), M varying, with a key mask
      (``forward``'s ``context`` and ``context_mask``): ``ditkit.models.conditioning.SequenceEmbedder`` makes them
      tokens (at most ``context_len``) that every block cross-attends to, beside a field's; a learned null
      sequence stands for a dropped one.
    - ``cond_mode``: how t and the class reach the blocks: ``"adaln"`` (adaLN-Zero, the paper's
      best), ``"cross_attention"`` (as extra tokens t, y (and params) attended by every block) or
      ``"in_context"`` (as those tokens appended to the sequence); the paper's ablation.

    LightningDiT's architecture options (``ditkit.models.layers``):

    - ``pos_embed``: ``"sincos"`` (the fixed table added to the tokens: 1D, the official 2D, or the
      factorised 3D table of ``ditkit.models.pos_embed``) or ``"rope"`` (axial rotary embeddings of q
      and k in every block, per axis of the token grid, and no table).
    - ``norm``: ``"layernorm"`` or ``"rmsnorm"`` in the blocks and the final layer.
    - ``qk_norm``: RMSNorm on each head's q and k.
    - ``mlp``: ``"gelu"`` or ``"swiglu"`` (hidden width int(2/3 · mlp_ratio · D), about the same parameters).

    Representation alignment (REPA, Yu et al. 2024): ``repa_depth`` = k adds ``repa_projector``, an
    MLP from the tokens after block k (1-indexed) to ``repa_dim``-wide vectors, returned beside the
    output by ``forward(..., return_repa=True)``; a training objective aligns them with a frozen
    encoder's features.  Sampling never calls it.
    """

    def __init__(
        self,
        input_size: int | Sequence[int] = 32,
        patch_size: int | Sequence[int] = 2,
        in_channels: int = 4,
        hidden_size: int = 1152,
        depth: int = 28,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        class_dropout_prob: float = 0.1,
        num_classes: int = 1000,
        learn_sigma: bool = True,
        num_params: int = 0,
        param_dropout_prob: float = 0.1,
        cond_channels: int = 0,
        field_mode: str = "cross_attention",
        cond_mode: str = "adaln",
        pos_embed: str = "sincos",
        norm: str = "layernorm",
        qk_norm: bool = False,
        mlp: str = "gelu",
        repa_depth: int | None = None,
        repa_dim: int = 768,
        context_dim: int = 0,
        context_len: int = 256,
    ):
        super().__init__()
        self.grid = TokenGrid.of(input_size, patch_size)
        self.input_size = self.grid.size
        if cond_mode not in ("adaln", "cross_attention", "in_context"):
            raise ValueError(f"cond_mode must be 'adaln', 'cross_attention' or 'in_context', got {cond_mode!r}")
        if field_mode not in ("cross_attention", "concat"):
            raise ValueError(f"field_mode must be 'cross_attention' or 'concat', got {field_mode!r}")
        for key, value, choices in (("pos_embed", pos_embed, ("sincos", "rope")), ("norm", norm, ("layernorm", "rmsnorm")),
                                    ("mlp", mlp, ("gelu", "swiglu"))):
            if value not in choices:
                raise ValueError(f"{key} must be {' or '.join(map(repr, choices))}, got {value!r}")
        if pos_embed == "rope" and cond_mode == "in_context":
            raise ValueError("pos_embed='rope' does not combine with cond_mode='in_context': the appended condition "
                             "tokens have no position on the token grid")
        if repa_depth is not None and not 1 <= repa_depth <= depth:
            raise ValueError(f"repa_depth must be a block in 1..{depth} (the depth), got {repa_depth}")
        if context_dim < 0 or context_len < 1:
            raise ValueError(f"context_dim must be ≥ 0 and context_len ≥ 1, got {context_dim} and {context_len}")
        if repa_dim <= 0:
            raise ValueError(f"repa_dim must be positive, got {repa_dim}")
        self.learn_sigma = learn_sigma
        self.in_channels = in_channels
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.patch_size = patch_size if isinstance(patch_size, int) else self.grid.patch
        self.num_heads = num_heads
        self.num_classes = num_classes
        self.cond_mode = cond_mode
        self.field_mode = field_mode if cond_channels else None
        self.cond_channels = cond_channels
        self.context_dim = context_dim
        self.grid_size = self.grid.shape  # tokens along each axis
        self.mlp_ratio = mlp_ratio
        self.options = {"pos_embed": pos_embed, "norm": norm, "qk_norm": qk_norm, "mlp": mlp}
        self.repa_depth = repa_depth

        embed_channels = in_channels + (cond_channels if self.field_mode == "concat" else 0)
        self.x_embedder = PatchEmbed(self.grid.patch, embed_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        if num_classes > 0:
            self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        self.cond = ConditionEmbedders(
            hidden_size, self.grid, num_params=num_params, param_dropout_prob=param_dropout_prob,
            field_channels=cond_channels if self.field_mode == "cross_attention" else 0,
            context_dim=context_dim, context_len=context_len,
        )
        if pos_embed == "sincos":
            # Fixed sin-cos embedding; a buffer-like Parameter so the state dict holds "pos_embed" as officially.
            self.pos_embed = nn.Parameter(torch.zeros(1, self.grid.num_tokens, hidden_size), requires_grad=False)
        else:  # RoPE alone carries the positions, as in LightningDiT
            self.register_parameter("pos_embed", None)

        cross = self.field_mode == "cross_attention" or cond_mode == "cross_attention" or context_dim > 0
        rope_grid = self.grid_size if pos_embed == "rope" else None
        self.blocks = nn.ModuleList([
            DiTBlock(hidden_size, num_heads, mlp_ratio=mlp_ratio, cross_attention=cross, norm=norm, mlp=mlp,
                     qk_norm=qk_norm, rope_grid=rope_grid)
            for _ in range(depth)
        ])
        self.final_layer = FinalLayer(hidden_size, self.grid.patch, self.out_channels, norm=norm)
        if repa_depth is not None:  # only then: the official state dict has no projector
            self.repa_projector = repa_projector(hidden_size, repa_dim)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        def _basic_init(module: nn.Module) -> None:
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.constant_(module.bias, 0)

        self.apply(_basic_init)
        if self.pos_embed is not None:
            self.pos_embed.data.copy_(sincos_pos_embed(self.pos_embed.shape[-1], self.grid_size).unsqueeze(0))
        # Patch embedding initialised like a Linear layer (xavier on the flattened kernel).
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view([w.shape[0], -1]))
        nn.init.constant_(self.x_embedder.proj.bias, 0)
        if self.num_classes > 0:
            nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        self.cond.initialize_weights()
        # adaLN-Zero: every block and the output layer start at zero.
        for block in self.blocks:
            nn.init.constant_(block.adaLN_modulation[-1].weight, 0)
            nn.init.constant_(block.adaLN_modulation[-1].bias, 0)
            if hasattr(block, "cross_attn"):  # ungated residual: a zero projection keeps the block the identity
                nn.init.constant_(block.cross_attn.proj.weight, 0)
                nn.init.constant_(block.cross_attn.proj.bias, 0)
        nn.init.constant_(self.final_layer.adaLN_modulation[-1].weight, 0)
        nn.init.constant_(self.final_layer.adaLN_modulation[-1].bias, 0)
        nn.init.constant_(self.final_layer.linear.weight, 0)
        nn.init.constant_(self.final_layer.linear.bias, 0)

    def _check_conditions(self, x: torch.Tensor, y, params, field, context=None, context_mask=None) -> None:
        """Each conditioning input is given exactly when the model was built for it, with its shape."""
        B = x.shape[0]
        if self.num_classes > 0 and y is None:
            raise ValueError(f"model is class-conditional (num_classes={self.num_classes}) but y is None")
        if self.num_classes == 0 and y is not None:
            raise ValueError("model was built without classes (num_classes=0) but y was given")
        P = self.cond.num_params
        if P and (params is None or tuple(params.shape) != (B, P)):
            got = None if params is None else tuple(params.shape)
            raise ValueError(f"model expects params of shape ({B}, {P}), got {got}")
        if not P and params is not None:
            raise ValueError("model was built without params (num_params=0) but params were given")
        C = self.cond_channels
        size = tuple(x.shape[2:])  # the input's size: the model's, or a padded batch's length
        if C and (field is None or tuple(field.shape) != (B, C, *size)):
            got = None if field is None else tuple(field.shape)
            raise ValueError(f"model expects a conditioning field of shape ({B}, {C}, {', '.join(map(str, size))}), got {got}")
        if not C and field is not None:
            raise ValueError("model was built without a conditioning field (cond_channels=0) but field was given")
        E = self.context_dim
        if E and (context is None or context.dim() != 3 or context.shape[0] != B or context.shape[2] != E):
            got = None if context is None else tuple(context.shape)
            raise ValueError(f"model expects a conditioning sequence of shape ({B}, M, {E}), got {got}")
        if not E and context is not None:
            raise ValueError("model was built without sequence conditioning (context_dim=0) but context was given")
        if context_mask is not None and (context is None or tuple(context_mask.shape) != tuple(context.shape[:2])):
            want = None if context is None else tuple(context.shape[:2])
            raise ValueError(f"context_mask must have the shape {want} of the context's (B, M), got {tuple(context_mask.shape)}")

    def _positions_of(self, grid: TokenGrid) -> torch.Tensor:
        """The position table's rows of an input smaller than the model's size: its tokens sit at the origin of
        every axis, so its rows are the table's first ``grid.shape`` rows along each axis, (1, N', D)."""
        table = self.pos_embed.reshape(*self.grid.shape, -1)
        return table[tuple(slice(0, n) for n in grid.shape)].reshape(1, grid.num_tokens, -1)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, p·p·C) -> (B, C, H, W); in general (B, N, p_0·…·p_{d−1}·C) -> (B, C, *input_size)."""
        return self.grid.unpatchify(x)

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        y: torch.Tensor | None = None,
        params: torch.Tensor | None = None,
        field: torch.Tensor | None = None,
        force_drop_ids: torch.Tensor | None = None,
        return_repa: bool = False,
        mask: torch.Tensor | None = None,
        context: torch.Tensor | None = None,
        context_mask: torch.Tensor | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """x: (B, C, H, W) noisy input ((B, C, L) or (B, C, T, H, W) for a model built so); t: (B,) network
        time; y: (B,) labels (``num_classes`` = null); params: (B, P) continuous parameters; field:
        (B, C_cond, *input_size) spatial conditioning.
        ``force_drop_ids`` (B,) with 1 where all conditioning is replaced by its null (for guidance).
        ``return_repa``: also return REPA's projection of the image tokens after block ``repa_depth``,
        (B, N, repa_dim).
        ``context`` (B, M, context_dim): per-sample sequences of embeddings, padded to the longest; ``context_mask``
        (B, M) bool, True at real entries (None: all real).  A sample with no real entry is unconditional.

        Variable sizes: x may be (B, C, L') with L' ≤ the model's L, a batch padded to its longest sequence (or, on
        2 or 3 axes, (B, C, T', H', W') no larger than the model's size on any axis, padded at the end of each
        axis), and ``mask`` (B, *x's size) bool marks the real positions (True) of each; every sample's extent must
        be a multiple of the patch on every axis.  Attention gives padded tokens no weight and positions count from
        each sample's origin, so the output on the real positions does not depend on the padding; the output on
        padding is not meaningful (a loss leaves it out).  RoPE serves smaller inputs in 1D only."""
        if return_repa and self.repa_depth is None:
            raise ValueError("return_repa needs a model built with repa_depth (REPA's projector)")
        grid = self.grid.of_input(x)
        if grid is not self.grid and grid.dims > 1 and self.pos_embed is None:
            raise ValueError(f"pos_embed='rope' takes inputs smaller than the model's size in 1D only; this input is "
                             f"{tuple(x.shape[2:])} for a model of {self.grid.size}: use pos_embed='sincos'")
        self._check_conditions(x, y, params, field, context, context_mask)
        keep = None if mask is None else grid.token_mask(mask)  # (B, N) True for real tokens
        if keep is not None and self.field_mode == "cross_attention":
            raise ValueError("a mask does not combine with field_mode='cross_attention' (its field tokens have no "
                             "padding mask); use field_mode='concat'")
        if self.training and force_drop_ids is None and (self.cond.num_params or self.cond_channels or self.context_dim):
            # One mask for every condition: guidance's unconditional branch drops them all at once,
            # so training must see them dropped together (independent masks almost never would).
            p = self.y_embedder.dropout_prob if self.num_classes > 0 else self.cond.dropout_prob
            if p > 0:
                force_drop_ids = (torch.rand(x.shape[0], device=x.device) < p).long()
        if self.field_mode == "concat":
            field = self.cond.drop_field(field, self.training, force_drop_ids)  # dropped -> zeros, the null field
            x = torch.cat([x, field.to(x.dtype)], dim=1)
        tokens = self.x_embedder(x)  # (B, N, D)
        if self.pos_embed is not None:
            tokens = tokens + (self.pos_embed if grid is self.grid else self._positions_of(grid))
        t_emb = self.t_embedder(t)  # (B, D)
        y_emb = self.y_embedder(y, self.training, force_drop_ids) if self.num_classes > 0 else None
        p_emb = self.cond.embed_params(params, self.training, force_drop_ids)
        # the tokens every block cross-attends to: a field's, then a sequence's; key_mask (B, M) None when all are real
        cross = self.cond.embed_field(field, self.training, force_drop_ids) if self.field_mode == "cross_attention" else None
        key_mask = None
        if self.context_dim:
            seq, key_mask = self.cond.embed_sequence(context, context_mask, self.training, force_drop_ids)
            if cross is not None and key_mask is not None:
                key_mask = torch.cat([key_mask.new_ones(len(seq), cross.shape[1]), key_mask], dim=1)
            cross = seq if cross is None else torch.cat([cross, seq], dim=1)
        c = self.cond.combine(t_emb, y_emb, p_emb)  # (B, D)

        n_extra = 0
        if self.cond_mode != "adaln":
            # t and class as tokens; the adaLN modulation then sees no conditioning (c = 0).
            extra = torch.stack([t_emb, y_emb if y_emb is not None else torch.zeros_like(t_emb)], dim=1)  # (B, 2, D)
            if p_emb is not None:
                extra = torch.cat([extra, p_emb.unsqueeze(1)], dim=1)
            c = torch.zeros_like(c)
            if self.cond_mode == "in_context":
                tokens = torch.cat([tokens, extra], dim=1)
                n_extra = extra.shape[1]
                if keep is not None:
                    keep = torch.cat([keep, keep.new_ones(keep.shape[0], n_extra)], dim=1)
            else:
                cross = extra if cross is None else torch.cat([cross, extra], dim=1)
                if key_mask is not None:
                    key_mask = torch.cat([key_mask, key_mask.new_ones(len(extra), extra.shape[1])], dim=1)

        num_patches = grid.num_tokens
        for k, block in enumerate(self.blocks, 1):
            if keep is None and key_mask is None:
                tokens = block(tokens, c, cross)
            else:
                tokens = block(tokens, c, cross, keep, key_mask)
            if return_repa and k == self.repa_depth:
                aligned = self.repa_projector(tokens[:, :num_patches])  # (B, N, repa_dim), without in-context tokens
        if n_extra:
            tokens = tokens[:, :-n_extra]
        out = grid.unpatchify(self.final_layer(tokens, c))  # (B, C_out, *input_size)
        return (out, aligned) if return_repa else out

    def forward_with_cfg(
        self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, cfg_scale: float, guided_channels: int | None = 3
    ) -> torch.Tensor:
        """The official guided forward: the batch holds [cond; uncond] halves with the same x.
        ε = ε_u + s (ε_c − ε_u) on the first ``guided_channels`` channels (3, as the official code
        does; ``None`` for all of the predicted channels); the rest (learned variance) is the
        conditional half's."""
        half = x[: len(x) // 2]
        combined = torch.cat([half, half], dim=0)
        model_out = self.forward(combined, t, y)
        k = self.in_channels if guided_channels is None else guided_channels
        eps, rest = model_out[:, :k], model_out[:, k:]
        cond_eps, uncond_eps = torch.split(eps, len(eps) // 2, dim=0)
        half_eps = uncond_eps + cfg_scale * (cond_eps - uncond_eps)
        eps = torch.cat([half_eps, half_eps], dim=0)
        return torch.cat([eps, rest], dim=1)


#################################################################################
#                                  DiT configs                                   #
#################################################################################

_SIZES = {"XL": (28, 1152, 16), "L": (24, 1024, 16), "B": (12, 768, 12), "S": (12, 384, 6)}


def _variant(size: str, patch: int) -> Callable[..., DiT]:
    depth, hidden, heads = _SIZES[size]

    def build(**kwargs) -> DiT:
        return DiT(depth=depth, hidden_size=hidden, patch_size=patch, num_heads=heads, **kwargs)

    build.depth = depth
    build.__name__ = f"DiT_{size}_{patch}"
    build.__doc__ = f"DiT-{size}/{patch}: depth {depth}, hidden {hidden}, {heads} heads, patch {patch}."
    return build


DiT_models: dict[str, Callable[..., DiT]] = {
    f"DiT-{size}/{patch}": _variant(size, patch) for size in _SIZES for patch in (2, 4, 8)
}
DiT_XL_2, DiT_XL_4, DiT_XL_8 = (DiT_models[f"DiT-XL/{p}"] for p in (2, 4, 8))
DiT_L_2, DiT_L_4, DiT_L_8 = (DiT_models[f"DiT-L/{p}"] for p in (2, 4, 8))
DiT_B_2, DiT_B_4, DiT_B_8 = (DiT_models[f"DiT-B/{p}"] for p in (2, 4, 8))
DiT_S_2, DiT_S_4, DiT_S_8 = (DiT_models[f"DiT-S/{p}"] for p in (2, 4, 8))


def build_model(name: str, **kwargs) -> DiT:
    """A named variant, or ``"custom"`` with depth/hidden_size/num_heads/patch_size in kwargs."""
    if name == "custom":
        return DiT(**kwargs)
    if name not in DiT_models:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(DiT_models)}, custom")
    return DiT_models[name](**kwargs)
