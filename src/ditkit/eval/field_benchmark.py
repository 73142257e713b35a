"""Sampling a trained field model in physical units (``ditkit sample --cond``), and scoring it on
the random-field benchmark (``ditkit eval-fields``): conditions are normalised with the
checkpoint's normaliser, sampled with the run's sampler and guidance, and the samples
denormalised back before ``evaluate_benchmark`` compares them with the known answer."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from ditkit.checkpoints import load_run
from ditkit.data.fields import FieldNormalizer
from ditkit.data.random_fields import FieldBenchmark
from ditkit.eval.fields import evaluate_benchmark, plot_benchmark
from ditkit.models.grid import as_size
from ditkit.objectives import build_objective
from ditkit.sampling import generate


def field_normalizer(ckpt: str | Path, stored: dict) -> FieldNormalizer:
    """The normaliser a data.kind=fields run stored in its checkpoint (``load_run``'s extras)."""
    if "normalizer" not in stored:
        raise ValueError(f"{ckpt} holds no field normaliser: give the training checkpoint of a data.kind=fields run")
    return FieldNormalizer(stored["normalizer"])


def field_generator(model, cfg, norm: FieldNormalizer, device: str | torch.device, batch_size: int = 64, seed: int = 0):
    """generate(params, field) -> x, all in physical units: conditions are normalised with the
    run's normaliser, sampled with the run's sampler and guidance, and denormalised back."""
    objective = build_objective(cfg)
    shape = (cfg.model.in_channels, *as_size(cfg.model.input_size))
    g = torch.Generator().manual_seed(seed)

    def generate_fields(params: torch.Tensor | None, field: torch.Tensor | None) -> torch.Tensor:
        n = len(params) if params is not None else len(field)
        out = []
        for i in range(0, n, batch_size):
            kwargs = {}
            if cfg.model.num_params:
                kwargs["params"] = norm.normalize(params[i:i + batch_size], "params").float().to(device)
            if cfg.model.cond_channels:
                kwargs["field"] = norm.normalize(field[i:i + batch_size], "field").float().to(device)
            noise = torch.randn((min(batch_size, n - i), *shape), generator=g).to(device)
            x, _ = generate(model, objective, noise, kwargs, cfg.sample, progress=False)
            out.append(norm.denormalize(x.double().cpu(), "x"))
        return torch.cat(out)

    return generate_fields


def evaluate_field_checkpoint(ckpt: str | Path, data_dir: str | Path, out_dir: str | Path, points: int = 8,
                              samples: int = 64, device: str = "cpu") -> dict:
    meta = Path(data_dir) / "benchmark.json"
    if not meta.is_file():
        raise FileNotFoundError(f"{meta} not found: --data must be a folder written by `ditkit fields-benchmark`")
    bench = FieldBenchmark.from_dict(json.loads(meta.read_text())["benchmark"])
    model, cfg, stored = load_run(ckpt, device=device)
    result = evaluate_benchmark(field_generator(model, cfg, field_normalizer(ckpt, stored), device), bench,
                                points=points, samples=samples)
    plot_benchmark(result, out_dir)
    return {k: float(v) for k, v in result.items() if isinstance(v, float)}
