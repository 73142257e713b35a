"""Exponential moving average of the weights, updated every step with one fused foreach op."""
from __future__ import annotations

import torch
from torch import nn


def ema_decay_at(decay: float, step: int, warmup: bool) -> float:
    """With warmup, decay_t = min(decay, (1 + t) / (10 + t)) so a short run's EMA is not stuck at init."""
    return min(decay, (1 + step) / (10 + step)) if warmup else decay


@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """θ_ema ← decay · θ_ema + (1 − decay) · θ   (buffers and frozen parameters are copied)."""
    ema_params = [p for p in ema.parameters() if p.dtype.is_floating_point]
    model_params = [p for p in model.parameters() if p.dtype.is_floating_point]
    if len(ema_params) != len(model_params):
        raise RuntimeError("EMA and model have different parameter lists")
    torch._foreach_lerp_(ema_params, model_params, 1.0 - decay)
