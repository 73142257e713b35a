"""The objective a training step calls with REPA on (``model.repa_depth``): the run's objective plus the
alignment term, with the frozen encoder of ``train.repa_encoder`` loaded once on the training device.

The encoder folder is checked before transformers reads it (``ditkit.models.encoders.load_dinov2``)."""
from __future__ import annotations

import torch

from ditkit.config import Config, ConfigError
from ditkit.models.encoders import load_dinov2
from ditkit.objectives.repa import RepaObjective


def repa_objective(cfg: Config, objective, grid: tuple[int, int], device: torch.device) -> tuple[RepaObjective, str]:
    """(the objective with REPA's term, a line for the log) for a DiT of token grid ``grid`` (h, w).
    Every failure names its config key."""
    m = cfg.model
    if cfg.train.repa_encoder is None:
        raise ConfigError("model.repa_depth needs train.repa_encoder: a local folder holding facebook/dinov2-base "
                          "(download it from the Hugging Face hub)")
    if cfg.data.kind != "latents" and m.in_channels not in (1, 3):
        raise ConfigError(f"model.repa_depth: the encoder reads RGB or greyscale pixels, not {m.in_channels} channels "
                          "(model.in_channels)")
    try:
        encoder = load_dinov2(cfg.train.repa_encoder, grid, device)
    except ValueError as err:
        raise ConfigError(f"train.repa_encoder: {err}") from None
    if encoder.dim != m.repa_dim:
        raise ConfigError(f"model.repa_dim is {m.repa_dim} but the encoder at {cfg.train.repa_encoder} gives "
                          f"{encoder.dim}-dim features: set model.repa_dim={encoder.dim}")
    note = (f"REPA: block {m.repa_depth}'s tokens aligned with the features of {cfg.train.repa_encoder} "
            f"({encoder.dim}-dim, images at {encoder.input_size[0]}×{encoder.input_size[1]}, encoder grid "
            f"{encoder.source_grid[0]}×{encoder.source_grid[1]} -> {grid[0]}×{grid[1]} tokens), "
            f"λ = {cfg.objective.repa_weight:g}")
    return RepaObjective(objective, encoder, cfg.objective.repa_weight), note
