"""A folder of 1D sequences of mixed lengths: one ``.npy`` file per sample, shape (C, L_i) (an (L_i,) array is one
channel), L_i varying; with class subfolders (``root/<class>/*.npy``, classes in sorted order) for class labels, as
an image folder.  Every length must be a multiple of the patch size (a token is real when all its positions are).
With ``axes`` 2 or 3 (``data.axes``) the samples are images (C, H_i, W_i) or volumes and videos (C, T_i, H_i, W_i)
of different sizes, each a multiple of the patch on every axis.  A video may also be a folder of frames (image
files, in name order; RGB, or one channel when the first frame is greyscale), ``root/<class>/<clip>/*.png``; its
pixels are read as values in [-1, 1] before the per-channel normalisation.

Normalisation (``SequenceNormalizer``), per channel c over every real position of every sample, in float64:
    z = (x − μ_c) / s_c,  and back  x = z s_c + μ_c.

A batch is padded to its longest sequence (its largest extent on each axis) with a (B, *size) bool mask, True at
the real positions (``pad_batch``)."""
from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from ditkit.utils.ranks import env_rank

log = logging.getLogger(__name__)

FRAME_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")


def _frames(clip: Path) -> list[Path]:
    """The image files of a clip folder, in name order."""
    return sorted(p for p in clip.iterdir() if p.suffix.lower() in FRAME_EXTENSIONS)


def _frame_channels(im) -> int:
    """A video's channels from its first frame: 1 when it is greyscale, else 3 (RGB)."""
    return 1 if im.mode in ("L", "I;16", "1") else 3


def _samples_below(top: Path) -> list[Path]:
    """In one walk below ``top`` (itself included): every ``.npy`` file, and every folder holding image files (one
    video each), sorted."""
    found = []
    for d, _, files in os.walk(top, followlinks=True):
        found += [Path(d, f) for f in files if f.endswith(".npy")]
        if any(Path(f).suffix.lower() in FRAME_EXTENSIONS for f in files):
            found.append(Path(d))
    return sorted(found)


def sequence_files(root: str | Path, classes: bool) -> tuple[list[Path], list[int], list[str]]:
    """(the samples sorted by name: ``.npy`` files and folders of video frames, their class ids, the class names).
    ``classes``: one class per subfolder (a folder without subfolders is one class 0); otherwise every sample below
    ``root`` is of class 0."""
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"sequence folder {root} does not exist")
    names = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith(".")) if classes else []
    tops = [root / n for n in names] or [root]
    files, labels = [], []
    for c, top in enumerate(tops):
        found = _samples_below(top)
        files += found
        labels += [c] * len(found)
    if not files:
        raise ValueError(f"sequence folder {root} holds no .npy files and no folders of frames")
    return files, labels, names


def read_clip(clip: Path) -> np.ndarray:
    """A folder of frames as (C, T, H, W) float64 in [-1, 1]: C = 3, or 1 when the first frame is greyscale.  Every
    frame must have the first one's size; a frame that cannot be read is named."""
    from PIL import Image

    frames = _frames(clip)
    arrays = []
    for f in frames:
        try:
            with Image.open(f) as im:
                if not arrays:
                    mode = "L" if _frame_channels(im) == 1 else "RGB"
                arrays.append(np.asarray(im.convert(mode), dtype=np.float64))
        except OSError as err:
            raise ValueError(f"video frame {f} cannot be read: {err}") from None
        if arrays[-1].shape != arrays[0].shape:
            raise ValueError(f"video frame {f} is {arrays[-1].shape[1]}×{arrays[-1].shape[0]}; {frames[0].name} is "
                             f"{arrays[0].shape[1]}×{arrays[0].shape[0]}")
    video = np.stack(arrays)  # (T, H, W) or (T, H, W, 3)
    video = video[None] if video.ndim == 3 else video.transpose(3, 0, 1, 2)
    return video / 127.5 - 1.0


GRID = {1: "L", 2: "H, W", 3: "T, H, W"}


def sequence_shape(path: Path, axes: int = 1) -> tuple[int, ...]:
    """(C, *size) of one file, from its header: (C, L) for sequences, (C, T, H, W) for ``axes`` = 3 (a folder of
    frames: from its first frame and its number of frames)."""
    if path.is_dir():
        from PIL import Image

        if axes != 3:
            raise ValueError(f"{path} is a folder of video frames: it needs data.axes=3")
        frames = _frames(path)
        with Image.open(frames[0]) as im:
            return (_frame_channels(im), len(frames), im.height, im.width)
    a = np.load(path, mmap_mode="r")
    if a.ndim not in (axes, axes + 1) or min(a.shape) < 1:
        raise ValueError(f"sequence file {path} has shape {a.shape}; expected (C, {GRID[axes]}) or ({GRID[axes]})"
                         + (" (data.axes sets the number of axes)" if a.ndim not in (axes, axes + 1) else ""))
    return (1, *a.shape) if a.ndim == axes else tuple(a.shape)


class SequenceNormalizer:
    """Per-channel standardisation of sequences (module docstring).  Its state is plain,
    {"x": {"mean": (C,), "std": (C,), "axes": grid axes (1 when absent)}}, so a checkpoint holding it loads with
    ``torch.load(weights_only=True)``."""

    def __init__(self, state: dict):
        self.state = {k: dict(v) for k, v in state.items() if k in ("x", "params")}

    def state_dict(self) -> dict:
        return {k: dict(v) for k, v in self.state.items()}

    def normalize_params(self, params: torch.Tensor) -> torch.Tensor:
        """Physical parameters (..., P) -> standardised, with the training set's column statistics."""
        s = self._params()
        return (params - s["mean"].to(params.device, params.dtype)) / s["std"].to(params.device, params.dtype)

    def _params(self) -> dict:
        if "params" not in self.state:
            raise KeyError("this normalizer has no parameter statistics: the run had no data.params_file")
        return self.state["params"]

    def _stats(self, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.state["x"]
        axes = int(s.get("axes", 1))
        if value.dim() < axes + 1 or value.shape[-axes - 1] != len(s["mean"]):
            raise ValueError(f"samples of shape {tuple(value.shape)} do not have the normalizer's "
                             f"{len(s['mean'])} channels at dim {-axes - 1}")
        shape = (-1, *[1] * axes)
        return s["mean"].to(value.device, value.dtype).view(shape), s["std"].to(value.device, value.dtype).view(shape)

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

    def __init__(self, root: str | Path, patch_size: int | tuple[int, ...], classes: bool = False, axes: int = 1,
                 params_file: str | Path | None = None, param_names: list[str] | None = None,
                 pad_multiple: int = 0, max_size: tuple[int, ...] | None = None):
        self.root = Path(root)
        self.files, self.labels, self.classes = sequence_files(root, classes)
        self.num_classes = len(self.classes) or None
        self.axes = axes
        self.patch = (patch_size,) * axes if isinstance(patch_size, int) else tuple(patch_size)
        self.patch_size = self.patch[0] if axes == 1 else self.patch  # the 1D collate's int
        if pad_multiple and any(pad_multiple % p for p in self.patch):
            raise ValueError(f"data.pad_multiple={pad_multiple} is not a multiple of the patch size "
                             f"{'×'.join(map(str, self.patch))}")
        self.pad_multiple, self.max_size = pad_multiple, max_size
        total, sums, squares, channels, self.lengths, self.sizes = 0, None, None, None, [], []
        for path in self.files:
            a = self._read(path)
            if channels is None:
                channels = a.shape[0]
            if a.shape[0] != channels:
                raise ValueError(f"sequence file {path} has {a.shape[0]} channels; {self.files[0]} has {channels}")
            if any(n % p for n, p in zip(a.shape[1:], self.patch)):
                what = f"length {a.shape[1]}" if axes == 1 else f"size {'×'.join(map(str, a.shape[1:]))}"
                patch = self.patch[0] if axes == 1 else "×".join(map(str, self.patch))
                raise ValueError(f"sequence file {path} has {what}, not a multiple of the patch size {patch}: pad or "
                                 f"crop the samples to multiples of it")
            if not np.isfinite(a).all():
                raise ValueError(f"sequence file {path} holds NaN or inf")
            flat = a.reshape(channels, -1)
            total += flat.shape[1]
            self.lengths.append(flat.shape[1])  # positions: what a length bucket sorts by
            self.sizes.append(tuple(a.shape[1:]))
            sums = flat.sum(1) if sums is None else sums + flat.sum(1)
            squares = (flat * flat).sum(1) if squares is None else squares + (flat * flat).sum(1)
        self.channels = channels
        mean = sums / total
        std = np.sqrt(np.maximum(squares / total - mean * mean, 0.0))
        std = np.where(std > 0, std, 1.0)  # a constant channel stays put rather than dividing by zero
        state = {"mean": torch.from_numpy(mean), "std": torch.from_numpy(std)}
        states = {"x": state if axes == 1 else state | {"axes": axes}}
        self.params, self.param_names = None, []
        if params_file is not None:
            self.params, self.param_names = read_sequence_params(params_file, self.root, self.files, param_names)
            p_mean, p_std = self.params.mean(0), self.params.std(0)
            states["params"] = {"mean": torch.from_numpy(p_mean), "std": torch.from_numpy(np.where(p_std > 0, p_std, 1.0)),
                                "names": list(self.param_names)}
        self.normalizer = SequenceNormalizer(states)

    def _read(self, path: Path) -> np.ndarray:
        if path.is_dir():
            if self.axes != 3:
                raise ValueError(f"{path} is a folder of video frames: it needs data.axes=3")
            return read_clip(path)
        a = np.asarray(np.load(path), dtype=np.float64)
        a = a[None] if a.ndim == self.axes else a
        if a.ndim != self.axes + 1 or min(a.shape) < 1:
            grid = GRID[self.axes]
            raise ValueError(f"sequence file {path} has shape {a.shape}; expected (C, {grid}) or ({grid})")
        return a

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> dict:
        x = self.normalizer.normalize(torch.from_numpy(self._read(self.files[i]))).float()
        item = {"x": x, "y": torch.tensor(self.labels[i], dtype=torch.long)}
        if self.params is not None:
            item["params"] = self.normalizer.normalize_params(torch.from_numpy(self.params[i])).float()
        return item

    def collate(self, items: list[dict]) -> dict:
        return pad_batch(items, self.patch_size, self.pad_multiple, self.max_size)


def read_sequence_params(path: str | Path, root: Path, files: list[Path], names: list[str] | None = None,
                         warn: bool = True) -> tuple[np.ndarray, list[str]]:
    """(N, P) float64 parameters of ``files``, in their order, and the column names, from a CSV whose header has a
    ``file`` column (each sample's path below ``root``, with or without ``.npy``) and one column per parameter
    (``names`` picks some; default all).  A sample without a row, or a cell that is not a number, is named; rows for
    no sample are warned of, by the first rank (``warn``: the start-up check, which reads the table first, leaves that
    to the dataset)."""
    import csv

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"params file {path} does not exist")
    with open(path, newline="") as f:
        rows = [r for r in csv.reader(f) if r]
    header = [h.strip() for h in rows[0]] if rows else []
    if "file" not in header:
        raise ValueError(f"params file {path} needs a 'file' column naming each sample's .npy below {root}; "
                         f"columns: {', '.join(header) or 'none'}")
    names = [h for h in header if h != "file"] if names is None else list(names)
    missing = [n for n in names if n not in header]
    if missing or not names:
        raise ValueError(f"params file {path} has no column {missing[0]!r}" if missing else
                         f"params file {path} has no parameter columns beside 'file'")
    cols, at = [header.index(n) for n in names], header.index("file")
    table = {}
    for r, row in enumerate(rows[1:], start=2):
        key = row[at].strip().removesuffix(".npy")
        try:
            table[key] = [float(row[c]) for c in cols]
        except (ValueError, IndexError):
            raise ValueError(f"params file {path}, row {r}: a parameter is missing or not a number") from None
    keys = [f.relative_to(root).with_suffix("").as_posix() for f in files]
    absent = [k for k in keys if k not in table]
    if absent:
        raise ValueError(f"params file {path} has no row for {len(absent)} of {len(keys)} samples (first: {absent[0]})")
    stray = sorted(set(table) - set(keys))
    if stray and warn and env_rank() == 0:  # every rank builds the dataset; one says it.  # a subset of a larger table is fine, but a misspelt name would otherwise go unnoticed
        log.warning("params file %s has %d rows for no sample below %s (first: %s)", path, len(stray), root, stray[0])
    values = np.array([table[k] for k in keys], dtype=np.float64)
    if not np.isfinite(values).all():
        raise ValueError(f"params file {path} holds NaN or inf")
    return values, names


def pad_batch(items: list[dict], patch_size: int | tuple[int, ...], multiple: int = 0,
              max_size: tuple[int, ...] | None = None) -> dict:
    """Items of (C, L_i) sequences -> {"x": (B, C, L) zero-padded, "mask": (B, L) True at real positions, and the
    other keys stacked}, L the longest L_i rounded up to a multiple of ``patch_size``; a batch without padding has no
    mask.  Items of (C, *size_i) (images,
    volumes; ``patch_size`` one per axis) are padded at the end of every axis to the largest extent, (B, *size).
    ``multiple``: round each extent up to a multiple of it instead of the patch, no further than ``max_size``, so that
    batches take few distinct shapes."""
    axes = items[0]["x"].dim() - 1
    patch = (patch_size,) * axes if isinstance(patch_size, int) else tuple(patch_size)
    extent = [max(it["x"].shape[1 + a] for it in items) for a in range(axes)]  # the longest on each axis
    needed = [-(-n // p) * p for n, p in zip(extent, patch)]  # rounded up to the patch
    largest = [-(-n // (multiple or p)) * (multiple or p) for n, p in zip(extent, patch)]
    if max_size is not None:  # a multiple beyond the model's size: no further than the size, never below the need
        largest = [max(min(n, m), k) for n, m, k in zip(largest, max_size, needed)]
    x = torch.zeros(len(items), items[0]["x"].shape[0], *largest)  # (B, C, *size)
    mask = torch.zeros(len(items), *largest, dtype=torch.bool)
    for i, it in enumerate(items):
        region = tuple(slice(0, n) for n in it["x"].shape[1:])
        x[(i, slice(None), *region)] = it["x"]
        mask[(i, *region)] = True
    batch = {k: torch.stack([it[k] for it in items]) for k in items[0] if k != "x"}
    if bool(mask.all()):  # nothing padded (a length bucket of equal sizes): attention needs no mask, and gets none
        return batch | {"x": x}
    return batch | {"x": x, "mask": mask}
