"""Clips of one handwritten digit moving at a constant velocity, conditioned on its class and that velocity: a video
dataset with a known answer for the DiT on (T, H, W) grids (``model.input_size=[T, H, W]``, ``data.kind=fields``).

A clip is ``frames`` frames of a ``size`` × ``size`` black canvas (pixel 0, x = −1) holding one real 8×8 digit of
scikit-learn's set, drawn for its class, at (y_0 + v_y t, x_0 + v_x t) in frame t.  Velocities are whole pixels per
frame, v_y, v_x ∈ {−s..s} with s = (size − 8) // (frames − 1) the fastest a digit can go and stay inside the canvas
for every frame (s = 1 for 8 frames of 16×16: nine velocities).  Whole steps keep every frame an exact copy of the
real digit, so the answer (its class in every frame, its path a straight line of the asked slope) holds to the
pixel; a sub-pixel step would blur the digit by interpolation and make the real clips the scorer is checked on
differ from real digits.  The start is uniform among those that keep the digit inside for all frames.

The class and velocity are the clip's parameters (``data.params_file``), since ``data.kind=fields`` has no labels:
10 one-hot columns c0..c9 and v_y, v_x in pixels per frame.  One-hot columns keep the classes unordered (a class
number as one column would tell the model that 3 lies between 2 and 4); the model embeds the 12 columns together
and drops them together for guidance.

``write_moving_digits`` lays out:

    root/x.npy        (N, 1, frames, size, size) float32 in [-1, 1]
    root/params.csv   header c0..c9, vy, vx; one row per clip
    root/clips.json   {"frames": …, "size": …, "seed": …,
                       "clips": [{"label": 3, "start": [y0, x0], "velocity": [vy, vx]}, …]}"""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

from ditkit.data.digits import load_digits_arrays, to_model_space
from ditkit.data.numbers import NUM_DIGITS, SLOT, digit_pool

PARAM_NAMES = [f"c{d}" for d in range(NUM_DIGITS)] + ["vy", "vx"]


def max_speed(frames: int, size: int) -> int:
    """The fastest whole-pixel speed per axis that keeps an 8×8 digit inside the canvas for all frames."""
    if frames < 2 or size < SLOT:
        raise ValueError(f"need frames ≥ 2 and size ≥ {SLOT}, got frames={frames}, size={size}")
    speed = (size - SLOT) // (frames - 1)
    if speed < 1:
        raise ValueError(f"a digit cannot move a whole pixel per frame for {frames} frames on a {size}×{size} canvas: "
                         f"it needs size ≥ {SLOT + frames - 1}")
    return speed


def start_range(v: np.ndarray, frames: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """The starts (lowest, highest) per axis that keep the digit in [0, size − 8] from frame 0 to frames − 1."""
    span = (frames - 1) * np.asarray(v)
    return np.maximum(0, -span), np.minimum(size - SLOT, size - SLOT - span)


def draw_clips(n: int, rng: np.random.Generator, frames: int = 8,
               size: int = 16) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``n`` clips: labels (n,) ~ U{0..9}, velocities (n, 2) (v_y, v_x) ~ U{−s..s}², starts (n, 2) uniform among those
    that keep the digit inside."""
    s = max_speed(frames, size)
    labels = rng.integers(0, NUM_DIGITS, size=n)
    velocities = rng.integers(-s, s + 1, size=(n, 2))
    return labels, velocities, random_starts(velocities, rng, frames, size)


def random_starts(velocities: np.ndarray, rng: np.random.Generator, frames: int = 8, size: int = 16) -> np.ndarray:
    """A start (y_0, x_0) per velocity, uniform among those that keep the digit inside for all frames."""
    lo, hi = start_range(velocities, frames, size)
    if (lo > hi).any():
        raise ValueError(f"a velocity of {np.abs(velocities).max()} px/frame leaves the {size}×{size} canvas within "
                         f"{frames} frames; at most {max_speed(frames, size)}")
    return rng.integers(lo, hi + 1)


def compose_clips(labels: np.ndarray, velocities: np.ndarray, starts: np.ndarray, pool: list[np.ndarray],
                  rng: np.random.Generator, frames: int = 8, size: int = 16) -> np.ndarray:
    """The clips (N, frames, size, size) in 0..16: a random real digit of each label moved along its path."""
    out = np.zeros((len(labels), frames, size, size))
    for i, (label, v, p) in enumerate(zip(labels, velocities, starts)):
        digit = pool[label][rng.integers(len(pool[label]))]
        for t in range(frames):
            y, x = np.asarray(p) + t * np.asarray(v)
            if not (0 <= y <= size - SLOT and 0 <= x <= size - SLOT):
                raise ValueError(f"clip {i} leaves the canvas in frame {t} (start {tuple(p)}, velocity {tuple(v)})")
            out[i, t, y:y + SLOT, x:x + SLOT] = digit
    return out


def clip_params(labels: np.ndarray, velocities: np.ndarray) -> np.ndarray:
    """The parameters of clips (N, 12), columns ``PARAM_NAMES``: one-hot class, then v_y, v_x in px/frame."""
    return np.concatenate([np.eye(NUM_DIGITS)[np.asarray(labels)], np.asarray(velocities, dtype=np.float64)], axis=1)


def write_moving_digits(root: str | Path, n: int, seed: int = 0, digits: np.ndarray | None = None,
                        labels: np.ndarray | None = None, frames: int = 8, size: int = 16) -> dict:
    """Writes ``n`` random clips under ``root`` (module docstring) and returns clips.json's content; ``digits``,
    ``labels``: the images (n, 8, 8) in 0..16 and their classes to draw from (default: all of scikit-learn's)."""
    if n < 1:
        raise ValueError(f"need n ≥ 1 clips, got {n}")
    if (digits is None) != (labels is None):
        raise ValueError("give both the digits and their labels, or neither")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    y, v, p = draw_clips(n, rng, frames, size)
    pixels = compose_clips(y, v, p, digit_pool(*((digits, labels) if digits is not None else load_digits_arrays())),
                           rng, frames, size)
    np.save(root / "x.npy", to_model_space(pixels)[:, None].astype(np.float32))  # (N, 1, T, H, W)
    with open(root / "params.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(PARAM_NAMES)
        w.writerows([[int(c) for c in row] for row in clip_params(y, v)])
    meta = {"frames": frames, "size": size, "seed": seed,
            "clips": [{"label": int(a), "start": b.tolist(), "velocity": c.tolist()} for a, b, c in zip(y, p, v)]}
    (root / "clips.json").write_text(json.dumps(meta))
    return meta
