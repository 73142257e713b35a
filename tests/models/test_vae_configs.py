"""VAEs other than SD's: any diffusers AutoencoderKL folder, here with 16 latent channels at a downsampling of
16 and 32 channels at 8, each with its own scaling_factor and shift_factor.  Extraction records them in the
cache's manifest and uses them; a run follows the cache's shape, trains, samples, and decodes through the
VAE with the same factors into images of the original size."""
import json

import numpy as np
import pytest
import torch

from ditkit.checkpoints import load_model
from ditkit.cli import main
from ditkit.config import load_config
from ditkit.models.vae import downsampling, encode, load_vae, scale_and_shift
from ditkit.training.trainer import train
from tests.models.vae_cases import save_image_folder, save_tiny_vae

pytest.importorskip("diffusers")

TINY = ["model.name=custom", "model.hidden_size=32", "model.depth=1", "model.num_heads=2", "model.patch_size=1",
        "model.num_classes=2", "train.global_batch_size=4", "train.steps=2", "train.log_every=1",
        "data.num_workers=0", "sample.sampler=ddim", "sample.steps=2", "data.image_size=32"]


@pytest.mark.parametrize("channels, levels, scale, shift", [(16, 5, 0.5, 0.25), (32, 4, 1.3, None)])
def test_extract_train_sample_decode(tmp_path, channels, levels, scale, shift):
    folder = save_image_folder(tmp_path / "imgs", size=32)
    vae_dir = save_tiny_vae(tmp_path / "vae", channels, levels, scale, shift)
    vae = load_vae(vae_dir)
    f = downsampling(vae)
    assert f == 2 ** (levels - 1) and scale_and_shift(vae) == (scale, shift or 0.0)
    main(["extract", "--data", str(folder), "--vae", str(vae_dir), "--image-size", "32", "--out",
          str(tmp_path / "cache"), "--batch-size", "4", "--workers", "0", "--device", "cpu"])
    manifest = json.loads((tmp_path / "cache" / "manifest.json").read_text())
    side = 32 // f
    assert manifest["latent_shape"] == [channels, side, side] and manifest["downsample"] == f
    assert (manifest["scale_factor"], manifest["shift_factor"]) == (scale, shift or 0.0)

    # The cached mean is (posterior mean − shift) · scale, the config's own factors.
    from ditkit.data.latents import LatentDataset

    z, _ = LatentDataset(tmp_path / "cache", flip=False, sample_posterior=False)[0]
    from ditkit.data.images import ImageDataset

    x = ImageDataset(folder, image_size=32, random_flip=False)[0][0]
    raw = vae.encode(x[None]).latent_dist.mean[0]
    torch.testing.assert_close(z, (raw - (shift or 0.0)) * scale, rtol=1e-3, atol=1e-3)  # a float16 cache
    torch.testing.assert_close(encode(vae, x[None])[0][0], (raw - (shift or 0.0)) * scale)

    # The run takes its channels and grid from the cache (the defaults say 4 and 32) and the factors with them.
    cfg = load_config(overrides=[*TINY, "data.kind=latents", f"data.path={tmp_path / 'cache'}"])
    train(cfg, tmp_path / "run", device="cpu")
    model, run_cfg = load_model(tmp_path / "run" / "checkpoints" / "last.pt")
    assert (run_cfg.model.in_channels, run_cfg.model.input_size) == (channels, side)
    assert (run_cfg.data.latent_scale, run_cfg.data.latent_shift) == (scale, shift or 0.0)

    main(["sample", "--ckpt", str(tmp_path / "run" / "checkpoints" / "last.pt"), "--vae", str(vae_dir),
          "--out", str(tmp_path / "samples"), "--num-samples", "2", "--device", "cpu"])
    images = np.load(tmp_path / "samples" / "samples.npz")["arr_0"]
    assert images.shape == (2, 32, 32, 3) and images.dtype == np.uint8

    # Decoding divides by the config's scale and adds its shift back before the decoder.
    import ditkit

    out = ditkit.sample(model, run_cfg, labels=[0, 1], vae=vae, progress=False)
    with torch.no_grad():
        want = vae.decode(out.x / scale + (shift or 0.0)).sample.clamp(-1, 1)
    from ditkit.utils.images import to_uint8

    assert np.abs(out.images.astype(int) - to_uint8(want).astype(int)).max() <= 1
