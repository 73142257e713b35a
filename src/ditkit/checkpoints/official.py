"""Checkpoints of the official DiT code (facebookresearch/DiT): the released ``DiT-XL-2-256x256.pt``
(a plain state dict) and what its ``train.py`` writes (``{"model", "ema", "opt", "args"}``).

Such a file carries no configuration, so the variant is read off the keys and shapes: depth from
the block count, hidden size, patch size and channels from the patch embedding, input size from
the number of positions, classes from the label table, learned sigma from the output width.
The one thing shapes cannot tell is the number of heads; the official variants fix it per
hidden size (XL 1152 → 16, L 1024 → 16, B 768 → 12, S 384 → 6), otherwise it must be given.
"""
from __future__ import annotations

import inspect
import math
import os
import re
from typing import Mapping

import torch

from ditkit.checkpoints.formats import CheckpointError, StateDict, check_state_dict, load_state_dict
from ditkit.models.dit import _SIZES, DiT, DiT_models

# hidden size -> heads, from the official variant table
OFFICIAL_HEADS = {hidden: heads for _, hidden, heads in _SIZES.values()}


def model_config(model: DiT) -> dict:
    """The constructor arguments that rebuild ``model`` (for the official options and the
    extensions that change the state dict)."""
    hidden = model.x_embedder.proj.out_channels
    square = model.grid.dims == 2 and model.input_size[0] == model.input_size[1]  # an int input_size means H = W
    config = dict(
        input_size=model.input_size[0] if square else list(model.input_size),
        patch_size=model.patch_size if isinstance(model.patch_size, int) else list(model.patch_size),
        in_channels=model.in_channels,
        hidden_size=hidden,
        depth=len(model.blocks),
        num_heads=model.num_heads,
        mlp_ratio=model.mlp_ratio,
        class_dropout_prob=model.y_embedder.dropout_prob if model.num_classes > 0 else 0.0,
        num_classes=model.num_classes,
        learn_sigma=model.learn_sigma,
    )
    if model.cond.num_params:
        config.update(num_params=model.cond.num_params, param_dropout_prob=model.cond.dropout_prob)
    if model.cond_channels:
        config.update(cond_channels=model.cond_channels, field_mode=model.field_mode)
    if model.cond_mode != "adaln":
        config.update(cond_mode=model.cond_mode)
    if model.context_dim:
        config.update(context_dim=model.context_dim, context_len=model.cond.sequence.max_len,
                      param_dropout_prob=model.cond.dropout_prob)
    defaults = inspect.signature(DiT).parameters
    config.update({k: v for k, v in model.options.items() if v != defaults[k].default})  # the architecture options
    if model.repa_depth is not None:  # REPA's projector: in the state dict, unused by sampling
        config.update(repa_depth=model.repa_depth, repa_dim=model.repa_projector[-1].out_features)
    return config


def official_name(config: Mapping) -> str | None:
    """``"DiT-XL/2"`` etc. when ``config`` is one of the twelve official variants, else None."""
    for name in DiT_models:
        size, patch = name.removeprefix("DiT-").split("/")
        depth, hidden, heads = _SIZES[size]
        if (config["depth"], config["hidden_size"], config["num_heads"], config["patch_size"]) == (depth, hidden, heads, int(patch)):
            return name
    return None


def infer_config(state_dict: Mapping[str, torch.Tensor], num_heads: int | None = None,
                 source: str = "state dict") -> dict:
    """DiT constructor arguments of an official-layout state dict (see the module docstring)."""
    extra = sorted(k for k in state_dict if k.startswith("cond.") or ".cross_attn." in k or ".norm_cross." in k)
    if extra:
        raise CheckpointError(f"{source}: holds ditkit extension weights ({extra[0]}, ...), whose configuration "
                              "cannot be read from shapes; load it with its saved config")
    for key in ("x_embedder.proj.weight", "final_layer.linear.weight", "blocks.0.mlp.fc1.weight"):
        if key not in state_dict:
            raise CheckpointError(f"{source}: not a DiT state dict (no {key!r}; first keys: {list(state_dict)[:4]})")
    hidden, in_channels, patch, _ = state_dict["x_embedder.proj.weight"].shape  # (D, C, p, p)
    out_channels = state_dict["final_layer.linear.weight"].shape[0] // (patch * patch)
    depth = 1 + max(int(m.group(1)) for k in state_dict if (m := re.match(r"blocks\.(\d+)\.", k)))
    if num_heads is None:
        if hidden not in OFFICIAL_HEADS:
            raise CheckpointError(f"{source}: hidden size {hidden} is not an official variant's, so the number "
                                  "of heads cannot be inferred; pass num_heads")
        num_heads = OFFICIAL_HEADS[hidden]
    if "pos_embed" not in state_dict:
        raise CheckpointError(f"{source}: no 'pos_embed', so the input size cannot be inferred")
    num_patches = state_dict["pos_embed"].shape[1]
    grid = math.isqrt(num_patches)
    if grid * grid != num_patches:
        raise CheckpointError(f"{source}: {num_patches} positions is not a square grid; load it with its saved config")
    table = state_dict.get("y_embedder.embedding_table.weight")
    # An official label table has one row more than classes: the null class of guidance.
    num_classes = 0 if table is None else table.shape[0] - 1
    if out_channels not in (in_channels, 2 * in_channels):
        raise CheckpointError(f"{source}: {out_channels} output channels for {in_channels} input channels")
    return dict(
        input_size=grid * patch,
        patch_size=patch,
        in_channels=in_channels,
        hidden_size=hidden,
        depth=depth,
        num_heads=num_heads,
        mlp_ratio=state_dict["blocks.0.mlp.fc1.weight"].shape[0] / hidden,
        class_dropout_prob=0.1 if num_classes else 0.0,
        num_classes=num_classes,
        learn_sigma=out_channels == 2 * in_channels,
    )


def load_official_checkpoint(path: str | os.PathLike, num_heads: int | None = None,
                             key: str | None = None) -> tuple[StateDict, dict]:
    """(state dict, DiT constructor arguments) of an official ``.pt`` checkpoint: a plain state
    dict, or train.py's dict, whose ``"ema"`` weights are taken unless ``key`` says otherwise."""
    state_dict = load_state_dict(path, key=key)
    return state_dict, infer_config(state_dict, num_heads=num_heads, source=str(path))


def build_from_state_dict(state_dict: Mapping[str, torch.Tensor], config: Mapping) -> DiT:
    """A DiT built from ``config`` holding ``state_dict`` (strict), in eval mode."""
    model = DiT(**config)
    check_state_dict(model, state_dict)
    model.load_state_dict(state_dict, strict=True)
    return model.eval()
