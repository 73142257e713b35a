"""Per-sample sequences of embeddings to condition on (``model.context_dim``, ``data.context_path``): a folder with
one file per sample, an (M_i, E) array (a text encoder's output for the sample's caption, the embeddings of its
tokens, or any set of vectors), M_i varying from sample to sample.  ditkit reads them; it runs no encoder.

Files are ``.npy`` or ``.safetensors`` (the one tensor it holds, or its tensor named ``context``) and are matched to
samples by name: a folder dataset's sample ``root/a/b.png`` (or ``b.npy``) takes ``context_path/a/b.npy`` (or
``.safetensors``); a dataset without file names (a latent cache, fields, the digits) takes the file named by the
sample's index, ``context_path/<index>.npy`` (leading zeros allowed).

A batch pads the sequences to its longest with a (B, M) mask, True at the real entries (``pad_contexts``); the
network's key mask then gives padding no weight, and an empty sequence (M_i = 0) is the unconditional one."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, default_collate

SUFFIXES = (".npy", ".safetensors")


def _context_key(path: Path, keys: list[str]) -> str:
    """The tensor of a .safetensors context file: the one it holds, or the one named 'context'."""
    if "context" in keys:
        return "context"
    if len(keys) != 1:
        raise ValueError(f"context file {path} holds tensors {sorted(keys)}; expected one, or one named 'context'")
    return keys[0]


def read_context(path: str | Path) -> np.ndarray:
    """The (M, E) array of one file (an (E,) array is one entry), checked finite."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.numpy import load_file

        tensors = load_file(str(path))
        a = tensors[_context_key(path, list(tensors))]
    elif path.suffix == ".npy":
        a = np.load(path)
    else:
        raise ValueError(f"context file {path}: expected .npy or .safetensors")
    a = np.asarray(a, dtype=np.float32)
    a = a[None] if a.ndim == 1 else a
    if a.ndim != 2:
        raise ValueError(f"context file {path} has shape {a.shape}; expected (M, E), one row per entry")
    if not np.isfinite(a).all():
        raise ValueError(f"context file {path} holds NaN or inf")
    return a


def context_shape(path: Path) -> tuple[int, ...]:
    """The shape of one file's array, from its header alone (the values are not read)."""
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="np") as f:
            return tuple(f.get_slice(_context_key(path, list(f.keys()))).get_shape())
    return tuple(np.load(path, mmap_mode="r").shape)


def context_files(folder: str | Path) -> dict[str, Path]:
    """{name: file} for every context file below ``folder``, the name its relative path without the suffix."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"context folder {folder} does not exist")
    found: dict[str, Path] = {}
    for d, _, files in os.walk(folder, followlinks=True):
        for f in files:
            p = Path(d, f)
            if p.suffix in SUFFIXES:
                name = p.relative_to(folder).with_suffix("").as_posix()
                if name in found:
                    raise ValueError(f"context folder {folder} holds both {found[name].name} and {p.name} for sample {name}")
                found[name] = p
    if not found:
        raise ValueError(f"context folder {folder} holds no .npy or .safetensors files")
    return found


def sample_names(dataset: Dataset) -> list[str] | None:
    """Each sample's name (its file's path relative to the dataset's root, without the suffix), or None for a
    dataset without files (then samples are named by index)."""
    root = getattr(dataset, "source", None) or getattr(dataset, "root", None)
    paths = getattr(dataset, "paths", None) or getattr(dataset, "files", None)
    if paths is None or root is None or not Path(root).is_dir():
        return None
    return [Path(p).relative_to(root).with_suffix("").as_posix() for p in paths]


def pad_contexts(contexts: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(M_i, E) sequences -> ((B, M, E) zero-padded, (B, M) True at real entries), M the longest M_i (at least 1)."""
    lengths = torch.tensor([len(c) for c in contexts])
    longest, width = max(int(lengths.max()), 1), contexts[0].shape[-1]
    out = torch.zeros(len(contexts), longest, width, dtype=contexts[0].dtype)
    for i, c in enumerate(contexts):
        out[i, :len(c)] = c
    return out, torch.arange(longest) < lengths[:, None]


class WithContext(Dataset):
    """``inner``'s items with ``"context"``, the sample's (M_i, E) sequence (module docstring); its ``collate`` pads
    them into ``"context"`` (B, M, E) and ``"context_mask"`` (B, M) around the inner dataset's own collate.  Other
    attributes (normaliser, lengths, classes) are the inner dataset's."""

    def __init__(self, inner: Dataset, folder: str | Path):
        self.inner, self.folder = inner, Path(folder)
        files = context_files(folder)
        names = sample_names(inner)
        if names is None:  # samples by index: <index>.npy, leading zeros allowed
            by_index = {int(n): p for n, p in files.items() if n.isdigit()}
            self.files = [by_index.get(i) for i in range(len(inner))]
            missing = [str(i) for i, p in enumerate(self.files) if p is None]
        else:
            self.files = [files.get(n) for n in names]
            missing = [n for n, p in zip(names, self.files) if p is None]
        if missing:
            raise ValueError(f"context folder {folder} has no file for {len(missing)} of {len(inner)} samples "
                             f"(first: {missing[0]}.npy or .safetensors)")
        self.dim = read_context(self.files[0]).shape[1]
        for path in self.files:  # every file's width from its header, so that a wrong one stops the run at start-up
            shape = context_shape(path)
            if len(shape) not in (1, 2) or shape[-1] != self.dim:
                raise ValueError(f"context file {path} has shape {shape}; expected (M, {self.dim}) as "
                                 f"{self.files[0]} has")

    def __len__(self) -> int:
        return len(self.inner)

    def __getattr__(self, name: str):
        if name == "inner":  # not yet set (unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.inner, name)

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.inner, "set_epoch"):
            self.inner.set_epoch(epoch)

    def __getitem__(self, i: int) -> dict:
        item = self.inner[i]
        if not isinstance(item, dict):  # (x, label) datasets
            item = {"x": item[0], "y": torch.as_tensor(item[1], dtype=torch.long)}
        a = read_context(self.files[i])
        if a.shape[1] != self.dim:
            raise ValueError(f"context file {self.files[i]} has entries of width {a.shape[1]}; "
                             f"{self.files[0]} has {self.dim}")
        return item | {"context": torch.from_numpy(a)}

    def collate(self, items: list[dict]) -> dict:
        rest = [{k: v for k, v in it.items() if k != "context"} for it in items]
        inner = getattr(self.inner, "collate", None)
        batch = inner(rest) if inner is not None else default_collate(rest)
        if "context" not in items[0]:  # the trainer's item filter kept no context
            return batch
        context, mask = pad_contexts([it["context"] for it in items])
        return batch | {"context": context, "context_mask": mask}
