"""The latent cache: extracted values equal direct encodings (both views), LatentDataset's sampling,
resume and rank splitting, and clear errors for a missing or damaged cache."""
import json
import pickle
import re

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("diffusers")

from ditkit.data.images import ImageDataset  # noqa: E402
from ditkit.data.latents import LatentDataset, build_latent_cache, extract_latents, read_manifest  # noqa: E402
from ditkit.models.vae import encode  # noqa: E402


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """5 images of 24×20 (cropped to 16×16) in 2 classes."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for k in range(5):
        (root / f"class{k % 2}").mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(root / f"class{k % 2}" / f"{k}.png")
    return ImageDataset(root, image_size=16, random_flip=False)


@pytest.fixture(scope="module")
def direct(vae, images):
    """(mean, std) of each image and of its flip, encoded one at a time: (5, 2, 4, 2, 2) each."""
    x = torch.stack([images[i][0] for i in range(len(images))])
    views = [encode(vae, v) for v in (x, x.flip(-1))]
    return torch.stack([views[0][0], views[1][0]], 1), torch.stack([views[0][1], views[1][1]], 1)


@pytest.fixture(scope="module")
def cache32(vae, images, tmp_path_factory):
    out = tmp_path_factory.mktemp("cache32")
    extract_latents(images, vae, out, shard_size=2, batch_size=2, num_workers=0, dtype=torch.float32)
    return out


def test_manifest(cache32, images):
    m = read_manifest(cache32)
    assert m["count"] == 5 and m["image_shape"] == [3, 16, 16] and m["latent_shape"] == [4, 2, 2]
    assert m["scale_factor"] == 0.18215 and m["dtype"] == "float32" and m["num_classes"] == 2
    assert m["source"] == images.source and m["classes"] == ["class0", "class1"]
    assert [(s["name"], s["start"], s["count"]) for s in m["shards"]] == [
        ("shard_00000.safetensors", 0, 2), ("shard_00001.safetensors", 2, 2), ("shard_00002.safetensors", 4, 1)]
    assert sorted(p.name for p in cache32.iterdir()) == ["manifest.json"] + [s["name"] for s in m["shards"]]


def test_cached_values_equal_direct_encoding(cache32, direct, images):
    mean, std = direct
    plain = LatentDataset(cache32, flip=False, sample_posterior=False)
    assert len(plain) == 5
    for i in range(5):
        z, y = plain[i]
        assert z.dtype == torch.float32 and y == images.labels[i]
        torch.testing.assert_close(z, mean[i, 0], rtol=1e-4, atol=1e-5)
    # with flips, each sample is one of the two views, both views occur, and the flip view is the
    # encoding of the flipped image (not the flip of the encoding)
    flipping = LatentDataset(cache32, flip=True, sample_posterior=False, seed=1)
    seen = set()
    for epoch in range(6):
        flipping.set_epoch(epoch)
        for i in range(5):
            z = flipping[i][0]
            view = 0 if torch.allclose(z, mean[i, 0], rtol=1e-4, atol=1e-5) else 1
            torch.testing.assert_close(z, mean[i, view], rtol=1e-4, atol=1e-5)
            seen.add(view)
    assert seen == {0, 1}
    assert not torch.allclose(mean[:, 1], mean[:, 0].flip(-1), atol=1e-3)


def test_posterior_samples(cache32, direct):
    mean, std = direct
    ds = LatentDataset(cache32, flip=False, sample_posterior=True, seed=3)
    eps = []
    for epoch in range(40):
        ds.set_epoch(epoch)
        eps += [(ds[i][0] - mean[i, 0]) / std[i, 0] for i in range(5)]
    eps = torch.stack(eps)  # 200 draws × 16 values of ε ~ N(0, 1)
    assert abs(eps.mean()) < 0.1 and abs(eps.std() - 1) < 0.1
    ds.set_epoch(7)
    again = LatentDataset(cache32, flip=False, sample_posterior=True, seed=3)
    again.set_epoch(7)
    torch.testing.assert_close(ds[2][0], again[2][0], rtol=0, atol=0)
    again.set_epoch(8)
    assert not torch.equal(ds[2][0], again[2][0])


def test_float16_cache_and_workers(vae, images, direct, tmp_path):
    extract_latents(images, vae, tmp_path, shard_size=3, batch_size=2, num_workers=0)  # float16
    assert read_manifest(tmp_path)["dtype"] == "float16"
    ds = LatentDataset(tmp_path, flip=False, sample_posterior=False)
    torch.testing.assert_close(torch.stack([ds[i][0] for i in range(5)]), direct[0][:, 0], rtol=2e-3, atol=2e-3)
    pickle.dumps(ds)  # open shard handles stay in the process that opened them
    loader = torch.utils.data.DataLoader(ds, batch_size=2, num_workers=2)
    z, y = next(iter(loader))
    assert z.shape == (2, 4, 2, 2) and y.tolist() == images.labels[:2]


def test_build_latent_cache_from_paths(vae, images, direct, tmp_path):
    """What `ditkit extract --data ... --vae ... --image-size 16` runs: a folder in, a cache out."""
    vae.save_pretrained(tmp_path / "vae")
    manifest = build_latent_cache(images.source, tmp_path / "vae", tmp_path / "cache", image_size=16,
                                  device="cpu", dtype=torch.float32, shard_size=4, num_workers=0)
    assert manifest["vae"] == str(tmp_path / "vae") and manifest["num_classes"] == 2
    ds = LatentDataset(tmp_path / "cache", flip=False, sample_posterior=False)
    torch.testing.assert_close(torch.stack([ds[i][0] for i in range(5)]), direct[0][:, 0], rtol=1e-4, atol=1e-5)


class Counting(torch.utils.data.Dataset):
    def __init__(self, dataset):
        self.dataset, self.calls, self.source = dataset, [], dataset.source

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        self.calls.append(i)
        return self.dataset[i]


def test_resume_encodes_only_missing_shards(vae, images, cache32, tmp_path):
    for f in cache32.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    (tmp_path / "shard_00001.safetensors").unlink()
    (tmp_path / ".shard_00001.safetensors.tmp999").write_bytes(b"left by a killed run")
    before = {p.name: p.stat().st_mtime_ns for p in tmp_path.glob("shard_*")}
    counting = Counting(images)
    extract_latents(counting, vae, tmp_path, shard_size=2, batch_size=2, num_workers=0, dtype=torch.float32)
    assert counting.calls == [0, 2, 3]  # the manifest's shape probe, then shard 1 only
    assert not list(tmp_path.glob(".shard_*"))
    assert {p.name: p.stat().st_mtime_ns for p in tmp_path.glob("shard_0000[02]*")} == before
    a, b = LatentDataset(tmp_path, flip=False), LatentDataset(cache32, flip=False)
    assert all(torch.equal(a[i][0], b[i][0]) for i in range(5))


def test_ranks_split_shards(vae, images, tmp_path):
    extract_latents(images, vae, tmp_path, shard_size=2, batch_size=2, num_workers=0, rank=0, world_size=2)
    assert sorted(p.name for p in tmp_path.glob("shard_*")) == ["shard_00000.safetensors", "shard_00002.safetensors"]
    with pytest.raises(ValueError, match=r"incomplete: 1 of 3 shards missing \(first: shard_00001.safetensors\)"):
        LatentDataset(tmp_path)
    extract_latents(images, vae, tmp_path, shard_size=2, batch_size=2, num_workers=0, rank=1, world_size=2)
    assert len(LatentDataset(tmp_path)) == 5


def test_extract_refusals(vae, images, cache32, tmp_path):
    flipping = ImageDataset(images.source, image_size=16)
    with pytest.raises(ValueError, match="without random flips"):
        extract_latents(flipping, vae, tmp_path)
    with pytest.raises(ValueError, match=r"cache with shard_size=2, not 3: use another output folder"):
        extract_latents(images, vae, cache32, shard_size=3, num_workers=0, dtype=torch.float32)
    odd = ImageDataset(images.source, image_size=12, random_flip=False)
    with pytest.raises(ValueError, match=r"image size \[12, 12\] is not divisible by 8"):
        extract_latents(odd, vae, tmp_path)


def test_cache_errors(cache32, tmp_path):
    with pytest.raises(ValueError, match=r"no latent cache in .*manifest.json is missing"):
        LatentDataset(tmp_path)
    for f in cache32.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    manifest = (tmp_path / "manifest.json").read_text()
    (tmp_path / "manifest.json").write_text(manifest[:40])
    with pytest.raises(ValueError, match=r"manifest.json is corrupt"):
        LatentDataset(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({k: v for k, v in json.loads(manifest).items() if k != "shards"}))
    with pytest.raises(ValueError, match=r"manifest.json is corrupt: missing shards"):
        LatentDataset(tmp_path)
    (tmp_path / "manifest.json").write_text(manifest)
    shard = tmp_path / "shard_00002.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 10])
    with pytest.raises(ValueError, match=r"latent shard .*shard_00002.safetensors is corrupt"):
        LatentDataset(tmp_path)
    shard.write_bytes((tmp_path / "shard_00001.safetensors").read_bytes())  # 2 latents, the manifest says 1
    with pytest.raises(ValueError, match=r"shard_00002.safetensors has tensors .* the manifest says"):
        LatentDataset(tmp_path)


def test_images_beside_the_latents_follow_the_view(vae, images, cache32, tmp_path):
    extract_latents(images, vae, tmp_path, shard_size=2, batch_size=2, num_workers=0, dtype=torch.float32, images=True)
    assert read_manifest(tmp_path)["images"] is True and read_manifest(cache32)["images"] is False
    plain = LatentDataset(tmp_path, flip=False, sample_posterior=False, images=True)
    views = set()
    for i in range(5):
        item = plain[i]
        assert item["image"].dtype == torch.uint8
        assert torch.equal(item["image"].float().div(127.5).sub(1), images[i][0])  # the very pixels the VAE saw
        for seed in (0, 1):
            flipped = LatentDataset(tmp_path, flip=True, sample_posterior=False, images=True, seed=seed)[i]
            view = int(not torch.equal(flipped["x"], item["x"]))  # the flip's latent differs from the image's
            assert torch.equal(flipped["image"], item["image"].flip(-1) if view else item["image"])
            views.add(view)
    assert views == {0, 1}
    with pytest.raises(ValueError, match=r"holds no images, which REPA's encoder needs"):
        LatentDataset(cache32, images=True)
    with pytest.raises(ValueError, match=r"cache with images=True, not False"):
        extract_latents(images, vae, tmp_path, shard_size=2, num_workers=0, dtype=torch.float32)


def tiny_vae(seed: int = 0):
    """An AutoencoderKL of one level (no downsampling) and 8 channels: 10k parameters."""
    import diffusers

    torch.manual_seed(seed)
    return diffusers.AutoencoderKL(down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
                                   block_out_channels=(8,), layers_per_block=1, norm_num_groups=4)


def test_a_rerun_finds_its_vae_and_data_however_their_paths_are_spelled(images, tmp_path, monkeypatch):
    """``--vae vae16s``, ``vae16s/``, its absolute path and a link to it are one folder; another VAE is refused."""
    monkeypatch.chdir(tmp_path)
    tiny_vae().save_pretrained(tmp_path / "vae16s")
    (tmp_path / "link").symlink_to(tmp_path / "vae16s")
    kwargs = {"image_size": 16, "device": "cpu", "shard_size": 4, "num_workers": 0}
    first = build_latent_cache(images.source, "vae16s", "cache", **kwargs)
    spellings = [("vae16s/", images.source + "/"), (str(tmp_path / "vae16s"), images.source), ("link", images.source)]
    for vae, data in spellings:
        assert build_latent_cache(data, vae, "cache", **kwargs)["count"] == first["count"] == 5
    tiny_vae(seed=1).save_pretrained(tmp_path / "other")
    with pytest.raises(ValueError, match=r"cache with vae='\S+/link', not '\S+/other': use another output folder, or delete "
                                         r"this one only if it is not wanted$"):
        build_latent_cache(images.source, "other", "cache", **kwargs)
    assert json.loads((tmp_path / "cache" / "manifest.json").read_text())["vae"] == str(tmp_path / "link")  # absolute


def test_extract_names_what_a_folder_that_is_no_vae_holds(images, tmp_path, capsys):
    """A DINOv2 folder, a VAE's config.json without its weights, another diffusers model: one line each."""
    transformers = pytest.importorskip("transformers")
    import diffusers

    from ditkit.cli import main

    config = transformers.Dinov2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    transformers.Dinov2Model(config).save_pretrained(tmp_path / "dinov2")
    (tmp_path / "config-only").mkdir()
    tiny_vae().save_config(tmp_path / "config-only")
    diffusers.UNet2DModel(block_out_channels=(8, 8), norm_num_groups=4, layers_per_block=1,
                          down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2,
                          ).save_pretrained(tmp_path / "unet")
    for folder, message in [
        ("dinov2", "holds a transformers model of model_type 'dinov2', not a diffusers AutoencoderKL: download"),
        ("config-only", ("has the config.json of an AutoencoderKL but no weights "
                         "(diffusion_pytorch_model.safetensors or .bin): download")),
        ("unet", "holds a diffusers UNet2DModel, not an AutoencoderKL: download"),
    ]:
        with pytest.raises(ValueError, match=f"^{re.escape(f'{tmp_path / folder} {message}')}") as err:
            build_latent_cache(images.source, tmp_path / folder, tmp_path / "cache", image_size=16, device="cpu")
        assert "\n" not in str(err.value)
    capsys.readouterr()  # transformers' progress bar of save_pretrained
    with pytest.raises(SystemExit) as exit_:
        main(["extract", "--data", images.source, "--vae", str(tmp_path / "dinov2"), "--out", str(tmp_path / "cache"),
              "--image-size", "16", "--device", "cpu"])
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and len(err.splitlines()) == 1 and "model_type 'dinov2'" in err, err
    assert not (tmp_path / "cache").exists()
