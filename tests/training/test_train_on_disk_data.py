"""The whole ImageNet-style path at toy size: an image folder (with a corrupt file) trains in
pixel space; the same folder extracted through a VAE into a latent cache trains in latent space,
then samples decode through the VAE into an ADM batch."""
import numpy as np
import pytest
import torch
from PIL import Image

from ditkit.cli import main
from ditkit.config import load_config
from ditkit.training.trainer import train

pytest.importorskip("diffusers")

TINY = ["model.name=custom", "model.hidden_size=32", "model.depth=1", "model.num_heads=2", "model.patch_size=2",
        "model.num_classes=2", "train.global_batch_size=4", "train.steps=2", "train.log_every=1",
        "data.num_workers=0", "sample.sampler=ddpm", "sample.steps=2"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(0)
    for c in ("cats", "dogs"):
        (root / c).mkdir()
        for i in range(4):
            Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(root / c / f"{i}.png")
    (root / "dogs" / "broken.png").write_bytes(b"not a png")
    return root


def test_image_folder_trains_and_counts_unreadable_files(tmp_path, folder):
    cfg = load_config(overrides=[*TINY, "data.kind=images", f"data.path={folder}", "data.image_size=16",
                                 "model.input_size=16", "model.in_channels=3"])
    train(cfg, tmp_path, device="cpu")
    import json

    record = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    assert record["loss"] == record["loss"] and "unreadable_images" in record


def test_latent_cache_trains_and_samples_through_the_vae(tmp_path, folder, capsys):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=32)
    vae.save_pretrained(tmp_path / "vae")
    main(["extract", "--data", str(folder), "--vae", str(tmp_path / "vae"), "--image-size", "16",
          "--out", str(tmp_path / "cache"), "--batch-size", "4", "--workers", "0", "--device", "cpu"])
    cfg = load_config(overrides=[*TINY, "data.kind=latents", f"data.path={tmp_path / 'cache'}",
                                 "model.input_size=8", "model.in_channels=4"])
    train(cfg, tmp_path / "run", device="cpu")
    main(["sample", "--ckpt", str(tmp_path / "run" / "checkpoints" / "last.pt"), "--vae", str(tmp_path / "vae"),
          "--out", str(tmp_path / "samples"), "--num-samples", "4", "--device", "cpu"])
    batch = np.load(tmp_path / "samples" / "samples.npz")
    assert batch["arr_0"].shape == (4, 16, 16, 3) and batch["arr_0"].dtype == np.uint8
    with pytest.raises(SystemExit):
        main(["sample", "--ckpt", str(tmp_path / "run" / "checkpoints" / "last.pt"), "--out", str(tmp_path / "s2"),
              "--num-samples", "4", "--device", "cpu"])
    said = capsys.readouterr().err  # the VAE is named from the cache's manifest
    assert f"give --vae PATH, a local folder of the VAE its latents were made with, {tmp_path / 'vae'}" in said
