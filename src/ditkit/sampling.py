"""From a trained network to samples: bind the conditioning (and guidance), hand the callable to
the objective's sampler, decode, write grids and ADM-style ``.npz`` batches."""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ditkit.config import Config, SampleConfig
from ditkit.data import COND_KEYS
from ditkit.guidance import NFECounter, conditional_fn, guided_fn
from ditkit.models.grid import as_size
from ditkit.utils.images import save_grid, stretched_images, to_uint8
from ditkit.utils.io import atomic_save_npz, remove_stale_temps


def check_sample_request(num_samples: int, batch_size: int, cfg_scale: float | None = None,
                         guidance_interval: list | tuple | None = None, cli: bool = True) -> None:
    """A ``ValueError`` of one line naming the option and its value for a request no run can serve,
    raised before any model is loaded.  ``cli``: name the ``ditkit sample`` options (``--batch-size``),
    else the Python arguments (``batch_size``)."""
    def name(arg: str) -> str:
        return "--" + arg.replace("_", "-") if cli else arg

    if num_samples < 1:
        raise ValueError(f"{name('num_samples')} must be at least 1, got {num_samples}")
    if batch_size < 1:
        raise ValueError(f"{name('batch_size')} must be at least 1, got {batch_size}")
    if cfg_scale is not None and not math.isfinite(cfg_scale):
        raise ValueError(f"{name('cfg_scale')} must be a finite number, got {cfg_scale}")
    if guidance_interval is not None and not (isinstance(guidance_interval, (list, tuple)) and len(guidance_interval) == 2
                                              and all(isinstance(v, (int, float)) and math.isfinite(v)
                                                      for v in guidance_interval)):
        raise ValueError(f"{name('guidance_interval')} must be two finite noise levels, got {guidance_interval!r}")


def check_finite(name: str, x: torch.Tensor) -> None:
    """A ``ValueError`` naming ``name``, how many NaN/inf entries it holds and in which rows: one
    such condition would silently turn its sample (and a batch's statistics) into NaN."""
    bad = ~torch.isfinite(x)
    if not bad.any():
        return
    rows = bad.reshape(len(x) if x.dim() else 1, -1).any(dim=1).nonzero().flatten().tolist()
    shown = ", ".join(map(str, rows[:3])) + (", ..." if len(rows) > 3 else "")
    count = int(bad.sum())
    raise ValueError(f"{name} holds {count} non-finite value{'s' if count > 1 else ''} "
                     f"(row{'s' if len(rows) > 1 else ''} {shown})")


def grid_labels(num_classes: int, per_class: int, max_total: int | None = None) -> torch.Tensor:
    """0,0,…,1,1,…: one row of ``per_class`` samples per class (the first classes if capped)."""
    if num_classes <= 0:
        return torch.zeros(per_class * 8, dtype=torch.long)
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    return labels[:max_total] if max_total else labels


@torch.no_grad()
def generate(model: nn.Module, objective, noise: torch.Tensor, model_kwargs: dict, cfg: SampleConfig,
             progress: bool = True) -> tuple[torch.Tensor, int]:
    """Samples from ``noise`` with the sampler, steps and guidance of ``cfg``; returns (x0, NFE).  Without a
    condition in ``model_kwargs`` (an unconditional model) there is nothing to guide: one evaluation per step."""
    counter = NFECounter()
    if cfg.cfg_scale != 1.0 and any(k in model_kwargs for k in COND_KEYS):
        interval = tuple(cfg.guidance_interval) if cfg.guidance_interval else None
        fn = guided_fn(model, model_kwargs, cfg.cfg_scale, cfg.guided_channels, interval,
                       objective.noise_level, counter)
    else:
        fn = conditional_fn(model, model_kwargs, counter)
    opts = {"ddim": {"eta": cfg.eta}, "euler": {"grid": cfg.grid}, "heun": {"grid": cfg.grid},
            "sde": {"grid": cfg.grid, "diffusion": cfg.sde_diffusion}}.get(cfg.sampler, {})
    if cfg.shift is not None and "grid" in opts:
        opts["shift"] = cfg.shift  # else the objective's own (objective.shift)
    x, _ = objective.sample(fn, noise, sampler=cfg.sampler, steps=cfg.steps, progress=progress, **opts)
    return x, counter.nfe


@torch.no_grad()
def generate_lengths(model: nn.Module, objective, lengths: list[int], model_kwargs: dict, cfg: SampleConfig,
                     channels: int, generator: torch.Generator | None = None,
                     progress: bool = False) -> tuple[list[torch.Tensor], int]:
    """Sequences of the given ``lengths``, one per sample, from a 1D model (lengths up to its L, multiples of its
    patch size): the batch's noise (B, C, max(lengths)) with its padding mask (B, max(lengths)) goes through
    ``generate`` (guidance doubles the mask with the other conditions), and each sample comes back cut to its
    length, a (C, L_i) tensor.  Returns (the sequences, NFE)."""
    if not lengths or min(lengths) < 1:
        raise ValueError(f"lengths must be at least 1 each, got {list(lengths)}")
    return generate_sizes(model, objective, [(n,) for n in lengths], model_kwargs, cfg, channels, generator, progress)


def generate_sizes(model: nn.Module, objective, sizes: list[tuple[int, ...]], model_kwargs: dict, cfg: SampleConfig,
                   channels: int, generator: torch.Generator | None = None,
                   progress: bool = False, seeds: list[int] | None = None) -> tuple[list[torch.Tensor], int]:
    """Samples of the given ``sizes``, one per sample, each a size per axis ((L,), (H, W) or (T, H, W); up to the
    model's size, multiples of its patch): the batch's noise (B, C, *largest) with its mask (B, *largest), True
    inside each sample's extent from the origin, goes through ``generate``, and each sample comes back cut to its
    size, a (C, *size_i) tensor.  ``seeds``: each sample's noise drawn at its own size from its own seed (so that
    it does not depend on the batch it is in); else the batch's from ``generator``.  Returns (the samples, NFE)."""
    if not sizes or len({len(s) for s in sizes}) != 1 or min(min(s) for s in sizes) < 1:
        raise ValueError(f"sizes must be positive, with the same number of axes each, got {list(sizes)}")
    device = next(model.parameters()).device
    largest = tuple(max(s[a] for s in sizes) for a in range(len(sizes[0])))
    mask = torch.zeros(len(sizes), *largest, dtype=torch.bool)
    for i, size in enumerate(sizes):
        mask[(i, *[slice(0, n) for n in size])] = True
    if seeds is None:
        noise = torch.randn(len(sizes), channels, *largest, generator=generator)  # drawn on the CPU
    else:
        noise = torch.zeros(len(sizes), channels, *largest)
        for i, (size, seed) in enumerate(zip(sizes, seeds, strict=True)):
            noise[(i, slice(None), *[slice(0, n) for n in size])] = torch.randn(
                channels, *size, generator=torch.Generator().manual_seed(seed))
    noise = noise.to(device)
    x, nfe = generate(model, objective, noise, {**model_kwargs, "mask": mask.to(device)}, cfg, progress=progress)
    return [x[(i, slice(None), *[slice(0, n) for n in size])] for i, size in enumerate(sizes)], nfe


def save_sample_grid(x: torch.Tensor, cfg: Config, path: Path, nrow: int, vae=None) -> np.ndarray:
    """A PNG of samples, upscaled so small images are visible: pixels as they are; latents through
    ``vae`` when given (the run's latent normalisation undone, ``decode_latents``); anything else (fields,
    latents without a VAE) as its first channel, each image stretched to its own min..max.  Returns the
    grid (H, W, 3) uint8."""
    if cfg.data.kind in ("digits", "images"):
        images = to_uint8(x)
    elif vae is not None and cfg.data.kind == "latents":
        from ditkit.data.latents import decode_latents

        images = to_uint8(decode_latents(vae, x, cfg.data))
    else:
        images = stretched_images(x)
    scale = 1 if x.dim() == 3 else max(1, 64 // images.shape[1])  # sequences: already a picture per sample
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
    made the parts (``source``: the checkpoint, by content, and the speed levers that change numbers;
    sampler, steps, guidance, seed, labels, sizes); a rerun with other settings into the same folder is
    refused instead of mixing samples.  A finished part is read back before it is skipped: one that is
    torn, corrupt or holds other samples is named, deleted and sampled again."""
    from tqdm import tqdm

    from ditkit.data.sampler import step_seed

    check_sample_request(num_samples, batch_size, cfg.sample.cfg_scale, cfg.sample.guidance_interval)
    out_dir = Path(out_dir)
    parts = out_dir / "parts"
    parts.mkdir(parents=True, exist_ok=True)
    sample = {k: v for k, v in dataclasses.asdict(cfg.sample).items() if k != "speed"}  # the caller's source names the levers
    _check_settings(parts, {"source": source, "sample": sample, "seed": seed, "labels": labels,
                            "num_samples": num_samples, "batch_size": batch_size})
    shape = (cfg.model.in_channels, *as_size(cfg.model.input_size))
    n_batches = -(-num_samples // batch_size)
    own = range(rank, n_batches, world_size)
    # Another rank may be writing its parts already: remove only the temporaries of this rank's own.
    remove_stale_temps(parts, targets=None if world_size == 1 else {_part_name(b) for b in own})
    mine = [b for b in own if not _part_is_done(out_dir, b, _batch_range(b, batch_size, num_samples))]
    conditional = cfg.model.num_classes > 0
    # Counted in images, with an ETA; rank 0 counts the other ranks' images as equal to its own.
    todo = sum(len(_batch_range(b, batch_size, num_samples)) for b in mine)
    bar = tqdm(total=num_samples, initial=max(0, num_samples - todo * world_size), desc="sample",
               disable=not progress or rank != 0, dynamic_ncols=True, unit="img")
    for b in mine:
        idx = _batch_range(b, batch_size, num_samples)
        torch.manual_seed(step_seed(seed, b, 3))  # the sampler's own noise (DDPM, SDE) for this batch
        noise = sample_noise(idx, shape, seed).to(device)
        y = sample_labels(idx, cfg.model.num_classes, labels, seed) if conditional else torch.zeros(len(idx), dtype=torch.long)
        kwargs = {"y": y.to(device)} if conditional else {}
        x, _ = generate(model, objective, noise, kwargs, cfg.sample, progress=False)
        images, raw = decode(x) if decode is not None else (to_uint8(x), x.float().cpu().numpy())
        arrays = {"index": np.asarray(idx, dtype=np.int64), "arr_0": images, "arr_1": y.numpy()}
        if raw is not None:
            arrays["samples"] = raw
        atomic_save_npz(parts / _part_name(b), **arrays)
        bar.update(len(idx) * world_size)
    bar.close()
    if barrier is not None:
        barrier()
    if rank != 0:
        return None
    return merge_parts(out_dir, num_samples, n_batches)


def _part_name(b: int) -> str:
    return f"part_{b:06d}.npz"


def _batch_range(b: int, batch_size: int, num_samples: int) -> range:
    return range(b * batch_size, min((b + 1) * batch_size, num_samples))


def read_part(path: Path, expected: range | None = None) -> dict[str, np.ndarray]:
    """Every array of a sample part, read in full (so the zip's CRC-32 catches flipped bytes).
    ``ValueError`` with the reason for a file that does not read, lacks ``index``/``arr_0``/``arr_1``,
    holds arrays of unequal lengths or other samples than ``expected``."""
    try:
        with np.load(path) as z:
            arrays = {k: z[k] for k in z.files}
    except Exception as err:  # BadZipFile, EOFError, zlib errors, pickled arrays, ...
        text = str(err).strip()
        raise ValueError(f"{type(err).__name__}: {text.splitlines()[0]}" if text else type(err).__name__) from None
    missing = [k for k in ("index", "arr_0", "arr_1") if k not in arrays]
    if missing:
        raise ValueError(f"it has no {', '.join(missing)} array")
    sizes = {k: v.shape[0] if v.ndim else 0 for k, v in arrays.items()}
    if len(set(sizes.values())) != 1 or arrays["index"].ndim != 1:
        raise ValueError(f"its arrays hold unequal numbers of samples ({', '.join(f'{k}: {n}' for k, n in sizes.items())})")
    if expected is not None and not np.array_equal(arrays["index"], np.arange(expected.start, expected.stop)):
        raise ValueError(f"it holds samples {_span(arrays['index'])}, not {expected.start}..{expected.stop - 1}")
    return arrays


def _span(index: np.ndarray) -> str:
    return f"{index.min()}..{index.max()}" if len(index) else "none"


def _part_is_done(out_dir: Path, b: int, expected: range) -> bool:
    """Whether part ``b`` exists and reads back with the samples of ``expected``; a bad one is
    named in one line and deleted, so that it is sampled again."""
    path = out_dir / "parts" / _part_name(b)
    if not path.exists():
        return False
    try:
        read_part(path, expected)
    except ValueError as err:
        print(f"sample part {path.relative_to(out_dir)} is corrupt ({err}); deleting it and sampling it again")
        path.unlink()
        return False
    return True


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
    """The parts, in order, into ``out_dir/samples.npz``: a missing or corrupt part, a sample held by
    two parts (both named) or out of place is an error; rerunning the sampling command repairs it."""
    out_dir = Path(out_dir)
    parts = out_dir / "parts"
    missing = [b for b in range(n_batches) if not (parts / _part_name(b)).exists()]
    if missing:
        raise RuntimeError(f"{len(missing)} sample parts are missing in {parts} (first: {_part_name(missing[0])}); "
                           "run the same command again to finish them")
    loaded = []
    for b in range(n_batches):
        try:
            loaded.append(read_part(parts / _part_name(b)))
        except ValueError as err:
            raise RuntimeError(f"sample part {parts / _part_name(b)} is corrupt ({err}); "
                               "run the same command again to sample it again") from None
    _check_coverage(parts, [p["index"] for p in loaded], num_samples)
    merged = {"arr_0": np.concatenate([p["arr_0"] for p in loaded]), "arr_1": np.concatenate([p["arr_1"] for p in loaded])}
    if "samples" in loaded[0]:  # pixel-space and field runs: the raw float samples and their labels
        merged["samples"] = np.concatenate([p["samples"] for p in loaded])
        merged["labels"] = merged["arr_1"]
    path = out_dir / "samples.npz"
    atomic_save_npz(path, **merged)
    return path


def _check_coverage(parts: Path, indices: list[np.ndarray], num_samples: int) -> None:
    """Parts 0, 1, … must hold samples 0..num_samples-1 in order, each once."""
    owner: dict[int, int] = {}
    for b, index in enumerate(indices):
        for i in index.tolist():
            if i in owner:
                raise RuntimeError(f"sample {i} is held by both {_part_name(owner[i])} and {_part_name(b)} in {parts}; "
                                   "run the same command again to sample the wrong one again")
            owner[i] = b
    start = 0
    for b, index in enumerate(indices):
        if not np.array_equal(index, np.arange(start, start + len(index))):
            raise RuntimeError(f"{parts / _part_name(b)} holds samples {_span(index)} where samples from {start} "
                               f"belong; run the same command again to sample it again")
        start += len(index)
    if start != num_samples:
        raise RuntimeError(f"sample parts in {parts} hold {start} samples, not {num_samples}; "
                           "run the same command again to sample the wrong ones again")
