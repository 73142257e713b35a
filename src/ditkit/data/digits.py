"""scikit-learn's handwritten digits (1,797 8×8 greyscale images, 10 classes, values 0..16),
shipped inside scikit-learn: the embedded demo needs no download.  Pixels map to [-1, 1] by
x = v / 8 − 1."""
from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset


def load_digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """(N, 8, 8) float64 in 0..16 and (N,) int64 labels."""
    from sklearn.datasets import load_digits

    d = load_digits()
    return d.images, d.target.astype(np.int64)


def to_model_space(v: np.ndarray | torch.Tensor):
    """0..16 -> [-1, 1]."""
    return v / 8.0 - 1.0


def to_pixel_space(x: np.ndarray | torch.Tensor):
    """[-1, 1] -> 0..16 (not rounded)."""
    return (x + 1.0) * 8.0


class DigitsDataset(Dataset):
    """Items are {"x": (1, 8, 8) float32 in [-1, 1], "y": int64 label}."""

    num_classes = 10

    def __init__(self) -> None:
        images, labels = load_digits_arrays()
        self.x = torch.from_numpy(to_model_space(images)).float().unsqueeze(1)  # (N, 1, 8, 8)
        self.y = torch.from_numpy(labels)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> dict:
        return {"x": self.x[i], "y": self.y[i]}
