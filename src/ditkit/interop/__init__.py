"""Checkpoints in and out: official DiT ``.pt`` files, safetensors, diffusers folders."""
from __future__ import annotations

import json
import os
from pathlib import Path

from ditkit.interop.diffusers import export_diffusers, from_diffusers, match_official_timestep_embedding
from ditkit.interop.formats import (
    CheckpointError, StateDictMismatchError, check_state_dict, load_for_finetune, load_state_dict, read_metadata,
    save_state_dict,
)
from ditkit.interop.official import build_from_state_dict, load_official_checkpoint, model_config
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


__all__ = [
    "CheckpointError", "StateDictMismatchError", "build_from_state_dict", "check_state_dict", "export_diffusers",
    "from_diffusers", "load_for_finetune", "load_official_checkpoint", "load_pretrained", "load_state_dict",
    "match_official_timestep_embedding", "model_config", "save_pretrained", "save_state_dict",
]
