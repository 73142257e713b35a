"""Where a run's scalars and sample grids go besides ``metrics.jsonl``: TensorBoard, Weights & Biases.

``train.log_to`` names the backends, joined by ``+``: ``tensorboard`` (the default), ``wandb``,
``tensorboard+wandb``, or ``none``.  ``metrics.jsonl`` is written whatever it says.  A backend asked
for but not installed is left out with one warning line, and the run goes on: neither package is a
dependency of ditkit.  Each backend is one small class with the same three methods, ``scalars``,
``image`` and ``close``; ``Loggers`` hands each call to all of them.

Weights & Biases reads its own settings from the environment (``WANDB_API_KEY``, ``WANDB_PROJECT``,
``WANDB_ENTITY``); ``WANDB_MODE=offline`` logs to ``run-dir/wandb`` without a network, for a later
``wandb sync``.  The W&B run's id is kept in ``run-dir/wandb_run_id``, so that ``--resume`` goes on
charting into the same W&B run instead of starting another.
"""
from __future__ import annotations

import logging
import os
import uuid
from pathlib import Path

import numpy as np

from ditkit.config import parse_log_to

log = logging.getLogger("ditkit.train")


class TensorBoardLogger:
    """Scalars as ``train/<name>`` and grids as images, in ``run-dir/tb`` (the config is in config.yaml)."""

    def __init__(self, run_dir: Path, config: dict) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(run_dir / "tb"))

    def scalars(self, values: dict[str, float], step: int) -> None:
        for name, value in values.items():
            self.writer.add_scalar(f"train/{name}", value, step)

    def image(self, name: str, image: np.ndarray, step: int) -> None:
        self.writer.add_image(name, image, step, dataformats="HWC")

    def close(self) -> None:
        self.writer.close()


class WandbLogger:
    """Scalars as ``train/<name>`` and grids as ``wandb.Image``, in one W&B run named after the run folder,
    with the run's config."""

    def __init__(self, run_dir: Path, config: dict) -> None:
        import wandb

        self.wandb = wandb
        id_file = run_dir / "wandb_run_id"
        run_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:12]
        id_file.write_text(run_id + "\n")
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "ditkit"), name=run_dir.resolve().name,
                              dir=str(run_dir), config=config, id=run_id, resume="allow",
                              mode=os.environ.get("WANDB_MODE", "online"))

    def scalars(self, values: dict[str, float], step: int) -> None:
        self.run.log({f"train/{name}": value for name, value in values.items()}, step=step)

    def image(self, name: str, image: np.ndarray, step: int) -> None:
        self.run.log({name: self.wandb.Image(image)}, step=step)

    def close(self) -> None:
        self.run.finish()


BACKENDS = {"tensorboard": TensorBoardLogger, "wandb": WandbLogger}


class Loggers:
    """The backends of ``train.log_to`` that could be opened; each call goes to all of them."""

    def __init__(self, backends: list) -> None:
        self.backends = backends

    def scalars(self, values: dict[str, float], step: int) -> None:
        """``values``: name -> number; a None (an interval of skipped steps has no loss) is left out."""
        values = {k: v for k, v in values.items() if v is not None}
        for backend in self.backends:
            backend.scalars(values, step)

    def image(self, name: str, image: np.ndarray, step: int) -> None:
        """``image``: (H, W, 3) uint8, a sample grid."""
        for backend in self.backends:
            backend.image(name, image, step)

    def close(self) -> None:
        for backend in self.backends:
            backend.close()


def open_loggers(log_to: str, run_dir: Path, config: dict) -> Loggers:
    """The backends that ``log_to`` asks for, each one that is not installed left out with one warning."""
    opened = []
    for name in parse_log_to(log_to):
        try:
            opened.append(BACKENDS[name](Path(run_dir), config))
        except ImportError:
            log.warning(f"{name} is not installed, so train.log_to={log_to} goes on without it (scalars still "
                        f"go to metrics.jsonl; pip install {name})")
    return Loggers(opened)
