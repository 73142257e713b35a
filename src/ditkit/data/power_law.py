"""A benchmark with a known answer on a grid of 1, 2 or 3 axes: random fields whose power spectrum is a power law
of known amplitude and slope, the conditions of the model.

Conventions are those of ``ditkit.data.random_fields`` (box side 1, an n^d periodic grid, δ̂_k = FFT(δ)/n^d,
P(k) = ⟨|δ̂_k|²⟩, integer wavenumbers).  Each sample has the parameters (σ², n_s), σ² log-uniform and n_s uniform
over their ranges, and two channels:

    x[0] = g,                  g ~ GRF(P),  P(k) = σ² k^(−n_s) / Σ_k' k'^(−n_s)   (P(0) = 0)
    x[1] = exp(h − σ²/2),      h ~ GRF(P) independent of g                        (log-normal, mean 1)

The normalisation Σ_k' k'^(−n_s) makes σ² the variance of every pixel of g whatever the grid and the slope, so that
one parameter range serves 1D spectra, images and volumes.  The spectrum of x[0] is P and that of x[1] is
``lognormal_spectrum(P)``, both exact, so generated fields are scored by the error of their radially binned spectra
against these (``ditkit.eval.fields.score_power_law``)."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from ditkit.data.random_fields import (
    check_generator,
    draw_power_law_params,
    gaussian_field,
    lognormal_field,
    lognormal_spectrum,
    power_law_spectrum,
    write_params_csv,
)

CHUNK = 64  # samples drawn per call when writing; fixed so that a seed always gives the same data


@dataclass
class PowerLawFields:
    """The generator (module docstring): ``axes`` grid axes of ``size`` points each."""

    size: int = 32
    axes: int = 3
    variance_range: tuple[float, float] = (0.1, 0.5)
    slope_range: tuple[float, float] = (1.0, 3.0)

    param_names = ("variance", "n_s")
    channel_names = ("gaussian", "lognormal")
    log_channels = (1,)  # x[1] is positive: normalise log(x + eps)

    def __post_init__(self) -> None:
        self.variance_range = tuple(float(v) for v in self.variance_range)
        self.slope_range = tuple(float(v) for v in self.slope_range)
        if self.axes not in (1, 2, 3):
            raise ValueError(f"axes must be 1, 2 or 3, got {self.axes}")
        check_generator(self.size, "variance_range", self.variance_range, self.slope_range)

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.size,) * self.axes

    def sample_params(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """(n, 2): σ² log-uniform over variance_range, n_s uniform over slope_range (float64)."""
        return draw_power_law_params(n, generator, self.variance_range, self.slope_range)

    def spectrum(self, params: torch.Tensor) -> torch.Tensor:
        """(B, 2) -> (B, *grid): P(k) = σ² k^(−n_s) / Σ_k' k'^(−n_s)."""
        shape = power_law_spectrum(torch.ones(len(params)), params[:, 1], self.size, self.axes)
        scale = params[:, 0].double() / shape.flatten(1).sum(1)
        return shape * scale.view(-1, *[1] * self.axes)

    def expected_spectra(self, params: torch.Tensor) -> torch.Tensor:
        """Exact per-mode spectra of both channels: (B, 2) -> (B, 2, *grid) = [P, P_lognormal]."""
        P = self.spectrum(params)
        return torch.stack([P, lognormal_spectrum(P)], dim=1)

    def sample_x(self, params: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Fresh fields given the parameters: (B, 2) -> (B, 2, *grid) float64."""
        P = self.spectrum(params)
        g = gaussian_field(P, generator)
        y = lognormal_field(gaussian_field(P, generator), params[:, 0].double())
        return torch.stack([g, y], dim=1)

    def to_dict(self) -> dict:
        return asdict(self) | {"param_names": list(self.param_names), "channel_names": list(self.channel_names),
                               "log_channels": list(self.log_channels)}

    @classmethod
    def from_dict(cls, data: dict) -> "PowerLawFields":
        return cls(**{k: data[k] for k in ("size", "axes", "variance_range", "slope_range")})


def write_power_law(out_dir: str | Path, n: int, size: int = 32, axes: int = 3, seed: int = 0,
                    **settings) -> dict[str, Path]:
    """Draw n samples and write them in the format of ``ditkit.data.fields``: ``x.npy`` (n, 2, *grid) float32,
    ``params.csv`` (columns variance, n_s) and ``benchmark.json`` (the generator's settings, seed and file names).
    Train with ``data.kind=fields``, ``data.path=x.npy``, ``data.params_file=params.csv``,
    ``data.log_transform=[1]`` (and ``data.axes=1`` for a 1D grid).  Returns the paths."""
    if n <= 0:
        raise ValueError(f"number of samples must be positive, got {n}")
    bench = PowerLawFields(size=size, axes=axes, **settings)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"x": out / "x.npy", "params": out / "params.csv", "meta": out / "benchmark.json"}
    x = np.lib.format.open_memmap(paths["x"], mode="w+", dtype=np.float32, shape=(n, 2, *bench.shape))
    params = np.empty((n, 2), dtype=np.float64)
    generator = torch.Generator().manual_seed(seed)
    for start in range(0, n, CHUNK):
        stop = min(start + CHUNK, n)
        p = bench.sample_params(stop - start, generator)
        x[start:stop] = bench.sample_x(p, generator).float().numpy()
        params[start:stop] = p.numpy()
    x.flush()
    del x
    write_params_csv(paths["params"], list(bench.param_names), params.tolist())
    meta = {"benchmark": bench.to_dict(), "seed": seed, "n": n, "files": {k: p.name for k, p in paths.items() if k != "meta"}}
    paths["meta"].write_text(json.dumps(meta, indent=2))
    return paths


def write_power_law_sequences(out_dir: str | Path, n: int, lengths: tuple[int, ...] = (64, 128, 256, 512, 1024),
                              seed: int = 0, **settings) -> dict[str, Path]:
    """1D power-law fields of mixed lengths, in the format of ``data.kind=sequences``: ``seqs/<i>.npy`` (2, L_i)
    float32 with L_i drawn uniformly from ``lengths``, ``params.csv`` (columns file, variance, n_s) and
    ``benchmark.json``.  The spectrum of each is normalised on its own length's grid, so σ² is the pixel variance at
    every length.  Train with ``data.kind=sequences``, ``data.path=seqs``, ``data.params_file=params.csv``."""
    if n <= 0:
        raise ValueError(f"number of samples must be positive, got {n}")
    out = Path(out_dir)
    (out / "seqs").mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    benches = {L: PowerLawFields(size=L, axes=1, **settings) for L in lengths}
    picks = torch.randint(len(lengths), (n,), generator=generator).tolist()
    params = benches[lengths[0]].sample_params(n, generator)
    rows = []
    for i, (pick, p) in enumerate(zip(picks, params)):
        L = lengths[pick]
        x = benches[L].sample_x(p[None], generator)[0]  # (2, L)
        np.save(out / "seqs" / f"{i:06d}.npy", x.float().numpy())
        rows.append([f"{i:06d}", *p.tolist()])
    paths = {"seqs": out / "seqs", "params": out / "params.csv", "meta": out / "benchmark.json"}
    write_params_csv(paths["params"], ["file", *PowerLawFields.param_names], rows)
    meta = {"benchmark": benches[lengths[0]].to_dict(), "lengths": list(lengths), "seed": seed, "n": n,
            "files": {"seqs": "seqs", "params": "params.csv"}}
    paths["meta"].write_text(json.dumps(meta, indent=2))
    return paths
