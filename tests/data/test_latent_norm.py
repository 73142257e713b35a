"""Per-channel latent normalisation (data.latent_norm: channel): the cache's statistics against numpy's, the
round trip normalise → denormalise, and a tiny run that trains on (z − μ_c) / σ_c, keeps μ and σ in its
checkpoint and weights file, and undoes them before the VAE when it samples."""
import json

import numpy as np
import pytest
import torch
from safetensors import safe_open

from ditkit.checkpoints import load_model
from ditkit.config import ConfigError, load_config
from ditkit.data.images import ImageDataset
from ditkit.data.latents import (
    LatentDataset,
    channel_stats,
    decode_latents,
    denormalize,
    extract_latents,
    normalize,
)
from ditkit.training.trainer import train
from tests.models.vae_cases import save_image_folder, save_tiny_vae

pytest.importorskip("diffusers")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """10 images of 32×32 through a 16-channel VAE downsampling by 16, in shards of 4 (float32)."""
    from ditkit.models.vae import load_vae

    root = tmp_path_factory.mktemp("norm")
    folder = save_image_folder(root / "imgs", size=32, per_class=5)
    vae_dir = save_tiny_vae(root / "vae", channels=16, levels=5, scale=0.7, shift=0.2)
    images = ImageDataset(folder, image_size=32, random_flip=False)
    extract_latents(images, load_vae(vae_dir), root / "cache", shard_size=4, batch_size=4, num_workers=0,
                    dtype=torch.float32)
    return root


def arrays(cache_dir):
    """(mean, std) of every shard, (n, 2, C, h, w) each, as numpy float64."""
    manifest = json.loads((cache_dir / "manifest.json").read_text())
    parts = {"mean": [], "std": []}
    for s in manifest["shards"]:
        with safe_open(str(cache_dir / s["name"]), framework="np") as f:
            for k in parts:
                parts[k].append(f.get_tensor(k).astype(np.float64))
    return manifest, np.concatenate(parts["mean"]), np.concatenate(parts["std"])


def test_the_statistics_are_numpys(cache):
    manifest, mean, std = arrays(cache / "cache")
    assert mean.shape == (10, 2, 16, 2, 2) and len(manifest["shards"]) == 3
    # z = mean + std · ε: E[z_c] = E[mean_c], Var[z_c] = Var[mean_c] + E[std_c²], over images, views and positions.
    axes = (0, 1, 3, 4)
    np.testing.assert_allclose(manifest["channel_mean"], mean.mean(axis=axes), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(manifest["channel_std"], np.sqrt(mean.var(axis=axes) + (std**2).mean(axis=axes)),
                               rtol=1e-10)
    mu, sigma = channel_stats(cache / "cache", manifest, chunk=3)  # chunks across shard rows give the same
    np.testing.assert_allclose(mu, manifest["channel_mean"], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(sigma, manifest["channel_std"], rtol=1e-12)


def test_round_trip():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(3, 16, 4, 4, generator=g) * 5 + 2
    mu, sigma = (torch.randn(16, generator=g) * 3).tolist(), (torch.rand(16, generator=g) + 0.1).tolist()
    x = normalize(z, mu, sigma)
    torch.testing.assert_close(x[:, 3], (z[:, 3] - mu[3]) / sigma[3])
    torch.testing.assert_close(denormalize(x, mu, sigma), z)
    torch.testing.assert_close(normalize(z[0], mu, sigma), x[0])  # one sample (C, h, w) too


def test_a_channel_normalised_run_trains_checkpoints_and_samples(cache, tmp_path):
    import ditkit
    from ditkit.checkpoints.formats import read_metadata
    from ditkit.models.vae import load_vae

    manifest, _, _ = arrays(cache / "cache")
    mu, sigma = manifest["channel_mean"], manifest["channel_std"]
    overrides = ["model.name=custom", "model.hidden_size=32", "model.depth=1", "model.num_heads=2",
                 "model.patch_size=1", "model.num_classes=2", "train.global_batch_size=4", "train.steps=2",
                 "train.log_every=1", "data.num_workers=0", "sample.sampler=ddim", "sample.steps=2",
                 f"data.path={cache / 'cache'}", "data.latent_norm=channel", "data.flip=false"]
    cfg = load_config(overrides=overrides)

    # What the network sees: (z − μ_c) / σ_c of the cached posterior draw.
    from ditkit.data import build_dataset
    from ditkit.data.facts import fit_to_data

    fitted, _ = fit_to_data(cfg)
    assert fitted.data.latent_mean == mu and fitted.data.latent_std == sigma
    seen = build_dataset(fitted)[(0, 5)]["x"]
    raw = LatentDataset(cache / "cache", flip=False, seed=fitted.train.seed)
    raw.set_epoch(0)
    z = raw[5][0]
    torch.testing.assert_close(seen, (z - torch.tensor(mu).view(-1, 1, 1)) / torch.tensor(sigma).view(-1, 1, 1))

    train(cfg, tmp_path, device="cpu")
    model, run_cfg = load_model(tmp_path / "checkpoints" / "last.pt")
    assert (run_cfg.data.latent_norm, run_cfg.data.latent_mean, run_cfg.data.latent_std) == ("channel", mu, sigma)
    saved = json.loads(read_metadata(tmp_path / "ema.safetensors")["ditkit_run_config"])["data"]
    assert (saved["latent_mean"], saved["latent_std"]) == (mu, sigma)

    vae = load_vae(cache / "vae")
    out = ditkit.sample(model, run_cfg, labels=[0, 1], vae=vae, progress=False)
    # By hand: latent = (x σ_c + μ_c) / scale + shift, then the decoder.
    z = out.x * torch.tensor(sigma).view(1, -1, 1, 1) + torch.tensor(mu).view(1, -1, 1, 1)
    with torch.no_grad():
        want = vae.decode(z / 0.7 + 0.2).sample.clamp(-1, 1)
    torch.testing.assert_close(decode_latents(vae, out.x, run_cfg.data), want, rtol=1e-5, atol=1e-5)
    from ditkit.utils.images import to_uint8

    assert np.abs(out.images.astype(int) - to_uint8(want).astype(int)).max() <= 1
    assert out.images.shape == (2, 32, 32, 3)

    # A DiTPipeline could not undo the normalisation: the export says so instead of writing one.
    from ditkit.checkpoints import export_diffusers

    with pytest.raises(ValueError, match="per channel"):
        export_diffusers(model, tmp_path / "hf", vae=cache / "vae", data=run_cfg.data)


def test_a_cache_without_statistics_is_named(cache, tmp_path):
    import shutil

    from ditkit.data.facts import fit_to_data

    old = tmp_path / "old"
    shutil.copytree(cache / "cache", old)
    manifest = json.loads((old / "manifest.json").read_text())
    for k in ("channel_mean", "channel_std"):
        del manifest[k]
    (old / "manifest.json").write_text(json.dumps(manifest))
    cfg = load_config(overrides=[f"data.path={old}", "data.latent_norm=channel", "train.global_batch_size=4"])
    with pytest.raises(ConfigError, match="run its `ditkit extract` command again"):
        fit_to_data(cfg)
    with pytest.raises(ConfigError, match="data.latent_norm must be none unless data.kind is latents"):
        load_config("digits", ["data.latent_norm=channel"])
