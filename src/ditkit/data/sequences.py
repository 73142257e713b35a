"""A folder of 1D sequences of mixed lengths: one ``.npy`` file per sample, shape (C, L_i) (an (L_i,) array is one
channel), L_i varying; with class subfolders (``root/<class>/*.npy``, classes in sorted order) for class labels, as
an image folder.  Every length must be a multiple of the patch size (a token is real when all its positions are).

Normalisation (``SequenceNormalizer``), per channel c over every real position of every sample, in float64:
    z = (x − μ_c) / s_c,  and back  x = z s_c + μ_c.

A batch is padded to its longest sequence with a (B, L) bool mask, True at the real positions (``pad_batch``)."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset


def sequence_files(root: str | Path, classes: bool) -> tuple[list[Path], list[int], list[str]]:
    """(the ``.npy`` files sorted by name, their class ids, the class names).  ``classes``: one class per subfolder
    (a folder without subfolders is one class 0); otherwise every file below ``root`` is a sample of class 0."""
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"sequence folder {root} does not exist")
    names = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith(".")) if classes else []
    tops = [root / n for n in names] or [root]
    files, labels = [], []
    for c, top in enumerate(tops):
        found = sorted(top.rglob("*.npy"))
        files += found
        labels += [c] * len(found)
    if not files:
        raise ValueError(f"sequence folder {root} holds no .npy files")
    return files, labels, names


def sequence_shape(path: Path) -> tuple[int, int]:
    """(C, L) of one file, from its header."""
    a = np.load(path, mmap_mode="r")
    if a.ndim not in (1, 2) or a.shape[-1] < 1:
        raise ValueError(f"sequence file {path} has shape {a.shape}; expected (C, L) or (L,)")
    return (1, a.shape[0]) if a.ndim == 1 else tuple(a.shape)


class SequenceNormalizer:
    """Per-channel standardisation of sequences (module docstring).  Its state is plain,
    {"x": {"mean": (C,), "std": (C,)}}, so a checkpoint holding it loads with ``torch.load(weights_only=True)``."""

    def __init__(self, state: dict):
        self.state = {"x": dict(state["x"])}

    def state_dict(self) -> dict:
        return {"x": dict(self.state["x"])}

    def _stats(self, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.state["x"]
        if value.dim() < 2 or value.shape[-2] != len(s["mean"]):
            raise ValueError(f"sequences of shape {tuple(value.shape)} do not have the normalizer's "
                             f"{len(s['mean'])} channels at dim -2")
        return (s["mean"].to(value.device, value.dtype)[:, None], s["std"].to(value.device, value.dtype)[:, None])

    def normalize(self, value: torch.Tensor) -> torch.Tensor:
        """Physical units (..., C, L) -> standardised."""
        mean, std = self._stats(value)
        return (value - mean) / std

    def denormalize(self, value: torch.Tensor) -> torch.Tensor:
        """Standardised (..., C, L) -> physical units."""
        mean, std = self._stats(value)
        return value * std + mean


class SequenceDataset(Dataset):
    """Items ``{"x": (C, L_i) float32 standardised, "y": class id}`` from a folder (module docstring); every file is
    read once at construction, for its shape, finiteness and the normaliser's statistics."""

    def __init__(self, root: str | Path, patch_size: int, classes: bool = False):
        self.root = Path(root)
        self.files, self.labels, self.classes = sequence_files(root, classes)
        self.num_classes = len(self.classes) or None
        self.patch_size = patch_size
        total, sums, squares, channels, self.lengths = 0, None, None, None, []
        for path in self.files:
            a = self._read(path)
            if channels is None:
                channels = a.shape[0]
            if a.shape[0] != channels:
                raise ValueError(f"sequence file {path} has {a.shape[0]} channels; {self.files[0]} has {channels}")
            if a.shape[1] % patch_size:
                raise ValueError(f"sequence file {path} has length {a.shape[1]}, not a multiple of the patch size "
                                 f"{patch_size}: pad or crop the sequences to multiples of it")
            if not np.isfinite(a).all():
                raise ValueError(f"sequence file {path} holds NaN or inf")
            total += a.shape[1]
            self.lengths.append(a.shape[1])
            sums = a.sum(1) if sums is None else sums + a.sum(1)
            squares = (a * a).sum(1) if squares is None else squares + (a * a).sum(1)
        mean = sums / total
        std = np.sqrt(np.maximum(squares / total - mean * mean, 0.0))
        std = np.where(std > 0, std, 1.0)  # a constant channel stays put rather than dividing by zero
        self.normalizer = SequenceNormalizer({"x": {"mean": torch.from_numpy(mean), "std": torch.from_numpy(std)}})

    @staticmethod
    def _read(path: Path) -> np.ndarray:
        a = np.asarray(np.load(path), dtype=np.float64)
        a = a[None] if a.ndim == 1 else a
        if a.ndim != 2 or a.shape[1] < 1:
            raise ValueError(f"sequence file {path} has shape {a.shape}; expected (C, L) or (L,)")
        return a

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> dict:
        x = self.normalizer.normalize(torch.from_numpy(self._read(self.files[i]))).float()
        return {"x": x, "y": torch.tensor(self.labels[i], dtype=torch.long)}

    def collate(self, items: list[dict]) -> dict:
        return pad_batch(items, self.patch_size)


def pad_batch(items: list[dict], patch_size: int) -> dict:
    """Items of (C, L_i) sequences -> {"x": (B, C, L) zero-padded, "mask": (B, L) True at real positions, and the
    other keys stacked}, L the longest L_i rounded up to a multiple of ``patch_size``."""
    lengths = torch.tensor([it["x"].shape[-1] for it in items])
    longest = -(-int(lengths.max()) // patch_size) * patch_size
    x = torch.zeros(len(items), items[0]["x"].shape[0], longest)  # (B, C, L)
    for i, it in enumerate(items):
        x[i, :, :it["x"].shape[-1]] = it["x"]
    batch = {k: torch.stack([it[k] for it in items]) for k in items[0] if k != "x"}
    return batch | {"x": x, "mask": torch.arange(longest) < lengths[:, None]}  # (B, L)
