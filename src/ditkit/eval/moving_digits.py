"""Scores of clips of a moving digit (``ditkit.data.moving_digits``): is each clip the asked class in every frame,
moving in a straight line at the asked velocity?

Class.  In each frame the digit is the 8×8 window the digits classifier (``ditkit.eval.digits``, an SVM reading
99.3 % of held-out real digits) is surest of among the windows holding at least ``WINDOW_MASS`` = 95 % of the
frame's largest 8×8 mass.  The largest mass alone does not find a real digit: most have an empty border row or
column, so two to four windows tie, and a digit read one pixel off its box is misread a third of the time; the
classifier's confidence picks its own box, without looking at the asked class.  On real clips of held-out digits
the window is the digit's box in 95 % of frames and the frame is read as its class in 99 %.

Velocity.  The digit's position in frame t is the frame's centre of mass p_t (pixels as mass; a blank frame sits at
the canvas centre); the fitted velocity is the least-squares slope v̂ = Σ (t − t̄)(p_t − p̄) / Σ (t − t̄)², per axis.
A real clip moves its unchanged digit by whole pixels, so v̂ is the asked velocity exactly and the residual of p_t
about the line is 0.  An asked velocity unrelated to the clip (shuffled) is off by E|v − v'| = 8/9 px/frame per
axis for v, v' uniform in {−1, 0, 1}, and both axes are within 0.5 px/frame for 1/9 of the clips."""
from __future__ import annotations

import numpy as np

from ditkit.data.numbers import NUM_DIGITS, SLOT
from ditkit.eval.digits import MAX_PIXEL, _classifier, classify_digits

WINDOW_MASS = 0.95
VELOCITY_TOLERANCE = 0.5  # px/frame: a fitted velocity this close on both axes follows the asked one


def _frames(pixels: np.ndarray) -> np.ndarray:
    """(N, T, H, W) or (N, 1, T, H, W) on 0..16 -> (N, T, H, W) float64, checked."""
    pixels = np.asarray(pixels, dtype=np.float64)
    if pixels.ndim == 5 and pixels.shape[1] == 1:
        pixels = pixels[:, 0]
    if pixels.ndim != 4 or pixels.shape[1] < 2 or min(pixels.shape[2:]) < SLOT:
        raise ValueError(f"clips must be (N, T, H, W) or (N, 1, T, H, W) with T ≥ 2 and H, W ≥ 8, "
                         f"got shape {pixels.shape}")
    if pixels.min() < 0 or pixels.max() > MAX_PIXEL:
        raise ValueError(f"pixels must be in [0, 16], got [{pixels.min():.3g}, {pixels.max():.3g}]; "
                         "samples in [-1, 1] go through ditkit.eval.numbers.to_number_pixels first")
    return pixels


def locate_digits(frames: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Frames (M, H, W) on 0..16 -> (the top-left corner (M, 2) of each frame's digit window, the windows (M, 64)),
    the window as in the module docstring."""
    c = np.pad(frames.cumsum(1).cumsum(2), ((0, 0), (1, 0), (1, 0)))
    mass = c[:, SLOT:, SLOT:] - c[:, :-SLOT, SLOT:] - c[:, SLOT:, :-SLOT] + c[:, :-SLOT, :-SLOT]  # (M, H−7, W−7)
    frame, y, x = np.nonzero(mass >= WINDOW_MASS * mass.max(axis=(1, 2), keepdims=True))  # candidates, by frame
    rows = y[:, None, None] + np.arange(SLOT)[None, :, None]
    cols = x[:, None, None] + np.arange(SLOT)[None, None, :]
    windows = frames[frame[:, None, None], rows, cols].reshape(-1, SLOT * SLOT)  # (K, 64)
    confidence = _classifier().decision_function(windows).max(axis=1)
    order = np.lexsort((confidence, frame))
    chosen = order[np.r_[frame[order][1:] != frame[order][:-1], True]]  # the surest candidate of each frame
    return np.stack([y[chosen], x[chosen]], axis=1), windows[chosen]


def centres_of_mass(frames: np.ndarray) -> np.ndarray:
    """Frames (M, H, W) -> the centre of mass (M, 2) as (y, x) in pixels; a blank frame's is the canvas centre."""
    _, h, w = frames.shape
    total = frames.sum(axis=(1, 2))
    y = (frames.sum(axis=2) * np.arange(h)).sum(axis=1)
    x = (frames.sum(axis=1) * np.arange(w)).sum(axis=1)
    blank = total <= 0
    safe = np.where(blank, 1.0, total)
    return np.stack([np.where(blank, (h - 1) / 2, y / safe), np.where(blank, (w - 1) / 2, x / safe)], axis=1)


def fit_velocities(positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Positions (N, T, 2) -> (the least-squares velocity (N, 2), the mean absolute residual about the line (N,))."""
    t = np.arange(positions.shape[1], dtype=np.float64) - (positions.shape[1] - 1) / 2  # t − t̄
    mean = positions.mean(axis=1, keepdims=True)
    v = np.einsum("t,ntk->nk", t, positions - mean) / (t ** 2).sum()  # v̂ = Σ (t − t̄)(p_t − p̄) / Σ (t − t̄)²
    line = mean + t[None, :, None] * v[:, None, :]
    return v, np.abs(positions - line).mean(axis=(1, 2))


def score_clips(pixels: np.ndarray, labels: np.ndarray, velocities: np.ndarray) -> dict:
    """Clips on 0..16 against the class and velocity (v_y, v_x) asked of them (module docstring):
    ``frame_agreement`` the share of frames read as the asked class, ``clip_agreement`` of clips read so in every
    frame; ``velocity_error`` the mean |v̂ − v| over clips and both axes (px/frame), ``velocity_within`` the share of
    clips with both axes within 0.5 px/frame; ``path_residual`` the mean distance (px) of the positions from their
    fitted line; ``right`` the share of clips right in every frame and within 0.5 px/frame."""
    pixels = _frames(pixels)
    n, frames, h, w = pixels.shape
    labels, velocities = np.asarray(labels), np.asarray(velocities, dtype=np.float64)
    if labels.shape != (n,) or velocities.shape != (n, 2):
        raise ValueError(f"{n} clips need labels (N,) and velocities (N, 2), got {labels.shape} and {velocities.shape}")
    if ((labels < 0) | (labels >= NUM_DIGITS)).any():
        raise ValueError(f"labels must be in 0..9, got {labels.min()}..{labels.max()}")
    flat = pixels.reshape(n * frames, h, w)
    _, windows = locate_digits(flat)
    read = classify_digits(windows).reshape(n, frames)
    v_hat, residual = fit_velocities(centres_of_mass(flat).reshape(n, frames, 2))
    error = np.abs(v_hat - velocities)  # (N, 2)
    in_class = (read == labels[:, None]).all(axis=1)
    within = (error <= VELOCITY_TOLERANCE).all(axis=1)
    return {
        "num_clips": n,
        "right": float((in_class & within).mean()),
        "frame_agreement": float((read == labels[:, None]).mean()),
        "clip_agreement": float(in_class.mean()),
        "velocity_error": float(error.mean()),
        "velocity_within": float(within.mean()),
        "path_residual": float(residual.mean()),
    }
