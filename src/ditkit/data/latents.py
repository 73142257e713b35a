"""A VAE latent cache: encode a dataset once, then train from the cached posteriors.

Layout of a cache folder:
  manifest.json          count, shapes, the VAE's scale and shift factors and downsampling, source, vae, dtype,
                         shard list (name, start, count), and once every shard is written the per-channel
                         mean and std of the latents (``channel_mean``, ``channel_std``)
  shard_00000.safetensors
      mean  (n, 2, C, h, w)  posterior mean in DiT's units, (mean − shift_factor) · scale_factor (SD's VAE:
                             0.18215 and no shift, C = 4, h = H/8); view 0 = image, 1 = its horizontal flip
      std   (n, 2, 4, h, w)  posterior std, same units
      label (n,) int64
      image (n, 3, H, W) uint8, only with ``images=True`` (``ditkit extract --images``): the center-cropped
            image itself, for REPA's encoder in the training step (its flip is taken with view 1)
mean and std are float16 by default: latents are O(1) and std ≥ 1e-4 or so, where float16 keeps
~3 significant digits, far below the posterior noise DiT adds; ImageNet-256 then takes ~42 GB,
and its images 3·256·256 bytes = 197 KB each, ~252 GB more.

Every file is written to a temporary name and renamed, so a file that exists is complete and an
interrupted extraction resumes by skipping the shards already there.  Shard k covers images
[k·shard_size, (k+1)·shard_size); processes with (rank, world_size) split shards k ≡ rank.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ditkit.data.images import ImageDataset, sample_seed
from ditkit.models.vae import decode, downsampling, encode, load_vae, scale_and_shift
from ditkit.utils.io import atomic_write, atomic_write_text

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
FORMAT = "ditkit-latents-v1"


def shard_name(k: int) -> str:
    return f"shard_{k:05d}.safetensors"


def _plan(dataset, vae, shard_size: int, source: str, vae_name: str, dtype: torch.dtype, images: bool) -> dict:
    """The manifest: everything a reader needs and a resumed run must agree with."""
    x0, _ = dataset[0]  # (3, H, W)
    f = downsampling(vae)
    if any(s % f for s in x0.shape[1:]):
        raise ValueError(f"image size {list(x0.shape[1:])} is not divisible by {f} (the VAE downsamples by {f})")
    latent_shape = list(encode(vae, x0[None])[0].shape[1:])  # (C, H/f, W/f), C = 4 for the SD VAE
    scale, shift = scale_and_shift(vae)
    n = len(dataset)
    shards = [
        {"name": shard_name(k), "start": s, "count": min(shard_size, n - s)}
        for k, s in enumerate(range(0, n, shard_size))
    ]
    return {
        "format": FORMAT,
        "count": n,
        "image_shape": list(x0.shape),
        "latent_shape": latent_shape,
        "views": ["image", "hflip"],
        "scale_factor": scale,  # the VAE config's: z = (latent − shift_factor) · scale_factor
        "shift_factor": shift,
        "downsample": f,
        "dtype": str(dtype).removeprefix("torch."),
        "images": images,
        "num_classes": getattr(dataset, "num_classes", None),
        "classes": getattr(dataset, "classes", None),  # ImageFolder's class folder names, by id
        "source": source,
        "vae": vae_name,
        "shard_size": shard_size,
        "shards": shards,
    }


@torch.no_grad()
def extract_latents(
    dataset,
    vae,
    out_dir: str | os.PathLike,
    shard_size: int = 10_000,
    batch_size: int = 64,
    device: torch.device | str | None = None,
    num_workers: int = 4,
    dtype: torch.dtype = torch.float16,
    source: str | None = None,
    vae_name: str = "",
    rank: int = 0,
    world_size: int = 1,
    progress: bool = False,
    images: bool = False,
) -> dict:
    """Encodes ``dataset`` (samples (x in [-1, 1] (3, H, W), label), not flipped) and its flips into
    ``out_dir``; returns the manifest.  ``images``: also store each image as uint8 (for REPA).
    Shards already on disk are skipped, so rerunning the same command resumes; a different dataset
    or shard size in the same folder is refused."""
    if getattr(dataset, "random_flip", False):
        raise ValueError("extract_latents needs a dataset without random flips (it stores both views)")
    if shard_size <= 0 or batch_size <= 0:
        raise ValueError(f"shard_size and batch_size must be positive, got {shard_size} and {batch_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    source = source if source is not None else str(getattr(dataset, "source", type(dataset).__name__))
    manifest = _plan(dataset, vae, shard_size, source, vae_name, dtype, images)
    if (out / MANIFEST).exists():
        old = {"images": False, **read_manifest(out)}
        for key in ("count", "image_shape", "shard_size", "source", "vae", "dtype", "images"):
            if not _same(key, old[key], manifest[key]):
                raise ValueError(
                    f"{out / MANIFEST} is a cache with {key}={old[key]!r}, not {manifest[key]!r}: "
                    "use another output folder, or delete this one only if it is not wanted"
                )
        manifest.update({k: old[k] for k in STATS if k in old})  # computed once, kept by a rerun
    atomic_write_text(out / MANIFEST, json.dumps(manifest, indent=1))

    device = torch.device(device) if device is not None else next(vae.parameters()).device
    todo = [
        s for k, s in enumerate(manifest["shards"]) if k % world_size == rank and not (out / s["name"]).exists()
    ]
    if not todo:
        return _with_channel_stats(out, manifest)
    for s in todo:  # what a killed run of this rank left half-written
        for stale in out.glob(f".{s['name']}.tmp*"):
            stale.unlink()
    # One loader for all shards to do (workers start once); no batch crosses a shard boundary.
    batches = [
        list(range(b, min(b + batch_size, s["start"] + s["count"])))
        for s in todo
        for b in range(s["start"], s["start"] + s["count"], batch_size)
    ]
    loader = iter(
        torch.utils.data.DataLoader(
            dataset, batch_sampler=batches, num_workers=num_workers, pin_memory=device.type == "cuda"
        )
    )
    for s in _progress(todo, progress):
        means, stds, labels, pixels = [], [], [], []
        for _ in range(-(-s["count"] // batch_size)):
            x, y = next(loader)
            x = x.to(device, non_blocking=True)
            b = x.shape[0]
            mean, std = encode(vae, torch.cat([x, x.flip(-1)]))  # (2B, C, h, w): images, then flips
            means.append(mean.unflatten(0, (2, b)).transpose(0, 1).to(dtype).cpu())  # (B, 2, C, h, w)
            stds.append(std.unflatten(0, (2, b)).transpose(0, 1).to(dtype).cpu())
            labels.append(torch.as_tensor(y, dtype=torch.int64))
            if images:  # x = p / 127.5 − 1 exactly inverted
                pixels.append(((x.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).cpu())  # (B, 3, H, W)
        tensors = {
            "mean": torch.cat(means).contiguous(),
            "std": torch.cat(stds).contiguous(),
            "label": torch.cat(labels),
        }
        if images:
            tensors["image"] = torch.cat(pixels).contiguous()
        atomic_write(out / s["name"], lambda tmp: save_file(tensors, tmp, metadata={"start": str(s["start"])}))
    return _with_channel_stats(out, manifest)


def _same(key: str, old, new) -> bool:
    """Whether a rerun's manifest value agrees with the cache's: the data and the VAE are paths, the same
    folder however spelled (vae16s, vae16s/, its absolute path or a link to it)."""
    if key in ("source", "vae"):
        return os.path.realpath(os.path.expanduser(old)) == os.path.realpath(os.path.expanduser(new))
    return old == new


STATS = ("channel_mean", "channel_std")


def channel_stats(cache_dir: str | os.PathLike, manifest: dict, chunk: int = 1024) -> tuple[list[float], list[float]]:
    """Per-channel mean μ_c and std σ_c of the latents z = mean + std · ε the dataset draws, over every
    image, both views and every position, streamed shard by shard in float64:

        μ_c = E[mean_c],   σ_c² = E[mean_c²] + E[std_c²] − μ_c²   (ε is independent of the posterior)
    """
    out = Path(cache_dir)
    C = manifest["latent_shape"][0]
    s1, s2, n = torch.zeros(C, dtype=torch.float64), torch.zeros(C, dtype=torch.float64), 0
    dims = (0, 1, 3, 4)
    for s in manifest["shards"]:
        with safe_open(str(out / s["name"]), framework="pt") as f:
            for a in range(0, s["count"], chunk):  # a few hundred MB at a time, whatever the shard size
                mean = f.get_slice("mean")[a:a + chunk].double()  # (chunk, 2, C, h, w)
                std = f.get_slice("std")[a:a + chunk].double()
                s1 += mean.sum(dims)
                s2 += (mean**2 + std**2).sum(dims)
                n += mean.numel() // C
    mu = s1 / n
    return mu.tolist(), (s2 / n - mu**2).clamp_min(0).sqrt().tolist()


def _with_channel_stats(out: Path, manifest: dict) -> dict:
    """The manifest with ``channel_mean`` and ``channel_std``, computed and written once the last shard is on
    disk (by whichever process of an extraction finishes last); as it is while shards are missing."""
    if all(k in manifest for k in STATS) or not all((out / s["name"]).is_file() for s in manifest["shards"]):
        return manifest
    mean, std = channel_stats(out, manifest)
    manifest = {**manifest, "channel_mean": mean, "channel_std": std}
    atomic_write_text(out / MANIFEST, json.dumps(manifest, indent=1))
    return manifest


def normalize(z: torch.Tensor, mean, std) -> torch.Tensor:
    """(z − μ_c) / σ_c over the channel axis of z (C, h, w) or (B, C, h, w)."""
    mu, sigma = (torch.as_tensor(v, dtype=z.dtype, device=z.device).view(-1, 1, 1) for v in (mean, std))
    return (z - mu) / sigma


def denormalize(x: torch.Tensor, mean, std) -> torch.Tensor:
    """x · σ_c + μ_c, the inverse of ``normalize``."""
    mu, sigma = (torch.as_tensor(v, dtype=x.dtype, device=x.device).view(-1, 1, 1) for v in (mean, std))
    return x * sigma + mu


def norm_stats(data) -> tuple[list[float], list[float]] | None:
    """(μ, σ) of a run's per-channel normalisation (``data.latent_norm: channel``), else None."""
    if data.latent_norm != "channel":
        return None
    if data.latent_mean is None or data.latent_std is None:
        raise ValueError("data.latent_norm=channel needs data.latent_mean and data.latent_std (the cache's "
                         "per-channel statistics, which training takes from its manifest)")
    return data.latent_mean, data.latent_std


def decode_latents(vae, x: torch.Tensor, data) -> torch.Tensor:
    """Images in [-1, 1] from what a latent model made, with the run's data config ``data``: its
    per-channel normalisation undone, then through the VAE with the cache's scale and shift
    (``data.latent_scale``, ``data.latent_shift``; unset: the VAE's own)."""
    stats = norm_stats(data)
    if stats is not None:
        x = denormalize(x.float(), *stats)
    return decode(vae, x, scale=data.latent_scale, shift=data.latent_shift)


def build_latent_cache(
    data: str | os.PathLike,
    vae_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    image_size: int = 256,
    labels_file: str | os.PathLike | None = None,
    num_classes: int | None = None,
    vae_dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
    **extract_kwargs,
) -> dict:
    """``ditkit extract``: images at ``data`` (ImageFolder or labels file) → latent cache at ``out_dir``.

    The VAE runs in ``vae_dtype`` (float32 as the official DiT; bfloat16 is ~1.5× faster on an H100);
    extract_kwargs go to ``extract_latents`` (shard_size, batch_size, num_workers, dtype, rank, ...).
    """
    dataset = ImageDataset(data, image_size, labels_file=labels_file, num_classes=num_classes, random_flip=False)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    vae = load_vae(vae_path, device=device, dtype=vae_dtype)
    manifest = extract_latents(dataset, vae, out_dir, vae_name=os.path.abspath(os.path.expanduser(vae_path)),
                               **extract_kwargs)  # absolute: the manifest names the VAE wherever it is read from
    if dataset.num_unreadable:
        log.warning("%d unreadable images were replaced by their successors: %s", dataset.num_unreadable,
                    ", ".join(dataset.unreadable_files()[:5]))
    return manifest


def _progress(items, enabled: bool):
    if not enabled:
        return items
    from tqdm import tqdm

    return tqdm(items, desc="latent shards", unit="shard")


def read_manifest(cache_dir: str | os.PathLike) -> dict:
    path = Path(cache_dir) / MANIFEST
    if not path.is_file():
        raise ValueError(f"no latent cache in {cache_dir}: {path} is missing (make one with `ditkit extract`)")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is corrupt: {e}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ValueError(f"{path} is not a ditkit latent manifest (format {FORMAT} expected)")
    need = ("count", "latent_shape", "shards", "scale_factor", "source", "vae", "shard_size", "image_shape", "dtype")
    missing = [k for k in need if k not in manifest]
    if missing:
        raise ValueError(f"{path} is corrupt: missing {', '.join(missing)}")
    return manifest


class LatentDataset(torch.utils.data.Dataset):
    """Samples (z (C, h, w) float32, label int) from a latent cache.

    flip: take the flipped view with probability 1/2 (the cached counterpart of DiT's random flip).
    sample_posterior: z = mean + std · ε, ε ~ N(0, I) (DiT's ``latent_dist.sample()``); else z = mean.
    images: samples are dicts {"x": z, "y": label, "image": (3, H, W) uint8 of the same view}, from a
    cache extracted with images (for REPA's encoder).
    norm: (μ, σ) per channel: samples are (z − μ_c) / σ_c (``data.latent_norm: channel``).
    Randomness is a function of (seed, epoch, index): the same for any number of workers; call
    ``set_epoch`` each epoch.
    """

    def __init__(
        self, cache_dir: str | os.PathLike, flip: bool = True, sample_posterior: bool = True, seed: int = 0,
        images: bool = False, norm: tuple[list[float], list[float]] | None = None,
    ):
        self.dir = Path(cache_dir)
        self.norm = norm
        self.manifest = read_manifest(self.dir)
        if images and not self.manifest.get("images"):
            raise ValueError(f"latent cache {self.dir} holds no images, which REPA's encoder needs (model.repa_depth): "
                             "extract it again into a new folder with `ditkit extract ... --images`")
        self.images = images
        self.flip, self.sample_posterior, self.seed, self.epoch = flip, sample_posterior, seed, 0
        shards = self.manifest["shards"]
        absent = [s["name"] for s in shards if not (self.dir / s["name"]).is_file()]
        if absent:
            raise ValueError(
                f"latent cache {self.dir} is incomplete: {len(absent)} of {len(shards)} shards missing "
                f"(first: {absent[0]}); rerun `ditkit extract` with the same arguments to finish it"
            )
        image_shape = self.manifest["image_shape"] if self.manifest.get("images") else None
        for s in shards:
            self._check_shard(self.dir / s["name"], [s["count"], 2, *self.manifest["latent_shape"]], image_shape)
        self.starts = torch.tensor([s["start"] for s in shards])
        self.num_classes = self.manifest.get("num_classes")
        self._open: dict[int, object] = {}  # shard index → safe_open handle, per process

    @staticmethod
    def _check_shard(path: Path, shape: list[int], image_shape: list[int] | None) -> None:
        """Reads only the header: catches truncated or foreign files at start, not mid-epoch."""
        try:
            with safe_open(str(path), framework="pt") as f:
                shapes = {k: f.get_slice(k).get_shape() for k in f.keys()}
        except (SafetensorError, OSError) as e:
            raise ValueError(f"latent shard {path} is corrupt: {e}") from None
        want = {"mean": shape, "std": shape, "label": shape[:1]}
        if image_shape is not None:
            want["image"] = [shape[0], *image_shape]
        if shapes != want:
            raise ValueError(f"latent shard {path} has tensors {shapes}, the manifest says {want}")

    def __len__(self) -> int:
        return self.manifest["count"]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __getstate__(self):
        # safe_open handles cannot cross process boundaries; each worker opens its own.
        return {**self.__dict__, "_open": {}}

    def _shard(self, k: int):
        if k not in self._open:
            self._open[k] = safe_open(str(self.dir / self.manifest["shards"][k]["name"]), framework="pt")
        return self._open[k]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int] | dict:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} latents")
        k = int(torch.searchsorted(self.starts, index, right=True)) - 1
        i = index - int(self.starts[k])
        g = torch.Generator().manual_seed(sample_seed(self.seed, self.epoch, index))
        view = int(torch.randint(2, (), generator=g)) if self.flip else 0
        f = self._shard(k)
        z = f.get_slice("mean")[i, view].float()  # (C, h, w)
        label = int(f.get_slice("label")[i])
        if self.sample_posterior:
            z = z + f.get_slice("std")[i, view].float() * torch.randn(z.shape, generator=g)
        if self.norm is not None:
            z = normalize(z, *self.norm)
        if not self.images:
            return z, label
        image = f.get_slice("image")[i]  # (3, H, W) uint8
        return {"x": z, "y": torch.tensor(label), "image": image.flip(-1) if view else image}
