"""Scores of images of numbers (``ditkit.data.numbers``): is each image the number its token sequence asked for?

An image 8 × (8·S) holds S slots of 8×8.  A slot is blank when its mean pixel (0..16) is below ``BLANK_MEAN`` = 1;
else the digits classifier (``ditkit.eval.digits.classify_digits``: an SVM reading 99.3 % of held-out real digits)
reads it.  The dimmest of all 1,797 real digits has a mean pixel of 2.9 (the training split's: 3.5), so no real
digit is blank, while a blank slot with noise of σ = 1 level around 0 (clipped at 0) averages 0.4.

A sample is right when each of its k asked digits is read as asked (and is not blank) and its S − k unused slots
are blank: the number, its order and its length all as asked.  On real composed numbers of held-out digits
this is 0.98 (0.993³ for three digits); for an asked number unrelated to the image (a shuffled context) it is
near chance, Σ_k P(k)² 10^(−k) = 0.012 for k uniform in 1..3."""
from __future__ import annotations

import numpy as np

from ditkit.data.numbers import NUM_DIGITS, SLOT
from ditkit.eval.digits import MAX_PIXEL, classify_digits, digit_split

BLANK_MEAN = 1.0


def split_digits(side: str) -> tuple[np.ndarray, np.ndarray]:
    """One side ("train" or "test") of the digits classifier's fixed split: (images (n, 8, 8) in 0..16, labels (n,)).
    Numbers to train on come from "train"; numbers of "test" digits check the scorer on pixels it never saw."""
    if side not in ("train", "test"):
        raise ValueError(f"side must be 'train' or 'test', got {side!r}")
    x_train, x_test, y_train, y_test = digit_split()
    x, y = (x_train, y_train) if side == "train" else (x_test, y_test)
    return x.reshape(-1, SLOT, SLOT), y


def to_number_pixels(x: np.ndarray) -> np.ndarray:
    """Model space [-1, 1] -> the 0..16 lattice of real digits, v = round(clip((x + 1)·8, 0, 16)), shape kept."""
    return np.rint(np.clip((np.asarray(x, dtype=np.float64) + 1.0) * 8.0, 0.0, MAX_PIXEL))


def read_slots(pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(N, 8, 8·S) or (N, 1, 8, 8·S) on 0..16 -> (the class read in each slot (N, S), whether it is blank (N, S))."""
    pixels = np.asarray(pixels, dtype=np.float64)
    if pixels.ndim == 4 and pixels.shape[1] == 1:
        pixels = pixels[:, 0]
    if pixels.ndim != 3 or pixels.shape[1] != SLOT or pixels.shape[2] % SLOT or not pixels.shape[2]:
        raise ValueError(f"numbers must be (N, 8, 8·S) or (N, 1, 8, 8·S), got shape {pixels.shape}")
    if pixels.min() < 0 or pixels.max() > MAX_PIXEL:
        raise ValueError(f"pixels must be in [0, 16], got [{pixels.min():.3g}, {pixels.max():.3g}]; "
                         "samples in [-1, 1] go through to_number_pixels first")
    n, s = len(pixels), pixels.shape[2] // SLOT
    slots = pixels.reshape(n, SLOT, s, SLOT).transpose(0, 2, 1, 3)  # (N, S, 8, 8)
    read = classify_digits(slots.reshape(n * s, SLOT * SLOT)).reshape(n, s)
    return read, slots.mean(axis=(2, 3)) < BLANK_MEAN


def score_numbers(pixels: np.ndarray, asked: list[list[int]]) -> dict:
    """Images of numbers on 0..16 against the numbers asked of them (module docstring):
    ``exact`` the share of right samples, overall and ``exact_by_length`` (by k); ``digit_accuracy`` the share of
    asked digits read as asked, overall and ``digit_accuracy_by_class``; ``blank_accuracy`` the share of unused
    slots left blank."""
    read, blank = read_slots(pixels)
    n, s = read.shape
    if len(asked) != n:
        raise ValueError(f"{n} images but {len(asked)} asked numbers")
    for i, number in enumerate(asked):
        if not 1 <= len(number) <= s or any(not 0 <= d < NUM_DIGITS for d in number):
            raise ValueError(f"asked number {i} is {number}: expected 1 to {s} digits in 0..9")
    k = np.array([len(a) for a in asked])
    want = np.full((n, s), -1)
    for i, number in enumerate(asked):
        want[i, :len(number)] = number
    used = want >= 0
    digit_ok = (read == want) & ~blank & used  # (N, S)
    slot_ok = np.where(used, digit_ok, blank)
    exact = slot_ok.all(axis=1)
    return {
        "num_samples": n,
        "exact": float(exact.mean()),
        "exact_by_length": {int(j): float(exact[k == j].mean()) for j in np.unique(k)},
        "digit_accuracy": float(digit_ok.sum() / used.sum()),
        "digit_accuracy_by_class": {d: float(digit_ok[want == d].mean()) for d in range(NUM_DIGITS) if (want == d).any()},
        "blank_accuracy": float(blank[~used].mean()) if (~used).any() else None,
    }
