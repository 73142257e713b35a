"""Datasets of arrays and physical fields: target fields x (N, C, H, W), a table of parameters per sample
(N, P, named columns) and optional conditioning fields (N, C_cond, H, W), each standardised with
statistics of the training set.  The grid may also be 1D, (N, C, L), or 3D, (N, C, D, H, W) volumes or
(N, C, T, H, W) videos (``data.axes``: the number of grid axes, inferred for 2D and for five-axis arrays).

Files: an array of all samples in ``.npy`` (memory-mapped), ``.npz`` or HDF5 (``.h5``/``.hdf5``,
read lazily; needs h5py), or a folder with one ``.npy``/``.npz`` file per sample (sorted by name).
(N, H, W) arrays and (H, W) per-sample files are one channel.  Parameters come from a CSV with a
header row of names, or from an (N, P) array with names given.

Normalisation (``FieldNormalizer``), per channel c of x and of the field, per column of params:
    z = (T(x) − μ_c) / s_c,   T(x) = log(x + eps) on log channels (positive fields), x elsewhere
so that samples come back in physical units through  x = T⁻¹(z s_c + μ_c).
"""
from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

ARRAY_SUFFIXES = (".npy", ".npz", ".h5", ".hdf5")
SCAN_CHUNK = 64  # samples read at a time by the validation and statistics pass


def _h5py():
    try:
        import h5py
    except ImportError:
        raise ImportError("reading HDF5 files needs h5py: pip install h5py") from None
    return h5py


def _pick_key(keys: list[str], key: str | None, path: Path, what: str) -> str:
    if key is None and len(keys) == 1:
        return keys[0]
    if key is None or key not in keys:
        wanted = "a key" if key is None else f"key {key!r}"
        raise ValueError(f"{what} file {path} holds arrays {', '.join(sorted(keys))}; give {wanted} that exists")
    return key


def _open_array(path: Path, key: str | None, what: str):
    """The whole array: memory-mapped (.npy), loaded (.npz) or an h5py dataset (HDF5)."""
    if not path.exists():
        raise FileNotFoundError(f"{what} file {path} does not exist")
    suffix = path.suffix.lower()
    if suffix == ".npy":
        return np.load(path, mmap_mode="r")
    if suffix == ".npz":
        with np.load(path) as z:
            return z[_pick_key(list(z.keys()), key, path, what)]
    if suffix in (".h5", ".hdf5"):
        f = _h5py().File(path, "r")
        datasets = []
        f.visititems(lambda name, obj: datasets.append(name) if hasattr(obj, "shape") else None)
        return f[_pick_key(datasets, key, path, what)]
    raise ValueError(f"{what} file {path}: unsupported format {suffix!r}; use {', '.join(ARRAY_SUFFIXES)} or a folder")


GRID_NAMES = {1: "L", 2: "H, W", 3: "D, H, W"}  # a sample's grid axes, by their number (data.axes)


def infer_axes(ndim: int) -> int:
    """The grid axes of a one-file array of ``ndim`` dimensions when ``data.axes`` is not given: (N, C, D, H, W) is
    3, (N, C, H, W) and (N, H, W) are 2 (so 1D arrays and one-channel volumes need ``data.axes``)."""
    return 3 if ndim == 5 else 2


class FieldSource:
    """Samples (C, *grid) of one kind (``what``: "x" or "field") from one array file or a folder; ``axes``: the
    number of grid axes, 1 (L), 2 (H, W) or 3 (D, H, W, or T, H, W for video); None infers it (``infer_axes``).
    A one-file array is (N, C, *grid) or (N, *grid); a folder holds one (C, *grid) or (*grid) array per sample."""

    def __init__(self, path: str | Path, key: str | None = None, what: str = "x", axes: int | None = None):
        self.path, self.key, self.what = Path(path), key, what
        if axes is not None and axes not in GRID_NAMES:
            raise ValueError(f"data.axes must be 1, 2 or 3, got {axes}")
        self._array, self._pid = None, None
        if self.path.is_dir():
            self.files = sorted(p for p in self.path.iterdir() if p.suffix.lower() in (".npy", ".npz"))
            if not self.files:
                raise ValueError(f"{what} folder {self.path} holds no .npy or .npz files")
            self.axes = axes if axes is not None else infer_axes(np.asarray(_open_array(self.files[0], key, what)).ndim + 1)
            self.shape = (len(self.files), *self._sample_file(0).shape)
        else:
            self.files = None
            shape = tuple(self.array().shape)
            self.axes = axes if axes is not None else infer_axes(len(shape))
            if len(shape) not in (self.axes + 1, self.axes + 2):
                grid = GRID_NAMES[self.axes]
                raise ValueError(f"{what} array {self.name()} has shape {shape}; expected (N, C, {grid}) or (N, {grid})"
                                 + ("" if axes is not None else " (data.axes sets the number of grid axes)"))
            self.shape = shape if len(shape) == self.axes + 2 else (shape[0], 1, *shape[1:])

    def array(self):
        """The open array.  An HDF5 handle is not shared across a fork: each DataLoader worker
        reopens the file (a memory map or a loaded .npz array is shared as is)."""
        reopen = self._pid != os.getpid() and self.path.suffix.lower() in (".h5", ".hdf5")
        if self._array is None or reopen:
            self._array, self._pid = _open_array(self.path, self.key, self.what), os.getpid()
        return self._array

    def __getstate__(self) -> dict:
        return self.__dict__ | {"_array": None, "_pid": None}

    def name(self, i: int | None = None) -> str:
        """How the user knows a sample: ``x.npy[12]``, ``x.h5:fields[12]``, ``samples/0012.npy``."""
        if self.files is not None:
            return str(self.path if i is None else self.files[i])
        base = f"{self.path}:{self.key}" if self.key else str(self.path)
        return base if i is None else f"{base}[{i}]"

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, i: int) -> np.ndarray:
        """Sample i as (C, *grid)."""
        if self.files is None:
            return np.asarray(self.array()[i]).reshape(self.shape[1:])
        a = self._sample_file(i)
        if a.shape != self.shape[1:]:
            raise ValueError(f"{self.what} file {self.files[i]} has shape {a.shape}; the first file, "
                             f"{self.files[0].name}, has {self.shape[1:]}")
        return a

    def _sample_file(self, i: int) -> np.ndarray:
        a = np.asarray(_open_array(self.files[i], self.key, self.what))
        a = a[None] if a.ndim == self.axes else a
        if a.ndim != self.axes + 1:
            grid = GRID_NAMES[self.axes]
            raise ValueError(f"{self.what} file {self.files[i]} has shape {a.shape}; expected (C, {grid}) or ({grid})")
        return a

    def read(self, indices: np.ndarray) -> np.ndarray:
        """Samples at sorted ``indices`` as (n, C, *grid) float64."""
        if self.files is None:
            return np.asarray(self.array()[indices], dtype=np.float64).reshape(len(indices), *self.shape[1:])
        return np.stack([self[i] for i in indices]).astype(np.float64)


def read_params(path: str | Path, key: str | None = None, names: Sequence[str] | None = None) -> tuple[np.ndarray, list[str]]:
    """(N, P) float64 parameters and their names.  CSV: the header names the columns and ``names``
    picks some (default: all).  Arrays (N, P) or (N,): ``names`` names all columns (default p0, p1…)."""
    path = Path(path)
    if path.suffix.lower() == ".csv":
        if not path.exists():
            raise FileNotFoundError(f"params file {path} does not exist")
        with open(path, newline="") as f:
            rows = [r for r in csv.reader(f) if r]
        if not rows:
            raise ValueError(f"params file {path} is empty")
        header = [h.strip() for h in rows[0]]
        names = list(header if names is None else names)
        for name in names:
            if name not in header:
                raise ValueError(f"params file {path} has no column {name!r}; columns: {', '.join(header)}")
        cols = [header.index(n) for n in names]
        values = np.empty((len(rows) - 1, len(cols)))
        for r, row in enumerate(rows[1:]):
            for j, c in enumerate(cols):
                try:
                    values[r, j] = float(row[c])
                except (ValueError, IndexError):
                    cell = row[c] if c < len(row) else "<missing>"
                    raise ValueError(f"params file {path}, row {r + 2}, column {header[c]!r}: {cell!r} is not a number") from None
    else:
        values = np.array(_open_array(path, key, "params"), dtype=np.float64)
        values = values[:, None] if values.ndim == 1 else values
        if values.ndim != 2:
            raise ValueError(f"params array {path} has shape {values.shape}; expected (N, P)")
        names = [f"p{j}" for j in range(values.shape[1])] if names is None else list(names)
        if len(names) != values.shape[1]:
            raise ValueError(f"params array {path} has {values.shape[1]} columns but {len(names)} names: {names}")
    bad = np.argwhere(~np.isfinite(values))
    if len(bad):
        r, j = bad[0]
        raise ValueError(f"params file {path}: sample {r}, column {names[j]!r} is {values[r, j]}")
    return values, names


class FieldNormalizer:
    """Standardisation of x, the field and params with training-set statistics (module docstring).
    Its state is plain: {"x": {"mean": (C,), "std": (C,), "log": [bool]·C, "eps": float, "axes": grid axes (2 when
    absent)},
    "field": {…} (if any), "params": {"mean": (P,), "std": (P,), "names": [str]} (if any)},
    so a checkpoint holding it loads with ``torch.load(weights_only=True)``."""

    def __init__(self, state: dict):
        unknown = set(state) - {"x", "field", "params"}
        if "x" not in state or unknown:
            raise ValueError(f"normalizer state needs key 'x' and only 'x', 'field', 'params'; got {sorted(state)}")
        self.state = {k: dict(v) for k, v in state.items()}

    def state_dict(self) -> dict:
        return {k: dict(v) for k, v in self.state.items()}

    def __contains__(self, key: str) -> bool:
        return key in self.state

    def normalize(self, value: torch.Tensor, key: str = "x") -> torch.Tensor:
        """Physical units -> standardised.  x/field: (..., C, *grid); params: (..., P)."""
        s = self._stats(key)
        mean, std = self._shaped(s["mean"], value, key), self._shaped(s["std"], value, key)
        if "log" in s and any(s["log"]):
            log = self._shaped(torch.tensor(s["log"]), value, key)
            value = torch.where(log, torch.log(torch.clamp(value + s["eps"], min=torch.finfo(value.dtype).tiny)), value)
        return (value - mean) / std

    def denormalize(self, value: torch.Tensor, key: str = "x") -> torch.Tensor:
        """Standardised -> physical units (the exact inverse of ``normalize`` on non-negative data).
        Log-transformed channels come back non-negative: a value below log(eps), which no
        training sample has, maps to 0 rather than to a slightly negative density."""
        s = self._stats(key)
        value = value * self._shaped(s["std"], value, key) + self._shaped(s["mean"], value, key)
        if "log" in s and any(s["log"]):
            log = self._shaped(torch.tensor(s["log"]), value, key)
            value = torch.where(log, (torch.exp(value) - s["eps"]).clamp_min(0), value)
        return value

    def _stats(self, key: str) -> dict:
        if key not in self.state:
            raise KeyError(f"normalizer has no statistics for {key!r}; it has {', '.join(self.state)}")
        return self.state[key]

    def _shaped(self, stat: torch.Tensor, value: torch.Tensor, key: str) -> torch.Tensor:
        """(C,) -> broadcastable over (..., C, *grid), or (P,) over (..., P), on value's device."""
        n = stat.shape[0]
        grid = 0 if key == "params" else self.state[key].get("axes", 2)
        axis = -1 - grid
        if value.dim() < -axis or value.shape[axis] != n:
            raise ValueError(f"{key} of shape {tuple(value.shape)} does not have the normalizer's {n} "
                             f"{'columns' if key == 'params' else 'channels'} at dim {axis}")
        stat = stat.to(device=value.device, dtype=value.dtype if stat.dtype != torch.bool else torch.bool)
        return stat.reshape(n, *[1] * grid)


class _Moments:
    """Per-channel mean and variance merged chunk by chunk (Chan et al.), in float64."""

    def __init__(self, channels: int):
        self.n, self.mean, self.m2 = 0, np.zeros(channels), np.zeros(channels)
        self.peak = np.zeros(channels)  # largest |value| seen, for the error of ``result``

    def update(self, v: np.ndarray) -> None:  # v: (C, m)
        v = np.asarray(v, dtype=np.float64)
        self.peak = np.maximum(self.peak, np.abs(v).max(1))
        with np.errstate(over="ignore", invalid="ignore"):  # an overflow becomes inf, refused by ``result``
            nb, mb = v.shape[1], v.mean(1)
            delta, n = mb - self.mean, self.n + nb
            self.m2 += ((v - mb[:, None]) ** 2).sum(1) + delta**2 * self.n * nb / n
            self.mean += delta * nb / n
        self.n = n

    def result(self, labels: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, std) as float64 tensors.  Both must be finite and within float32's range, in which
        the network and sampling (``denormalize`` in float32) use them; ``labels[c]`` names channel
        (or column) c in the error."""
        std = np.sqrt(self.m2 / self.n)
        std[std == 0] = 1.0  # a constant channel is only centred
        limit = float(np.finfo(np.float32).max)
        for name, stat in (("mean", self.mean), ("standard deviation", std)):
            bad = np.flatnonzero(~(np.abs(stat) <= limit))
            if len(bad):
                c = int(bad[0])
                raise ValueError(f"{labels[c]}: non-finite {name} in float32 ({stat[c]:.3g}; values up to "
                                 f"{self.peak[c]:.3g}); rescale the data or log-transform it (data.log_transform)")
        return torch.from_numpy(self.mean.copy()), torch.from_numpy(std)


def scan_fields(source: FieldSource, indices: np.ndarray, log: list[bool], eps: float, fit: bool) -> dict | None:
    """Check every sample (finite; x > −eps on log channels) and, with ``fit``, return the
    normaliser statistics of T(x) over ``indices``."""
    moments = _Moments(source.shape[1])
    log_idx = np.flatnonzero(log)
    num_bad, first_bad = 0, None  # every sample is read before refusing, to say how many values are bad
    for start in range(0, len(indices), SCAN_CHUNK):
        chunk = np.sort(indices[start:start + SCAN_CHUNK])
        a = source.read(chunk)  # (n, C, *grid)
        bad = np.argwhere(~np.isfinite(a))
        if len(bad) and first_bad is None:
            i, c = bad[0][:2]
            first_bad = f"{source.name(int(chunk[i]))} channel {c} holds {a[tuple(bad[0])]}"
        num_bad += len(bad)
        if num_bad:
            continue
        if len(log_idx):
            sub = a[:, log_idx]
            if (sub <= -eps).any():
                i, c = np.argwhere(sub <= -eps)[0][:2]
                raise ValueError(f"{source.name(int(chunk[i]))}: channel {log_idx[c]} is log-transformed but holds "
                                 f"{sub[i, c].min():.4g}; log(x + eps) with eps={eps:g} needs x > {-eps:g}")
            a[:, log_idx] = np.log(sub + eps)
        if fit:
            moments.update(np.moveaxis(a, 1, 0).reshape(a.shape[1], -1))
    if num_bad:
        raise ValueError(f"{source.what} data {source.name()} holds {num_bad} NaN or inf values (first: {first_bad}); "
                         "remove or repair those samples")
    if not fit:
        return None
    mean, std = moments.result([f"{source.what} data {source.name()} channel {c}" for c in range(source.shape[1])])
    return {"mean": mean, "std": std, "log": [bool(b) for b in log], "eps": float(eps), "axes": source.axes}


def _log_mask(channels: Sequence[int], n: int, what: str) -> list[bool]:
    for c in channels:
        if not -n <= c < n:
            raise ValueError(f"{what} log channel {c} does not exist; the {what} has {n} channels")
    return [c in {ch % n for ch in channels} for c in range(n)]


def split_indices(n: int, val_fraction: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A seeded random split of range(n) into (train, val) index arrays."""
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    perm = np.random.default_rng(seed).permutation(n)
    n_val = int(round(n * val_fraction))
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


class FieldDataset(Dataset):
    """Items ``{"x": (C, *grid), "params": (P,), "field": (C_cond, *grid), "index": int}`` (params and
    field only when given), float32 and standardised; the grid is (H, W), or (L) or (D, H, W) with ``axes``.

    ``indices`` restricts the dataset to a subset (a train/val split).  Without ``normalizer`` the
    statistics are fitted on this subset (the training set); give the training set's normaliser
    to a validation set.  Every sample is checked once at construction (``validate``).
    ``augment`` applies one random symmetry of the square (flips, transpose) to the last two axes of x and field
    together, for statistically isotropic fields (of a volume, each slice; of a video, each frame); 1D data has
    no such symmetry and refuses it."""

    def __init__(self, x: str | Path, params: str | Path | None = None, field: str | Path | None = None, *,
                 x_key: str | None = None, params_key: str | None = None, field_key: str | None = None,
                 param_names: Sequence[str] | None = None, log_channels: Sequence[int] | None = None,
                 field_log_channels: Sequence[int] | None = None, eps: float = 1e-6,
                 indices: Sequence[int] | None = None, normalizer: FieldNormalizer | None = None,
                 augment: bool = False, validate: bool = True, axes: int | None = None):
        self.x = FieldSource(x, x_key, "x", axes)
        N, C, *size = self.x.shape
        self.field = None if field is None else FieldSource(field, field_key, "field", self.x.axes)
        if self.field is not None and (len(self.field), *self.field.shape[2:]) != (N, *size):
            raise ValueError(f"field {self.field.name()} has shape {self.field.shape}; x {self.x.name()} has "
                             f"{self.x.shape}, so the field must be ({N}, C_cond, {', '.join(map(str, size))})")
        self.params, self.param_names = (None, []) if params is None else read_params(params, params_key, param_names)
        self.params_source = params
        if self.params is not None and len(self.params) != N:
            raise ValueError(f"params file {params} has {len(self.params)} rows but x {self.x.name()} has {N} samples")
        self.indices = np.arange(N) if indices is None else np.asarray(indices, dtype=np.int64)
        if len(self.indices) and (self.indices.min() < 0 or self.indices.max() >= N):
            raise ValueError(f"indices must lie in [0, {N}) for x {self.x.name()}")
        if augment and (len(size) < 2 or size[-1] != size[-2]):
            raise ValueError(f"augment (data.flip) needs square slices of the last two axes, x {self.x.name()} is "
                             f"{'×'.join(map(str, size))}: set data.flip=false")
        self.augment = augment

        if normalizer is None:
            self.normalizer = self._fit(log_channels or (), field_log_channels or (), eps)
        else:
            self.normalizer = normalizer
            self._check_normalizer(log_channels, field_log_channels)
            if validate:
                scan_fields(self.x, self.indices, normalizer.state["x"]["log"], normalizer.state["x"]["eps"], fit=False)
                if self.field is not None:
                    s = normalizer.state["field"]
                    scan_fields(self.field, self.indices, s["log"], s["eps"], fit=False)

    def _fit(self, log_channels: Sequence[int], field_log_channels: Sequence[int], eps: float) -> FieldNormalizer:
        if not len(self.indices):
            raise ValueError("cannot fit a normalizer on an empty set of samples")
        state = {"x": scan_fields(self.x, self.indices, _log_mask(log_channels, self.x.shape[1], "x"), eps, fit=True)}
        if self.field is not None:
            mask = _log_mask(field_log_channels, self.field.shape[1], "field")
            state["field"] = scan_fields(self.field, self.indices, mask, eps, fit=True)
        elif field_log_channels:
            raise ValueError("field_log_channels given but no field")
        if self.params is not None:
            moments = _Moments(self.params.shape[1])
            moments.update(self.params[self.indices].T)
            mean, std = moments.result([f"params file {self.params_source} column {n!r}" for n in self.param_names])
            state["params"] = {"mean": mean, "std": std, "names": list(self.param_names)}
        return FieldNormalizer(state)

    def _check_normalizer(self, log_channels, field_log_channels) -> None:
        st = self.normalizer.state
        for key, src in (("x", self.x), ("field", self.field)):
            if (src is None) != (key not in st):
                raise ValueError(f"the normalizer {'has' if key in st else 'has no'} {key} statistics but the data "
                                 f"{'has no' if src is None else 'has a'} {key}")
            if src is not None and len(st[key]["mean"]) != src.shape[1]:
                raise ValueError(f"the normalizer was fitted on {len(st[key]['mean'])} {key} channels, "
                                 f"{src.name()} has {src.shape[1]}")
        for given, key in ((log_channels, "x"), (field_log_channels, "field")):
            if given is not None and key in st and _log_mask(given, len(st[key]["log"]), key) != st[key]["log"]:
                raise ValueError(f"{key} log channels {list(given)} differ from the normalizer's "
                                 f"{[c for c, b in enumerate(st[key]['log']) if b]}")
        if self.params is not None and st.get("params", {}).get("names") != self.param_names:
            raise ValueError(f"params {self.param_names} differ from the normalizer's {st.get('params', {}).get('names')}")

    def model_shape(self) -> dict:
        """What the network must be built for: in_channels, input_size, num_params, cond_channels."""
        _, C, *size = self.x.shape
        return {"in_channels": C, "input_size": size[0] if len(size) == 2 and size[0] == size[1] else list(size),
                "num_params": 0 if self.params is None else self.params.shape[1],
                "cond_channels": 0 if self.field is None else self.field.shape[1]}

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict:
        j = int(self.indices[i])
        item = {"x": self.normalizer.normalize(torch.from_numpy(np.array(self.x[j], dtype=np.float64)), "x").float()}
        if self.field is not None:
            f = torch.from_numpy(np.array(self.field[j], dtype=np.float64))
            item["field"] = self.normalizer.normalize(f, "field").float()
        if self.params is not None:
            item["params"] = self.normalizer.normalize(torch.from_numpy(self.params[j]), "params").float()
        if self.augment:
            flip_h, flip_w, transpose = torch.randint(0, 2, (3,)).tolist()
            for key in ("x", "field"):
                if key in item:
                    v = item[key].flip(-1) if flip_w else item[key]
                    v = v.flip(-2) if flip_h else v
                    item[key] = v.transpose(-1, -2).contiguous() if transpose else v.contiguous()
        item["index"] = j
        return item
