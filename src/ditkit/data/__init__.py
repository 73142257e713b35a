"""Datasets by kind, and the split of a batch into the clean sample x0 and the network's conditioning.

Every dataset yields dicts: "x" (the sample, or "mean"/"std" of a VAE posterior for cached
latents), and optionally "y" (class label), "params" (continuous parameters), "field" (spatial
conditioning)."""
from __future__ import annotations

import torch

from ditkit.config import Config, ConfigError

COND_KEYS = ("y", "params", "field")


def build_dataset(cfg: Config):
    kind = cfg.data.kind
    if kind == "digits":
        from ditkit.data.digits import DigitsDataset

        return DigitsDataset()
    if cfg.data.path is None:
        raise ConfigError(f"data.path must be set for data.kind={kind}")
    if kind == "latents":
        from ditkit.data.latents import LatentDataset

        return LatentDataset(cfg.data.path)
    if kind == "images":
        from ditkit.data.images import ImageDataset

        return ImageDataset(cfg.data.path, image_size=cfg.data.image_size, labels_file=cfg.data.labels_file,
                            num_classes=cfg.model.num_classes)
    if kind == "fields":
        from ditkit.data.fields import FieldDataset

        return FieldDataset(cfg.data.path, log_channels=cfg.data.log_transform)
    raise ConfigError(f"unknown data.kind {kind!r}")


def split_batch(batch: dict, device: torch.device) -> tuple[torch.Tensor, dict]:
    """(x0, model_kwargs) on ``device``.  Cached VAE posteriors are sampled here, on the device and
    under the step's seeded generator: z = mean + std · ε."""
    if "mean" in batch:
        mean = batch["mean"].to(device, non_blocking=True).float()
        std = batch["std"].to(device, non_blocking=True).float()
        x0 = mean + std * torch.randn_like(mean)
    else:
        x0 = batch["x"].to(device, non_blocking=True)
    kwargs = {k: batch[k].to(device, non_blocking=True) for k in COND_KEYS if k in batch}
    return x0, kwargs
