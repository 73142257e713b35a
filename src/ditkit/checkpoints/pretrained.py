"""Pretrained weights without a training run: a safetensors file with the model's constructor
arguments in its header, an official DiT state dict, or a diffusers folder."""
from __future__ import annotations

import json
import os
from pathlib import Path

from ditkit.checkpoints.diffusers import from_diffusers
from ditkit.checkpoints.formats import load_state_dict, read_metadata, save_state_dict
from ditkit.checkpoints.official import build_from_state_dict, load_official_checkpoint, model_config
from ditkit.models.dit import DiT

CONFIG_KEY = "ditkit_config"


def save_pretrained(model: DiT, path: str | os.PathLike) -> None:
    """``model``'s weights as safetensors, with its constructor arguments (JSON) in the header
    under ``"ditkit_config"`` so that ``load_pretrained`` needs no inference from shapes."""
    if Path(path).suffix != ".safetensors":
        raise ValueError(f"{path}: save_pretrained writes a .safetensors file")
    save_state_dict(model.state_dict(), path, metadata={CONFIG_KEY: json.dumps(model_config(model))})


def load_pretrained(path: str | os.PathLike, num_heads: int | None = None) -> tuple[DiT, dict]:
    """(DiT in eval mode, constructor arguments) from any pretrained format: a diffusers folder
    (transformer or DiTPipeline); a ``.safetensors`` file with its config in the header
    (``save_pretrained``); or a ``.pt`` / ``.safetensors`` state dict in the official layout, whose
    variant is read off its shapes (``num_heads`` needed only for non-official widths)."""
    if Path(path).is_dir():
        return from_diffusers(path)
    saved = read_metadata(path).get(CONFIG_KEY)
    if saved is not None:
        config = json.loads(saved)
        return build_from_state_dict(load_state_dict(path), config), config
    state_dict, config = load_official_checkpoint(path, num_heads=num_heads)
    return build_from_state_dict(state_dict, config), config
