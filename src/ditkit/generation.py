"""From a model to images: ``ditkit.sample`` for a notebook, and ``sample_checkpoint``, the work of
``ditkit sample`` (many samples on many processes into an ADM ``.npz`` and a PNG grid).

Both prepare the network through the one door for speed (``ditkit.fast.sample_speed``); with FP8
the static activation scales are calibrated on 8 samples of their own (noise and labels from seed
12345), never on the samples returned.
"""
from __future__ import annotations

import copy
import math
import weakref
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ditkit.config import Config, from_dict
from ditkit.data.context import pad_contexts
from ditkit.fast import SampleSpeed, sample_speed
from ditkit.fast.recipes import resolve_sample_speed
from ditkit.models.grid import as_size
from ditkit.objectives import build_objective
from ditkit.sampling import (
    check_finite,
    check_sample_request,
    generate,
    grid_labels,
    sample_labels,
    sample_noise,
    sample_to_npz,
    save_sample_grid,
)
from ditkit.utils.images import save_grid, stretched_images, to_uint8

CALIBRATION_SAMPLES, CALIBRATION_SEED = 8, 12345


@dataclass
class Samples:
    """What ``ditkit.sample`` returns."""
    images: np.ndarray  # (N, H, W, 3) uint8: decoded through the VAE for latent models, else shown as they are
    x: torch.Tensor  # (N, C, H, W) float32 on the CPU: what the network made (latents, normalised per channel under
    #                  data.latent_norm=channel; pixels; normalised fields)
    labels: torch.Tensor | None  # (N,) class ids, or None for an unconditional model
    nfe: int  # network evaluations per batch (guidance counts its doubled batch once)


def with_sample_settings(cfg: Config, **settings) -> Config:
    """``cfg`` with ``sample.<key>`` set for every setting that is not None, validated."""
    given = {k: list(v) if isinstance(v, tuple) else v for k, v in settings.items() if v is not None}
    return from_dict({"sample": given}, copy.deepcopy(cfg)).validate() if given else cfg


def _calibration_run(objective, cfg: Config, shape: tuple[int, ...], device, kwargs: dict | None = None):
    """net -> one sampler run on ``CALIBRATION_SAMPLES`` samples of their own (for FP8's static scales);
    with ``kwargs`` (conditions), on as many samples as they hold rows."""
    idx = range(len(next(iter(kwargs.values()))) if kwargs else CALIBRATION_SAMPLES)
    noise = sample_noise(idx, shape, CALIBRATION_SEED).to(device)
    if kwargs is None:
        kwargs = ({"y": sample_labels(idx, cfg.model.num_classes, "random", CALIBRATION_SEED).to(device)}
                  if cfg.model.num_classes else {})
    return lambda net: generate(net, objective, noise, kwargs, cfg.sample, progress=False)


_prepared: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()


def prepare_network(model: nn.Module, cfg: Config, speed: str | SampleSpeed, device: torch.device,
                    calibration_kwargs: dict | None = None, copy_model: bool = True) -> tuple[nn.Module, list[str]]:
    """The network to sample ``model`` with under ``speed`` (``ditkit.fast.sample_speed``) and its notes.
    With ``copy_model`` the levers act on a copy, so ``model`` itself stays the reference network; the
    prepared copy is kept for the next call with the same speed and sampler settings."""
    key = (speed, cfg.sample.sampler, cfg.sample.steps, cfg.sample.cfg_scale)
    cache = _prepared.setdefault(model, {}) if copy_model else {}
    if key in cache:
        return cache[key], []
    plain = resolve_sample_speed(speed, device)[0] == SampleSpeed()  # the reference numerics change nothing
    target = copy.deepcopy(model) if copy_model and not plain else model
    shape = (cfg.model.in_channels, *as_size(cfg.model.input_size))
    calibrate = _calibration_run(build_objective(cfg), cfg, shape, device, calibration_kwargs)
    net, notes = sample_speed(target, speed, device, calibrate=calibrate)
    cache[key] = net
    return net, notes


def _images(x: torch.Tensor, cfg: Config, vae) -> np.ndarray:
    if cfg.data.kind == "latents" and vae is not None:
        from ditkit.data.latents import decode_latents

        return to_uint8(decode_latents(vae, x, cfg.data))
    if x.dim() == 4 and (cfg.data.kind in ("digits", "images") or cfg.model.in_channels in (1, 3)):
        return to_uint8(x)
    return stretched_images(x)  # latents without a VAE, fields, volumes, videos, sequences: the first channel


@torch.no_grad()
def sample(model: nn.Module, cfg: Config, labels: list[int] | torch.Tensor | None = None, num_samples: int | None = None,
           steps: int | None = None, cfg_scale: float | None = None, sampler: str | None = None, vae=None, seed: int = 0,
           speed: str | SampleSpeed = "auto", batch_size: int = 64, params: torch.Tensor | None = None,
           field: torch.Tensor | None = None, context=None, progress: bool = True, **settings) -> Samples:
    """Samples from ``model`` (from ``ditkit.load_model``) with the sampler of ``cfg`` unless given.

    ``labels``: class ids or class names (``cfg.data.class_names``), one sample each (default:
    ``num_samples`` of them, classes in turn);
    ``vae``: a VAE (``ditkit.models.vae.load_vae``) or a local path, to decode latent models' samples (the run's
    per-channel normalisation undone, then the cache's scale and shift: ``ditkit.data.latents.decode_latents``);
    ``params`` (N, P) and ``field`` (N, C, H, W): the conditions of a field model, in the model's
    (normalised) units; ``context``: the sequences of embeddings of a model with ``model.context_dim``, one (M_i, E)
    array or tensor per sample, M_i varying (or a folder of such files, one sample per file in natural name order: ``load_contexts``);
    ``seed``: sample i's noise comes from (seed, i), whatever the batch size;
    ``speed``: a recipe name or ``SampleSpeed`` (``ditkit.fast``; ``model`` itself is not changed);
    ``settings``: any other ``sample.<key>`` for this call, e.g. ``grid="shifted", shift=3.33``, ``eta``,
    ``guidance_interval=(0.1, 0.9)``, ``guided_channels``, ``sde_diffusion`` (``ditkit config`` lists them).
    NaN or inf in ``params``, ``field`` or ``cfg_scale`` is refused: it would only yield NaN samples."""
    device = next(model.parameters()).device
    if cfg.data.kind == "sequences":
        raise ValueError(SEQUENCES_HINT)
    if labels is not None:
        if cfg.model.num_classes <= 0:
            raise ValueError("this model is unconditional (num_classes=0): give no labels")
        if torch.is_tensor(labels):
            labels = labels.reshape(-1).tolist()
        elif isinstance(labels, (str, int)):
            labels = [labels]
        labels = torch.tensor(class_ids(list(labels), cfg), dtype=torch.long)
    for name, value in (("params", params), ("field", field)):
        if value is not None:
            check_finite(name, torch.as_tensor(value))
    contexts = _contexts(context, cfg)
    given = [len(v) for v in (labels, params, field, contexts) if v is not None]
    n = num_samples if num_samples is not None else (given[0] if given else 16)
    check_sample_request(n, batch_size, cfg_scale, settings.get("guidance_interval"), cli=False)
    cfg = with_sample_settings(cfg, steps=steps, cfg_scale=cfg_scale, sampler=sampler, **settings)
    if any(g != n for g in given):
        raise ValueError(f"labels/params/field/context hold {given} rows, but {n} samples were asked for")
    if isinstance(vae, (str, Path)):
        from ditkit.models.vae import load_vae

        vae = load_vae(vae, device=device)
    conds = {k: v for k, v in (("params", params), ("field", field)) if v is not None}
    calibration = {k: v[:CALIBRATION_SAMPLES].to(device) for k, v in conds.items()}
    if contexts is not None:
        calibration |= {k: v.to(device) for k, v in zip(("context", "context_mask"), pad_contexts(contexts[:CALIBRATION_SAMPLES]))}
    net, notes = prepare_network(model, cfg, speed, device, calibration_kwargs=calibration or None)
    for note in notes:
        print(note)
    objective = build_objective(cfg)
    shape = (cfg.model.in_channels, *as_size(cfg.model.input_size))
    if cfg.model.num_classes > 0 and labels is None:
        labels = sample_labels(range(n), cfg.model.num_classes, "balanced", seed)
    xs, nfe = [], 0
    from tqdm import tqdm

    bar = tqdm(total=n, desc="sample", unit="img", disable=not progress, dynamic_ncols=True)
    for start in range(0, n, batch_size):
        idx = range(start, min(start + batch_size, n))
        kwargs = {k: v[idx.start:idx.stop].float().to(device) for k, v in conds.items()}
        if labels is not None:
            kwargs["y"] = labels[idx.start:idx.stop].to(device)
        if contexts is not None:
            ctx, ctx_mask = pad_contexts(contexts[idx.start:idx.stop])
            kwargs |= {"context": ctx.to(device), "context_mask": ctx_mask.to(device)}
        torch.manual_seed(seed * 1_000_003 + start)  # the sampler's own noise (DDPM, SDE) for this batch
        x, nfe = generate(net, objective, sample_noise(idx, shape, seed).to(device), kwargs, cfg.sample, progress=False)
        xs.append(x.float().cpu())
        bar.update(len(idx))
    bar.close()
    x = torch.cat(xs)
    return Samples(images=_images(x, cfg, vae), x=x, labels=labels, nfe=nfe)


def load_contexts(path: str | Path) -> list[torch.Tensor]:
    """The sequences of embeddings in a folder (``.npy``/``.safetensors`` files, each (M, E), in natural name order:
    ``context_file_list``) or in one such file: one sample each."""
    from ditkit.data.context import read_context

    return [torch.from_numpy(read_context(f)) for f in context_file_list(path)]


def context_file_list(path: str | Path) -> list[Path]:
    """The files of a folder of sequences of embeddings in natural name order (``q2`` before ``q10``), or the one
    file ``path``: the order in which ``--context`` gives them to samples."""
    import re

    from ditkit.data.context import context_files

    path = Path(path)
    if path.is_file():
        return [path]
    natural = lambda name: [(0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", name) if t]  # noqa: E731
    return [f for _, f in sorted(context_files(path).items(), key=lambda kv: natural(kv[0]))]


def _contexts(context, cfg: Config) -> list[torch.Tensor] | None:
    """``sample``'s ``context`` as a list of (M_i, E) float tensors, checked against the model."""
    E = cfg.model.context_dim
    if context is None:
        if E:
            raise ValueError(f"this model is conditioned on sequences of embeddings (model.context_dim={E}): give "
                             "context=[one (M, E) array per sample] or a folder of such .npy files (ditkit sample: "
                             "--context DIR)")
        return None
    if not E:
        raise ValueError("this model takes no sequences of embeddings (model.context_dim=0): give no context")
    items = load_contexts(context) if isinstance(context, (str, Path)) else list(context)
    out = []
    for i, c in enumerate(items):
        c = torch.as_tensor(np.asarray(c, dtype=np.float32) if not torch.is_tensor(c) else c).float()
        c = c[None] if c.dim() == 1 else c
        if c.dim() != 2 or c.shape[1] != E:
            raise ValueError(f"context {i} has shape {tuple(c.shape)}; the model takes (M, {E})")
        check_finite(f"context {i}", c)
        out.append(c)
    return out


def sampler_text(cfg: Config) -> str:
    """'heun, 50 steps, shifted grid (shift 3.33), guidance 4.0': what a sample line says of the sampling."""
    s = cfg.sample
    grid = ""
    if s.grid == "shifted":
        grid = f", shifted grid (shift {s.shift if s.shift is not None else cfg.objective.shift:g})"
    return f"{s.sampler}, {s.steps} steps{grid}, {guidance_text(cfg)}"


def guidance_text(cfg: Config) -> str:
    """'guidance s' for a model with a condition to guide by; 'unconditional' for one without."""
    m = cfg.model
    if not (m.num_classes or m.num_params or m.cond_channels or m.context_dim):
        return "unconditional"
    return f"guidance {cfg.sample.cfg_scale}"


def read_npz(path: str | Path, need: list[str], what: str) -> dict[str, np.ndarray]:
    """The float64 arrays ``need`` of the .npz at ``path`` (``what`` they are for, in the messages); a missing,
    damaged or foreign file, or a missing array, is one ``ValueError`` naming the file."""
    import pickle

    from ditkit.eval.batches import damaged_npz_as_value_error

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{what} file {path} does not exist")
    with damaged_npz_as_value_error(path):
        try:
            data = np.load(path)
        except (ValueError, pickle.UnpicklingError):  # numpy's reading of a file that is neither .npy nor .npz
            raise ValueError(f"{what} file {path} is not an .npz file (numpy.savez writes one)") from None
        if not hasattr(data, "files"):
            raise ValueError(f"{what} file {path} is a .npy array, not an .npz with {', '.join(map(repr, need))}")
        with data:
            missing = [k for k in need if k not in data.files]
            if missing:
                raise ValueError(f"{what} file {path} has no {', '.join(map(repr, missing))} array (it has: "
                                 f"{', '.join(data.files) or 'none'})")
            return {k: np.asarray(data[k], dtype=np.float64) for k in need}


SEQUENCES_HINT = ("a model of sequences of mixed lengths samples one sequence per length: ditkit sample --lengths "
                  "64,128,..., or ditkit.generation.sample_sequences(checkpoint, lengths=[64, 128, ...])")


class SampledSequences(list):
    """``sample_sequences``' arrays, one per asked size, with what each was asked for: ``labels`` (class ids, or
    None), ``class_names`` (the run's, or None) and ``params`` ((N, P) in the data's units, or None)."""
    labels: np.ndarray | None = None
    class_names: list[str] | None = None
    params: np.ndarray | None = None


@torch.no_grad()
def sample_sequences(ckpt: str | Path, lengths: list[int], labels: list[int] | None = None, seed: int = 0,
                     ema: bool = True, device: str | None = None, context=None, params=None, batch_size: int = 250,
                     progress: bool = False, speed: str | SampleSpeed | None = None,
                     **settings) -> SampledSequences:
    """One sequence per length in ``lengths`` from a checkpoint trained on ``data.kind=sequences``, each a (C, L_i)
    float64 array in the data's units (the run's per-channel normalisation undone); for a run on images or volumes of
    different sizes (``data.axes`` 2 or 3), ``lengths`` holds one size tuple per sample, e.g. (4, 16, 16).  ``labels``: class ids or names,
    one per length (default: classes in turn); ``context``: a model's sequences of embeddings, one (M_i, E) array per
    length, or a folder of such files (``load_contexts``); ``settings``: ``sample.<key>`` overrides (steps, cfg_scale,
    sampler); ``params``: (N, P) parameters in the data's units, one row per length, for a run with
    ``data.params_file``.  Samples go through the network ``batch_size`` at a time, grouped by size so that little is
    padding; sample i's noise comes from its own seed, so a deterministic sampler gives it whatever the batch
    (the DDPM and SDE samplers' per-step noise is seeded per batch).  ``speed``: the sampling recipe or levers
    (default: the config's ``sample.speed``), as for ``ditkit.sample``; its notes are printed."""
    from ditkit.checkpoints import load_run
    from ditkit.data.sequences import SequenceNormalizer
    from ditkit.sampling import generate_sizes

    model, cfg, stored = load_run(ckpt, use_ema=ema, device=device or ("cuda" if torch.cuda.is_available() else "cpu"))
    device = next(model.parameters()).device
    if cfg.data.kind != "sequences" or "normalizer" not in stored:
        raise ValueError(f"{ckpt} is not a checkpoint of a run on data.kind=sequences")
    cfg = with_sample_settings(cfg, **settings)
    kwargs = {}
    if cfg.model.num_classes > 0:
        ids = class_ids(list(labels), cfg) if labels is not None else sample_labels(range(len(lengths)),
                                                                                      cfg.model.num_classes,
                                                                                      "balanced", seed).tolist()
        if len(ids) != len(lengths):
            raise ValueError(f"{len(ids)} labels for {len(lengths)} lengths")
        kwargs["y"] = torch.tensor(ids, device=device)
    sizes = [tuple(n) if isinstance(n, (tuple, list)) else (int(n),) for n in lengths]
    check_sizes(sizes, model.grid)
    norm = SequenceNormalizer(stored["normalizer"])
    P = cfg.model.num_params
    if P and params is None:
        raise ValueError(f"{ckpt} is conditioned on {P} parameters: give params (N, {P}) in the data's units, one row "
                         "per sample (ditkit sample: --cond FILE.npz holding 'params')")
    if params is not None:
        params = torch.as_tensor(np.asarray(params, dtype=np.float64))
        if not P or tuple(params.shape) != (len(lengths), P):
            raise ValueError(f"params of shape {tuple(params.shape)}; the model takes ({len(lengths)}, {P})")
        check_finite("params", params)
        kwargs["params"] = norm.normalize_params(params).float().to(device)
    contexts = _contexts(context, cfg)
    if contexts is not None:
        if len(contexts) != len(lengths):
            raise ValueError(f"{len(contexts)} context sequences for {len(lengths)} lengths")
        ctx, ctx_mask = pad_contexts(contexts)
        kwargs |= {"context": ctx.to(device), "context_mask": ctx_mask.to(device)}
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    from tqdm import tqdm

    from ditkit.data.sampler import step_seed

    calibration = {k: v[:CALIBRATION_SAMPLES] for k, v in kwargs.items()}  # FP8's scales: the model's full size
    net, notes = prepare_network(model, cfg, speed or cfg.sample.speed, device, calibration_kwargs=calibration or None,
                                 copy_model=False)
    for note in notes:
        print(note)
    objective = build_objective(cfg)
    order = sorted(range(len(sizes)), key=lambda i: (math.prod(sizes[i]), sizes[i]))  # like sizes batch together
    out = SampledSequences([None] * len(sizes))
    out.labels = np.array(kwargs["y"].tolist()) if "y" in kwargs else None
    out.class_names = list(cfg.data.class_names or []) if "y" in kwargs else None
    out.params = None if params is None else params.numpy()
    bar = tqdm(total=len(sizes), desc="sample", unit="sample", disable=not progress or len(sizes) <= batch_size)
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        torch.manual_seed(step_seed(seed, start, 3))  # the sampler's own noise (DDPM, SDE) for this batch
        seqs, _ = generate_sizes(net, objective, [sizes[i] for i in chunk],
                                 {k: v[torch.tensor(chunk, device=v.device)] for k, v in kwargs.items()}, cfg.sample,
                                 channels=cfg.model.in_channels, seeds=[step_seed(seed, i, 1) for i in chunk])
        for i, s in zip(chunk, seqs):
            out[i] = norm.denormalize(s.double().cpu()).numpy()
        bar.update(len(chunk))
    bar.close()
    return out


def check_sizes(sizes: list[tuple[int, ...]], grid) -> None:
    """The sizes asked of a model of sequences or of mixed sizes (``ditkit sample --lengths``): each positive, no
    larger than the model's size and a multiple of its patch on every axis; else one ``ValueError`` naming the size."""
    if not sizes:
        raise ValueError("--lengths: no size asked")
    for size in sizes:
        text = "x".join(map(str, size))
        if len(size) != grid.dims:
            example = "x".join(map(str, grid.size))
            raise ValueError(f"--lengths: {text} has {len(size)} ax{'i' if len(size) == 1 else 'e'}s; this model's "
                             f"samples have {grid.dims} "
                             f"({', '.join(grid.axes)}), e.g. {example}")
        for n, m, p, axis in zip(size, grid.size, grid.patch, grid.axes):
            where = "" if grid.dims == 1 else f" on axis {axis}"
            if n < 1:
                raise ValueError(f"--lengths: {text} must be positive{where}")
            if n > m:
                raise ValueError(f"--lengths: {text} is larger than the model's {m}{where} (model.input_size)")
            if n % p:
                raise ValueError(f"--lengths: {text} is not a multiple of the patch size {p}{where}")


def sequences_to_npz(ckpt: str | Path, out: str | Path, lengths: list[int], **kwargs) -> str:
    """``ditkit sample --lengths``: ``sample_sequences`` into ``out/samples.npz``, one key per sample (``seq_0000``,
    a (C, L_i) array), ``lengths`` (or ``sizes``) and what was asked: ``labels`` and ``class_names``, ``params``,
    ``context_files``, where the model takes them.  Returns the line to print."""
    from ditkit.utils.io import atomic_save_npz

    seqs = sample_sequences(ckpt, lengths, **kwargs)  # a context folder: one file per length, in natural name order
    path = Path(out) / "samples.npz"
    path.parent.mkdir(parents=True, exist_ok=True)
    sizes = np.array([s.shape[1:] for s in seqs])
    key = {"lengths": sizes[:, 0]} if sizes.shape[1] == 1 else {"sizes": sizes}
    asked = {k: v for k, v in (("labels", seqs.labels), ("params", seqs.params)) if v is not None}
    if seqs.class_names:
        asked["class_names"] = np.array(seqs.class_names)
    context = kwargs.get("context")
    if isinstance(context, (str, Path)):  # the files, in the order they were taken
        asked["context_files"] = np.array([str(p) for p in context_file_list(context)])
    atomic_save_npz(path, **key, **asked, **{f"seq_{i:04d}": s for i, s in enumerate(seqs)})
    what = f"lengths {sizes.min()} to {sizes.max()}" if sizes.shape[1] == 1 else "sizes " + ", ".join(
        "×".join(map(str, s)) for s in sizes[:4]) + (", ..." if len(sizes) > 4 else "")
    return f"{len(seqs)} samples of {what}, in the data's units -> {path}"


#################################################################################
#                  ditkit sample: a checkpoint to an .npz and a grid                 #
#################################################################################


def class_ids(labels, cfg: Config) -> list[int]:
    """Class ids from ids or class names (``cfg.data.class_names``, kept from the training data's class
    folders or latent cache), each checked against the model's ``num_classes``."""
    names = cfg.data.class_names or []
    ids = []
    for label in labels:
        if isinstance(label, str) and not label.strip().lstrip("-").isdigit():
            if label not in names:
                known = f"the model's classes are {', '.join(names[:20])}{' ...' if len(names) > 20 else ''}" if names \
                    else "this model keeps no class names (give class ids)"
                raise ValueError(f"unknown class name {label!r}: {known}")
            ids.append(names.index(label))
        else:
            ids.append(int(label))
    bad = [i for i in ids if not 0 <= i < cfg.model.num_classes]
    if bad:
        raise ValueError(f"label {bad[0]} is out of range: the model has {cfg.model.num_classes} classes "
                         f"(0..{cfg.model.num_classes - 1})")
    return ids


def _class_ids(text: str, cfg: Config) -> list[int]:
    """``--labels 3,7`` or ``--labels cat,dog`` (names where the model keeps them)."""
    return class_ids([v.strip() for v in text.split(",") if v.strip()], cfg)


def _vae_needed(cfg: Config) -> str:
    """The message for a latent model sampled without a VAE: it names the VAE its cache was made with, where the
    run's cache (``data.path``) or ``train.vae`` still says."""
    from ditkit.data.latents import read_manifest

    made_with = cfg.train.vae
    if made_with is None and cfg.data.path:
        try:
            made_with = read_manifest(cfg.data.path).get("vae")
        except (OSError, ValueError):
            made_with = None
    which = f"the VAE its latents were made with, {made_with}" if made_with else \
        "the VAE its latents were made with (sd-vae-ft-ema or -mse for the official checkpoints)"
    return f"this model samples VAE latents; give --vae PATH, a local folder of {which}"


def _decoder(cfg: Config, vae_path: str | None, device, stored: dict | None = None):
    """x -> (uint8 N×H×W×3, raw float array or None) for the data kind of the run; arrays (``data.kind=fields``)
    come back in the data's units through the checkpoint's normaliser."""
    if cfg.data.kind == "latents":
        if vae_path is None:
            raise ValueError(_vae_needed(cfg))
        from ditkit.data.latents import decode_latents
        from ditkit.models.vae import load_vae

        vae = load_vae(vae_path, device=device)
        return lambda x: (to_uint8(decode_latents(vae, x, cfg.data)), None)
    units = _data_units(cfg, stored)
    if units is not None:
        return lambda x: (stretched_images(x), units(x).numpy())
    return lambda x: (to_uint8(x) if x.dim() == 4 else stretched_images(x), x.float().cpu().numpy())


def _data_units(cfg: Config, stored: dict | None):
    """For arrays (``data.kind=fields``): x -> the samples in the data's units (float32 on the CPU), through the
    checkpoint's normaliser; None for other kinds."""
    if cfg.data.kind != "fields" or stored is None or "normalizer" not in stored:
        return None
    from ditkit.data.fields import FieldNormalizer

    norm = FieldNormalizer(stored["normalizer"])
    return lambda x: norm.denormalize(x.double().cpu(), "x").float()


def sample_checkpoint(ckpt: str | Path, out: str | Path, num_samples: int = 100, batch_size: int = 250,
                      settings: dict | None = None, speed: str | None = None, labels: str = "balanced", seed: int = 0,
                      vae: str | None = None, cond: str | None = None, ema: bool = True,
                      device: str | None = None, context: str | None = None) -> str:
    """``ditkit sample``: ``num_samples`` from a checkpoint of any format into ``out/samples.npz`` (ADM layout,
    resumable, one part per batch, on every process of a torchrun launch) and ``out/grid.png``; a field model
    takes its conditions from ``cond`` (an .npz in physical units), a model of sequences of embeddings from ``context``
    (a folder of (M, E) files, one sample per file: ``load_contexts``).  ``speed``: a recipe or levers (default: the
    config's ``sample.speed``).  The parts record the checkpoint by its content (SHA-256), so a rerun into ``out``
    after the file at ``ckpt`` was replaced by another model is refused.  Returns the line to print."""
    from ditkit.checkpoints import load_run
    from ditkit.training.distributed import barrier, cleanup, setup_distributed
    from ditkit.utils.io import content_sha256

    settings = settings or {}
    check_sample_request(num_samples, batch_size, settings.get("cfg_scale"), settings.get("guidance_interval"))
    info = setup_distributed(device)
    try:
        model, cfg, stored = load_run(ckpt, use_ema=ema, device=info.device)
        if stored.get("origin") == "pretrained" and settings.get("cfg_scale") is None and info.is_main:
            print(f"guidance scale {cfg.sample.cfg_scale:g}: the official sample.py's default for weights without a run "
                  "config (--cfg-scale to change it)")
        cfg = with_sample_settings(cfg, **settings)
        if cfg.data.kind == "sequences":
            raise ValueError(SEQUENCES_HINT)
        speed = speed or cfg.sample.speed
        if cfg.model.context_dim or context is not None:
            return _sample_contexts(model, cfg, context, out, batch_size, speed, labels, seed, vae, info.device, stored)
        if cfg.model.num_params or cfg.model.cond_channels:
            return _sample_fields(ckpt, model, cfg, stored, cond, out, batch_size, speed, seed, info.device)
        net, notes = prepare_network(model, cfg, speed, info.device, copy_model=False)
        for note in notes:
            print(note)
        wanted = labels if labels in ("balanced", "random") else _class_ids(labels, cfg)
        out = Path(out)
        s = resolve_sample_speed(speed, info.device)[0]  # the levers that change the numbers (compilation does not)
        source = (f"{Path(ckpt).resolve()} sha256={content_sha256(ckpt)} ema={ema} precision={s.precision} "
                  f"fp8={s.fp8} fp8_mlp={s.fp8_mlp}")
        path = sample_to_npz(net, build_objective(cfg), cfg, num_samples, out, batch_size, seed=seed, labels=wanted,
                             decode=_decoder(cfg, vae, info.device, stored), rank=info.rank, world_size=info.world_size,
                             device=info.device, barrier=lambda: barrier(info), source=source)
        if path is None:
            return ""
        _write_grid(path, cfg, out / "grid.png")
        return (f"{num_samples} samples ({sampler_text(cfg)}) "
                f"-> {path}; grid -> {out / 'grid.png'}")
    finally:
        cleanup(info)


def _write_grid(npz: Path, cfg: Config, path: Path) -> None:
    """Up to 10 classes × 10 samples (or the first 100) of a merged ``samples.npz``."""
    with np.load(npz) as data:
        images, y = data["arr_0"], data["arr_1"]
    if cfg.model.num_classes > 0:
        wanted = grid_labels(min(cfg.model.num_classes, 10), per_class=10)
        picks = [int(np.flatnonzero(y == c)[k]) for c, k in zip(wanted.tolist(), list(range(10)) * 10) if (y == c).sum() > k]
        images = images[picks]
    save_grid(images[:100], path, nrow=10, scale=max(1, 64 // images.shape[1]))


def _sample_contexts(model, cfg: Config, context: str | None, out, batch_size: int, speed, labels: str, seed: int,
                     vae, device, stored: dict | None = None) -> str:
    """A model conditioned on sequences of embeddings: one sample per file of ``context``, into ``out/samples.npz``
    (ADM's arr_0 images and arr_1 labels, and the raw float ``samples``) and ``out/grid.png``, in the files' order."""
    from ditkit.utils.io import atomic_save_npz

    if context is None:
        raise ValueError(f"this model is conditioned on sequences of embeddings (model.context_dim="
                         f"{cfg.model.context_dim}): give --context FOLDER of (M, E) .npy/.safetensors files, one per sample")
    contexts = _contexts(context, cfg)
    wanted = None if labels in ("balanced", "random") or not cfg.model.num_classes else _class_ids(labels, cfg)
    if wanted is not None and len(wanted) not in (1, len(contexts)):
        raise ValueError(f"--labels gives {len(wanted)} classes for {len(contexts)} context files: give one, or one each")
    if wanted is not None and len(wanted) == 1:
        wanted = wanted * len(contexts)
    if cfg.data.kind == "latents" and vae is None:
        raise ValueError(_vae_needed(cfg))
    result = sample(model, cfg, labels=wanted, num_samples=len(contexts), vae=vae, seed=seed, speed=speed,
                    batch_size=batch_size, context=contexts)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    units = _data_units(cfg, stored)
    arrays = {"arr_0": result.images, "samples": (result.x if units is None else units(result.x)).numpy()}
    if result.labels is not None:
        arrays["arr_1"] = result.labels.numpy()
    atomic_save_npz(out / "samples.npz", **arrays)
    save_grid(result.images[:100], out / "grid.png", nrow=10, scale=max(1, 64 // result.images.shape[1]))
    return (f"{len(contexts)} samples, one per file of {context} ({sampler_text(cfg)}) -> {out / 'samples.npz'}; "
            f"grid -> {out / 'grid.png'}")


def _sample_fields(ckpt, model, cfg: Config, stored: dict, cond: str | None, out, batch_size: int, speed, seed: int,
                   device) -> str:
    """A model conditioned on parameters and/or fields: one sample per condition of ``cond``, in physical
    units (the run's normaliser applied on the way in and undone on the way out)."""
    from ditkit.eval.field_benchmark import field_generator, field_normalizer
    from ditkit.utils.io import atomic_save_npz

    if cond is None:
        raise ValueError(f"{ckpt} is conditioned on parameters/fields: give --cond FILE.npz with 'params' (N, P) "
                         "and/or 'field' (N, C, H, W) in physical units")
    norm = field_normalizer(ckpt, stored)
    need = [k for k, on in (("params", cfg.model.num_params), ("field", cfg.model.cond_channels)) if on]
    arrays = {k: torch.from_numpy(v) for k, v in read_npz(cond, need, "--cond").items()}
    for k, v in arrays.items():
        check_finite(f"{cond}: {k!r}", v)
    first = {k: norm.normalize(v[:CALIBRATION_SAMPLES], k).float().to(device) for k, v in arrays.items()}
    net, notes = prepare_network(model, cfg, speed, device, calibration_kwargs=first, copy_model=False)
    for note in notes:
        print(note)
    x = field_generator(net, cfg, norm, device, batch_size=batch_size, seed=seed)(arrays.get("params"),
                                                                                    arrays.get("field")).float()
    out = Path(out)
    atomic_save_npz(out / "samples.npz", samples=x.numpy(), **{k: v.numpy() for k, v in arrays.items()})
    save_sample_grid(x[:64], cfg, out / "grid.png", nrow=8)
    return f"{len(x)} fields in physical units ({sampler_text(cfg)}) -> {out / 'samples.npz'}"
