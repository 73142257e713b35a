"""Image batches as ADM's evaluation suite reads them.

- A sample batch is an ``.npz`` with ``arr_0``: uint8 (N, H, W, 3) and optionally ``arr_1``:
  (N,) class labels (what ADM's and DiT's sampling scripts write with ``np.savez``).
- A reference batch is the same, and may also hold precomputed statistics ``mu``, ``sigma``
  (pool3) and ``mu_s``, ``sigma_s`` (spatial), as ADM's VIRTUAL_imagenet256_labeled.npz does.
- A folder of images (png, jpg, jpeg, bmp, webp), all of one size, read in sorted name order and
  made 8-bit RGB (16-bit grayscale scaled, not clipped: ``ditkit.data.images.to_rgb``).

Images are streamed in batches: a 50K × 256² batch is 9.8 GB and need not fit in memory.
"""
from __future__ import annotations

import zipfile
import zlib
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image

from ditkit.data.images import to_rgb

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
STAT_KEYS = ("mu", "sigma", "mu_s", "sigma_s")


def check_image_array(shape: tuple, dtype: np.dtype, source: str) -> None:
    """Raises unless (shape, dtype) is that of uint8 (N, H, W, 3) images with N > 0."""
    shape = tuple(shape)
    if dtype != np.uint8 or len(shape) != 4 or shape[-1] != 3 or shape[0] == 0:
        hint = " (channels first? transpose to N×H×W×3)" if len(shape) == 4 and shape[1] == 3 else ""
        raise ValueError(f"{source}: images must be uint8 (N, H, W, 3), got {dtype} {shape}{hint}")


def save_sample_batch(path: str | Path, images: np.ndarray, labels: np.ndarray | None = None) -> None:
    """Writes ADM's sample-batch format: arr_0 = images, arr_1 = labels when given."""
    check_image_array(images.shape, images.dtype, str(path))
    arrays = {"arr_0": images}
    if labels is not None:
        labels = np.asarray(labels)
        if labels.shape != (len(images),):
            raise ValueError(f"{path}: labels must have shape ({len(images)},), got {labels.shape}")
        arrays["arr_1"] = labels
    np.savez(path, **arrays)


class ImageSource:
    """N images of one shape (H, W, 3), handed out as uint8 (B, H, W, 3) batches."""

    name: str
    num_images: int
    image_shape: tuple[int, int, int]

    def batches(self, batch_size: int) -> Iterator[np.ndarray]:
        raise NotImplementedError


class ArrayImages(ImageSource):
    def __init__(self, images: np.ndarray, name: str = "array") -> None:
        check_image_array(images.shape, images.dtype, name)
        self.images = images
        self.name, self.num_images, self.image_shape = name, len(images), tuple(images.shape[1:])

    def batches(self, batch_size: int) -> Iterator[np.ndarray]:
        for i in range(0, self.num_images, batch_size):
            yield self.images[i:i + batch_size]


class NpzImages(ImageSource):
    """``key`` of an .npz, read from the zip member in batches rather than loaded whole."""

    def __init__(self, path: Path, key: str = "arr_0") -> None:
        self.path, self.key, self.name = path, key, f"{path}[{key}]"
        with _open_member(path, key) as f:
            shape, dtype, fortran = _read_npy_header(f)
        check_image_array(shape, dtype, self.name)
        if fortran:
            raise ValueError(f"{self.name} is stored in Fortran order; save a C-ordered array "
                             f"(np.ascontiguousarray) so that it can be read in batches")
        self.num_images, self.image_shape, self.dtype = shape[0], tuple(shape[1:]), dtype

    def batches(self, batch_size: int) -> Iterator[np.ndarray]:
        row_bytes = int(np.prod(self.image_shape)) * self.dtype.itemsize
        with _open_member(self.path, self.key) as f:
            _read_npy_header(f)
            for i in range(0, self.num_images, batch_size):
                n = min(batch_size, self.num_images - i)
                data = f.read(n * row_bytes)
                if len(data) != n * row_bytes:
                    raise ValueError(f"{self.name} is truncated after image {i + len(data) // row_bytes} of {self.num_images}")
                yield np.frombuffer(data, dtype=self.dtype).reshape(n, *self.image_shape)


@contextmanager
def damaged_npz_as_value_error(path: Path):
    """A damaged .npz (a bad CRC, a cut-off member) reads as one ValueError naming ``path``."""
    try:
        yield
    except (zipfile.BadZipFile, EOFError, zlib.error) as err:
        raise ValueError(f"{path} is corrupt or truncated ({err}); write it again") from None


@contextmanager
def _open_member(path: Path, key: str):
    """The raw .npy bytes of ``key`` inside the .npz at ``path``."""
    with damaged_npz_as_value_error(path), zipfile.ZipFile(path) as zf:
        if f"{key}.npy" not in zf.namelist():
            keys = sorted(n[:-4] for n in zf.namelist() if n.endswith(".npy"))
            raise ValueError(f"{path} has no '{key}' array (it has: {', '.join(keys) or 'none'})")
        with zf.open(f"{key}.npy") as f:
            yield f


def _read_npy_header(f) -> tuple[tuple, np.dtype, bool]:
    version = np.lib.format.read_magic(f)
    read = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}.get(version)
    if read is None:
        raise ValueError(f"unsupported .npy format version {version}")
    shape, fortran, dtype = read(f)
    return shape, dtype, fortran


class FolderImages(ImageSource):
    """Image files of a folder and its subfolders (an ImageFolder's class folders), sorted by path,
    converted to RGB, loaded batch by batch."""

    def __init__(self, folder: Path) -> None:
        self.files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not self.files:
            raise ValueError(f"{folder} holds no images ({', '.join(IMAGE_SUFFIXES)}) at any depth")
        self.name, self.num_images = str(folder), len(self.files)
        self.image_shape = self._read(self.files[0]).shape

    @staticmethod
    def _read(path: Path) -> np.ndarray:
        try:
            with Image.open(path) as im:
                return np.asarray(to_rgb(im))  # 16-bit grayscale scaled to 8 bits, not clipped
        except (OSError, SyntaxError, Image.DecompressionBombError) as err:
            raise ValueError(f"image {path} cannot be read ({err}); remove it or write it again") from None

    def batches(self, batch_size: int) -> Iterator[np.ndarray]:
        for i in range(0, self.num_images, batch_size):
            batch = []
            for path in self.files[i:i + batch_size]:
                image = self._read(path)
                if image.shape != self.image_shape:
                    raise ValueError(f"{path} is {image.shape[1]}×{image.shape[0]}, the other images of "
                                     f"{self.name} are {self.image_shape[1]}×{self.image_shape[0]}")
                batch.append(image)
            yield np.stack(batch)


def existing_input(path: str | Path) -> Path:
    """``path`` as a Path, if it is a folder or an .npz; one line naming it otherwise."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such file or folder: {path}")
    if path.is_file() and not zipfile.is_zipfile(path):
        raise ValueError(f"{path} is not an .npz file, or is truncated (expected an .npz with arr_0, or a folder "
                         "of images)")
    return path


def open_images(source: str | Path | np.ndarray) -> ImageSource:
    """An in-memory uint8 (N, H, W, 3) array, an .npz (its arr_0) or a folder of images."""
    if isinstance(source, np.ndarray):
        return ArrayImages(source)
    path = existing_input(source)
    return FolderImages(path) if path.is_dir() else NpzImages(path)


def has_images(path: str | Path) -> bool:
    """Whether ``path`` is a folder or an .npz with arr_0 (a reference may hold statistics only)."""
    path = existing_input(path)
    if path.is_dir():
        return True
    with damaged_npz_as_value_error(path), zipfile.ZipFile(path) as zf:
        return "arr_0.npy" in zf.namelist()


def npz_arrays(path: str | Path) -> dict[str, tuple[tuple, np.dtype]]:
    """Each array of an .npz -> (shape, dtype), read from the .npy headers alone (a 50K-image batch
    is not loaded to look at it)."""
    path = existing_input(path)
    with damaged_npz_as_value_error(path), zipfile.ZipFile(path) as zf:
        keys = [n[:-4] for n in zf.namelist() if n.endswith(".npy")]
    arrays = {}
    for key in keys:
        with _open_member(path, key) as f:
            shape, dtype, _ = _read_npy_header(f)
        arrays[key] = (tuple(shape), dtype)
    return arrays


def load_sample_batch(path: str | Path) -> tuple[np.ndarray, np.ndarray | None]:
    """A whole sample batch in memory: arr_0 images and arr_1 labels (None when absent)."""
    path = existing_input(path)
    with damaged_npz_as_value_error(path), np.load(path) as npz:
        if "arr_0" not in npz.files:
            raise ValueError(f"{path} has no 'arr_0' array (it has: {', '.join(npz.files) or 'none'})")
        images = npz["arr_0"]
        labels = npz["arr_1"] if "arr_1" in npz.files else None
    check_image_array(images.shape, images.dtype, f"{path}[arr_0]")
    if labels is not None and labels.shape != (len(images),):
        raise ValueError(f"{path}: arr_1 (labels) has shape {labels.shape}, expected ({len(images)},)")
    return images, labels


def read_reference_stats(path: str | Path) -> dict[str, np.ndarray]:
    """The precomputed statistics of an ADM reference batch: those of mu, sigma, mu_s, sigma_s it
    holds (pool3 needs both mu and sigma, spatial both mu_s and sigma_s), {} for a folder."""
    path = existing_input(path)
    if path.is_dir():
        return {}
    with damaged_npz_as_value_error(path), np.load(path) as npz:
        stats = {k: np.asarray(npz[k], dtype=np.float64) for k in STAT_KEYS if k in npz.files}
    for mean, cov in (("mu", "sigma"), ("mu_s", "sigma_s")):
        if (mean in stats) != (cov in stats):
            raise ValueError(f"{path} holds '{mean if mean in stats else cov}' without "
                             f"'{cov if mean in stats else mean}'; both are needed")
        if mean in stats and stats[cov].shape != (len(stats[mean]),) * 2:
            raise ValueError(f"{path}: '{cov}' has shape {stats[cov].shape}, expected {(len(stats[mean]),) * 2}")
    return stats
