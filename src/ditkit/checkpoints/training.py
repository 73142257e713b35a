"""Training checkpoints: one file per save, written atomically, the last K kept, ``last.<ext>`` a
link to the newest.  Two formats hold the same nested state (model, EMA, optimizer, step,
config, …): ``pt`` (``torch.save``, loaded with ``weights_only=True``) and ``safetensors`` (every
tensor a safetensors entry, the structure around them as JSON in the header).  Neither ever
unpickles an object.

Every file also records the SHA-256 of each tensor's bytes, and loading checks them: a bit flipped
on a disk or in a copy is named (file and tensor) instead of resuming from wrong weights."""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from ditkit.checkpoints.formats import CheckpointError
from ditkit.utils.io import atomic_write

CKPT_RE = re.compile(r"^ckpt_(\d{8})\.(pt|safetensors)$")
STATE_KEY = "ditkit_training_state"
CHECKSUMS_KEY = "checksums"  # pt: a top-level entry of the saved dict; safetensors: a header entry (JSON)
ROOT = "s"  # the path of the whole state; a tensor's path is e.g. "s/model/blocks.0.attn.qkv.weight"


def flatten_state(state, tensors: dict[str, torch.Tensor], path: str = ROOT):
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


def iter_tensors(state, path: str = ROOT) -> Iterator[tuple[str, torch.Tensor]]:
    """(path, tensor) for every tensor of a nested state, under the paths of ``flatten_state``,
    one at a time (a state on the GPU is never copied to the host whole)."""
    if torch.is_tensor(state):
        yield path, state
    elif isinstance(state, dict):
        for k, v in state.items():
            yield from iter_tensors(v, f"{path}/{k}")
    elif isinstance(state, (list, tuple)):
        for i, v in enumerate(state):
            yield from iter_tensors(v, f"{path}/{i}")


def tensor_sha256(t: torch.Tensor) -> str:
    """SHA-256 of a tensor's bytes in memory order (any dtype, bf16 and 0-dim included)."""
    raw = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8)  # a 0-dim tensor cannot be viewed as bytes
    return hashlib.sha256(raw.numpy()).hexdigest()


def state_checksums(tensors: Iterator[tuple[str, torch.Tensor]]) -> dict[str, str]:
    return {path: tensor_sha256(t) for path, t in tensors}


def _verify(path: Path, checksums: dict[str, str] | None, tensors: Iterator[tuple[str, torch.Tensor]]) -> None:
    """Raise ``CheckpointError`` at the first tensor whose bytes differ from the record.  No record
    (older files), or a record of other tensors (a file loaded, edited and saved again by hand, the
    record carried along), leaves the file unverified."""
    if not checksums:
        return
    tensors = dict(tensors)
    if tensors.keys() != checksums.keys():
        return
    for name, t in tensors.items():
        if tensor_sha256(t) != checksums[name]:
            raise CheckpointError(f"{path.name} is corrupt: tensor {name} does not match its checksum; its bytes "
                                  f"changed after it was written (disk or copy error); use an earlier checkpoint than "
                                  f"{path}, or, for a file edited on purpose, save it without its '{CHECKSUMS_KEY}' entry")


def _write(state: dict, path: Path) -> None:
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        tensors: dict[str, torch.Tensor] = {}
        skeleton = flatten_state(state, tensors)
        meta = {STATE_KEY: json.dumps(skeleton), CHECKSUMS_KEY: json.dumps(state_checksums(iter(tensors.items())))}
        atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))
    else:
        if CHECKSUMS_KEY in state:
            raise ValueError(f"a training state may not hold a top-level '{CHECKSUMS_KEY}' entry: {path} stores its own there")
        saved = {**state, CHECKSUMS_KEY: state_checksums(iter_tensors(state))}
        atomic_write(path, lambda tmp: torch.save(saved, tmp))


def save_checkpoint(state: dict, ckpt_dir: Path, step: int, keep_last: int, fmt: str = "pt",
                    keep: Path | None = None) -> Path:
    """Write ``ckpt_dir/ckpt_<step>.<fmt>`` with its tensors' checksums, point ``last.<fmt>`` at it, and
    delete all but the newest ``keep_last`` (0: keep all).  Never deleted: the file just written and
    ``keep`` (e.g. the last checkpoint before a divergence, which a rollback needs)."""
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    path = ckpt_dir / f"ckpt_{step:08d}.{fmt}"
    _write(state, path)
    link_tmp = ckpt_dir / f".last.{fmt}.tmp"
    if link_tmp.is_symlink() or link_tmp.exists():
        link_tmp.unlink()
    link_tmp.symlink_to(path.name)
    os.replace(link_tmp, ckpt_dir / f"last.{fmt}")
    protected = {path.resolve()} | ({Path(keep).resolve()} if keep is not None else set())
    for old in list_checkpoints(ckpt_dir)[:-keep_last] if keep_last > 0 else []:
        if old.resolve() not in protected:
            old.unlink()
    return path


def list_checkpoints(ckpt_dir: Path) -> list[Path]:
    """Step-numbered checkpoints, oldest first."""
    if not ckpt_dir.is_dir():
        return []
    return sorted((p for p in ckpt_dir.iterdir() if CKPT_RE.match(p.name)), key=lambda p: p.stem)


def newest_good_checkpoint(ckpt_dir: Path, log: Callable[[str], None] = print) -> tuple[Path, dict] | None:
    """(path, state) of the newest checkpoint in ``ckpt_dir`` that loads, passes its checksums and is
    a ditkit training checkpoint; each newer one that fails is logged and skipped, so a run resumes
    from the last good state after a torn or corrupted file.  None when there is no checkpoint at
    all; ``CheckpointError`` listing every file when none is usable."""
    from ditkit.checkpoints.load import is_ditkit_checkpoint

    failed = []
    for path in reversed(list_checkpoints(Path(ckpt_dir))):
        try:
            state = load_checkpoint(path)
        except CheckpointError as err:
            reason = str(err)
        else:
            if is_ditkit_checkpoint(state):
                return path, state
            reason = "a foreign file: no 'config', 'model' and 'step' entries"
        log(f"checkpoint {path} is unusable ({reason}); trying the one before it")
        failed.append(f"{path.name} ({reason})")
    if failed:
        raise CheckpointError(f"no usable checkpoint in {ckpt_dir}: " + "; ".join(failed))
    return None


def is_training_safetensors(path: str | Path) -> bool:
    from ditkit.checkpoints.formats import read_metadata

    return Path(path).suffix == ".safetensors" and STATE_KEY in read_metadata(path)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu", verify: bool = True) -> dict:
    """Either format, returned as it was saved; a clear error for a missing, truncated or foreign file.

    ``verify``: recompute every tensor's SHA-256 and raise ``CheckpointError`` naming the file and the
    first tensor that differs from the record written with it.  Files without a record (written by
    older versions, or other programs' ``.pt`` files) load unverified."""
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
                tensors = {k: f.get_tensor(k) for k in f.keys()}
            if verify:
                _verify(path, json.loads(meta.get(CHECKSUMS_KEY, "null")), iter(tensors.items()))
            return unflatten_state(json.loads(meta[STATE_KEY]), tensors)
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
    checksums = data.pop(CHECKSUMS_KEY) if isinstance(data.get(CHECKSUMS_KEY), dict) else None
    if verify:
        _verify(path, checksums, iter_tensors(data))
    return data
