"""Metrics of the digits demo: scikit-learn's 8×8 handwritten digits (1,797 images, values 0..16).

InceptionV3 features mean nothing on 8×8 digits, so the demo is judged by models of the digits
themselves, fit at first use on a fixed split (75 % train, 25 % held out, stratified, seed 0) in
well under a second, kept in memory, never written to disk:

- ``classifier_agreement``: the fraction of samples that an RBF SVM (gamma 0.001, C 10) trained
  on real digits assigns to the class they were generated for.  The SVM classifies 99.3 % of the
  held-out real digits correctly, so an agreement near that is as good as real digits get; 10 %
  is chance.
- ``digits_frechet_distance``: the Fréchet distance (FID's formula) between samples and all
  1,797 real digits in the 64-unit tanh hidden layer of an MLP classifier trained on the same
  split — the analogue of Inception pool3, the last layer before the class scores.  A hidden
  layer keeps within-class variation (stroke, slant, thickness) that the SVM's decision values
  discard, so it sees a generator that draws one prototype per class; the MLP (97.8 % held-out
  accuracy) is fit on the training split only.  For scale: two disjoint random halves of the real
  digits are 0.28 apart (``real_vs_real_fd()``); from all real digits, the 450 held-out ones are
  at 0.18, real digits of classes 0–4 only at 5.9, each class mean repeated (one prototype per
  class) at 5.7, 1000 uniform-noise images at 15.  Mild pixel noise (σ = 2 levels) stays at 0.13: the
  features, like Inception's, look at digit shape rather than pixel texture.

Sample convention: the demo models x = v/8 − 1 ∈ [-1, 1] (v the 0..16 pixel) and writes an
``.npz`` with ``samples`` (N, 1, 8, 8) float32 and ``labels`` (N,) int64.  ``to_digit_pixels``
maps back with v = round(clip((x + 1)·8, 0, 16)): real digits are integers in 0..16, and
quantising samples to that same lattice is what the image pipeline does when it turns samples
into uint8 before the ADM suite; without it both models would see off-lattice values that no
real digit has.  The metric functions take pixels on the 0..16 scale (any numeric dtype).
"""
from __future__ import annotations

import zipfile
from functools import lru_cache
from pathlib import Path

import numpy as np
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from sklearn.neural_network import MLPClassifier
from sklearn.svm import SVC
from threadpoolctl import threadpool_limits

from ditkit.eval.batches import damaged_npz_as_value_error, npz_arrays
from ditkit.eval.metrics import feature_statistics, frechet_distance

SEED = 0
MAX_PIXEL = 16.0


def to_digit_pixels(x: np.ndarray) -> np.ndarray:
    """Model space [-1, 1] (any shape with 64 values per sample) -> (N, 64) float64 in 0..16,
    v = round(clip((x + 1)·8, 0, 16))."""
    x = np.asarray(x, dtype=np.float64)
    return np.rint(np.clip((x.reshape(len(x), -1) + 1.0) * 8.0, 0.0, MAX_PIXEL))


def _flat_pixels(pixels: np.ndarray) -> np.ndarray:
    """(N, 64), (N, 8, 8) or (N, 1, 8, 8) on the 0..16 scale -> (N, 64) float64, checked."""
    pixels = np.asarray(pixels, dtype=np.float64)
    if pixels.ndim < 2 or pixels[0].size != 64:
        raise ValueError(f"digits must be (N, 64), (N, 8, 8) or (N, 1, 8, 8), got shape {pixels.shape}")
    pixels = pixels.reshape(len(pixels), 64)
    if pixels.min() < 0 or pixels.max() > MAX_PIXEL:
        raise ValueError(f"digit pixels must be in [0, 16], got [{pixels.min():.3g}, {pixels.max():.3g}]; "
                         "samples in [-1, 1] go through to_digit_pixels first")
    return pixels


@lru_cache(maxsize=1)
def digit_split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The fixed split of the real digits: x_train (1347, 64), x_test (450, 64), y_train, y_test."""
    digits = load_digits()
    return tuple(train_test_split(digits.data, digits.target, test_size=0.25, random_state=SEED, stratify=digits.target))


@lru_cache(maxsize=1)
def _classifier() -> SVC:
    x_train, _, y_train, _ = digit_split()
    return SVC(gamma=0.001, C=10.0).fit(x_train, y_train)


@lru_cache(maxsize=1)
def _feature_net() -> MLPClassifier:
    x_train, _, y_train, _ = digit_split()
    # lbfgs: deterministic full-batch training, converges in ~40 iterations on 1347 digits.
    net = MLPClassifier(hidden_layer_sizes=(64,), activation="tanh", solver="lbfgs", alpha=1e-2,
                        max_iter=500, random_state=SEED)
    # One BLAS thread: matrices this small only lose time to threading (0.1 s vs seconds on a busy
    # machine), and the fit is then the same whatever the thread settings.
    with threadpool_limits(limits=1):
        return net.fit(x_train / MAX_PIXEL, y_train)


def classify_digits(pixels: np.ndarray) -> np.ndarray:
    """(N, …) digits on the 0..16 scale -> (N,) predicted classes."""
    return _classifier().predict(_flat_pixels(pixels))


def classifier_accuracy() -> float:
    """Accuracy of the digit classifier on the held-out real digits."""
    _, x_test, _, y_test = digit_split()
    return float((classify_digits(x_test) == y_test).mean())


def classifier_agreement(pixels: np.ndarray, requested_labels: np.ndarray) -> float:
    """Fraction of digits (0..16 scale) that the classifier labels as the class requested for them."""
    requested_labels = np.asarray(requested_labels)
    if requested_labels.shape != (len(pixels),):
        raise ValueError(f"need one label per sample: {len(pixels)} samples, labels of shape {requested_labels.shape}")
    return float((classify_digits(pixels) == requested_labels).mean())


def digit_features(pixels: np.ndarray) -> np.ndarray:
    """(N, …) digits on the 0..16 scale -> (N, 64) tanh hidden activations of the feature MLP."""
    net = _feature_net()
    return np.tanh(_flat_pixels(pixels) / MAX_PIXEL @ net.coefs_[0] + net.intercepts_[0])


@lru_cache(maxsize=1)
def _real_statistics() -> tuple[np.ndarray, np.ndarray]:
    return feature_statistics(digit_features(load_digits().data))


def digits_frechet_distance(pixels: np.ndarray, reference: np.ndarray | None = None) -> float:
    """Fréchet distance between digits (0..16 scale) and ``reference`` (default: all real digits)
    in the feature MLP's hidden layer."""
    ref_mu, ref_sigma = _real_statistics() if reference is None else feature_statistics(digit_features(reference))
    return frechet_distance(*feature_statistics(digit_features(pixels)), ref_mu, ref_sigma)


def real_vs_real_fd() -> float:
    """The Fréchet distance between two disjoint random halves of the real digits: the floor a
    perfect generator of ~900 samples reaches."""
    data = load_digits().data
    order = np.random.default_rng(SEED).permutation(len(data))
    half = len(data) // 2
    return digits_frechet_distance(data[order[:half]], reference=data[order[half:]])


DIGIT_SHAPE = (1, 8, 8)  # the raw samples of a digits run; its images arr_0 are (8, 8, 3)


def is_digit_samples(path: str | Path) -> bool:
    """Whether ``path`` is a digits run's samples .npz: raw ``samples`` (N, 1, 8, 8) with ``labels`` (N,),
    or, without raw samples, 8×8 images ``arr_0`` (N, 8, 8, 3) with labels ``arr_1`` (N,).  Read from
    the array headers alone; a folder, another file or other shapes are not digits."""
    path = Path(path)
    if not path.is_file() or not zipfile.is_zipfile(path):
        return False
    arrays = npz_arrays(path)
    if "samples" in arrays:
        (shape, _), labels = arrays["samples"], arrays.get("labels")
        expected = DIGIT_SHAPE
    elif "arr_0" in arrays and arrays["arr_0"][1] == np.uint8:
        (shape, _), labels = arrays["arr_0"], arrays.get("arr_1")
        expected = (8, 8, 3)
    else:
        return False
    return len(shape) == 4 and shape[0] > 0 and shape[1:] == expected and labels is not None and labels[0] == shape[:1]


def load_digit_samples(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """A digits run's samples .npz -> (N, 64) pixels in 0..16 and (N,) labels.

    From the raw ``samples`` in [-1, 1] and ``labels`` when the file has them (``to_digit_pixels``);
    else from the images ``arr_0`` and ``arr_1``: an image pixel is u8 = ⌊127.5 (x + 1) + ½⌋, so
    x = u8 / 127.5 − 1 goes through the same v = round((x + 1)·8), at most 1/32 of a level from the raw
    sample's (x + 1)·8: the same pixel unless that was within 1/32 of a rounding boundary, and exactly
    the same for samples on the lattice of real digits.  Anything else (a folder, a truncated file,
    images of another size) is refused naming ``path``."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a folder; the digits scorer reads a digits run's samples .npz "
                                "('samples' (N, 1, 8, 8) and 'labels' (N,))")
    if not path.is_file():
        raise FileNotFoundError(f"no such samples file: {path}")
    if not zipfile.is_zipfile(path):
        raise ValueError(f"{path} is not an .npz file, or is truncated; sample it again")
    with damaged_npz_as_value_error(path), np.load(path) as npz:
        if "samples" in npz.files or "arr_0" not in npz.files:
            keys = ("samples", "labels")
        else:
            keys = ("arr_0", "arr_1")
        missing = [k for k in keys if k not in npz.files]
        if missing:
            raise ValueError(f"{path} lacks {', '.join(repr(k) for k in missing)} (it has: {', '.join(npz.files)}); "
                             "the digits scorer needs the samples and the labels they were generated for")
        samples, labels = npz[keys[0]], npz[keys[1]]
    if keys[0] == "arr_0":
        if samples.dtype != np.uint8 or samples.shape[1:] != (8, 8, 3):
            raise ValueError(f"{path}: arr_0 holds {samples.dtype} images of shape {samples.shape[1:]}, not the digits "
                             "demo's uint8 (8, 8, 3); images of other sizes are scored with the FID InceptionV3 (--inception)")
        samples = samples[..., 0] / 127.5 - 1.0  # gray: the three channels are equal
    if samples.ndim < 2 or samples[0].size != 64 or labels.shape != (len(samples),):
        raise ValueError(f"{path}: expected the digits demo's samples (N, 1, 8, 8) and labels (N,), got "
                         f"{samples.shape} and {labels.shape}; images of other sizes are scored with the FID "
                         "InceptionV3 (--inception)")
    return to_digit_pixels(samples), labels.astype(np.int64)


def evaluate_digits(pixels: np.ndarray, labels: np.ndarray) -> dict:
    """Both metrics of digits on the 0..16 scale, with the classifier's held-out accuracy and
    the real-vs-real distance as yardsticks."""
    return {
        "num_samples": len(pixels),
        "classifier_agreement": classifier_agreement(pixels, labels),
        "classifier_heldout_accuracy": classifier_accuracy(),
        "digits_fd": digits_frechet_distance(pixels),
        "real_vs_real_fd": real_vs_real_fd(),
    }


def format_digits(results: dict) -> str:
    """One line per metric, each next to its yardstick."""
    return "\n".join([
        f"digits: {results['num_samples']} samples",
        f"classifier agreement  {results['classifier_agreement']:.4f}  "
        f"(real held-out digits: {results['classifier_heldout_accuracy']:.4f}, chance: 0.1)",
        f"digits FD             {results['digits_fd']:.4f}  "
        f"(real vs real halves: {results['real_vs_real_fd']:.4f})",
    ])
