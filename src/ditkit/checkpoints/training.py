"""Training checkpoints: one file per save, written atomically, the last K kept, ``last.<ext>`` a
link to the newest.  Two formats hold the same nested state (model, EMA, optimizer, step,
config, …): ``pt`` (``torch.save``, loaded with ``weights_only=True``) and ``safetensors`` (every
tensor a safetensors entry, the structure around them as JSON in the header).  Neither ever
unpickles an object."""
from __future__ import annotations

import argparse
import json
import os
import re
from pathlib import Path

import torch

from ditkit.checkpoints.formats import CheckpointError
from ditkit.utils.io import atomic_write

CKPT_RE = re.compile(r"^ckpt_(\d{8})\.(pt|safetensors)$")
STATE_KEY = "ditkit_training_state"


def flatten_state(state, tensors: dict[str, torch.Tensor], path: str = "s"):
    """A nested state -> JSON-able skeleton, its tensors moved into ``tensors`` under their path.
    Dicts become [key, value] pairs so integer keys (optimizer state) survive JSON."""
    if torch.is_tensor(state):
        tensors[path] = state.detach().cpu().contiguous()
        return {"tensor": path}
    if isinstance(state, dict):
        return {"dict": [[k, flatten_state(v, tensors, f"{path}/{k}")] for k, v in state.items()]}
    if isinstance(state, (list, tuple)):
        return {"list": [flatten_state(v, tensors, f"{path}/{i}") for i, v in enumerate(state)]}
    return {"value": state}


def unflatten_state(skeleton, tensors: dict[str, torch.Tensor]):
    if "tensor" in skeleton:
        return tensors[skeleton["tensor"]]
    if "dict" in skeleton:
        return {k: unflatten_state(v, tensors) for k, v in skeleton["dict"]}
    if "list" in skeleton:
        return [unflatten_state(v, tensors) for v in skeleton["list"]]
    return skeleton["value"]


def _write(state: dict, path: Path) -> None:
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        tensors: dict[str, torch.Tensor] = {}
        skeleton = flatten_state(state, tensors)
        atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={STATE_KEY: json.dumps(skeleton)}))
    else:
        atomic_write(path, lambda tmp: torch.save(state, tmp))


def save_checkpoint(state: dict, ckpt_dir: Path, step: int, keep_last: int, fmt: str = "pt") -> Path:
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    path = ckpt_dir / f"ckpt_{step:08d}.{fmt}"
    _write(state, path)
    link_tmp = ckpt_dir / f".last.{fmt}.tmp"
    if link_tmp.is_symlink() or link_tmp.exists():
        link_tmp.unlink()
    link_tmp.symlink_to(path.name)
    os.replace(link_tmp, ckpt_dir / f"last.{fmt}")
    for old in list_checkpoints(ckpt_dir)[:-keep_last] if keep_last > 0 else []:
        old.unlink()
    return path


def list_checkpoints(ckpt_dir: Path) -> list[Path]:
    """Step-numbered checkpoints, oldest first."""
    if not ckpt_dir.is_dir():
        return []
    return sorted((p for p in ckpt_dir.iterdir() if CKPT_RE.match(p.name)), key=lambda p: p.stem)


def is_training_safetensors(path: str | Path) -> bool:
    from ditkit.checkpoints.formats import read_metadata

    return Path(path).suffix == ".safetensors" and STATE_KEY in read_metadata(path)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """Either format; a clear error for a missing, truncated or foreign file."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt", device=str(map_location)) as f:
                meta = f.metadata() or {}
                if STATE_KEY not in meta:
                    raise CheckpointError(f"{path} holds weights only, not a ditkit training checkpoint")
                return unflatten_state(json.loads(meta[STATE_KEY]), {k: f.get_tensor(k) for k in f.keys()})
        # The official train.py stores its argparse.Namespace beside the weights: the one class allowed.
        with torch.serialization.safe_globals([argparse.Namespace]):
            data = torch.load(path, map_location=map_location, weights_only=True)
    except CheckpointError:
        raise
    except Exception as err:  # torch raises RuntimeError, UnpicklingError, EOFError, zipfile errors...
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"{path} is not a readable checkpoint (truncated or not a checkpoint file?): {first}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} holds a {type(data).__name__}, not a checkpoint dict or state dict")
    return data
