"""From a trained network to samples: bind the conditioning (and guidance), hand the callable to
the objective's sampler, decode, write grids and ADM-style ``.npz`` batches."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ditkit.config import Config, SampleConfig
from ditkit.guidance import NFECounter, conditional_fn, guided_fn
from ditkit.models.dit import as_pair
from ditkit.utils.images import save_grid, to_uint8
from ditkit.utils.io import atomic_save_npz


def grid_labels(num_classes: int, per_class: int, max_total: int | None = None) -> torch.Tensor:
    """0,0,…,1,1,…: one row of ``per_class`` samples per class (the first classes if capped)."""
    if num_classes <= 0:
        return torch.zeros(per_class * 8, dtype=torch.long)
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    return labels[:max_total] if max_total else labels


@torch.no_grad()
def generate(model: nn.Module, objective, noise: torch.Tensor, model_kwargs: dict, cfg: SampleConfig,
             progress: bool = True) -> tuple[torch.Tensor, int]:
    """Samples from ``noise`` with the sampler, steps and guidance of ``cfg``; returns (x0, NFE)."""
    counter = NFECounter()
    if cfg.cfg_scale != 1.0:
        interval = tuple(cfg.guidance_interval) if cfg.guidance_interval else None
        fn = guided_fn(model, model_kwargs, cfg.cfg_scale, cfg.guided_channels, interval,
                       objective.noise_level, counter)
    else:
        fn = conditional_fn(model, model_kwargs, counter)
    opts = {"ddim": {"eta": cfg.eta}, "euler": {"grid": cfg.grid}, "heun": {"grid": cfg.grid},
            "sde": {"grid": cfg.grid, "diffusion": cfg.sde_diffusion}}.get(cfg.sampler, {})
    x, _ = objective.sample(fn, noise, sampler=cfg.sampler, steps=cfg.steps, progress=progress, **opts)
    return x, counter.nfe


def save_sample_grid(x: torch.Tensor, cfg: Config, path: Path, nrow: int, vae=None) -> np.ndarray:
    """A PNG of samples, upscaled so small images are visible: pixels as they are; latents through
    ``vae`` when given; anything else (fields, latents without a VAE) as its first channel, each
    image stretched to its own min..max.  Returns the grid (H, W, 3) uint8."""
    if cfg.data.kind in ("digits", "images"):
        images = to_uint8(x)
    elif vae is not None and cfg.data.kind == "latents":
        from ditkit.models.vae import decode

        images = to_uint8(decode(vae, x))
    else:
        first = x[:, :1].float()
        lo = first.amin(dim=(1, 2, 3), keepdim=True)
        hi = first.amax(dim=(1, 2, 3), keepdim=True)
        images = to_uint8(2 * (first - lo) / (hi - lo).clamp_min(1e-12) - 1)
    scale = max(1, 64 // images.shape[1])
    return save_grid(images, path, nrow=nrow, scale=scale)


#################################################################################
#            Many samples on many processes, resumable, into one .npz            #
#################################################################################


def sample_noise(indices: range, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Noise of global sample i drawn from its own seed: the same whatever the batch or world size.
    (The per-step noise of the DDPM and SDE samplers is seeded per batch of indices, so their
    samples depend on the batch size, never on the number of processes.)"""
    from ditkit.data.sampler import step_seed

    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(step_seed(seed, i, 1))) for i in indices])


def sample_labels(indices: range, num_classes: int, mode: str | list[int], seed: int) -> torch.Tensor:
    """'balanced' (i mod K), 'random' (uniform, seeded per sample) or a given list cycled."""
    from ditkit.data.sampler import step_seed

    if isinstance(mode, list):
        return torch.tensor([mode[i % len(mode)] for i in indices], dtype=torch.long)
    if mode == "balanced":
        return torch.tensor([i % num_classes for i in indices], dtype=torch.long)
    if mode == "random":
        return torch.tensor([int(torch.randint(num_classes, (1,), generator=torch.Generator().manual_seed(step_seed(seed, i, 2))))
                             for i in indices], dtype=torch.long)
    raise ValueError(f"labels must be 'balanced', 'random' or a list of class ids, got {mode!r}")


def sample_to_npz(model: nn.Module, objective, cfg: Config, num_samples: int, out_dir: str | Path, batch_size: int,
                  seed: int = 0, labels: str | list[int] = "balanced", decode=None, rank: int = 0, world_size: int = 1,
                  device: torch.device = torch.device("cpu"), progress: bool = True, barrier=None,
                  source: str = "") -> Path | None:
    """Sample ``num_samples`` into ``out_dir/samples.npz`` (ADM format: ``arr_0`` uint8 N×H×W×3,
    ``arr_1`` labels; pixel-space and field runs also keep the raw float ``samples``).

    Batch b holds samples [b·B, (b+1)·B); rank r does batches r, r+W, …, each written atomically to
    ``parts/``.  An interrupted run resumes by skipping finished parts; rank 0 merges them in
    order (after ``barrier()``, which waits for the other ranks) and checks that every index is
    present exactly once.  ``decode(x) -> (uint8, raw)``.  ``parts/settings.json`` records what
    made the parts (``source``: the checkpoint and the speed levers that change numbers; sampler, steps,
    guidance, seed, labels, sizes); a
    rerun with other settings into the same folder is refused instead of mixing samples."""
    from tqdm import tqdm

    from ditkit.data.sampler import step_seed

    out_dir = Path(out_dir)
    parts = out_dir / "parts"
    parts.mkdir(parents=True, exist_ok=True)
    sample = {k: v for k, v in dataclasses.asdict(cfg.sample).items() if k != "speed"}  # the caller's source names the levers
    _check_settings(parts, {"source": source, "sample": sample, "seed": seed, "labels": labels,
                            "num_samples": num_samples, "batch_size": batch_size})
    shape = (cfg.model.in_channels, *as_pair(cfg.model.input_size))
    n_batches = -(-num_samples // batch_size)
    mine = [b for b in range(rank, n_batches, world_size) if not (parts / f"part_{b:06d}.npz").exists()]
    conditional = cfg.model.num_classes > 0
    bar = tqdm(total=n_batches, initial=n_batches - len(mine) * world_size, desc="sample", disable=not progress or rank != 0,
               dynamic_ncols=True, unit="batch")
    for b in mine:
        idx = range(b * batch_size, min((b + 1) * batch_size, num_samples))
        torch.manual_seed(step_seed(seed, b, 3))  # the sampler's own noise (DDPM, SDE) for this batch
        noise = sample_noise(idx, shape, seed).to(device)
        y = sample_labels(idx, cfg.model.num_classes, labels, seed) if conditional else torch.zeros(len(idx), dtype=torch.long)
        kwargs = {"y": y.to(device)} if conditional else {}
        x, _ = generate(model, objective, noise, kwargs, cfg.sample, progress=False)
        images, raw = decode(x) if decode is not None else (to_uint8(x), x.float().cpu().numpy())
        arrays = {"index": np.asarray(idx, dtype=np.int64), "arr_0": images, "arr_1": y.numpy()}
        if raw is not None:
            arrays["samples"] = raw
        atomic_save_npz(parts / f"part_{b:06d}.npz", **arrays)
        bar.update(world_size)
    bar.close()
    if barrier is not None:
        barrier()
    if rank != 0:
        return None
    return merge_parts(out_dir, num_samples, n_batches)


def _check_settings(parts: Path, settings: dict) -> None:
    import json

    from ditkit.utils.io import atomic_write_text

    path = parts / "settings.json"
    text = json.dumps(settings, sort_keys=True)
    old = path.read_text() if path.exists() else text
    if old != text:
        differ = sorted(_differing_keys(json.loads(old), json.loads(text)))
        raise ValueError(f"{parts} holds samples made with other settings ({path}; differing: {', '.join(differ)}); "
                         "choose another --out or delete that folder to start over")
    atomic_write_text(path, text)  # every rank writes the same text


def _differing_keys(a: dict, b: dict, prefix: str = "") -> list[str]:
    """Dotted names of the entries that differ between two nested dicts."""
    out, absent = [], object()
    for key in a.keys() | b.keys():
        x, y = a.get(key, absent), b.get(key, absent)
        if isinstance(x, dict) and isinstance(y, dict):
            out += _differing_keys(x, y, f"{prefix}{key}.")
        elif x is absent or y is absent or x != y:
            out.append(prefix + key)
    return out


def merge_parts(out_dir: Path, num_samples: int, n_batches: int) -> Path:
    parts = out_dir / "parts"
    missing = [b for b in range(n_batches) if not (parts / f"part_{b:06d}.npz").exists()]
    if missing:
        raise RuntimeError(f"{len(missing)} sample parts are missing in {parts} (first: part_{missing[0]:06d}.npz); "
                           "run the same command again to finish them")
    loaded = [np.load(parts / f"part_{b:06d}.npz") for b in range(n_batches)]
    index = np.concatenate([p["index"] for p in loaded])
    if not np.array_equal(index, np.arange(num_samples)):
        raise RuntimeError(f"sample parts in {parts} do not cover 0..{num_samples - 1} exactly once")
    merged = {"arr_0": np.concatenate([p["arr_0"] for p in loaded]), "arr_1": np.concatenate([p["arr_1"] for p in loaded])}
    if "samples" in loaded[0]:  # pixel-space and field runs: the raw float samples and their labels
        merged["samples"] = np.concatenate([p["samples"] for p in loaded])
        merged["labels"] = merged["arr_1"]
    path = out_dir / "samples.npz"
    atomic_save_npz(path, **merged)
    return path
