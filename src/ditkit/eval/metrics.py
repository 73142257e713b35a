"""Sample-quality metrics on feature arrays, as the ADM evaluation suite computes them.

The DiT paper reports FID, sFID, Inception Score, precision and recall from ADM's TensorFlow
suite (openai/guided-diffusion ``evaluations/evaluator.py``).  These are the same formulas on
numpy / torch arrays; which network produced the features is not this module's business
(``ditkit.eval.inception`` for images, ``ditkit.eval.digits`` for the 8×8 digits demo).

- FID  = Fréchet distance between Gaussians fitted to InceptionV3 pool3 features (2048-d).
- sFID = the same distance on ADM's spatial features: the first 7 channels of the 17×17
  ``mixed_6/conv`` map, 7·17·17 = 2023-d (Nash et al. 2021).
- IS   = exp(E_x KL(p(y|x) ‖ p(y))), averaged over splits of 5000 samples (10 splits at 50K).
- Precision / recall = improved precision and recall (Kynkäänniemi et al. 2019), k = 3.
"""
from __future__ import annotations

import warnings

import numpy as np
import torch
from scipy import linalg
from scipy.special import xlogy


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(N, D) features -> mean (D,) and unbiased covariance (D, D), both float64."""
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"need at least 2 feature vectors of shape (N, D), got shape {features.shape}")
    return features.mean(axis=0), np.cov(features, rowvar=False)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                     eps: float = 1e-6) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2):

        d² = ‖μ1 − μ2‖² + Tr(Σ1 + Σ2 − 2 (Σ1 Σ2)^½)

    (Σ1 Σ2)^½ has the trace of (Σ1^½ Σ2 Σ1^½)^½.  As ADM and pytorch-fid do: when the product is
    numerically singular its square root is not finite, so ε·I is added to both covariances; a
    tiny imaginary part left by sqrtm is dropped, a large one is an error.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape:
        raise ValueError(f"mean vectors differ in length: {mu1.shape} vs {mu2.shape}")
    if sigma1.shape != sigma2.shape or sigma1.shape != (mu1.shape[0],) * 2:
        raise ValueError(f"covariances {sigma1.shape} and {sigma2.shape} do not match means of length {mu1.shape[0]}")

    covmean = linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        warnings.warn(f"Fréchet distance: product of covariances is singular; adding {eps} to their diagonals")
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"Fréchet distance: sqrtm left an imaginary component of {np.abs(covmean.imag).max():.3g}")
        covmean = covmean.real

    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def inception_score(probs: np.ndarray, split_size: int = 5000) -> float:
    """IS = exp(E_x KL(p(y|x) ‖ p(y))) with p(y) the mean of p(y|x) over a split.

    ``probs`` is (N, C), rows are class distributions.  As ADM: consecutive splits of
    ``split_size`` rows (the last one may be shorter), the score is the mean over splits.
    0·log 0 is taken as 0, its limit (ADM's formula would give NaN if a softmax underflowed to 0).
    """
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2 or len(probs) == 0:
        raise ValueError(f"class probabilities must be (N, C) with N > 0, got shape {probs.shape}")
    if (probs < 0).any() or not np.allclose(probs.sum(axis=1), 1.0, atol=1e-3):
        raise ValueError("class probabilities must be non-negative rows summing to 1 (apply a softmax first)")
    scores = []
    for start in range(0, len(probs), split_size):
        part = probs[start:start + split_size]  # (n, C)
        p_y = part.mean(axis=0, keepdims=True)  # (1, C)
        kl = (xlogy(part, part) - xlogy(part, p_y)).sum(axis=1)  # KL(p(y|x) ‖ p(y)) per row
        scores.append(np.exp(kl.mean()))
    return float(np.mean(scores))


# -- improved precision and recall --------------------------------------------------------------

def _as_tensor(features, device) -> torch.Tensor:
    t = torch.as_tensor(features, device=device)
    return t if t.dtype == torch.float64 else t.float()


def squared_distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(n, D), (m, D) -> (n, m) squared Euclidean distances, ‖a‖² − 2 a·b + ‖b‖² clamped at 0
    (the expansion ADM uses: one matmul, no (n, m, D) intermediate)."""
    d = a.square().sum(1, keepdim=True) - 2 * a @ b.T + b.square().sum(1)[None, :]
    return d.clamp_min_(0)


def manifold_radii(features, k: int = 3, batch_size: int = 10000, device=None) -> torch.Tensor:
    """(N, D) -> (N,) squared distance of each point to its k-th nearest neighbour.

    The point itself is among the distances (at 0), so this is the (k+1)-th smallest, as in ADM's
    ``ManifoldEstimator.manifold_radii``.  Rows go in batches: memory is batch_size × N.
    """
    x = _as_tensor(features, device)
    if x.ndim != 2 or x.shape[0] <= k:
        raise ValueError(f"need more than k={k} feature vectors of shape (N, D), got shape {tuple(x.shape)}")
    radii = [squared_distances(x[i:i + batch_size], x).kthvalue(k + 1, dim=1).values
             for i in range(0, len(x), batch_size)]
    return torch.cat(radii)


def precision_recall(real_features, fake_features, k: int = 3, batch_size: int = 10000,
                     device=None) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019).

    Each set's manifold is the union of balls around its points with the k-NN radius.
    precision = fraction of fake points inside the real manifold;
    recall    = fraction of real points inside the fake manifold.
    A point on a ball's boundary is inside (≤), as in ADM.  Distances are computed in blocks of
    batch_size × batch_size in the features' float precision (ADM uses float16 when it does not
    overflow, so its results can differ in the last digits).
    """
    real, fake = _as_tensor(real_features, device), _as_tensor(fake_features, device)
    if real.shape[1:] != fake.shape[1:]:
        raise ValueError(f"real features {tuple(real.shape)} and fake features {tuple(fake.shape)} differ in dimension")
    r_real = manifold_radii(real, k, batch_size)
    r_fake = manifold_radii(fake, k, batch_size)
    real_in = torch.zeros(len(real), dtype=torch.bool, device=real.device)
    fake_in = torch.zeros(len(fake), dtype=torch.bool, device=fake.device)
    for i in range(0, len(real), batch_size):
        for j in range(0, len(fake), batch_size):
            d = squared_distances(real[i:i + batch_size], fake[j:j + batch_size])  # (bi, bj)
            fake_in[j:j + batch_size] |= (d <= r_real[i:i + batch_size, None]).any(dim=0)
            real_in[i:i + batch_size] |= (d <= r_fake[None, j:j + batch_size]).any(dim=1)
    return fake_in.double().mean().item(), real_in.double().mean().item()
