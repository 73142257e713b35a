"""Reading weights for sampling and fine-tuning, whatever wrote them: a ditkit training
checkpoint (its config inside), or anything ``ditkit.checkpoints.load_pretrained`` reads (an official
DiT ``.pt``, a safetensors file, a diffusers folder)."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from ditkit.checkpoints.formats import check_state_dict, load_for_finetune, load_state_dict, read_metadata, save_state_dict
from ditkit.checkpoints.official import model_config
from ditkit.checkpoints.pretrained import load_pretrained
from ditkit.checkpoints.training import is_training_safetensors, load_checkpoint
from ditkit.config import RUN_CONFIG_KEY, Config, ModelConfig, SampleConfig, config_from_checkpoint
from ditkit.models.dit import DiT, build_model


OFFICIAL_CFG_SCALE = 4.0  # the official sample.py's default guidance scale, for weights that carry no run config


def is_ditkit_checkpoint(data: dict) -> bool:
    return isinstance(data.get("config"), dict) and "model" in data and "step" in data


def load_model(path: str | Path, device: str | torch.device | None = None, ema: bool = True) -> tuple[DiT, Config]:
    """``model, cfg = load_model(path)``: the model in eval mode and the config to sample it with, from any
    format: a ditkit training checkpoint (its EMA weights unless ``ema=False``) or ``ema.safetensors``, an
    official DiT ``.pt``, a safetensors file, a diffusers folder.  ``device``: default a GPU if there is one."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    model, cfg, _ = load_run(path, ema, device)
    return model, cfg


def load_run(path: str | Path, use_ema: bool = True, device: str | torch.device = "cpu") -> tuple[DiT, Config, dict]:
    """(model in eval mode, its config, the rest of a ditkit checkpoint: e.g. "normalizer"),
    reading the file once.  Weights from outside ditkit carry no training config: they are taken
    as the official recipe (DDPM on SD-VAE latents, guidance 4.0 on 3 channels as the official
    sample.py), with nothing else; their extras are ``{"origin": "pretrained"}``."""
    path = Path(path)
    if path.is_file() and (path.suffix != ".safetensors" or is_training_safetensors(path)):
        data = load_checkpoint(path)
        if is_ditkit_checkpoint(data):
            cfg = config_from_checkpoint(data["config"])
            model = build_model(cfg.model.name, **cfg.model.kwargs())
            state = data["ema" if use_ema and "ema" in data else "model"]
            check_state_dict(model, state, source=str(path))
            model.load_state_dict(state)
            return model.to(device).eval(), cfg, data
    saved = read_metadata(path).get(RUN_CONFIG_KEY) if path.suffix == ".safetensors" else None
    model, ctor = load_pretrained(path)
    if saved is not None:  # ditkit's ema.safetensors: the run's own objective and sampler
        return model.to(device).eval(), config_from_checkpoint(json.loads(saved)), {}
    # The official sample.py: DDPM-250 with guidance 4.0 on the first 3 channels (ε of RGB-like latents), never
    # the variance; a model without a null class (no label dropout) cannot be guided.
    guided = model.num_classes > 0 and ctor.get("class_dropout_prob", 0.1) > 0
    cfg = Config(model=ModelConfig(name="custom", **ctor),
                 sample=SampleConfig(guided_channels=3 if model.in_channels >= 3 else None,
                                     cfg_scale=OFFICIAL_CFG_SCALE if guided else 1.0))
    cfg.data.kind = "latents" if model.in_channels == 4 else "images"
    return model.to(device).eval(), cfg.validate(), {"origin": "pretrained"}


def load_weights_for_finetune(model: DiT, path: str | Path, log: logging.Logger) -> None:
    """Start from another checkpoint's weights.  The label table (another number of classes) and
    the position embedding (another input size) are rebuilt for this model, and the log says so;
    any other mismatch is an error naming the keys."""
    path = Path(path)
    data = load_checkpoint(path) if path.suffix != ".safetensors" or is_training_safetensors(path) else None
    state = data["ema"] if data is not None and is_ditkit_checkpoint(data) else load_state_dict(path)
    load_for_finetune(model, state, log=log.info, source=str(path))


def save_weights(state_dict: dict, model: DiT, cfg: Config, path: str | Path) -> None:
    """Weights as safetensors with the model's constructor arguments (for ``load_pretrained``) and
    the run's whole config (objective, sampler, data kind) in the header, so that sampling from
    the file uses what the model was trained for."""
    save_state_dict(state_dict, path, metadata={"ditkit_config": json.dumps(model_config(model)),
                                                RUN_CONFIG_KEY: json.dumps(cfg.to_dict())})
