"""Checkpoint files, whatever their format: safetensors by the ``.safetensors`` suffix, a torch
pickle (``torch.load(weights_only=True)``) otherwise.  Writes are atomic (temporary file in the
same folder, fsync, ``os.replace``) so a crash never leaves half a checkpoint under the real name.

Also the two checks that sit between a file and a model: ``check_state_dict`` (strict, with an
error that names the keys) and ``load_for_finetune`` (strict except for the label table and the
position embedding, which are rebuilt when the class count or the input size changes, and REPA's
projector, which is dropped when the model has none).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import re
from pathlib import Path
from typing import Callable, Mapping

import torch
from torch import nn

from ditkit.models.pos_embed import sincos_pos_embed
from ditkit.utils.io import atomic_write

StateDict = dict[str, torch.Tensor]


class CheckpointError(ValueError):
    """A file that is not a readable checkpoint (truncated, another format, no state dict in it)."""


class StateDictMismatchError(ValueError):
    """A state dict whose keys or shapes do not fit the model."""


def _is_safetensors(path: str | os.PathLike) -> bool:
    return Path(path).suffix == ".safetensors"


def _unshared(state_dict: Mapping[str, torch.Tensor]) -> StateDict:
    """Contiguous CPU tensors, cloning those that share storage with an earlier one: safetensors
    refuses aliased tensors (diffusers' DiT holds the same embedder in every block)."""
    seen: set[int] = set()
    out = {}
    for k, v in state_dict.items():
        v = v.detach().cpu().contiguous()
        if v.numel() and v.untyped_storage().data_ptr() in seen:
            v = v.clone()
        seen.add(v.untyped_storage().data_ptr())
        out[k] = v
    return out


def save_state_dict(state_dict: Mapping[str, torch.Tensor], path: str | os.PathLike,
                    metadata: Mapping[str, str] | None = None) -> None:
    """Write a flat {key: tensor} dict to ``path``: safetensors (with string ``metadata`` in its
    header) if the name ends in ``.safetensors``, ``torch.save`` otherwise."""
    path = Path(path)
    if _is_safetensors(path):
        from safetensors.torch import save_file

        tensors = _unshared(state_dict)
        atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=dict(metadata) if metadata else None))
    else:
        if metadata:
            raise ValueError(f"{path}: metadata can only be stored in a .safetensors file")
        atomic_write(path, lambda tmp: torch.save(dict(state_dict), tmp))


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The string metadata of a ``.safetensors`` header ({} for other files or none stored)."""
    if not _is_safetensors(path):
        return {}
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception as e:  # SafetensorError is not importable by a stable name
        raise CheckpointError(f"{path}: not a readable safetensors file ({_first_line(e)})") from None


def _first_line(e: BaseException) -> str:
    """The first sentence of an exception's message: enough to say what failed on one line."""
    lines = [s for s in str(e).strip().splitlines() if s.strip()]
    return lines[0].strip().split(". ")[0].rstrip(".") if lines else type(e).__name__


def load_file(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> object:
    """Whatever the checkpoint file holds, read safely.  The official train.py pickles its
    ``argparse.Namespace`` of arguments next to the weights, so that one class is allowed."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: the file is empty")
    if _is_safetensors(path):
        from safetensors.torch import load_file as st_load

        try:
            return st_load(str(path), device=str(map_location))
        except Exception as e:
            raise CheckpointError(f"{path}: not a readable safetensors file, truncated? ({_first_line(e)})") from None
    allow = getattr(torch.serialization, "safe_globals", None)
    try:
        with allow([argparse.Namespace]) if allow else contextlib.nullcontext():
            return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        text = str(e)
        if "Weights only load failed" in text:
            found = re.search(r"Unsupported global: GLOBAL (\S+)", text)
            reason = f"it pickles {found.group(1) if found else 'objects'} besides tensors, refused by weights_only=True"
        elif _is_zip(path):  # torch.save's format since 1.6
            reason = f"truncated or corrupt zip archive ({_first_line(e)})"
        else:
            reason = f"not a torch checkpoint ({_first_line(e)})"
        raise CheckpointError(f"{path}: cannot read checkpoint: {reason}") from None


def _is_zip(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"PK\x03\x04"


def _is_tensor_dict(obj: object) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(isinstance(v, torch.Tensor) for v in obj.values())


def load_state_dict(path: str | os.PathLike, key: str | None = None,
                    map_location: str | torch.device = "cpu") -> StateDict:
    """The model state dict in ``path``.  A wrapping dict is opened at ``key`` if given, else at
    ``"ema"``, then ``"model"``, then ``"state_dict"`` (the EMA weights are the ones to sample
    with, as in the official sample.py).  ``module.`` (DDP) and ``_orig_mod.`` (torch.compile)
    prefixes are removed."""
    obj = load_file(path, map_location)
    if key is not None:
        if not isinstance(obj, Mapping) or key not in obj:
            raise CheckpointError(f"{path}: no entry {key!r} in the checkpoint")
        obj = obj[key]
    elif not _is_tensor_dict(obj) and isinstance(obj, Mapping):
        obj = next((obj[k] for k in ("ema", "model", "state_dict") if _is_tensor_dict(obj.get(k))), obj)
    if not _is_tensor_dict(obj):
        what = f"a dict with keys {sorted(map(str, obj))[:8]}" if isinstance(obj, Mapping) else type(obj).__name__
        raise CheckpointError(f"{path}: no state dict of tensors found (the file holds {what})")
    out = {}
    for k, v in obj.items():
        for prefix in ("module.", "_orig_mod."):
            k = k.removeprefix(prefix)
        out[k] = v
    return out


def _expected(model: nn.Module) -> dict[str, torch.Size]:
    return {k: v.shape for k, v in model.state_dict().items()}


def _listing(keys: list[str], n: int = 5) -> str:
    more = f" and {len(keys) - n} more" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def check_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str = "state dict") -> None:
    """Raise ``StateDictMismatchError`` naming the first few missing keys, unexpected keys and
    shape mismatches, if ``state_dict`` would not load strictly into ``model``."""
    _check_shapes(_expected(model), state_dict, source)


def _check_shapes(expected: Mapping[str, torch.Size], state_dict: Mapping[str, torch.Tensor], source: str) -> None:
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    shapes = [f"{k} {tuple(state_dict[k].shape)} vs model {tuple(s)}"
              for k, s in expected.items() if k in state_dict and state_dict[k].shape != s]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys ({_listing(missing)})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys ({_listing(unexpected)})")
    if shapes:
        problems.append(f"{len(shapes)} shape mismatches ({_listing(shapes, 3)})")
    if problems:
        raise StateDictMismatchError(f"{source} does not fit the model: " + "; ".join(problems))


def load_for_finetune(model: nn.Module, state_dict: Mapping[str, torch.Tensor],
                      log: Callable[[str], None] = print, source: str = "checkpoint") -> list[str]:
    """Load pretrained DiT weights to fine-tune ``model`` on another class count or input size.

    The label table is re-initialised (N(0, 0.02²), as at construction) when its number of rows
    differs, and the fixed sin-cos ``pos_embed`` is recomputed for the model's grid when the
    number of patches differs; REPA's projector (``repa_projector.*``, a training-only head that
    sampling never calls) is dropped when the model has none; everything else must load strictly.
    Returns (and logs) the keys that were re-initialised."""
    expected = _expected(model)
    projector = "repa_projector."
    has_projector = any(k.startswith(projector) for k in expected)
    dropped = [] if has_projector else [k for k in state_dict if k.startswith(projector)]
    if dropped:
        log(f"fine-tune: dropped REPA's projector ({len(dropped)} tensors of {source}): a training-only head, "
            "and this model has none (model.repa_depth unset)")
        state_dict = {k: v for k, v in state_dict.items() if not k.startswith(projector)}
    reinit = []
    table = "y_embedder.embedding_table.weight"
    if table in expected and table in state_dict and state_dict[table].shape != expected[table]:
        reinit.append(table)
    if "pos_embed" in expected and "pos_embed" in state_dict and state_dict["pos_embed"].shape != expected["pos_embed"]:
        reinit.append("pos_embed")
    kept = {k: v for k, v in state_dict.items() if k not in reinit}
    _check_shapes({k: s for k, s in expected.items() if k not in reinit}, kept, source)
    with torch.no_grad():
        model.load_state_dict(kept, strict=False)
        if table in reinit:
            nn.init.normal_(model.y_embedder.embedding_table.weight, std=0.02)
            log(f"fine-tune: re-initialised {table}: {source} has {state_dict[table].shape[0]} rows, "
                f"the model {expected[table][0]} ({model.y_embedder.num_classes} classes"
                f"{' + null' if model.y_embedder.dropout_prob > 0 else ''})")
        if "pos_embed" in reinit:
            pe = model.pos_embed
            pe.copy_(sincos_pos_embed(pe.shape[-1], model.grid_size).unsqueeze(0).to(pe))
            log(f"fine-tune: recomputed pos_embed for a {'x'.join(map(str, model.grid_size))} patch grid "
                f"({source} has {state_dict['pos_embed'].shape[1]} positions, the model {pe.shape[1]})")
    return reinit

