"""Pictures: tensors in [-1, 1] to uint8, and sample grids as PNG."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ditkit.utils.io import atomic_write


def uint8_hwc(x: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) in [-1, 1] -> (N, H, W, C) uint8 by the official sample_ddp.py formula,
    clamp(127.5·x + 128, 0, 255) truncated (i.e. 127.5·(x + 1) rounded half up)."""
    return (x.float() * 127.5 + 128.0).clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1)


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """(N, C, H, W) in [-1, 1] -> (N, H, W, 3) uint8 numpy (one channel is repeated to three)."""
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    return uint8_hwc(x[:, :3]).cpu().numpy()


def stretched_images(x: torch.Tensor, height: int = 32) -> np.ndarray:
    """Samples of any grid as (N, H, W, 3) uint8 pictures of their first channel, each stretched to its own
    min..max: (N, C, H, W) as it is; (N, C, D, H, W) volumes and (N, C, T, H, W) videos by their middle slice or
    frame; (N, C, L) sequences as a line plot ``height`` pixels tall, one column per position."""
    first = x[:, :1].float().cpu()
    if first.dim() == 5:
        first = first[:, :, first.shape[2] // 2]
    lo = first.flatten(1).amin(1).view(-1, *[1] * (first.dim() - 1))
    hi = first.flatten(1).amax(1).view(-1, *[1] * (first.dim() - 1))
    unit = (first - lo) / (hi - lo).clamp_min(1e-12)  # [0, 1]
    if first.dim() == 3:  # (N, 1, L): the row of each position's value, counted from the bottom
        rows = ((1 - unit[:, 0]) * (height - 1)).round().long()  # (N, L)
        picture = torch.zeros(len(first), height, first.shape[-1], dtype=torch.uint8)
        picture.scatter_(1, rows[:, None, :], 255)
        return picture[..., None].expand(-1, -1, -1, 3).numpy().copy()
    return to_uint8(2 * unit - 1)


def save_grid(images: np.ndarray, path: str | Path, nrow: int, scale: int = 1, pad: int = 2) -> np.ndarray:
    """(N, H, W, 3) uint8 -> one PNG of ceil(N / nrow) rows, each image upscaled ×``scale``."""
    n, h, w, _ = images.shape
    rows = -(-n // nrow)
    H, W = h * scale + pad, w * scale + pad
    canvas = np.full((rows * H + pad, nrow * W + pad, 3), 255, dtype=np.uint8)
    for i, img in enumerate(images):
        r, c = divmod(i, nrow)
        big = img.repeat(scale, axis=0).repeat(scale, axis=1)
        canvas[pad + r * H: pad + r * H + h * scale, pad + c * W: pad + c * W + w * scale] = big
    atomic_write(path, lambda tmp: Image.fromarray(canvas).save(tmp, format="PNG"))
    return canvas  # (rows·H, nrow·W, 3)
