"""Training checkpoints: one file per save, written atomically, the last K kept, ``last.pt`` a
link to the newest.  Loaded with ``weights_only=True``: a checkpoint holds tensors, numbers,
strings, lists and dicts only, never pickled objects."""
from __future__ import annotations

import os
import re
from pathlib import Path

import torch

from ditkit.interop.formats import CheckpointError
from ditkit.utils.io import atomic_write

CKPT_RE = re.compile(r"^ckpt_(\d{8})\.pt$")


def save_checkpoint(state: dict, ckpt_dir: Path, step: int, keep_last: int) -> Path:
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    path = ckpt_dir / f"ckpt_{step:08d}.pt"
    atomic_write(path, lambda tmp: torch.save(state, tmp))
    link_tmp = ckpt_dir / ".last.pt.tmp"
    if link_tmp.is_symlink() or link_tmp.exists():
        link_tmp.unlink()
    link_tmp.symlink_to(path.name)
    os.replace(link_tmp, ckpt_dir / "last.pt")
    for old in list_checkpoints(ckpt_dir)[:-keep_last] if keep_last > 0 else []:
        old.unlink()
    return path


def list_checkpoints(ckpt_dir: Path) -> list[Path]:
    """Step-numbered checkpoints, oldest first."""
    if not ckpt_dir.is_dir():
        return []
    return sorted(p for p in ckpt_dir.iterdir() if CKPT_RE.match(p.name))


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """Any file torch can read safely; a clear error for a missing, truncated or foreign file."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        data = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises RuntimeError, UnpicklingError, EOFError, zipfile errors...
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"{path} is not a readable checkpoint (truncated or not a torch file?): {first}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} holds a {type(data).__name__}, not a checkpoint dict or state dict")
    return data
