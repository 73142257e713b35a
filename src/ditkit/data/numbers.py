"""Numbers of one to ``max_digits`` handwritten digits side by side, each with the token sequence of its digits: a
dataset with a known answer for conditioning on a sequence (``model.context_dim``, ``data.context_path``).

A number [4, 7] is an 8 × (8·max_digits) image: real 8×8 digits of scikit-learn's set, drawn for their class, in
8-wide slots from the left; the slots past its last digit are blank (pixel 0, x = −1).  Its sequence is the k
one-hot rows (k, 10) of its digits in order, so the model must read both which digits and where each goes.

The digits to draw from are given (default: all 1,797).  The benchmark draws training numbers from the training
side of the digits scorer's fixed split (``ditkit.eval.numbers.split_digits``) and checks the scorer on numbers of the
held-out side, which its classifier never saw.

``write_numbers`` lays out what ``data.kind=fields`` and ``data.context_path`` read:

    root/x.npy            (N, 1, 8, 8·max_digits) float32 in [-1, 1]
    root/context/<i>.npy  (k_i, 10) float32, the one-hot rows of sample i's digits
    root/numbers.json     {"max_digits": …, "seed": …, "numbers": [[4, 7], …]}"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ditkit.data.digits import load_digits_arrays, to_model_space

SLOT = 8  # a digit's width in pixels
NUM_DIGITS = 10


def digit_pool(images: np.ndarray, labels: np.ndarray) -> list[np.ndarray]:
    """Digits (n, 8, 8) or (n, 64) in 0..16 by class: ``pool[d]`` is (n_d, 8, 8)."""
    images, labels = np.asarray(images, dtype=np.float64).reshape(-1, SLOT, SLOT), np.asarray(labels)
    pool = [images[labels == d] for d in range(NUM_DIGITS)]
    missing = [d for d in range(NUM_DIGITS) if not len(pool[d])]
    if missing:
        raise ValueError(f"the digits to draw from hold no image of class {missing[0]}")
    return pool


def draw_numbers(n: int, rng: np.random.Generator, max_digits: int = 3) -> list[list[int]]:
    """``n`` numbers, each k ~ U{1..max_digits} digits ~ U{0..9} (leading zeros allowed: a number is its tokens)."""
    return [rng.integers(0, NUM_DIGITS, size=int(k)).tolist() for k in rng.integers(1, max_digits + 1, size=n)]


def compose_numbers(numbers: list[list[int]], pool: list[np.ndarray], rng: np.random.Generator,
                    max_digits: int = 3) -> np.ndarray:
    """The images of ``numbers``, (N, 8, 8·max_digits) in 0..16: a random real digit of its class per slot."""
    out = np.zeros((len(numbers), SLOT, SLOT * max_digits))
    for i, number in enumerate(numbers):
        if not 1 <= len(number) <= max_digits:
            raise ValueError(f"number {i} has {len(number)} digits; expected 1 to {max_digits}")
        for j, d in enumerate(number):
            out[i, :, SLOT * j:SLOT * (j + 1)] = pool[d][rng.integers(len(pool[d]))]
    return out


def number_tokens(number: list[int]) -> np.ndarray:
    """A number's sequence: the (k, 10) one-hot rows of its digits, in order."""
    return np.eye(NUM_DIGITS, dtype=np.float32)[np.asarray(number, dtype=np.int64)]


def write_numbers(root: str | Path, n: int, seed: int = 0, max_digits: int = 3,
                  digits: tuple[np.ndarray, np.ndarray] | None = None) -> list[list[int]]:
    """Writes ``n`` random numbers under ``root`` (module docstring) and returns their digits; ``digits``: the
    (images, labels) to draw from (default: all of scikit-learn's)."""
    if n < 1 or max_digits < 1:
        raise ValueError(f"need n ≥ 1 and max_digits ≥ 1, got n={n}, max_digits={max_digits}")
    root = Path(root)
    (root / "context").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    numbers = draw_numbers(n, rng, max_digits)
    pixels = compose_numbers(numbers, digit_pool(*(digits or load_digits_arrays())), rng, max_digits)
    np.save(root / "x.npy", to_model_space(pixels)[:, None].astype(np.float32))  # (N, 1, 8, 8·max_digits)
    width = len(str(n - 1))
    for i, number in enumerate(numbers):
        np.save(root / "context" / f"{i:0{width}d}.npy", number_tokens(number))
    (root / "numbers.json").write_text(json.dumps({"max_digits": max_digits, "seed": seed, "numbers": numbers}))
    return numbers
