"""Frozen image encoders whose patch features REPA aligns a DiT's tokens with (``ditkit.objectives.repa``).

    encoder = load_dinov2("/models/dinov2-base", grid=(16, 16))   # transformers' Dinov2Model, local only
    z = encoder(image)          # image (B, C, H, W): uint8 0..255 or floats in [-1, 1], C = 1 or 3
                                # -> (B, h·w, D) on the DiT's token grid, without gradient

Any module mapping normalised images (B, 3, S_h, S_w) to patch features (B, S_h/p · S_w/p, D) serves:
``RepaEncoder(backbone, patch_size, dim, grid)``.  Nothing is ever downloaded.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ditkit.utils.io import held_by, read_json_config

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MIN_ENCODER_GRID = 16  # DINOv2 at 224×224 with patch 14: the paper's setting for 256×256 images


def encoder_grid(grid: tuple[int, int]) -> tuple[int, int]:
    """The encoder's patch grid for a DiT token grid: the same grid, at least 16×16 (224×224 for a
    patch-14 encoder, which DINOv2 was trained at).  DiT-XL/2 at 256×256 (16×16) and at 512×512
    (32×32, the encoder at 448×448) match exactly, as in the paper; a smaller grid is resampled."""
    return max(grid[0], MIN_ENCODER_GRID), max(grid[1], MIN_ENCODER_GRID)


def encoder_input(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, C, H, W) uint8 in 0..255 or floats in [-1, 1], C = 1 (repeated) or 3 -> (B, 3, *size):
    x ∈ [0, 1] resized bicubically (antialiased when shrinking), then (x − mean) / std with
    ImageNet's mean and std."""
    x = image.float() / 255 if image.dtype == torch.uint8 else (image.float() + 1) / 2
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    if tuple(x.shape[-2:]) != tuple(size):
        x = F.interpolate(x, size=size, mode="bicubic", align_corners=False, antialias=True)
    mean = x.new_tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = x.new_tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def to_token_grid(z: torch.Tensor, source: tuple[int, int], target: tuple[int, int]) -> torch.Tensor:
    """Features on the encoder's grid (B, h_e·w_e, D) -> on the DiT's grid (B, h·w, D), row-major like
    DiT's patches, resampled bilinearly (antialiased, i.e. averaged, when shrinking) where the grids differ."""
    if tuple(source) == tuple(target):
        return z
    B, _, D = z.shape
    z = z.transpose(1, 2).reshape(B, D, *source)  # (B, D, h_e, w_e)
    z = F.interpolate(z, size=target, mode="bilinear", align_corners=False, antialias=True)
    return z.flatten(2).transpose(1, 2)  # (B, h·w, D)


class RepaEncoder(nn.Module):
    """A frozen ``backbone`` (normalised images (B, 3, S_h, S_w) -> patch features (B, N_e, D), patch size
    ``patch_size``) seen from a DiT with token grid ``grid``: the image is resized so that the encoder's
    grid is ``encoder_grid(grid)``, and its features are resampled onto ``grid`` where they differ."""

    def __init__(self, backbone: nn.Module, patch_size: int, dim: int, grid: tuple[int, int]):
        super().__init__()
        self.backbone = backbone.eval().requires_grad_(False)
        self.dim, self.grid = dim, tuple(grid)
        self.source_grid = encoder_grid(self.grid)
        self.input_size = (self.source_grid[0] * patch_size, self.source_grid[1] * patch_size)

    def train(self, mode: bool = True) -> "RepaEncoder":
        return super().train(False)  # frozen: never in training mode

    @torch.no_grad()
    def forward(self, image: torch.Tensor) -> torch.Tensor:
        z = self.backbone(encoder_input(image, self.input_size))  # (B, N_e, D)
        return to_token_grid(z, self.source_grid, self.grid)  # (B, N, D)


class Dinov2Patches(nn.Module):
    """transformers' Dinov2Model (or Dinov2WithRegistersModel) as a backbone: the final (layer-normed) patch
    tokens.  The tokens are [CLS, R registers, N_e patches]; the CLS token and the registers carry no place in
    the image, so the first ``1 + R`` are dropped."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.skip = 1 + getattr(model.config, "num_register_tokens", 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=x).last_hidden_state[:, self.skip:]  # (B, 1 + R + N_e, D) -> (B, N_e, D)


def dinov2_encoder(model: nn.Module, grid: tuple[int, int]) -> RepaEncoder:
    """A DINOv2 model (loaded or freshly built) as REPA's encoder for a DiT token grid ``grid``."""
    c = model.config
    return RepaEncoder(Dinov2Patches(model), c.patch_size, c.hidden_size, grid)


DINOV2_CLASSES = {"dinov2": "Dinov2Model", "dinov2_with_registers": "Dinov2WithRegistersModel"}  # model_type -> class
_EXPECTED = "a transformers DINOv2 folder (model_type 'dinov2', e.g. facebook/dinov2-base, or 'dinov2_with_registers')"
_DOWNLOAD = "huggingface-cli download facebook/dinov2-base --local-dir"


def dinov2_model_type(path: Path) -> str:
    """The ``model_type`` in the config.json of the folder ``path``, one of ``DINOV2_CLASSES``; anything else is a
    ValueError naming the folder, what it holds and what is expected (a download into ``path`` is suggested
    only where nothing is there yet)."""
    if not path.exists() or (path.is_dir() and not any(path.iterdir())):
        raise ValueError(f"no DINOv2 model at {path} (a folder with config.json): download facebook/dinov2-base "
                         f"from the Hugging Face hub, e.g. `{_DOWNLOAD} {path}`")
    if not (path / "config.json").is_file():
        raise ValueError(f"{path} is not a DINOv2 model folder (no config.json): download facebook/dinov2-base into "
                         f"a new folder, e.g. `{_DOWNLOAD} DINOV2_DIR`, and give DINOV2_DIR")
    config = read_json_config(path / "config.json")
    kind = config.get("model_type")
    if kind in DINOV2_CLASSES:
        return kind
    raise ValueError(f"{path} holds {held_by(config) or 'a config.json without model_type'}, not DINOv2: "
                     f"expected {_EXPECTED}")


def load_dinov2(path: str | Path, grid: tuple[int, int], device: torch.device | str = "cpu") -> RepaEncoder:
    """REPA's frozen encoder for a DiT token grid ``grid`` from the local DINOv2 folder ``path`` (never a
    download).  The folder is checked before transformers reads it: its config.json must name a DINOv2 (with or
    without registers) and every weight of that model must be there, so that REPA never aligns with another model
    or with one left partly at its random initialisation.  Each refusal is a ValueError of one line."""
    path = Path(path).expanduser()
    kind = dinov2_model_type(path)
    try:
        import transformers
    except ImportError:
        raise ValueError("REPA's DINOv2 encoder needs transformers: pip install 'ditkit[repa]'") from None
    cls = getattr(transformers, DINOV2_CLASSES[kind], None)
    if cls is None:
        raise ValueError(f"{path} holds a {kind} model, which transformers {transformers.__version__} cannot read "
                         f"({DINOV2_CLASSES[kind]}): upgrade transformers")
    try:
        model, info = cls.from_pretrained(str(path), local_files_only=True, output_loading_info=True)
    except OSError as err:
        if err.errno is not None:  # the system's (permissions, disk); transformers' own "no file named" has none
            raise
        raise ValueError(f"{path} has the config.json of a {kind} model but no weights transformers can read "
                         "(model.safetensors or pytorch_model.bin)") from None
    missing = sorted(info["missing_keys"])
    if missing:
        listed = ", ".join(missing[:3]) + (", ..." if len(missing) > 3 else "")
        raise ValueError(f"{path}: its weights leave {len(missing)} of the {kind} model's tensors at random "
                         f"({listed}): download the model again")
    return dinov2_encoder(model, grid).to(device)
