"""Statistics for generated fields: radially averaged (cross-)power spectra, their relative error,
the cross-correlation coefficient r(k), the benchmark of ``ditkit.data.random_fields`` scored
against its known answer, and PNG figures.

Spectra use the conventions of ``ditkit.data.random_fields``: δ̂_k = FFT(δ)/N, P(k) = ⟨|δ̂_k|²⟩,
integer wavenumbers k in units of the fundamental mode; bin i ≥ 1 holds the modes with
i − ½ ≤ |k| < i + ½, up to the Nyquist wavenumber of the shorter side (k = 0 is left out).
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from ditkit.data.random_fields import FieldBenchmark, field_variance, wavenumbers


def radial_bins(shape: tuple[int, ...], device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One-hot bin matrix (H·W, K) float64, bin centres k̄ (K,) (the mean |k| of each bin's modes)
    and mode counts (K,); for a grid of 1 or 3 axes, (L,) or (D, H, W), the same over its modes."""
    if len(set(shape)) != 1:
        raise ValueError(f"radial power spectra need square fields, got {'×'.join(map(str, shape))}")
    n = shape[0]
    k = wavenumbers(n, len(shape)).to(device).reshape(-1)  # (H*W,)
    K = n // 2
    index = torch.round(k).long()  # shells [i − ½, i + ½)
    onehot = (index[:, None] == torch.arange(1, K + 1, device=device)[None]).double()  # (H*W, K)
    counts = onehot.sum(0)
    return onehot, (k[:, None] * onehot).sum(0) / counts, counts


def bin_spectrum(P2d: torch.Tensor, axes: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """Radial average of a per-mode quantity over its last ``axes`` axes: (..., H, W) -> k̄ (K,), (..., K) float64."""
    onehot, k, counts = radial_bins(tuple(P2d.shape[-axes:]), P2d.device)
    return k, (P2d.double().flatten(-axes) @ onehot) / counts


def cross_power_spectrum(x: torch.Tensor, y: torch.Tensor, axes: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """P_xy(k) = Re⟨x̂_k ŷ_k*⟩ averaged over each bin, per field: (..., H, W) -> k̄ (K,), (..., K); ``axes`` 1 or 3
    for (..., L) or (..., D, H, W)."""
    if x.shape != y.shape:
        raise ValueError(f"fields to cross-correlate differ in shape: {tuple(x.shape)} vs {tuple(y.shape)}")
    dims = tuple(range(-axes, 0))
    x_k = torch.fft.fftn(x.double(), dim=dims, norm="forward")
    y_k = torch.fft.fftn(y.double(), dim=dims, norm="forward")
    return bin_spectrum((x_k * y_k.conj()).real, axes)


def power_spectrum(x: torch.Tensor, axes: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """P(k) = ⟨|x̂_k|²⟩ averaged over each bin, per field: (..., H, W) -> k̄ (K,), (..., K) (``axes``: as above)."""
    return cross_power_spectrum(x, x, axes)


def cross_correlation(x: torch.Tensor, y: torch.Tensor, dim: int | tuple[int, ...] = 0) -> torch.Tensor:
    """r(k) = ⟨P_xy⟩ / sqrt(⟨P_xx⟩⟨P_yy⟩), spectra averaged over ``dim`` (the samples) before the
    ratio.  1 for identical fields, ≈ 0 for independent ones.  (B, ..., H, W) -> (..., K)."""
    _, pxy = cross_power_spectrum(x, y)
    _, pxx = power_spectrum(x)
    _, pyy = power_spectrum(y)
    return pxy.mean(dim) / torch.sqrt(pxx.mean(dim) * pyy.mean(dim))


def relative_error(p: torch.Tensor, p_ref: torch.Tensor) -> torch.Tensor:
    """Per-bin relative error P / P_ref − 1 (signed)."""
    return p / p_ref - 1


def evaluate_benchmark(
    generate: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    bench: FieldBenchmark,
    points: int = 8,
    samples: int = 16,
    seed: int = 1_000_003,
) -> dict:
    """Score a generator on the benchmark at ``points`` fresh parameter points, each with one
    fresh condition c and ``samples`` generated fields, against the known answer.

    ``generate(params (B, 2), field (B, 1, n, n)) -> x (B, 2, n, n)``, called once with
    B = points·samples; all three in physical units (params and field float64 on the CPU: pass
    them through the dataset's ``FieldNormalizer.normalize`` before the network, and its output
    through ``denormalize``).  Returns tensors (per point and bin) and summary floats:
      target_spectrum_err     mean over bins and points of |P_gen/P_true − 1| for x[0], with P_true
                              from as many fresh true draws for the same c
      target_r, target_r_ceiling   mean of r(k) between generated and true x[0], and between two
                              true draws (what a perfect generator scores), over the points and
                              the signal-dominated bins (ceiling > ½, i.e. signal power above the
                              noise's); the full curves are in "r" and "r_ceiling"
      lognormal_spectrum_err  the same for x[1] against the exact log-normal spectrum
      lognormal_mean, lognormal_var   pixel mean and variance of x[1] divided by their exact
                              values 1 and exp(σ²) − 1 (1 is perfect)
      *_floor                 the two spectrum errors of the benchmark's own generator (fresh true
                              draws for the same points, conditions and sample count): a perfect
                              generator does not score 0, sampling noise remains; more ``samples``
                              lower this floor as 1/sqrt(samples)"""
    g = torch.Generator().manual_seed(seed)
    params = bench.sample_params(points, g)  # (G, 2)
    field = bench.condition(params, g)  # (G, 1, n, n)
    params_rep = params.repeat_interleave(samples, 0)  # (G*M, 2)
    field_rep = field.repeat_interleave(samples, 0)  # (G*M, 1, n, n)
    true_a, true_b = bench.target(field_rep, g), bench.target(field_rep, g)
    gen = generate(params_rep, field_rep)
    n = bench.size
    if tuple(gen.shape) != (points * samples, 2, n, n):
        raise ValueError(f"generate returned shape {tuple(gen.shape)}, expected {(points * samples, 2, n, n)}")
    gen = gen.double().reshape(points, samples, 2, n, n)
    true_a, true_b = true_a.reshape(points, samples, n, n), true_b.reshape(points, samples, n, n)

    k, p_gen = power_spectrum(gen)  # (G, M, 2, K)
    p_gen = p_gen.mean(1)  # (G, 2, K)
    _, p_true = power_spectrum(true_a)
    target_err = relative_error(p_gen[:, 0], p_true.mean(1))  # (G, K)
    r = cross_correlation(gen[:, :, 0], true_a, dim=1)  # (G, K)
    r_ceiling = cross_correlation(true_b, true_a, dim=1)
    _, p_exact = bin_spectrum(bench.expected_spectra(params)[:, 0])  # (G, K)
    lognormal_err = relative_error(p_gen[:, 1], p_exact)

    _, p_oracle_target = power_spectrum(true_b)  # the oracle: the benchmark's own generator
    _, p_oracle_lognormal = power_spectrum(bench.lognormal(params_rep, g).reshape(points, samples, n, n))
    target_floor = relative_error(p_oracle_target.mean(1), p_true.mean(1)).abs().mean().item()
    lognormal_floor = relative_error(p_oracle_lognormal.mean(1), p_exact).abs().mean().item()

    variance = field_variance(bench.spectrum(params))  # σ² of g per point, (G,)
    signal = r_ceiling.mean(0) > 0.5  # (K,) bins where S_σ c outweighs the white noise
    y = gen[:, :, 1]
    return {
        "k": k, "params": params, "field": field, "generated": gen, "true_target": true_a,
        "target_spectrum": p_gen[:, 0], "target_spectrum_true": p_true.mean(1), "target_rel_err": target_err,
        "r": r, "r_ceiling": r_ceiling,
        "lognormal_spectrum": p_gen[:, 1], "lognormal_spectrum_exact": p_exact, "lognormal_rel_err": lognormal_err,
        "target_spectrum_err": target_err.abs().mean().item(),
        "target_r": r[:, signal].mean().item(), "target_r_ceiling": r_ceiling[:, signal].mean().item(),
        "lognormal_spectrum_err": lognormal_err.abs().mean().item(),
        "target_spectrum_err_floor": target_floor, "lognormal_spectrum_err_floor": lognormal_floor,
        "lognormal_mean": y.mean().item(),
        "lognormal_var": (y.var(dim=(1, 2, 3)) / torch.expm1(variance)).mean().item(),
    }


def score_power_law(generate: Callable[[torch.Tensor], torch.Tensor], bench, points: int = 8, samples: int = 16,
                    seed: int = 1_000_003) -> dict:
    """Score a generator on ``ditkit.data.power_law.PowerLawFields`` at ``points`` fresh parameter points with
    ``samples`` fields each, against the exact spectra.

    ``generate(params (B, 2)) -> x (B, 2, *grid)``, called once with B = points·samples, both in physical units
    (params float64 on the CPU).  Per channel c: the mean over points and k-bins of |P̄_gen / P_exact − 1|, P̄ the
    binned spectrum averaged over a point's samples (``gaussian_spectrum_err``, ``lognormal_spectrum_err``); the
    same for as many fresh draws of the benchmark's own generator (``*_floor``: sampling noise, which a perfect
    generator also shows; it falls as 1/sqrt(samples)); the per-point, per-bin errors and spectra as tensors."""
    g = torch.Generator().manual_seed(seed)
    params = bench.sample_params(points, g)  # (G, 2)
    params_rep = params.repeat_interleave(samples, 0)  # (G·M, 2)
    gen = generate(params_rep)
    want = (points * samples, 2, *bench.shape)
    if tuple(gen.shape) != want:
        raise ValueError(f"generate returned shape {tuple(gen.shape)}, expected {want}")
    gen = gen.double().reshape(points, samples, *want[1:])
    oracle = bench.sample_x(params_rep, g).reshape(points, samples, *want[1:])
    k, p_exact = bin_spectrum(bench.expected_spectra(params), bench.axes)  # (G, 2, K)
    _, p_gen = power_spectrum(gen, bench.axes)  # (G, M, 2, K)
    _, p_oracle = power_spectrum(oracle, bench.axes)
    err = relative_error(p_gen.mean(1), p_exact)  # (G, 2, K)
    floor = relative_error(p_oracle.mean(1), p_exact)
    out = {"k": k, "params": params, "generated": gen, "spectrum": p_gen.mean(1), "spectrum_exact": p_exact,
           "rel_err": err}
    for c, name in enumerate(bench.channel_names):
        out[f"{name}_spectrum_err"] = err[:, c].abs().mean().item()
        out[f"{name}_spectrum_err_floor"] = floor[:, c].abs().mean().item()
    return out


def score_power_law_lengths(generate: Callable[[list[int], torch.Tensor], list[torch.Tensor]], lengths: list[int],
                            points: int = 8, samples: int = 64, seed: int = 1_000_003, **settings) -> dict:
    """``score_power_law`` for 1D fields of mixed lengths, one score per length: ``generate(lengths, params (B, 2))
    -> [x_i (2, L_i)]`` in physical units, called once per length with B = points·samples.  Returns
    {L: the per-length summary floats of ``score_power_law``}, and the mean over lengths ("mean")."""
    from ditkit.data.power_law import PowerLawFields

    out = {}
    for L in lengths:
        bench = PowerLawFields(size=L, axes=1, **settings)
        result = score_power_law(lambda p, L=L: torch.stack(generate([L] * len(p), p)).double(), bench, points=points,
                                 samples=samples, seed=seed)
        out[L] = {k: v for k, v in result.items() if isinstance(v, float)}
    out["mean"] = {k: sum(out[L][k] for L in lengths) / len(lengths) for k in out[lengths[0]]}
    return out


#################################################################################
#                                    Figures                                     #
#################################################################################


def _figure(*args, **kwargs):
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise ImportError("figures need matplotlib: pip install matplotlib") from None
    return Figure(*args, **kwargs)


def _np(t: torch.Tensor):
    return t.detach().cpu().double().numpy()


def plot_power_spectra(k: torch.Tensor, spectra: dict[str, torch.Tensor], path: str | Path, title: str = "") -> Path:
    """Log-log plot of radially averaged spectra, one line per label: each value (K,) or (G, K)
    (G lines of one colour, e.g. one per parameter point).  Dashed for labels containing 'true'
    or 'exact'.  Writes a PNG and returns its path."""
    fig = _figure(figsize=(5, 4), dpi=120)
    ax = fig.add_subplot()
    for i, (label, p) in enumerate(spectra.items()):
        p = p.detach().cpu().double().reshape(-1, p.shape[-1]).clamp_min(1e-300).numpy()
        style = "--" if ("true" in label or "exact" in label) else "-"
        for j, row in enumerate(p):
            ax.loglog(_np(k), row, style, color=f"C{i}", lw=1, label=label if j == 0 else None)
    ax.set_xlabel("k  [2π/L]")
    ax.tick_params(axis="x", which="minor", labelbottom=False)
    ax.set_ylabel("P(k)")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    return Path(path)


def plot_field_grid(columns: dict[str, torch.Tensor], path: str | Path, title: str = "") -> Path:
    """A grid of images: one column per label (each (R, H, W), e.g. condition, true target,
    generated target), one row per sample.  Columns share a colour scale when their labels
    share a word after the first (e.g. 'true target' and 'generated target')."""
    rows = min(v.shape[0] for v in columns.values())
    fig = _figure(figsize=(2.0 * len(columns), 2.0 * rows + 0.4), dpi=100)
    axes = fig.subplots(rows, len(columns), squeeze=False)
    groups: dict[str, tuple[float, float]] = {}
    for label, v in columns.items():
        key = label.split()[-1]
        lo, hi = v[:rows].min().item(), v[:rows].max().item()
        old = groups.get(key, (lo, hi))
        groups[key] = (min(lo, old[0]), max(hi, old[1]))
    for j, (label, v) in enumerate(columns.items()):
        lo, hi = groups[label.split()[-1]]
        for i in range(rows):
            ax = axes[i, j]
            ax.imshow(_np(v[i]), cmap="viridis", vmin=lo, vmax=hi, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(label, fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    return Path(path)


def plot_benchmark(result: dict, out_dir: str | Path, rows: int = 4) -> list[Path]:
    """The figures of an ``evaluate_benchmark`` result: spectra of x[0] and x[1] (generated vs
    true/exact), r(k) with its ceiling, and a grid condition | true target | generated target."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    k = result["k"]
    paths = [
        plot_power_spectra(k, {"generated": result["target_spectrum"], "true": result["target_spectrum_true"]},
                           out / "target_spectrum.png", "x[0] = tanh(gain·S c) + noise"),
        plot_power_spectra(k, {"generated": result["lognormal_spectrum"], "exact": result["lognormal_spectrum_exact"]},
                           out / "lognormal_spectrum.png", "x[1] log-normal, P(k | A, n_s)"),
    ]
    fig = _figure(figsize=(5, 4), dpi=120)
    ax = fig.add_subplot()
    ax.semilogx(_np(k), _np(result["r"].mean(0)), "-", color="C0", label="generated vs true")
    ax.semilogx(_np(k), _np(result["r_ceiling"].mean(0)), "--", color="C1", label="true vs true (ceiling)")
    ax.set_xlabel("k  [2π/L]")
    ax.tick_params(axis="x", which="minor", labelbottom=False)
    ax.set_ylabel("r(k)")
    ax.set_ylim(-0.1, 1.05)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "cross_correlation.png")
    paths.append(out / "cross_correlation.png")
    n = min(rows, result["field"].shape[0])
    paths.append(plot_field_grid({
        "condition c": result["field"][:n, 0],
        "true target": result["true_target"][:n, 0],
        "generated target": result["generated"][:n, 0, 0],
        "generated lognormal": result["generated"][:n, 0, 1],
    }, out / "fields.png"))
    return paths
