"""From a trained network to samples: bind the conditioning (and guidance), hand the callable to
the objective's sampler, decode, write grids and ADM-style ``.npz`` batches."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from ditkit.config import Config, SampleConfig
from ditkit.guidance import NFECounter, conditional_fn, guided_fn
from ditkit.utils.images import save_grid, to_uint8


def grid_labels(num_classes: int, per_class: int, max_total: int | None = None) -> torch.Tensor:
    """0,0,…,1,1,…: one row of ``per_class`` samples per class (the first classes if capped)."""
    if num_classes <= 0:
        return torch.zeros(per_class * 8, dtype=torch.long)
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    return labels[:max_total] if max_total else labels


@torch.no_grad()
def generate(model: nn.Module, objective, noise: torch.Tensor, model_kwargs: dict, cfg: SampleConfig,
             progress: bool = True) -> tuple[torch.Tensor, int]:
    """Samples from ``noise`` with the sampler, steps and guidance of ``cfg``; returns (x0, NFE)."""
    counter = NFECounter()
    if cfg.cfg_scale != 1.0:
        interval = tuple(cfg.guidance_interval) if cfg.guidance_interval else None
        fn = guided_fn(model, model_kwargs, cfg.cfg_scale, cfg.guided_channels, interval,
                       objective.noise_level, counter)
    else:
        fn = conditional_fn(model, model_kwargs, counter)
    opts = {"eta": cfg.eta} if cfg.sampler == "ddim" else {}
    x, _ = objective.sample(fn, noise, sampler=cfg.sampler, steps=cfg.steps, progress=progress, **opts)
    return x, counter.nfe


def save_sample_grid(x: torch.Tensor, cfg: Config, path: Path, nrow: int) -> np.ndarray | None:
    """A PNG of pixel-space samples (upscaled so small images are visible); None for latents."""
    if cfg.data.kind not in ("digits", "images"):
        return None
    images = to_uint8(x)
    scale = max(1, 64 // images.shape[1])
    return save_grid(images, path, nrow=nrow, scale=scale)
