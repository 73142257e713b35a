"""Metric formulas against closed forms, an eigendecomposition-based reference and brute force."""
import types

import numpy as np
import pytest
import torch

from ditkit.eval import metrics
from ditkit.eval.metrics import feature_statistics, frechet_distance, inception_score, manifold_radii, precision_recall


def random_spd(rng, d):
    a = rng.normal(size=(d, d))
    return a @ a.T + 0.1 * np.eye(d)


def psd_sqrt(s):
    w, v = np.linalg.eigh(s)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def reference_fd(mu1, s1, mu2, s2):
    """‖μ1−μ2‖² + Tr(Σ1 + Σ2 − 2 (Σ1^½ Σ2 Σ1^½)^½), the trace term from symmetric eigenvalues."""
    r = psd_sqrt(s1)
    eig = np.linalg.eigvalsh(r @ s2 @ r)
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.sum(np.sqrt(np.clip(eig, 0, None))))


# -- Fréchet distance ---------------------------------------------------------------------------

def test_frechet_distance_diagonal_closed_form():
    # Commuting (diagonal) covariances: d² = ‖μ1−μ2‖² + Σ_i (√a_i − √b_i)².
    mu1, mu2 = np.array([0.0, 1.0, -2.0]), np.array([1.0, 1.0, 0.5])
    a, b = np.array([1.0, 4.0, 0.25]), np.array([9.0, 1.0, 0.25])
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-10)


def test_frechet_distance_general_matches_eigen_reference():
    rng = np.random.default_rng(0)
    d = 8
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    s1, s2 = random_spd(rng, d), random_spd(rng, d)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(reference_fd(mu1, s1, mu2, s2), rel=1e-8)
    assert frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-8)
    # a distance between distributions: symmetric
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(frechet_distance(mu2, s2, mu1, s1), rel=1e-8)


def test_frechet_distance_of_rank_deficient_sample_covariances():
    # Fewer samples than dimensions, as with small sample counts on 2048-d features.
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(5, 12)), rng.normal(size=(6, 12)) + 0.3
    (m1, s1), (m2, s2) = feature_statistics(x), feature_statistics(y)
    assert frechet_distance(m1, s1, m2, s2) == pytest.approx(reference_fd(m1, s1, m2, s2), rel=1e-6)


def test_frechet_distance_from_samples_converges_to_closed_form():
    rng = np.random.default_rng(2)
    mu1, mu2 = np.zeros(3), np.array([1.0, 0.0, -1.0])
    s1, s2 = random_spd(rng, 3), random_spd(rng, 3)
    x = rng.multivariate_normal(mu1, s1, size=200_000)
    y = rng.multivariate_normal(mu2, s2, size=200_000)
    estimate = frechet_distance(*feature_statistics(x), *feature_statistics(y))
    assert estimate == pytest.approx(reference_fd(mu1, s1, mu2, s2), rel=0.02)


def test_feature_statistics_is_mean_and_unbiased_covariance():
    x = np.random.default_rng(3).normal(size=(50, 4))
    mu, sigma = feature_statistics(x)
    centred = x - x.mean(0)
    np.testing.assert_allclose(mu, x.sum(0) / 50)
    np.testing.assert_allclose(sigma, centred.T @ centred / 49)
    with pytest.raises(ValueError, match="at least 2"):
        feature_statistics(x[:1])


def test_singular_product_adds_eps_to_the_diagonals(monkeypatch):
    # When sqrtm of Σ1Σ2 is not finite, ADM retries with Σ + εI.
    calls = []

    def sqrtm(a):
        calls.append(a)
        return np.full_like(a, np.nan) if len(calls) == 1 else psd_sqrt(a)

    monkeypatch.setattr(metrics, "linalg", types.SimpleNamespace(sqrtm=sqrtm))
    s1, s2 = np.diag([1.0, 0.0]), np.diag([0.0, 4.0])
    with pytest.warns(UserWarning, match="singular"):
        d = frechet_distance(np.zeros(2), s1, np.zeros(2), s2, eps=1e-2)
    np.testing.assert_allclose(calls[1], (s1 + 1e-2 * np.eye(2)) @ (s2 + 1e-2 * np.eye(2)))
    assert d == pytest.approx(5.0 - 2 * np.trace(psd_sqrt(calls[1])))


def test_large_imaginary_part_is_an_error_small_one_dropped(monkeypatch):
    s = np.eye(2)
    monkeypatch.setattr(metrics, "linalg", types.SimpleNamespace(sqrtm=lambda a: a + 1e-6j))
    assert frechet_distance(np.zeros(2), s, np.zeros(2), s) == pytest.approx(0.0, abs=1e-9)
    monkeypatch.setattr(metrics, "linalg", types.SimpleNamespace(sqrtm=lambda a: a + 0.1j))
    with pytest.raises(ValueError, match="imaginary"):
        frechet_distance(np.zeros(2), s, np.zeros(2), s)


def test_frechet_distance_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="differ in length"):
        frechet_distance(np.zeros(2), np.eye(2), np.zeros(3), np.eye(3))


# -- Inception Score ----------------------------------------------------------------------------

def test_inception_score_of_uniform_one_hot_is_the_number_of_classes():
    k = 7
    probs = np.eye(k)[np.tile(np.arange(k), 5)]  # 35 confident predictions, classes balanced
    assert inception_score(probs) == pytest.approx(k, rel=1e-12)


def test_inception_score_of_identical_rows_is_one():
    row = np.random.default_rng(0).dirichlet(np.ones(10))
    assert inception_score(np.tile(row, (20, 1))) == pytest.approx(1.0, rel=1e-12)


def test_inception_score_equals_exp_of_entropy_gap():
    # E_x KL(p(y|x) ‖ p(y)) = H(p(y)) − E_x H(p(y|x)), an identity independent of the KL form.
    probs = np.random.default_rng(1).dirichlet(0.3 * np.ones(12), size=400)
    entropy = lambda p: -np.sum(p * np.log(p), axis=-1)
    expected = np.exp(entropy(probs.mean(0)) - entropy(probs).mean())
    assert inception_score(probs, split_size=400) == pytest.approx(expected, rel=1e-10)


def test_inception_score_averages_splits_as_adm():
    # split 1 (5 rows): all class 0 -> 1; split 2: one-hot over 5 classes -> 5; mean 3.
    probs = np.eye(5)[[0, 0, 0, 0, 0, 0, 1, 2, 3, 4]]
    assert inception_score(probs, split_size=5) == pytest.approx(3.0)


def test_inception_score_rejects_non_distributions():
    with pytest.raises(ValueError, match="summing to 1"):
        inception_score(np.ones((4, 3)))


# -- improved precision and recall --------------------------------------------------------------

def brute_force_precision_recall(real, fake, k=3):
    d_rr = ((real[:, None] - real[None]) ** 2).sum(-1)
    d_ff = ((fake[:, None] - fake[None]) ** 2).sum(-1)
    d_rf = ((real[:, None] - fake[None]) ** 2).sum(-1)
    r_real = np.sort(d_rr, axis=1)[:, k]  # index 0 is the point itself
    r_fake = np.sort(d_ff, axis=1)[:, k]
    precision = np.mean([(d_rf[:, j] <= r_real).any() for j in range(len(fake))])
    recall = np.mean([(d_rf[i] <= r_fake).any() for i in range(len(real))])
    return precision, recall


def test_identical_sets_have_precision_and_recall_one():
    x = np.random.default_rng(0).normal(size=(40, 16))
    assert precision_recall(x, x.copy()) == (1.0, 1.0)


def test_far_apart_clouds_have_precision_and_recall_zero():
    rng = np.random.default_rng(1)
    real, fake = rng.normal(size=(30, 8)), rng.normal(size=(25, 8)) + 100.0
    assert precision_recall(real, fake) == (0.0, 0.0)


def test_generator_covering_one_of_two_modes():
    # Real data: two far clusters; the samples are one of them -> every sample is realistic
    # (precision 1) but only that cluster's share of real data is covered (recall 20/50).
    rng = np.random.default_rng(2)
    mode_a, mode_b = rng.normal(size=(20, 4)), rng.normal(size=(30, 4)) + 50.0
    precision, recall = precision_recall(np.concatenate([mode_a, mode_b]), mode_a)
    assert precision == 1.0
    assert recall == pytest.approx(20 / 50)


def test_batched_precision_recall_matches_brute_force():
    rng = np.random.default_rng(3)
    real = rng.normal(size=(61, 5))
    fake = 1.2 * rng.normal(size=(47, 5)) + 0.4
    expected = brute_force_precision_recall(real, fake)
    assert 0 < expected[0] < 1 and 0 < expected[1] < 1
    got = precision_recall(torch.tensor(real), torch.tensor(fake), batch_size=7)
    assert got == pytest.approx(expected, abs=1e-12)


def test_manifold_radii_are_kth_neighbour_squared_distances():
    x = np.random.default_rng(4).normal(size=(20, 3))
    d = ((x[:, None] - x[None]) ** 2).sum(-1)
    radii = manifold_radii(torch.tensor(x), k=3, batch_size=6).numpy()
    np.testing.assert_allclose(radii, np.sort(d, axis=1)[:, 3], rtol=1e-9, atol=1e-12)
    with pytest.raises(ValueError, match="more than k=3"):
        manifold_radii(x[:3])
