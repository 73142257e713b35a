"""A benchmark with a known answer: random fields whose distribution is known in closed form.

Conventions (those of cosmology, box side L = 1, an n×n periodic grid of N = n² pixels):
    δ̂_k = (1/N) Σ_x δ(x) e^{−2πi k·x/n}         (``torch.fft.fft2(norm="forward")``)
    P(k) = ⟨|δ̂_k|²⟩,   Var δ(x) = Σ_k P(k)        (Parseval)
with k the integer wavenumber, in units of the fundamental mode 2π/L.  P(0) = 0: every field has
zero spatial mean.

The benchmark sample is
    params   (A, n_s)        P(k) = A k^(−n_s); A log-uniform, n_s uniform over their ranges
    field    c ~ GRF(P)                         (the spatial condition, 1 channel)
    x[0]     tanh(gain · S_σ c) + noise · ε     (S_σ: Gaussian smoothing; ε white, unit variance)
    x[1]     exp(g − σ_g²/2),  g ~ GRF(P) independent of c   (log-normal, mean 1)
so x[0] given c is known in distribution (its mean tanh(gain·S_σ c), its noise white) and the
power spectrum of x[1] given (A, n_s) is known exactly:  ξ_y(r) = exp(ξ_g(r)) − 1.
"""
from __future__ import annotations

import csv
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

CHUNK = 256  # samples drawn per call when writing; fixed so a seed always gives the same data


def wavenumbers(size: int, axes: int = 2) -> torch.Tensor:
    """|k| on the FFT grid of ``axes`` axes of ``size`` points, (size,)·axes float64, in units of the fundamental
    mode."""
    f = torch.fft.fftfreq(size, d=1.0 / size, dtype=torch.float64)
    return torch.sqrt(sum(g ** 2 for g in torch.meshgrid(*[f] * axes, indexing="ij")))


def check_generator(size: int, scale_name: str, scale_range: tuple[float, float],
                    slope_range: tuple[float, float]) -> None:
    """The settings of a power-law generator: an even grid of at least 4 points, 0 < low <= high for the amplitude
    (``scale_name``) and low <= high for the slope; a ``ValueError`` names the setting."""
    lo, hi = scale_range
    if not 0 < lo <= hi:
        raise ValueError(f"{scale_name} must satisfy 0 < low <= high, got {scale_range}")
    if slope_range[0] > slope_range[1]:
        raise ValueError(f"slope_range must satisfy low <= high, got {slope_range}")
    if size < 4 or size % 2:
        raise ValueError(f"size must be an even integer >= 4, got {size}")


def draw_power_law_params(n: int, generator: torch.Generator, scale_range: tuple[float, float],
                          slope_range: tuple[float, float]) -> torch.Tensor:
    """(n, 2) float64: an amplitude log-uniform over ``scale_range``, a slope uniform over ``slope_range``."""
    u = torch.rand(n, 2, generator=generator, dtype=torch.float64)
    (a0, a1), (s0, s1) = scale_range, slope_range
    scale = torch.exp(math.log(a0) + u[:, 0] * (math.log(a1) - math.log(a0)))
    return torch.stack([scale, s0 + u[:, 1] * (s1 - s0)], dim=1)


def write_params_csv(path: Path, header: list[str], rows: list[list]) -> None:
    """A parameter table: the header, then one row per sample, floats written exactly (``repr``)."""
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows([[v if isinstance(v, str) else repr(float(v)) for v in row] for row in rows])


def power_law_spectrum(amplitude: torch.Tensor, slope: torch.Tensor, size: int, axes: int = 2) -> torch.Tensor:
    """P(k) = A k^(−n) on the grid, P(0) = 0.  amplitude, slope: (B,) -> (B, size, …) float64 (``axes`` grid axes)."""
    k = wavenumbers(size, axes)
    k_safe = torch.where(k > 0, k, torch.ones_like(k))
    shape = (-1, *[1] * axes)
    P = amplitude.double().view(shape) * k_safe ** (-slope.double().view(shape))
    return torch.where(k > 0, P, torch.zeros_like(P))


def _grid_dims(P: torch.Tensor) -> tuple[int, ...]:
    """The grid axes of a batch (B, *grid): every axis after the first."""
    return tuple(range(-(P.dim() - 1), 0))


def gaussian_field(P: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A Gaussian random field with spectrum P: δ̂_k = sqrt(P(k)) ŵ_k with ŵ the orthonormal FFT of
    unit white noise (so ⟨|ŵ_k|²⟩ = 1, Hermitian: δ is real).  P: (B, *grid) -> (B, *grid) float64, on a grid of
    1, 2 or 3 axes."""
    w = torch.randn(P.shape, generator=generator, dtype=torch.float64)
    dims = _grid_dims(P)
    delta_k = torch.sqrt(P) * torch.fft.fftn(w, dim=dims, norm="ortho")
    return torch.fft.ifftn(delta_k, dim=dims, norm="forward").real


def field_variance(P: torch.Tensor) -> torch.Tensor:
    """σ² = Σ_k P(k), the variance of every pixel.  (B, *grid) -> (B,)."""
    return P.sum(dim=_grid_dims(P))


def lognormal_field(g: torch.Tensor, variance: torch.Tensor) -> torch.Tensor:
    """y = exp(g − σ²/2): E y = 1, Var y = exp(σ²) − 1.  g: (B, *grid), variance: (B,)."""
    return torch.exp(g - variance.view(-1, *[1] * (g.dim() - 1)) / 2)


def lognormal_spectrum(P: torch.Tensor) -> torch.Tensor:
    """Exact spectrum of y = exp(g − σ²/2) for g ~ GRF(P) on the grid:
    ξ_g = Σ_k P(k) e^{2πik·r/n},  ξ_y = exp(ξ_g) − 1,  P_y = (1/N) Σ_r ξ_y(r) e^{−2πik·r/n}.
    (B, *grid) -> (B, *grid) float64.  Unlike P(0), P_y(0) > 0: the spatial mean of y fluctuates."""
    dims = _grid_dims(P)
    xi_g = torch.fft.ifftn(P, dim=dims, norm="forward").real
    return torch.fft.fftn(torch.expm1(xi_g), dim=dims, norm="forward").real


def gaussian_smooth(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Periodic convolution with a Gaussian of standard deviation ``sigma`` (box units):
    multiplies δ̂_k by exp(−2π² σ² k²).  x: (..., n, n)."""
    k2 = wavenumbers(x.shape[-1]).to(x.device) ** 2
    kernel = torch.exp(-2 * math.pi**2 * sigma**2 * k2)
    return torch.fft.ifft2(torch.fft.fft2(x.double()) * kernel).real.to(x.dtype)


@dataclass
class FieldBenchmark:
    """The generator of the benchmark (see the module docstring); all draws use a given torch.Generator."""

    size: int = 64
    amplitude_range: tuple[float, float] = (0.01, 0.04)  # pixel std of c, g from ~0.3 to 1 on 64²
    slope_range: tuple[float, float] = (2.0, 3.0)
    smooth_sigma: float = 1 / 32  # box units: 2 pixels at 64²
    gain: float = 2.0
    noise: float = 0.1

    param_names = ("A", "n_s")
    channel_names = ("target", "lognormal")
    log_channels = (1,)  # x[1] is positive: normalise log(x + eps)

    def __post_init__(self) -> None:
        self.amplitude_range = tuple(float(v) for v in self.amplitude_range)
        self.slope_range = tuple(float(v) for v in self.slope_range)
        check_generator(self.size, "amplitude_range", self.amplitude_range, self.slope_range)

    def sample_params(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """(n, 2): A log-uniform over amplitude_range, n_s uniform over slope_range (float64)."""
        return draw_power_law_params(n, generator, self.amplitude_range, self.slope_range)

    def spectrum(self, params: torch.Tensor) -> torch.Tensor:
        """(B, 2) -> (B, n, n): the Gaussian fields' P(k) = A k^(−n_s)."""
        return power_law_spectrum(params[:, 0], params[:, 1], self.size)

    def condition(self, params: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """c ~ GRF(A k^(−n_s)): (B, 2) -> (B, 1, n, n)."""
        return gaussian_field(self.spectrum(params), generator)[:, None]

    def target_mean(self, field: torch.Tensor) -> torch.Tensor:
        """E[x[0] | c] = tanh(gain · S_σ c): (B, 1, n, n) -> (B, 1, n, n)."""
        return torch.tanh(self.gain * gaussian_smooth(field, self.smooth_sigma))

    def target(self, field: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """A fresh draw of x[0] given c (new noise): (B, 1, n, n)."""
        eps = torch.randn(field.shape, generator=generator, dtype=field.dtype)
        return self.target_mean(field) + self.noise * eps

    def lognormal(self, params: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """A fresh draw of x[1] given (A, n_s): (B, 2) -> (B, 1, n, n)."""
        P = self.spectrum(params)
        return lognormal_field(gaussian_field(P, generator), field_variance(P))[:, None]

    def sample_x(self, params: torch.Tensor, field: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """x given its conditions: (B, 2, n, n) = [target, lognormal]."""
        return torch.cat([self.target(field, generator), self.lognormal(params, generator)], dim=1)

    def sample(self, n: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """n samples: {"params": (n, 2), "field": (n, 1, s, s), "x": (n, 2, s, s)}, float64."""
        params = self.sample_params(n, generator)
        field = self.condition(params, generator)
        return {"params": params, "field": field, "x": self.sample_x(params, field, generator)}

    def expected_spectra(self, params: torch.Tensor) -> torch.Tensor:
        """Exact per-mode spectra of x[1] and of c given the params: (B, 2, n, n) = [P_y, P]."""
        P = self.spectrum(params)
        return torch.stack([lognormal_spectrum(P), P], dim=1)

    def to_dict(self) -> dict:
        return asdict(self) | {"param_names": list(self.param_names), "channel_names": list(self.channel_names),
                               "log_channels": list(self.log_channels)}

    @classmethod
    def from_dict(cls, data: dict) -> "FieldBenchmark":
        return cls(**{k: data[k] for k in ("size", "amplitude_range", "slope_range", "smooth_sigma", "gain", "noise")})


def write_benchmark(out_dir: str | Path, n: int, size: int = 64, seed: int = 0, **settings) -> dict[str, Path]:
    """Draw n samples and write them in the format of ``ditkit.data.fields``:
    ``x.npy`` (n, 2, s, s) float32, ``field.npy`` (n, 1, s, s) float32, ``params.csv`` (columns A, n_s)
    and ``benchmark.json`` (the generator's settings, seed and file names).  Returns the paths."""
    if n <= 0:
        raise ValueError(f"number of samples must be positive, got {n}")
    bench = FieldBenchmark(size=size, **settings)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"x": out / "x.npy", "field": out / "field.npy", "params": out / "params.csv", "meta": out / "benchmark.json"}
    x = np.lib.format.open_memmap(paths["x"], mode="w+", dtype=np.float32, shape=(n, 2, size, size))
    field = np.lib.format.open_memmap(paths["field"], mode="w+", dtype=np.float32, shape=(n, 1, size, size))
    params = np.empty((n, 2), dtype=np.float64)
    generator = torch.Generator().manual_seed(seed)
    for start in range(0, n, CHUNK):
        stop = min(start + CHUNK, n)
        s = bench.sample(stop - start, generator)
        x[start:stop] = s["x"].float().numpy()
        field[start:stop] = s["field"].float().numpy()
        params[start:stop] = s["params"].numpy()
    x.flush()
    field.flush()
    del x, field
    write_params_csv(paths["params"], list(bench.param_names), params.tolist())
    meta = {"benchmark": bench.to_dict(), "seed": seed, "n": n,
            "files": {k: p.name for k, p in paths.items() if k != "meta"}}
    paths["meta"].write_text(json.dumps(meta, indent=2))
    return paths
