"""Scores for samples of the shapes dataset (``ditkit.data.shapes``), the stand-in for a small image set.

As for the digits, Inception features say little about 32×32 drawings, so samples are judged by a
model of the data itself, trained at first use on fresh draws (seed 1, 600 per class) and kept in
memory:

- ``classifier_agreement``: the fraction of samples that a small CNN assigns to the class they were
  generated for (its accuracy on other fresh draws is ``classifier_accuracy()``; 1/6 is chance).
- ``shapes_frechet_distance``: the Fréchet distance (FID's formula) between samples and 1,800 real
  draws in the CNN's 64-unit hidden layer, the analogue of Inception pool3.  Two sets of 1,800 real
  draws are ``real_vs_real_fd()`` apart: the floor a perfect generator reaches.

Images are uint8 (N, H, W, 3), as ``ditkit.sample`` returns them and ADM batches hold them.
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
from torch import nn

from ditkit.data.shapes import CLASSES, draw_shapes
from ditkit.eval.metrics import feature_statistics, frechet_distance

TRAIN_SEED, TEST_SEED, REFERENCE_SEED, SECOND_SEED = 1, 2, 3, 4
SIZE = 32


class ShapeNet(nn.Module):
    """conv(3→32) → pool → conv(32→64) → pool → conv(64→64) → global mean → tanh(Linear 64) → classes."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(),
        )
        self.hidden = nn.Linear(64, 64)
        self.head = nn.Linear(64, len(CLASSES))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.hidden(self.conv(x).mean(dim=(2, 3))))  # (B, 64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def _as_input(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 3) → float (N, 3, 32, 32) in [-1, 1]; other sizes are resized (bilinear)."""
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ValueError(f"shapes samples must be uint8 images (N, H, W, 3), got {images.dtype} {images.shape}")
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    if x.shape[-2:] != (SIZE, SIZE):
        x = nn.functional.interpolate(x, size=(SIZE, SIZE), mode="bilinear", antialias=True, align_corners=False)
    return x


@lru_cache(maxsize=1)
def _net() -> ShapeNet:
    images, labels = draw_shapes(600, SIZE, TRAIN_SEED)
    x, y = _as_input(images), torch.from_numpy(labels)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TRAIN_SEED)
        net = ShapeNet()
        opt = torch.optim.Adam(net.parameters(), lr=2e-3)
        for _ in range(8):  # epochs: ~99% on fresh draws
            for idx in torch.randperm(len(x)).split(64):
                loss = nn.functional.cross_entropy(net(x[idx]), y[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
    return net.eval().requires_grad_(False)


def _batched(fn, x: torch.Tensor) -> torch.Tensor:
    return torch.cat([fn(part) for part in x.split(512)])


def classify_shapes(images: np.ndarray) -> np.ndarray:
    return _batched(_net(), _as_input(images)).argmax(1).numpy()


def shape_features(images: np.ndarray) -> np.ndarray:
    """(N, 64) hidden activations of the CNN."""
    return _batched(_net().features, _as_input(images)).double().numpy()


def classifier_accuracy() -> float:
    images, labels = draw_shapes(200, SIZE, TEST_SEED)
    return float((classify_shapes(images) == labels).mean())


def classifier_agreement(images: np.ndarray, labels: np.ndarray) -> float:
    labels = np.asarray(labels)
    if labels.shape != (len(images),):
        raise ValueError(f"need one label per sample: {len(images)} samples, labels of shape {labels.shape}")
    return float((classify_shapes(images) == labels).mean())


@lru_cache(maxsize=1)
def _reference_statistics() -> tuple[np.ndarray, np.ndarray]:
    return feature_statistics(shape_features(draw_shapes(300, SIZE, REFERENCE_SEED)[0]))


def shapes_frechet_distance(images: np.ndarray) -> float:
    return frechet_distance(*feature_statistics(shape_features(images)), *_reference_statistics())


def real_vs_real_fd() -> float:
    return shapes_frechet_distance(draw_shapes(300, SIZE, SECOND_SEED)[0])


def evaluate_shapes(images: np.ndarray, labels: np.ndarray) -> dict:
    return {"num_samples": len(images), "classifier_agreement": classifier_agreement(images, labels),
            "shapes_fd": shapes_frechet_distance(images), "real_accuracy": classifier_accuracy(),
            "real_vs_real_fd": real_vs_real_fd()}
