"""ditkit's DiT to and from diffusers' ``DiTTransformer2DModel`` (and a whole ``DiTPipeline``).

The two are the same network under other names, with two differences of layout:

- diffusers gives every block's ``norm1`` (AdaLayerNormZero) its own copy of the timestep and
  label embedders (``norm1.emb``); the official model has one ``t_embedder`` and one
  ``y_embedder``.  Export copies them into every block; import checks the copies agree.
  The final layer (``proj_out_1``) reads block 0's copy.
- attention holds ``to_q``, ``to_k``, ``to_v`` where the official one has a fused ``qkv``.

and two of arithmetic, which no weights can absorb:

- diffusers' DiT embeds timesteps with ω_k = 10000^(-k/(half-1)) (``downscale_freq_shift=1``),
  the official with ω_k = 10000^(-k/half).  ``match_official_timestep_embedding`` switches a
  loaded diffusers model to the official frequencies.
- the LayerNorm before the MLP uses ``norm_eps`` (diffusers' default 1e-5); exports set 1e-6, the
  official value.

A model with an option the 2023 DiT lacks (RoPE, RMSNorm, QK-norm, SwiGLU, REPA's projector, other
conditioning, other input shapes) is refused before anything is written: see ``_PLAIN``.

Nothing here imports diffusers: folders are written as JSON and safetensors.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Mapping

import torch

from ditkit.checkpoints.formats import CheckpointError, StateDict, load_file, save_state_dict
from ditkit.checkpoints.official import build_from_state_dict, infer_config, model_config
from ditkit.models.dit import DiT
from ditkit.models.pos_embed import sincos_2d_pos_embed

WEIGHTS = "diffusion_pytorch_model"

# official key prefix -> diffusers key prefix, once per model
_GLOBAL = {
    "x_embedder.proj": "pos_embed.proj",
    "final_layer.adaLN_modulation.1": "proj_out_1",
    "final_layer.linear": "proj_out_2",
}
# per block i: official "blocks.i.<a>" -> diffusers "transformer_blocks.i.<b>"
_BLOCK = {
    "adaLN_modulation.1": "norm1.linear",
    "attn.proj": "attn1.to_out.0",
    "mlp.fc1": "ff.net.0.proj",
    "mlp.fc2": "ff.net.2",
}
# shared embedders: official key -> diffusers key inside every block's norm1.emb
_SHARED = {
    "t_embedder.mlp.0.weight": "timestep_embedder.linear_1.weight",
    "t_embedder.mlp.0.bias": "timestep_embedder.linear_1.bias",
    "t_embedder.mlp.2.weight": "timestep_embedder.linear_2.weight",
    "t_embedder.mlp.2.bias": "timestep_embedder.linear_2.bias",
    "y_embedder.embedding_table.weight": "class_embedder.embedding_table.weight",
}
_TABLE = "y_embedder.embedding_table.weight"

# diffusers' DiT-XL-2-256 scheduler: the official 1000-step linear β schedule (1e-4 to 0.02),
# DDIM with "leading" spacing (0, 40, ..., 960 for 25 steps, the official "ddim25" respacing)
# and ᾱ_prev = 1 at the last step.
DDIM_CONFIG = {
    "_class_name": "DDIMScheduler",
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "trained_betas": None,
    "clip_sample": False,
    "set_alpha_to_one": True,
    "steps_offset": 0,
    "prediction_type": "epsilon",
    "timestep_spacing": "leading",
}


def _diffusers_version() -> str:
    try:
        from importlib.metadata import version

        return version("diffusers")
    except Exception:  # not installed: the oldest release with DiTTransformer2DModel
        return "0.28.0"


# DiT constructor arguments (the run config's model.* keys) with the one value diffusers' DiTTransformer2DModel
# can hold; any other value adds weights it has no place for or changes what the network computes.
_PLAIN = {
    "num_params": 0, "cond_channels": 0, "context_dim": 0, "cond_mode": "adaln", "mlp_ratio": 4.0,
    "pos_embed": "sincos", "norm": "layernorm", "qk_norm": False, "mlp": "gelu",
    "repa_depth": None,  # REPA's projector: a training head, but dropping it would break the exact round trip
}
_INSTEAD = "use --to safetensors (save_pretrained), which keeps every option and round-trips exactly"


def _setting(key: str, value) -> str:
    """``model.key=value`` as ``--set`` takes it."""
    return f"model.{key}={json.dumps(value) if isinstance(value, (bool, list, tuple)) else value}"


def _check_exportable(config: Mapping) -> None:
    """Refuse, in one line naming every such key, a config that diffusers' DiT cannot represent."""
    found = [_setting(k, config[k]) for k, plain in _PLAIN.items() if config.get(k, plain) != plain]
    if not config.get("num_classes"):
        found.append(_setting("num_classes", 0) + " (unconditional)")
    size, patch = config["input_size"], config["patch_size"]
    if not isinstance(size, int) and (len(size) != 2 or size[0] != size[1]):
        found.append(_setting("input_size", list(size)))
    if not isinstance(patch, int):
        found.append(_setting("patch_size", list(patch)))
    if found:
        raise ValueError(f"diffusers' DiTTransformer2DModel (the 2023 DiT: square images cut by one patch size, class "
                         f"labels through adaLN-Zero, sin-cos positions, LayerNorm, GELU MLP of ratio 4) cannot represent "
                         f"{', '.join(found)}; {_INSTEAD}")


def to_diffusers_state_dict(dit_state_dict: Mapping[str, torch.Tensor], config: Mapping | None = None) -> tuple[dict, StateDict]:
    """(diffusers config, diffusers state dict) of an official-layout DiT state dict.  ``config``
    is the DiT constructor arguments (inferred from the shapes when None)."""
    config = dict(config) if config is not None else infer_config(dit_state_dict)
    _check_exportable(config)
    size = config["input_size"] if isinstance(config["input_size"], int) else config["input_size"][0]
    hidden, heads, depth = config["hidden_size"], config["num_heads"], config["depth"]
    in_channels = config["in_channels"]
    diff_config = {
        "_class_name": "DiTTransformer2DModel",
        "_diffusers_version": _diffusers_version(),
        "num_attention_heads": heads,
        "attention_head_dim": hidden // heads,
        "in_channels": in_channels,
        "out_channels": 2 * in_channels if config.get("learn_sigma", True) else in_channels,
        "num_layers": depth,
        "dropout": 0.0,
        "norm_num_groups": 32,
        "attention_bias": True,
        "sample_size": size,
        "patch_size": config["patch_size"],
        "activation_fn": "gelu-approximate",
        "num_embeds_ada_norm": config["num_classes"],
        "upcast_attention": False,
        "norm_type": "ada_norm_zero",
        "norm_elementwise_affine": False,
        "norm_eps": 1e-6,
    }
    sd = dict(dit_state_dict)  # each weight is popped as it is placed: what is left has no place in diffusers
    sd.pop("pos_embed", None)  # fixed; diffusers recomputes it
    shared = {k: sd.pop(k) for k in _SHARED}
    if shared[_TABLE].shape[0] == config["num_classes"]:
        # trained without label dropout: diffusers always has a null row; a zero one is harmless
        shared[_TABLE] = torch.cat([shared[_TABLE], shared[_TABLE].new_zeros(1, hidden)])
    out: StateDict = {}
    for src, dst in _GLOBAL.items():
        for p in ("weight", "bias"):
            out[f"{dst}.{p}"] = sd.pop(f"{src}.{p}")
    for i in range(depth):
        for src, dst in _BLOCK.items():
            for p in ("weight", "bias"):
                out[f"transformer_blocks.{i}.{dst}.{p}"] = sd.pop(f"blocks.{i}.{src}.{p}")
        for p in ("weight", "bias"):
            q, k, v = sd.pop(f"blocks.{i}.attn.qkv.{p}").chunk(3, dim=0)  # (3D, ...) -> 3 × (D, ...)
            for name, t in zip(("to_q", "to_k", "to_v"), (q, k, v)):
                out[f"transformer_blocks.{i}.attn1.{name}.{p}"] = t.clone()
        for src, dst in _SHARED.items():
            out[f"transformer_blocks.{i}.norm1.emb.{dst}"] = shared[src]
    if sd:  # an option the config does not name
        left = sorted(sd)
        raise ValueError(f"diffusers' DiTTransformer2DModel has no place for {len(left)} weights of this model "
                         f"({', '.join(left[:3])}{', ...' if len(left) > 3 else ''}); {_INSTEAD}")
    return diff_config, out


def from_diffusers_state_dict(state_dict: Mapping[str, torch.Tensor], diffusers_config: Mapping) -> tuple[StateDict, dict]:
    """(official-layout state dict, DiT constructor arguments) of a diffusers DiT."""
    c = diffusers_config
    if c.get("norm_type", "ada_norm_zero") != "ada_norm_zero" or c.get("patch_size") is None:
        raise ValueError(f"not a DiT transformer: norm_type={c.get('norm_type')!r}, patch_size={c.get('patch_size')}")
    depth, heads = c["num_layers"], c["num_attention_heads"]
    hidden = heads * c["attention_head_dim"]
    in_channels = c["in_channels"]
    out_channels = c.get("out_channels") or in_channels
    config = dict(
        input_size=c["sample_size"], patch_size=c["patch_size"], in_channels=in_channels, hidden_size=hidden,
        depth=depth, num_heads=heads, mlp_ratio=4.0, class_dropout_prob=0.1,
        num_classes=c["num_embeds_ada_norm"], learn_sigma=out_channels == 2 * in_channels,
    )
    sd = dict(state_dict)
    out: StateDict = {}
    for dst, src in _GLOBAL.items():
        for p in ("weight", "bias"):
            out[f"{dst}.{p}"] = sd[f"{src}.{p}"]
    for official, name in _SHARED.items():
        ref = sd[f"transformer_blocks.0.norm1.emb.{name}"]
        for i in range(1, depth):
            key = f"transformer_blocks.{i}.norm1.emb.{name}"
            if not torch.equal(sd[key], ref):
                raise ValueError(f"{key} differs from block 0's copy; the official DiT has a single embedder "
                                 "shared by all blocks, so this model cannot be converted exactly")
        out[official] = ref
    for i in range(depth):
        for dst, src in _BLOCK.items():
            for p in ("weight", "bias"):
                out[f"blocks.{i}.{dst}.{p}"] = sd[f"transformer_blocks.{i}.{src}.{p}"]
        for p in ("weight", "bias"):
            qkv = [sd[f"transformer_blocks.{i}.attn1.{n}.{p}"] for n in ("to_q", "to_k", "to_v")]
            out[f"blocks.{i}.attn.qkv.{p}"] = torch.cat(qkv, dim=0)  # 3 × (D, ...) -> (3D, ...)
    grid = c["sample_size"] // c["patch_size"]
    out["pos_embed"] = sincos_2d_pos_embed(hidden, grid).unsqueeze(0)  # fixed; diffusers recomputes it too
    return out, config


def _write_json(path: Path, obj: Mapping) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def _component_dir(path: str | os.PathLike, sub: str, what: str) -> Path:
    """A diffusers model folder (with config.json), or a pipeline folder holding one in ``sub/``."""
    path = Path(path)
    if (path / sub / "config.json").is_file():
        path = path / sub
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"no {what} at {path}: expected a diffusers folder with config.json")
    return path


def _vae_dir(vae: str | os.PathLike) -> Path:
    """A local AutoencoderKL folder, or a pipeline folder holding one in ``vae/``."""
    vae = _component_dir(vae, "vae", "VAE")
    config = vae / "config.json"
    name = json.loads(config.read_text()).get("_class_name")
    if name != "AutoencoderKL":
        raise ValueError(f"{config}: _class_name is {name!r}, expected 'AutoencoderKL'")
    return vae


def pipeline_decoding_gap(data, vae_scale: float | None = None) -> str | None:
    """Why a ``DiTPipeline`` would decode a run's latents wrongly, or None.  The pipeline decodes
    ``vae.decode(latents / vae.config.scaling_factor)``: it has no per-channel normalisation to undo
    (``data.latent_norm: channel``), no shift_factor to add back, and trusts the VAE's own scale."""
    if data is None or data.kind != "latents":
        return None
    if data.latent_norm == "channel":
        return ("the run normalises its latents per channel (data.latent_norm=channel), which a DiTPipeline cannot "
                "undo before its VAE")
    if data.latent_shift:
        return f"the run's latents are shifted by the VAE's shift_factor {data.latent_shift}, which a DiTPipeline ignores"
    if vae_scale is not None and data.latent_scale is not None and vae_scale != data.latent_scale:
        return (f"the VAE's scaling_factor is {vae_scale}, but the run's latents were made with {data.latent_scale}, "
                "which a DiTPipeline would not know")
    return None


def export_diffusers(model: DiT, folder: str | os.PathLike, vae: str | os.PathLike | None = None,
                     id2label: Mapping[int, str] | None = None, data=None) -> Path:
    """Write ``model`` as a diffusers folder.  Without ``vae``: a ``DiTTransformer2DModel`` folder
    (config.json + diffusion_pytorch_model.safetensors).  With a local VAE folder: a whole
    ``DiTPipeline`` (transformer/, vae/ copied, scheduler/ as in ``DDIM_CONFIG``, model_index.json
    with ``id2label``), refused where the pipeline would decode the run's latents wrongly
    (``pipeline_decoding_gap`` of ``data``, the run's data config).  Returns the folder."""
    folder = Path(folder)
    # first: a model diffusers cannot represent is refused whatever the VAE, and before anything is written
    diff_config, state_dict = to_diffusers_state_dict(model.state_dict(), model_config(model))
    if vae is not None:
        vae_scale = json.loads((_vae_dir(vae) / "config.json").read_text()).get("scaling_factor")
        gap = pipeline_decoding_gap(data, vae_scale)
        if gap is not None:
            raise ValueError(f"cannot write a DiTPipeline: {gap}; export with --to safetensors, which carries the run's "
                             "config, and sample that file with `ditkit sample --vae`")
    transformer = folder / "transformer" if vae is not None else folder
    save_state_dict(state_dict, transformer / f"{WEIGHTS}.safetensors", metadata={"format": "pt"})
    _write_json(transformer / "config.json", diff_config)
    if vae is None:
        return folder
    shutil.copytree(_vae_dir(vae), folder / "vae", dirs_exist_ok=True)
    version = _diffusers_version()
    _write_json(folder / "scheduler" / "scheduler_config.json", {**DDIM_CONFIG, "_diffusers_version": version})
    index = {
        "_class_name": "DiTPipeline",
        "_diffusers_version": version,
        "transformer": ["diffusers", "DiTTransformer2DModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "scheduler": ["diffusers", "DDIMScheduler"],
    }
    if id2label is not None:
        index["id2label"] = {str(k): v for k, v in id2label.items()}
    _write_json(folder / "model_index.json", index)
    return folder


def _read_weights(folder: Path) -> StateDict:
    """The weights of a diffusers model folder: sharded or not, safetensors or .bin."""
    for suffix in (".safetensors", ".bin"):
        index = folder / f"{WEIGHTS}{suffix}.index.json"
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            return {k: v for shard in shards for k, v in _as_dict(folder / shard).items()}
        single = folder / f"{WEIGHTS}{suffix}"
        if single.is_file():
            return _as_dict(single)
    raise FileNotFoundError(f"no {WEIGHTS}.safetensors or {WEIGHTS}.bin in {folder}")


def _as_dict(path: Path) -> StateDict:
    obj = load_file(path)
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: holds a {type(obj).__name__}, not a state dict")
    return obj


def from_diffusers(folder: str | os.PathLike) -> tuple[DiT, dict]:
    """(ditkit DiT in eval mode, its constructor arguments) from a diffusers DiT transformer
    folder, or a DiTPipeline folder holding one in ``transformer/``."""
    folder = _component_dir(folder, "transformer", "diffusers model")
    diff_config = json.loads((folder / "config.json").read_text())
    state_dict, config = from_diffusers_state_dict(_read_weights(folder), diff_config)
    return build_from_state_dict(state_dict, config), config


def match_official_timestep_embedding(transformer):
    """Make a loaded diffusers DiT (or a DiTPipeline's) embed timesteps with the official
    frequencies ω_k = 10000^(-k/half) instead of 10000^(-k/(half-1)).  Returns it."""
    transformer = getattr(transformer, "transformer", transformer)
    for block in transformer.transformer_blocks:
        block.norm1.emb.time_proj.downscale_freq_shift = 0
    return transformer
