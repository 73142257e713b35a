"""Image datasets for DiT training: ImageFolder or a labels file, ADM center crop, seeded flips.

Two layouts, both mapped to (image path, class id):
  * ImageFolder: ``root/<class name>/**/<image>``; class names sorted → ids 0..K-1 (torchvision's rule).
  * labels file: one ``image_path class_id`` per line; a relative path is relative to the file's folder.

A sample is ``(x, y)``: x float32 (3, H, W) in [-1, 1] (x = pixel / 127.5 − 1, as ADM and DiT), y an int.
With ``num_classes=0`` (an unconditional model) labels are not read from the folder layout: every
image under the root, in class folders or not, is a sample, and a labels file's class ids are ignored.

The random horizontal flip is a pure function of (seed, epoch, index), so it is the same whatever the
number of DataLoader workers and after a resume; call ``set_epoch`` each epoch for new flips.
An unreadable image is logged, counted and replaced by the next readable one; the run goes on.  A
dataset none of whose files can be read fails at construction, naming its folder.

Any PIL mode becomes 8-bit RGB (``to_rgb``): 16-bit grayscale is scaled by 1/257, not clipped.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

log = logging.getLogger(__name__)

# torchvision's IMG_EXTENSIONS, compared in lower case.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
# What PIL raises on a truncated, corrupt or hostile file; anything else is a bug and should surface.
_UNREADABLE = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)

_MASK64 = (1 << 64) - 1


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed for one sample's randomness: splitmix64 of the three integers, mixed in turn.

    Per-sample seeds keep augmentation independent of worker count and order: a Generator held by
    a Dataset would be copied into every DataLoader worker and repeat the same stream in each.
    """
    z = 0
    for v in (seed, epoch, index):
        z = (z + (v & _MASK64) + 0x9E3779B97F4A7C15) & _MASK64
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
        z ^= z >> 31
    return z >> 1


def center_crop_arr(image: Image.Image, image_size: int) -> np.ndarray:
    """ADM's center crop (guided-diffusion image_datasets.py, used by DiT's train.py) → (S, S, C) uint8.

    Halve with a BOX filter while the short side is ≥ 2·S (cheap anti-aliasing), BICUBIC-resize so
    the short side is S (long side rounded), then cut the central S×S window.
    """
    while min(image.size) >= 2 * image_size:
        image = image.resize(tuple(s // 2 for s in image.size), resample=Image.BOX)
    scale = image_size / min(image.size)
    image = image.resize(tuple(round(s * scale) for s in image.size), resample=Image.BICUBIC)
    arr = np.array(image)
    top = (arr.shape[0] - image_size) // 2
    left = (arr.shape[1] - image_size) // 2
    return arr[top : top + image_size, left : left + image_size]


_SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N", "I")  # "I": 16-bit PNGs in older Pillow, 32-bit TIFFs


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB from any PIL mode.  ``convert("RGB")`` clips 16-bit grayscale at 255, turning a
    16-bit PNG white, so 16-bit values v become round(v / 257) (65535 → 255, the exact inverse of
    8 → 16 bit's v·257) and float ("F") images in [0, 1] become round(255 v) (above 1: as 16-bit).
    RGBA, LA and P drop their alpha as ADM's ``convert("RGB")`` does."""
    if image.mode not in _SIXTEEN_BIT + ("F",):
        return image.convert("RGB")
    v = np.asarray(image, dtype=np.float64)
    scale = 255.0 if image.mode == "F" and v.size and np.nanmax(v) <= 1.0 else 1 / 257
    gray = np.clip(np.rint(np.nan_to_num(v) * scale), 0, 255).astype(np.uint8)
    return Image.fromarray(gray, "L").convert("RGB")


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def _scan_image_folder(root: Path) -> tuple[list[str], list[int], list[str]]:
    """ImageFolder layout → (paths, labels, class names); every class folder must hold an image."""
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise ValueError(f"no class folders in {root} (expected {root}/<class name>/<image files>)")
    paths, labels = [], []
    for label, name in enumerate(classes):
        found = sorted(
            os.path.join(d, f)
            for d, _, files in os.walk(root / name, followlinks=True)
            for f in files
            if _is_image(f)
        )
        if not found:
            raise ValueError(f"class folder {root / name} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
        paths += found
        labels += [label] * len(found)
    return paths, labels, classes


def _scan_all_images(root: Path) -> list[str]:
    """Every image under ``root``, at any depth, sorted: the samples of an unconditional model."""
    paths = sorted(os.path.join(d, f) for d, _, files in os.walk(root, followlinks=True) for f in files if _is_image(f))
    if not paths:
        raise ValueError(f"image folder {root} holds no images ({', '.join(IMAGE_EXTENSIONS)}) at any depth")
    return paths


def _read_labels_file(path: Path, num_classes: int | None, unconditional: bool = False) -> tuple[list[str], list[int]]:
    """``image_path class_id`` per line (blank lines ignored); the path may contain spaces.  For an
    unconditional model the class id may be absent (a line is then the path alone) and is ignored."""
    base = path.parent
    paths, labels = [], []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            parts = line.rsplit(maxsplit=1)
            if unconditional and (len(parts) == 1 or not parts[1].lstrip("-").isdigit()):
                parts = [line, "0"]  # the path alone: no label to read, none needed
            if len(parts) != 2 or not parts[1].lstrip("-").isdigit():
                raise ValueError(f"{path} line {lineno}: expected 'image_path class_id', got {line!r}")
            label = int(parts[1])
            if label < 0 or (num_classes is not None and label >= num_classes):
                limit = "" if num_classes is None else f" (num_classes={num_classes})"
                raise ValueError(f"{path} line {lineno}: class id {label} out of range{limit}")
            paths.append(str(base / parts[0]))  # an absolute parts[0] replaces base
            labels.append(label)
    if paths and not os.path.exists(paths[0]):
        # One cheap probe catches a wrong base folder; every file is checked when it is read.
        raise ValueError(f"{path} line 1: image {paths[0]} not found (relative paths are relative to {base})")
    return paths, labels


class ImageDataset(torch.utils.data.Dataset):
    """Images with class labels, ADM-center-cropped to ``image_size`` and optionally flipped.

    data: an ImageFolder root, or a labels file.  labels_file: a labels file (if relative, taken
    inside ``data``).  num_classes: if given, every label must lie in [0, num_classes); 0 (an
    unconditional model): every image under ``data`` is a sample and every label is 0.
    """

    def __init__(
        self,
        data: str | os.PathLike,
        image_size: int,
        labels_file: str | os.PathLike | None = None,
        num_classes: int | None = None,
        random_flip: bool = True,
        seed: int = 0,
    ):
        data = Path(data)
        if labels_file is not None:
            labels_file = Path(labels_file)
            if not labels_file.is_absolute() and data.is_dir():
                labels_file = data / labels_file
        elif data.is_file():
            labels_file = data
        if image_size <= 0:
            raise ValueError(f"image size must be positive, got {image_size}")
        unconditional = num_classes == 0
        if labels_file is not None:
            if not labels_file.is_file():
                raise ValueError(f"labels file {labels_file} does not exist")
            paths, labels = _read_labels_file(labels_file, None if unconditional else num_classes, unconditional)
            self.source, self.classes = str(labels_file), None
        else:
            if not data.is_dir():
                raise ValueError(f"image folder {data} does not exist")
            if unconditional:
                paths, labels, self.classes = _scan_all_images(data), None, None
            else:
                paths, labels, self.classes = _scan_image_folder(data)
            self.source = str(data)
        if not paths:
            raise ValueError(f"no images in {self.source}")
        if unconditional:
            labels = [0] * len(paths)
        if self.classes is not None and num_classes is not None and len(self.classes) > num_classes:
            raise ValueError(f"{data} has {len(self.classes)} class folders, more than num_classes={num_classes}")
        if num_classes is None:
            num_classes = len(self.classes) if self.classes is not None else max(labels) + 1
        self.num_classes = num_classes
        self.paths = paths
        self.labels = labels
        self.image_size = image_size
        self.random_flip = random_flip
        self.seed = seed
        self.epoch = 0
        # One flag per file in shared memory: DataLoader workers mark what they could not read and
        # the main process sees it (a plain int counter would stay in the worker).
        self._unreadable = torch.zeros(len(paths), dtype=torch.bool).share_memory_()
        self._check_one_readable()

    def _check_one_readable(self) -> None:
        """Reads files in order until one decodes (usually the first), so that a folder of files
        none of which is an image fails now, by name, not in a DataLoader worker mid-run."""
        skipped = []
        for i in range(len(self)):
            if self._load(i, skipped) is not None:
                for path, err in skipped:  # named only now: a folder of nothing readable gets one line
                    log.warning("skipping unreadable image %s: %s", path, err)
                return
        raise ValueError(f"no readable image in {self.source}: {len(self)} file(s) skipped as unreadable "
                         f"(first: {self.paths[0]}); check that they are images and not truncated")

    def __len__(self) -> int:
        return len(self.paths)

    def set_epoch(self, epoch: int) -> None:
        """Selects the epoch's flips; DataLoader workers see it if set before iteration starts."""
        self.epoch = epoch

    @property
    def num_unreadable(self) -> int:
        """How many distinct files could not be read so far (by this process and its workers)."""
        return int(self._unreadable.sum())

    def unreadable_files(self) -> list[str]:
        return [self.paths[i] for i in self._unreadable.nonzero().flatten().tolist()]

    def _load(self, index: int, skipped: list | None = None) -> np.ndarray | None:
        """The cropped image, or None if unreadable: logged, or added to ``skipped`` as (path, error)."""
        if self._unreadable[index]:
            return None
        path = self.paths[index]
        try:
            with Image.open(path) as im:
                rgb = to_rgb(im)  # decodes fully, so a truncated file fails here
        except _UNREADABLE as e:
            self._unreadable[index] = True
            if skipped is None:
                log.warning("skipping unreadable image %s: %s", path, e)
            else:
                skipped.append((path, e))
            return None
        return center_crop_arr(rgb, self.image_size)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        # An unreadable file is replaced by the next readable one (with its label).
        for k in range(len(self)):
            i = (index + k) % len(self)
            arr = self._load(i)
            if arr is not None:
                break
        else:
            raise ValueError(f"no readable image in {self.source} ({len(self)} files tried)")
        if self.random_flip and sample_seed(self.seed, self.epoch, index) & 1:
            arr = arr[:, ::-1]
        x = torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1)  # (H, W, 3) → (3, H, W)
        return x.float().div_(127.5).sub_(1.0), self.labels[i]
