"""Tiny randomly initialised diffusers AutoencoderKLs of other shapes than SD's, saved to a folder as a user's
VAE would be: ``levels`` encoder levels (downsampling by 2^(levels − 1)), ``channels`` latent channels, and
their own scaling_factor and shift_factor."""
import numpy as np
from PIL import Image


def save_tiny_vae(folder, channels: int, levels: int, scale: float, shift: float | None, seed: int = 0):
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL(block_out_channels=(8,) * levels, down_block_types=("DownEncoderBlock2D",) * levels,
                        up_block_types=("UpDecoderBlock2D",) * levels, layers_per_block=1, latent_channels=channels,
                        norm_num_groups=8, scaling_factor=scale, shift_factor=shift)
    vae.save_pretrained(folder)
    return folder


def save_image_folder(root, size: int, per_class: int = 4, seed: int = 0):
    """Two class folders of ``per_class`` random RGB images of ``size``×``size``."""
    rng = np.random.default_rng(seed)
    for c in ("cats", "dogs"):
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(root / c / f"{i}.png")
    return root
