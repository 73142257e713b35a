"""The benchmark generator against closed forms: Parseval, the power law it was asked for, the
log-normal moments and spectrum, scipy's Gaussian filter, and its files on disk."""
import csv
import json
import math

import numpy as np
import pytest
import torch

from ditkit.data.random_fields import (
    FieldBenchmark,
    field_variance,
    gaussian_field,
    gaussian_smooth,
    lognormal_field,
    lognormal_spectrum,
    power_law_spectrum,
    wavenumbers,
    write_benchmark,
)
from ditkit.eval.fields import bin_spectrum, power_spectrum

N_REAL, SIZE, A, SLOPE = 200, 64, 0.02, 2.5


@pytest.fixture(scope="module")
def grf():
    P = power_law_spectrum(torch.full((N_REAL,), A), torch.full((N_REAL,), SLOPE), SIZE)
    return P, gaussian_field(P, torch.Generator().manual_seed(0))


def test_wavenumbers_are_integer_distances_on_the_fft_grid():
    k = wavenumbers(8)
    assert k[0, 0] == 0 and k[0, 1] == 1 and k[0, 7] == 1 and k[0, 4] == 4 and k[3, 4] == 5


def test_fields_are_real_and_have_the_parseval_variance(grf):
    P, delta = grf
    assert delta.dtype == torch.float64 and delta.shape == (N_REAL, SIZE, SIZE)
    assert torch.allclose(delta.mean(dim=(-2, -1)), torch.zeros(N_REAL, dtype=torch.float64), atol=1e-12)  # P(0) = 0
    sigma2 = field_variance(P[:1]).item()  # Σ_k P(k)
    assert abs(delta.square().mean().item() / sigma2 - 1) < 0.04


def test_estimator_recovers_the_input_power_law(grf):
    """Averaged over 200 realisations the binned estimate matches the exact bin expectation (the
    mean of A k^-n over each bin's modes) to ~1 % (sampling noise: sqrt(2/(m·200)) per bin of m
    modes), A k̄^-n beyond the coarse first bins, and a log-log fit gives back n and A."""
    P, delta = grf
    k, p_hat = power_spectrum(delta)
    p_mean = p_hat.mean(0)
    _, p_exact = bin_spectrum(P[0])
    rel = p_mean / p_exact - 1
    assert rel.abs().mean() < 0.02 and rel.abs().max() < 0.1
    far = k >= 4
    assert (p_mean[far] / (A * k[far] ** -SLOPE) - 1).abs().mean() < 0.03
    X = torch.stack([torch.ones_like(k), torch.log(k)], dim=1)
    log_a, minus_n = torch.linalg.lstsq(X, torch.log(p_mean)[:, None]).solution.ravel()
    assert abs(-minus_n.item() - SLOPE) < 0.05 and abs(log_a.item() - math.log(A)) < 0.1


def test_lognormal_moments_and_spectrum(grf):
    """y = exp(g − σ²/2): E y = 1, Var y = exp(σ²) − 1, and ξ_y = exp(ξ_g) − 1 gives its spectrum."""
    P, g = grf
    var = field_variance(P)
    y = lognormal_field(g, var)
    assert (y > 0).all()
    assert abs(y.mean().item() - 1) < 0.01
    assert abs(y.var().item() / math.expm1(var[0].item()) - 1) < 0.08
    _, p_hat = power_spectrum(y)
    _, p_exact = bin_spectrum(lognormal_spectrum(P[:1])[0])
    assert (p_hat.mean(0) / p_exact - 1).abs().mean() < 0.03
    # Σ_k P_y(k) is the variance exp(σ²) − 1 (Parseval again, now in closed form)
    assert abs(lognormal_spectrum(P[:1]).sum().item() / math.expm1(var[0].item()) - 1) < 1e-10


def test_smoothing_matches_scipy_periodic_gaussian_filter():
    ndimage = pytest.importorskip("scipy.ndimage")
    x = torch.randn(1, 32, 32, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ours = gaussian_smooth(x, sigma=2.0 / 32)  # 2 pixels
    ref = ndimage.gaussian_filter(x[0].numpy(), sigma=2.0, mode="wrap", truncate=8.0)
    assert np.abs(ours[0].numpy() - ref).max() < 1e-4 * np.abs(ref).max()


def test_conditional_target_is_the_smoothed_tanh_plus_white_noise():
    bench = FieldBenchmark(size=32)
    g = torch.Generator().manual_seed(2)
    s = bench.sample(64, g)
    assert s["x"].shape == (64, 2, 32, 32) and s["field"].shape == (64, 1, 32, 32) and s["params"].shape == (64, 2)
    residual = s["x"][:, :1] - bench.target_mean(s["field"])
    assert abs(residual.std().item() / bench.noise - 1) < 0.02
    _, p_res = power_spectrum(residual[:, 0])
    white = bench.noise**2 / 32**2  # P = σ²/N for white noise in these conventions
    assert (p_res.mean(0) / white - 1).abs().mean() < 0.05
    A, n_s = s["params"].T
    assert (A >= 0.01).all() and (A <= 0.04).all() and (n_s >= 2).all() and (n_s <= 3).all()


def test_params_are_log_uniform_and_uniform():
    p = FieldBenchmark().sample_params(4000, torch.Generator().manual_seed(3))
    log_a = torch.log(p[:, 0])
    assert abs(log_a.mean().item() - math.log(0.02)) < 0.02  # the middle of [log .01, log .04]
    assert abs(p[:, 1].mean().item() - 2.5) < 0.02


def test_bad_settings_are_named():
    with pytest.raises(ValueError, match="amplitude_range"):
        FieldBenchmark(amplitude_range=(0.0, 1.0))
    with pytest.raises(ValueError, match="size must be an even integer"):
        FieldBenchmark(size=15)
    with pytest.raises(ValueError, match="number of samples"):
        write_benchmark("/nonexistent", 0)


def test_write_benchmark_is_deterministic_and_readable(tmp_path):
    a = write_benchmark(tmp_path / "a", n=300, size=16, seed=7)  # 300 > one chunk of 256
    b = write_benchmark(tmp_path / "b", n=300, size=16, seed=7)
    c = write_benchmark(tmp_path / "c", n=300, size=16, seed=8)
    xa, xb, xc = (np.load(p["x"]) for p in (a, b, c))
    assert xa.shape == (300, 2, 16, 16) and xa.dtype == np.float32
    assert np.array_equal(xa, xb) and not np.array_equal(xa, xc)
    assert np.load(a["field"]).shape == (300, 1, 16, 16)
    with open(a["params"]) as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["A", "n_s"] and len(rows) == 301
    meta = json.loads(a["meta"].read_text())
    assert meta["seed"] == 7 and meta["files"]["x"] == "x.npy"
    assert FieldBenchmark.from_dict(meta["benchmark"]) == FieldBenchmark(size=16)
    assert (xa[:, 1] > 0).all()  # the log-normal channel is positive
