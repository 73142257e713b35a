"""Representation alignment (REPA, Yu et al. 2024, "Representation Alignment for Generation"): any
objective plus a term that pulls the network's tokens after block k, through its projector, toward a
frozen image encoder's patch features of the clean image:

    L = L_objective + λ · L_REPA,    L_REPA = −(1/N) Σ_n cos(proj(h_k)_n, z_n)    (the paper's Eq. 8)

reported as the term ``repa`` = L_REPA ∈ [−1, 1] and in ``loss`` as λ · (1 + L_REPA): the constant λ
changes no gradient and keeps the loss non-negative, as the trainer's spike guard (a loss over a
multiple of its running mean) needs.

The network is any ``model(x_t, t_net, **model_kwargs, return_repa=True) -> (output, (B, N, D))``
(``ditkit.models.dit.DiT`` with ``repa_depth``); the encoder any module ``encoder(image) -> (B, N, D)``
without gradient (``ditkit.models.encoders.RepaEncoder``).  The wrapped objective never sees either:
it calls the network as always and gets its output alone.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def repa_loss(z_hat: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """−(1/N) Σ_n cos(ẑ_n, z_n), per sample: (B, N, D), (B, N, D) -> (B,), in float32."""
    if z_hat.shape != z.shape:
        raise ValueError(f"REPA: the projector gives {tuple(z_hat.shape)} but the encoder's features are "
                         f"{tuple(z.shape)} (model.repa_dim must be the encoder's width; the token grids must match)")
    z_hat, z = F.normalize(z_hat.float(), dim=-1), F.normalize(z.float(), dim=-1)
    return -(z_hat * z).sum(dim=-1).mean(dim=1)


class RepaObjective:
    """``objective`` with REPA's alignment term of weight ``weight`` (λ; the paper's 0.5).

    ``loss(model, x0, model_kwargs, image=None)`` returns the objective's terms with ``repa`` (B,)
    added and ``loss`` = the objective's loss + λ · (1 + repa).  ``image`` is what the encoder sees
    (uint8 0..255 or floats in [-1, 1], e.g. the pixels beside cached latents); None: x0 itself,
    for a model trained on pixels.  Sampling is the wrapped objective's (``objective``)."""

    def __init__(self, objective, encoder: nn.Module, weight: float = 0.5):
        if weight <= 0:
            raise ValueError(f"the REPA weight must be positive, got {weight}")
        self.objective, self.encoder, self.weight = objective, encoder, weight

    def loss(self, model, x0: torch.Tensor, model_kwargs: dict | None = None,
             image: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        z = self.encoder(x0 if image is None else image)  # (B, N, D), no gradient
        aligned = {}

        def network(x_t: torch.Tensor, t: torch.Tensor, **kwargs) -> torch.Tensor:
            out, aligned["z_hat"] = model(x_t, t, **kwargs, return_repa=True)
            return out

        terms = self.objective.loss(network, x0, model_kwargs)
        terms["repa"] = repa_loss(aligned["z_hat"], z)
        terms["loss"] = terms["loss"] + self.weight * (1 + terms["repa"])
        return terms
