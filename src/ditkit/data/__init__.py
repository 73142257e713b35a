"""Datasets by kind, and the split of a batch into the clean sample x0 and the network's conditioning.

The trainer sees dicts: "x" (the clean sample: pixels, a VAE latent drawn from its cached
posterior, a normalised field) and the conditioning the model takes: "y" (class label),
"params" (continuous parameters), "field" (spatial conditioning), "context" and "context_mask" (per-sample
sequences of embeddings, padded by ``ditkit.data.context.WithContext.collate``); and what the loss alone reads:
"image" (the pixels beside cached latents, for REPA's encoder), "mask" (the (B, L) padding mask of a batch of
sequences, made by their collate, ``ditkit.data.sequences.pad_batch``; the loss hands it on to the network)."""
from __future__ import annotations

import torch
from torch.utils.data import Dataset

from ditkit.config import Config, ConfigError
from ditkit.data.sampler import step_seed

COND_KEYS = ("y", "params", "field", "context", "context_mask")
LOSS_KEYS = ("image", "mask")


class EpochIndexed(Dataset):
    """Adapts any dataset to the trainer: items are looked up by (epoch, index), so that random
    augmentation (flips, posterior draws) is a function of (seed, epoch, index), the same in any
    worker and after a resume; items come out as dicts ("x" and the conditioning keys the model
    takes)."""

    def __init__(self, inner: Dataset, seed: int, keep: tuple[str, ...]):
        self.inner, self.seed, self.keep = inner, seed, keep

    def __len__(self) -> int:
        return len(self.inner)

    def __getitem__(self, key: tuple[int, int]) -> dict:
        epoch, index = key
        if hasattr(self.inner, "set_epoch"):
            self.inner.set_epoch(epoch)
        # For datasets that draw from the global RNG.  Items are made on the CPU, so only its generator is seeded:
        # torch.manual_seed would also queue a CUDA seeding with a captured stack trace (about 0.5 ms an item).
        torch.random.default_generator.manual_seed(step_seed(self.seed, epoch, index))
        item = self.inner[index]
        if not isinstance(item, dict):  # (x, label) datasets
            item = {"x": item[0], "y": torch.as_tensor(item[1], dtype=torch.long)}
        return {k: v for k, v in item.items() if k == "x" or k in self.keep}


def build_dataset(cfg: Config) -> EpochIndexed:
    """The dataset ``cfg.data`` names, wrapped for the trainer."""
    d, kind = cfg.data, cfg.data.kind
    if kind == "digits":
        from ditkit.data.digits import DigitsDataset

        inner = DigitsDataset()
    elif d.path is None:
        raise ConfigError(f"data.path must be set for data.kind={kind}")
    elif kind == "latents":
        from ditkit.data.latents import LatentDataset, norm_stats

        try:
            inner = LatentDataset(d.path, flip=d.flip, seed=cfg.train.seed, images=cfg.model.repa_depth is not None,
                                  norm=norm_stats(d))
        except ValueError as err:
            raise ConfigError(f"data.path: {err}") from None
    elif kind == "images":
        from ditkit.data.images import ImageDataset

        # num_classes=0 (unconditional): every image is a sample, labels are not read; "y" is not kept below.
        inner = ImageDataset(d.path, image_size=d.image_size, labels_file=d.labels_file,
                             num_classes=cfg.model.num_classes, random_flip=d.flip, seed=cfg.train.seed)
    elif kind == "fields":
        from ditkit.data.fields import FieldDataset

        try:
            inner = FieldDataset(d.path, d.params_file, d.field_file, param_names=d.param_names,
                                 log_channels=d.log_transform, field_log_channels=d.field_log_transform,
                                 augment=d.flip, axes=d.axes)
        except ValueError as err:
            raise ConfigError(f"data.path: {err}") from None
    elif kind == "sequences":
        from ditkit.data.facts import patch_sizes
        from ditkit.data.sequences import SequenceDataset

        try:
            axes = d.axes or 1
            inner = SequenceDataset(d.path, patch_sizes(cfg, axes), classes=cfg.model.num_classes > 0, axes=axes,
                                    params_file=d.params_file, param_names=d.param_names,
                                    pad_multiple=d.pad_multiple, max_size=tuple(cfg.model.input_size)
                                    if isinstance(cfg.model.input_size, list) else None)
        except ValueError as err:
            raise ConfigError(f"data.path: {err}") from None
    else:
        raise ConfigError(f"unknown data.kind {kind!r}")
    if bool(d.context_path) != bool(cfg.model.context_dim):
        raise ConfigError("data.context_path (a folder of per-sample embeddings) and model.context_dim (their width) "
                          f"go together; got data.context_path={d.context_path!r}, model.context_dim={cfg.model.context_dim}")
    if d.context_path:
        from ditkit.data.context import WithContext

        try:
            inner = WithContext(inner, d.context_path)
        except ValueError as err:
            raise ConfigError(f"data.context_path: {err}") from None
        if inner.dim != cfg.model.context_dim:
            raise ConfigError(f"data.context_path: {inner.files[0]} has entries of width {inner.dim}, but "
                              f"model.context_dim is {cfg.model.context_dim}")
    found = getattr(inner, "num_classes", None)
    if found is not None and cfg.model.num_classes > 0 and found > cfg.model.num_classes:
        raise ConfigError(f"data at {d.path or kind} has {found} classes but model.num_classes is {cfg.model.num_classes}")
    keep = tuple(k for k, on in (("y", cfg.model.num_classes > 0), ("params", cfg.model.num_params > 0),
                                 ("field", cfg.model.cond_channels > 0), ("image", cfg.model.repa_depth is not None),
                                 ("context", cfg.model.context_dim > 0))
                 if on)
    return EpochIndexed(inner, cfg.train.seed, keep)


def split_batch(batch: dict, device: torch.device) -> tuple[torch.Tensor, dict]:
    """(x0, model_kwargs) on ``device``."""
    x0 = batch["x"].to(device, non_blocking=True)
    kwargs = {k: batch[k].to(device, non_blocking=True) for k in COND_KEYS if k in batch}
    return x0, kwargs


def loss_inputs(batch: dict, device: torch.device) -> dict:
    """The batch's inputs of the loss alone (``LOSS_KEYS``), on ``device``: keyword arguments of ``objective.loss``."""
    return {k: batch[k].to(device, non_blocking=True) for k in LOSS_KEYS if k in batch}
