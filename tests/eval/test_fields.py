"""Field statistics against closed forms: white noise, Parseval, r(k) of a field with itself, with
an independent field and with itself plus noise; the benchmark score of its own generator
(the oracle: the noise floor of the metrics) and of wrong generators."""
import dataclasses

import pytest
import torch

from ditkit.data.random_fields import FieldBenchmark
from ditkit.eval.fields import (
    bin_spectrum,
    cross_correlation,
    evaluate_benchmark,
    plot_benchmark,
    plot_field_grid,
    plot_power_spectra,
    power_spectrum,
    radial_bins,
    relative_error,
)

G = torch.Generator().manual_seed(0)


def test_bins_are_integer_shells_up_to_nyquist():
    onehot, k, counts = radial_bins((16, 16))
    assert onehot.shape == (256, 8) and (onehot.sum(1) <= 1).all()
    assert counts[0] == 8 and counts[1] == 12  # |k| in [0.5, 1.5): (±1,0),(0,±1),(±1,±1); [1.5, 2.5): 12 modes
    assert torch.all((k - torch.arange(1, 9)).abs() < 0.5)
    with pytest.raises(ValueError, match="square fields"):  # integer |k| would mix wavelengths of both sides
        radial_bins((8, 16))


def test_white_noise_spectrum_is_flat_at_sigma2_over_n():
    x = 0.5 * torch.randn(400, 32, 32, generator=G, dtype=torch.float64)
    k, p = power_spectrum(x)
    assert p.shape == (400, 16)
    assert ((p.mean(0) / (0.25 / 32**2)) - 1).abs().max() < 0.05


def test_spectrum_of_one_mode_lands_in_its_bin():
    """A cosine of wavenumber (3, 4): |k| = 5, all of its power (a²/2) in bin 5 over its 12 modes."""
    y, x = torch.meshgrid(*[torch.arange(32, dtype=torch.float64)] * 2, indexing="ij")
    f = 2.0 * torch.cos(2 * torch.pi * (3 * y + 4 * x) / 32)
    k, p = power_spectrum(f)
    expected = torch.zeros(16, dtype=torch.float64)
    _, _, counts = radial_bins((32, 32))
    expected[4] = (2.0**2 / 2) / counts[4]  # the mean over the bin's modes
    torch.testing.assert_close(p, expected, atol=1e-12, rtol=1e-9)


def test_cross_correlation_of_a_field_with_itself_is_one_and_with_another_zero():
    x = torch.randn(64, 2, 32, 32, generator=G)
    torch.testing.assert_close(cross_correlation(x, x), torch.ones(2, 16, dtype=torch.float64))
    torch.testing.assert_close(cross_correlation(x, -3 * x), -torch.ones(2, 16, dtype=torch.float64))
    r = cross_correlation(x, torch.randn(64, 2, 32, 32, generator=G))
    assert r.abs().mean() < 0.03 and r.abs().max() < 0.15


def test_cross_correlation_of_signal_plus_noise_is_snr_closed_form():
    """y = x + n with independent white x (variance 1) and n (variance s²): r = 1/sqrt(1 + s²)."""
    x = torch.randn(200, 32, 32, generator=G, dtype=torch.float64)
    y = x + 0.5 * torch.randn(200, 32, 32, generator=G, dtype=torch.float64)
    r = cross_correlation(x, y)
    assert (r - 1 / (1 + 0.25) ** 0.5).abs().max() < 0.02


def test_relative_error_and_shape_errors():
    p = torch.tensor([1.0, 2.0, 4.0])
    torch.testing.assert_close(relative_error(2 * p, p), torch.ones(3))
    torch.testing.assert_close(relative_error(p, p), torch.zeros(3))
    with pytest.raises(ValueError, match=r"differ in shape: \(2, 8, 8\) vs \(2, 8, 4\)"):
        cross_correlation(torch.zeros(2, 8, 8), torch.zeros(2, 8, 4))


def test_bin_spectrum_of_the_ones_is_one():
    k, p = bin_spectrum(torch.ones(3, 16, 16))
    torch.testing.assert_close(p, torch.ones(3, 8, dtype=torch.float64))


BENCH = FieldBenchmark(size=32)


def score(generate):
    return evaluate_benchmark(generate, BENCH, points=4, samples=8, seed=11)


def test_the_benchmarks_own_generator_scores_near_the_ceiling():
    g = torch.Generator().manual_seed(1)
    res = score(lambda p, c: BENCH.sample_x(p, c, g))
    assert res["target_spectrum_err"] < 0.1 and res["lognormal_spectrum_err"] < 0.2  # sampling noise, 4 × 8 fields
    assert abs(res["target_r"] - res["target_r_ceiling"]) < 0.02 and res["target_r_ceiling"] > 0.85
    assert abs(res["lognormal_mean"] - 1) < 0.03 and abs(res["lognormal_var"] - 1) < 0.15
    assert res["r"].shape == (4, 16) and res["generated"].shape == (4, 8, 2, 32, 32)


def test_reported_floor_is_the_oracles_score_and_falls_with_more_samples():
    """*_floor is what the benchmark's own generator scores under the same settings (the same
    statistics, not the same draws), and it shrinks about as 1/sqrt(samples)."""
    g = torch.Generator().manual_seed(3)
    oracle = [evaluate_benchmark(lambda p, c: BENCH.sample_x(p, c, g), BENCH, points=4, samples=8, seed=seed)
              for seed in range(20, 28)]  # 8 independent evaluations: the ratio of means is stable
    floor = sum(r["target_spectrum_err_floor"] for r in oracle) / len(oracle)
    got = sum(r["target_spectrum_err"] for r in oracle) / len(oracle)
    assert 0.75 < got / floor < 1.33
    ratio = sum(r["lognormal_spectrum_err"] for r in oracle) / sum(r["lognormal_spectrum_err_floor"] for r in oracle)
    assert 0.75 < ratio < 1.33
    more = [evaluate_benchmark(lambda p, c: BENCH.sample_x(p, c, g), BENCH, points=4, samples=64, seed=seed)
            for seed in (20, 21)]
    assert sum(r["target_spectrum_err_floor"] for r in more) / 2 < 0.6 * floor  # 8× the samples: ≈ 0.35×


def test_wrong_generators_are_told_apart():
    g = torch.Generator().manual_seed(2)
    steeper = dataclasses.replace(BENCH, gain=1.0)
    wrong_params = score(lambda p, c: steeper.sample_x(p + torch.tensor([0.0, 0.5], dtype=p.dtype), c, g))
    assert wrong_params["lognormal_spectrum_err"] > 0.45 and wrong_params["target_spectrum_err"] > 0.25
    ignores_c = score(lambda p, c: BENCH.sample_x(p, BENCH.condition(p, g), g))
    assert abs(ignores_c["target_r"]) < 0.1 and ignores_c["lognormal_spectrum_err"] < 0.2
    with pytest.raises(ValueError, match=r"generate returned shape \(32, 1, 32, 32\)"):
        score(lambda p, c: c)


def test_figures_are_written(tmp_path):
    pytest.importorskip("matplotlib")
    g = torch.Generator().manual_seed(3)
    res = score(lambda p, c: BENCH.sample_x(p, c, g))
    paths = plot_benchmark(res, tmp_path / "figs", rows=3)
    assert [p.name for p in paths] == ["target_spectrum.png", "lognormal_spectrum.png", "cross_correlation.png", "fields.png"]
    for p in paths:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 5000
    k, pk = power_spectrum(torch.randn(2, 16, 16, generator=g))
    assert plot_power_spectra(k, {"a": pk[0], "true": pk}, tmp_path / "p.png").exists()
    assert plot_field_grid({"c": torch.randn(2, 8, 8), "true x": torch.randn(2, 8, 8)}, tmp_path / "g.png").exists()
