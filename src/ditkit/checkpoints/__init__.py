"""Every weights format ditkit reads and writes, in one package.

- ``training``: ditkit's training checkpoints (``.pt`` without pickle, or safetensors), written atomically.
- ``formats``: state dicts in ``.pt`` / ``.safetensors`` files, checked against a model with one clear error.
- ``official``: the official DiT's checkpoints (the variant read off the shapes).
- ``diffusers``: ``DiTTransformer2DModel`` folders and whole ``DiTPipeline`` folders, both ways.
- ``pretrained``: a safetensors file with the model's constructor arguments in its header.
- ``load``: any of them to a model and its run config (``load_model``), for sampling or fine-tuning.
"""
from __future__ import annotations

from ditkit.checkpoints.diffusers import export_diffusers, from_diffusers, match_official_timestep_embedding
from ditkit.checkpoints.formats import (
    CheckpointError,
    StateDictMismatchError,
    check_state_dict,
    load_for_finetune,
    load_state_dict,
    read_metadata,
    save_state_dict,
)
from ditkit.checkpoints.load import load_model, load_run, load_weights_for_finetune, save_weights
from ditkit.checkpoints.official import build_from_state_dict, load_official_checkpoint, model_config
from ditkit.checkpoints.pretrained import load_pretrained, save_pretrained

__all__ = [
    "CheckpointError", "StateDictMismatchError", "build_from_state_dict", "check_state_dict", "export_diffusers",
    "from_diffusers", "load_for_finetune", "load_model", "load_official_checkpoint", "load_pretrained", "load_run",
    "load_state_dict", "load_weights_for_finetune", "match_official_timestep_embedding", "model_config",
    "read_metadata", "save_pretrained", "save_state_dict", "save_weights",
]
