"""Reading weights for sampling and fine-tuning, whatever wrote them: a ditkit training
checkpoint (config inside), an official DiT ``.pt`` (a plain state dict, or train.py's dict with
"model"/"ema"), a safetensors file, or a diffusers folder."""
from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from ditkit.config import Config, config_from_checkpoint
from ditkit.models.dit import DiT, build_model
from ditkit.train.checkpoint import CheckpointError, load_checkpoint


def is_ditkit_checkpoint(data: dict) -> bool:
    return isinstance(data.get("config"), dict) and "model" in data and "step" in data


def load_for_sampling(path: str | Path, use_ema: bool = True, device: str | torch.device = "cpu") -> tuple[DiT, Config]:
    """(model in eval mode, its config) from any supported checkpoint."""
    path = Path(path)
    if path.is_file() and path.suffix != ".safetensors":
        data = load_checkpoint(path)
        if is_ditkit_checkpoint(data):
            cfg = config_from_checkpoint(data["config"])
            model = build_model(cfg.model.name, **cfg.model.kwargs())
            load_checked(model, data["ema" if use_ema and "ema" in data else "model"], path)
            return model.to(device).eval(), cfg
    from ditkit.interop import load_any  # official .pt, safetensors, diffusers folders

    model, cfg = load_any(path)
    return model.to(device).eval(), cfg


def load_checked(model: nn.Module, state_dict: dict, source: str | Path) -> None:
    """load_state_dict(strict) with a one-line error naming missing, unexpected and mis-shaped keys."""
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    shapes = [f"{k} {tuple(state_dict[k].shape)} vs model {tuple(v.shape)}" for k, v in own.items()
              if k in state_dict and tuple(state_dict[k].shape) != tuple(v.shape)]
    if missing or unexpected or shapes:
        parts = []
        for label, items in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shapes)):
            if items:
                parts.append(f"{label}: {', '.join(items[:5])}{' …' if len(items) > 5 else ''} ({len(items)})")
        raise CheckpointError(f"{source} does not fit the model: " + "; ".join(parts))
    model.load_state_dict(state_dict, strict=True)


def load_weights_for_finetune(model: DiT, path: str | Path, log: logging.Logger) -> None:
    """Start from another checkpoint's weights.  Tensors whose shape differs because of the
    dataset (the label table for another number of classes; the position embedding for another
    input size) keep this model's fresh initialisation, and the log says so; anything else that
    does not fit is an error."""
    from ditkit.interop import read_state_dict

    state = read_state_dict(path)
    own = model.state_dict()
    reinit = [k for k in ("y_embedder.embedding_table.weight", "pos_embed")
              if k in state and k in own and state[k].shape != own[k].shape]
    for k in reinit:
        log.info(f"fine-tuning from {path}: {k} re-initialised ({tuple(state[k].shape)} in the checkpoint, "
                 f"{tuple(own[k].shape)} here)")
        state[k] = own[k]
    load_checked(model, state, path)
