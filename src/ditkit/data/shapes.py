"""A small image dataset with known classes, drawn on the fly: coloured shapes on plain backgrounds.

Each image is one shape of one class (circle, cross, diamond, ring, square, triangle) at a random
position and size, in a random colour on a random background of at least 0.35 luminance contrast,
drawn at 4× and reduced with a box filter (anti-aliased edges).  The class is the shape alone:
colour, position and size vary within every class, so a generator must learn shape, not a palette.

It stands in for a user's own small image folder where no such data can be downloaded: the folder
it writes is a plain ImageFolder (``root/<class>/<i>.png``), read by ``ditkit train --data`` like any
other, and ``ditkit.eval.shapes`` scores samples of it with a classifier trained on fresh draws.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

CLASSES = ("circle", "cross", "diamond", "ring", "square", "triangle")  # sorted: the ids of an ImageFolder of them
SUPERSAMPLE = 4


def _luminance(rgb: np.ndarray) -> float:
    return float(rgb @ np.array([0.299, 0.587, 0.114]) / 255.0)


def _colours(rng: np.random.Generator) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(shape colour, background colour) whose luminances differ by at least 0.35."""
    while True:
        fg, bg = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
        if abs(_luminance(fg) - _luminance(bg)) >= 0.35:
            return tuple(int(v) for v in fg), tuple(int(v) for v in bg)


def draw_shape(label: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """One (size, size, 3) uint8 image of class ``label`` (an index into ``CLASSES``)."""
    s = size * SUPERSAMPLE
    fg, bg = _colours(rng)
    image = Image.new("RGB", (s, s), bg)
    d = ImageDraw.Draw(image)
    r = rng.uniform(0.2, 0.34) * s  # half the shape's extent
    cx, cy = (rng.uniform(r + 0.04 * s, s - r - 0.04 * s) for _ in range(2))
    name = CLASSES[label]
    if name == "circle":
        d.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fg)
    elif name == "square":
        d.rectangle((cx - 0.85 * r, cy - 0.85 * r, cx + 0.85 * r, cy + 0.85 * r), fill=fg)
    elif name == "triangle":
        d.polygon([(cx + r * math.cos(a), cy - r * math.sin(a)) for a in (math.pi / 2, 7 * math.pi / 6, 11 * math.pi / 6)],
                  fill=fg)
    elif name == "diamond":
        d.polygon([(cx, cy - r), (cx + 0.75 * r, cy), (cx, cy + r), (cx - 0.75 * r, cy)], fill=fg)
    elif name == "cross":
        w = 0.3 * r
        d.rectangle((cx - r, cy - w, cx + r, cy + w), fill=fg)
        d.rectangle((cx - w, cy - r, cx + w, cy + r), fill=fg)
    else:  # ring
        d.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fg)
        d.ellipse((cx - 0.55 * r, cy - 0.55 * r, cx + 0.55 * r, cy + 0.55 * r), fill=bg)
    return np.asarray(image.reduce(SUPERSAMPLE))


def draw_shapes(per_class: int, size: int = 32, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(images (N, size, size, 3) uint8, labels (N,) int64), ``per_class`` of each class in turn."""
    rng = np.random.default_rng(seed)
    labels = np.tile(np.arange(len(CLASSES)), per_class)
    return np.stack([draw_shape(int(y), size, rng) for y in labels]), labels


def write_shapes(root: str | Path, per_class: int, size: int = 32, seed: int = 0) -> Path:
    """An ImageFolder of ``per_class`` PNGs per class under ``root``; returns ``root``."""
    root = Path(root)
    images, labels = draw_shapes(per_class, size, seed)
    for name in CLASSES:
        (root / name).mkdir(parents=True, exist_ok=True)
    for i, (image, label) in enumerate(zip(images, labels)):
        Image.fromarray(image).save(root / CLASSES[label] / f"{i:06d}.png")
    return root
