"""The VAE (diffusers ``AutoencoderKL``) whose latent space DiT is trained in: Stable Diffusion's, or any
other AutoencoderKL saved as a local folder (4, 16 or 32 latent channels, downsampling by 8 or 16).

With SD's VAE a 256×256×3 image in [-1, 1] maps to a 32×32×4 latent; DiT works on z = 0.18215 · latent,
the factor that brings SD latents to roughly unit variance (the same constant as the official DiT).
Every VAE brings its own units in its config, as diffusers writes them:

    z = (latent − shift_factor) · scaling_factor          latent = z / scaling_factor + shift_factor

(SD: scaling_factor 0.18215, no shift_factor); ``encode`` and ``decode`` read them from the VAE unless
told otherwise.  Weights are never downloaded here: ``load_vae`` reads a local folder or file.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from ditkit.utils.images import uint8_hwc
from ditkit.utils.io import held_by, read_json_config

LATENT_SCALE = 0.18215

# stabilityai/sd-vae-ft-ema and sd-vae-ft-mse share this config (and the original SD 1.x VAE):
# 4 levels, ×8 downsampling, 4 latent channels, 83,653,863 parameters.
SD_VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    act_fn="silu",
    latent_channels=4,
    norm_num_groups=32,
    sample_size=256,
    scaling_factor=LATENT_SCALE,
)

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")

_HOW_TO_GET = (
    "download the diffusers VAE stabilityai/sd-vae-ft-ema (or sd-vae-ft-mse) from huggingface.co, e.g. "
    "`huggingface-cli download stabilityai/sd-vae-ft-ema --local-dir VAE_DIR`, and pass VAE_DIR "
    "(a folder with config.json and diffusion_pytorch_model.safetensors), or a single weights file"
)


def _autoencoder_kl():
    try:
        from diffusers import AutoencoderKL
    except ImportError as e:
        raise ImportError("the VAE needs diffusers: pip install 'ditkit[vae]'") from e
    return AutoencoderKL


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        sd = load_file(str(path))
    else:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
        sd = sd["state_dict"]  # a Lightning / original-SD checkpoint
    if not isinstance(sd, dict) or not sd:
        raise ValueError(f"{path} holds no state dict")
    return sd


def _to_diffusers_keys(sd: dict[str, torch.Tensor], path: Path) -> dict[str, torch.Tensor]:
    """Original-SD (LDM) naming (``encoder.down.0.block.0…``, maybe under ``first_stage_model.``)
    is converted by diffusers' own converter; diffusers naming passes through."""
    if any(k.startswith("encoder.down_blocks.") for k in sd):
        return sd
    if any(".down.0.block." in k for k in sd):
        from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

        return convert_ldm_vae_checkpoint(sd, SD_VAE_CONFIG)
    raise ValueError(f"{path} is not an AutoencoderKL state dict (first keys: {list(sd)[:3]})")


def _model_folder(path: Path) -> Path | None:
    """The folder holding config.json: the folder itself, its vae/ (a whole pipeline), or the newest
    snapshot of a Hugging Face cache entry (models--stabilityai--sd-vae-ft-ema)."""
    candidates = [path, path / "vae"]
    snapshots = path / "snapshots"
    if snapshots.is_dir():
        newest = sorted(snapshots.iterdir(), key=lambda p: p.stat().st_mtime, reverse=True)
        candidates += [c for s in newest for c in (s, s / "vae")]
    return next((c for c in candidates if (c / "config.json").is_file()), None)


def load_vae(path: str | os.PathLike, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
    """A frozen ``AutoencoderKL`` in eval mode from a local diffusers folder or a weights file.

    path: a folder saved by ``save_pretrained`` (or a pipeline folder with vae/, or an HF cache
    entry), or one .safetensors/.bin/.pt/.ckpt state dict of the SD VAE (diffusers or original
    naming), which gets ``SD_VAE_CONFIG``.
    """
    AutoencoderKL = _autoencoder_kl()
    path = Path(path).expanduser()
    if path.is_dir():
        folder = _model_folder(path)
        if folder is None:
            raise ValueError(f"no VAE in {path} (no config.json there or in {path}/vae): {_HOW_TO_GET}")
        config = read_json_config(folder / "config.json")
        # another model is named before its weights are sought
        if config.get("_class_name", "AutoencoderKL") != "AutoencoderKL":
            raise ValueError(f"{folder} holds {held_by(config)}, not an AutoencoderKL: {_HOW_TO_GET}")
        if "_class_name" not in config and config.get("model_type"):
            raise ValueError(f"{folder} holds {held_by(config)}, not a diffusers AutoencoderKL: {_HOW_TO_GET}")
        weights = [f"diffusion_pytorch_model.{s}" for s in ("safetensors", "bin", "safetensors.index.json",
                                                             "bin.index.json")]
        if not any((folder / w).is_file() for w in weights):
            raise ValueError(f"{folder} has the config.json of an AutoencoderKL but no weights ({weights[0]} or "
                             f".bin): {_HOW_TO_GET}")
        # low_cpu_mem_usage=False: the same load, without diffusers' warning when accelerate is absent.
        vae = AutoencoderKL.from_pretrained(folder, local_files_only=True, torch_dtype=dtype, low_cpu_mem_usage=False)
    elif path.is_file():
        if path.suffix not in WEIGHT_SUFFIXES:
            raise ValueError(f"VAE weights {path} should end in one of {', '.join(WEIGHT_SUFFIXES)}")
        sd = _to_diffusers_keys(_read_state_dict(path), path)
        with torch.device("meta"):  # no random init of 84M parameters that load_state_dict replaces
            vae = AutoencoderKL(**SD_VAE_CONFIG)
        want = vae.state_dict()
        missing = [k for k in want if k not in sd]
        wrong = [k for k in want if k in sd and sd[k].shape != want[k].shape] + [k for k in sd if k not in want]
        if missing or wrong:
            raise ValueError(
                f"{path} does not fit the SD VAE (block_out_channels {SD_VAE_CONFIG['block_out_channels']}): "
                f"{len(missing)} keys missing (e.g. {missing[:2]}), {len(wrong)} unexpected or misshapen (e.g. {wrong[:2]})"
            )
        vae.load_state_dict({k: v.to(dtype) for k, v in sd.items()}, assign=True)
    else:
        raise ValueError(f"VAE path {path} does not exist: {_HOW_TO_GET}")
    return vae.to(device=device).eval().requires_grad_(False)


def scale_and_shift(vae) -> tuple[float, float]:
    """(scaling_factor, shift_factor) of the VAE's config: its latent units (SD's VAE: 0.18215 and no shift, 0.0)."""
    config = vae.config
    return float(config.scaling_factor), float(getattr(config, "shift_factor", None) or 0.0)


def downsampling(vae) -> int:
    """Image pixels per latent cell along each side: 2^(levels − 1), one halving between levels of the encoder."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


def _vae_place(vae) -> tuple[torch.device, torch.dtype]:
    p = next(vae.parameters())
    return p.device, p.dtype


@torch.no_grad()
def encode(vae, images: torch.Tensor, scale: float | None = None, shift: float | None = None
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior q(z | x) = N(mean, std²) of images (B, 3, H, W) in [-1, 1], in DiT's scaled units.

    Returns float32 (mean, std), each (B, C, H/f, W/f) (f = ``downsampling(vae)``), as
    ((mean − shift) · scale, std · scale) with the VAE's own scale and shift unless given, so that
    z = mean + std · ε is what DiT's train.py gets from ``latent_dist.sample().mul_(0.18215)`` with SD's VAE.
    """
    own_scale, own_shift = scale_and_shift(vae)
    scale, shift = own_scale if scale is None else scale, own_shift if shift is None else shift
    device, dtype = _vae_place(vae)
    dist = vae.encode(images.to(device=device, dtype=dtype)).latent_dist
    mean = dist.mean.float()
    if shift:
        mean = mean - shift
    return mean * scale, dist.std.float() * scale


@torch.no_grad()
def decode(vae, latents: torch.Tensor, scale: float | None = None, shift: float | None = None,
           chunk: int = 32) -> torch.Tensor:
    """Images (B, 3, f·h, f·w) in [-1, 1] (float32) from scaled latents (B, C, h, w): z / scale + shift goes
    to the decoder, with the VAE's own scale and shift unless given.

    Decodes ``chunk`` latents at a time: the decoder's full-resolution activations take about
    0.25 GB per 256-pixel image in float32, so a sampling batch of a few hundred would not fit.
    """
    own_scale, own_shift = scale_and_shift(vae)
    scale, shift = own_scale if scale is None else scale, own_shift if shift is None else shift
    device, dtype = _vae_place(vae)
    latents = latents.to(device=device, dtype=dtype) / scale
    if shift:
        latents = latents + shift
    images = torch.cat([vae.decode(part).sample for part in latents.split(chunk)])
    return images.float().clamp_(-1, 1)


to_uint8 = uint8_hwc  # decoded images -> (B, H, W, 3) uint8, DiT's sample_ddp.py conversion
