"""Arrays of any grid on disk (``data.kind=fields`` with ``data.axes``): (N, C, L) sequences, (N, C, H, W) images and
(N, C, D, H, W) volumes or (N, C, T, H, W) videos, one file or one file per sample, standardised per channel with the
statistics kept in the checkpoint; the data sizes the model, `ditkit.train` runs and resumes, samples come back as
arrays and pictures."""

import numpy as np
import pytest
import torch

import ditkit
from ditkit.cli import main
from ditkit.config import ConfigError
from ditkit.data.facts import fit_to_data
from ditkit.data.fields import FieldDataset, FieldNormalizer, FieldSource
from ditkit.utils.images import stretched_images
from tests.data.resume import assert_resumes_exactly

TINY = ["model.name=custom", "model.hidden_size=32", "model.depth=2", "model.num_heads=2", "model.num_classes=0",
        "train.global_batch_size=8", "train.log_every=1", "train.ckpt_every=2", "train.warmup_steps=1",
        "train.log_to=none", "train.sample_every=2", "sample.steps=3", "data.num_workers=0"]


def _write(path, shape, seed=0):
    a = np.random.default_rng(seed).normal(size=shape) * np.arange(1, shape[1] + 1).reshape(1, -1, *[1] * (len(shape) - 2)) + 5
    np.save(path, a.astype(np.float32))
    return a


def test_the_grid_axes_are_inferred_or_given_and_a_wrong_shape_names_them(tmp_path):
    _write(tmp_path / "vol.npy", (6, 2, 4, 8, 8))
    assert FieldSource(tmp_path / "vol.npy").shape == (6, 2, 4, 8, 8)
    np.save(tmp_path / "seq.npy", np.zeros((6, 3, 16)))
    assert FieldSource(tmp_path / "seq.npy", axes=1).shape == (6, 3, 16)
    assert FieldSource(tmp_path / "seq.npy").shape == (6, 1, 3, 16)  # without data.axes: (N, H, W)
    np.save(tmp_path / "one.npy", np.zeros((6, 16)))
    assert FieldSource(tmp_path / "one.npy", axes=1).shape == (6, 1, 16)
    with pytest.raises(ValueError, match=r"has shape \(6, 16\); expected \(N, C, H, W\) or \(N, H, W\) \(data.axes"):
        FieldSource(tmp_path / "one.npy")
    (tmp_path / "per").mkdir()
    for i in range(3):
        np.save(tmp_path / "per" / f"{i}.npy", np.zeros((2, 4, 8, 8)))
    assert FieldSource(tmp_path / "per").shape == (3, 2, 4, 8, 8)


@pytest.mark.parametrize("shape, axes", [((10, 2, 16), 1), ((10, 2, 4, 6, 6), 3)])
def test_per_channel_statistics_and_the_round_trip(tmp_path, shape, axes):
    a = _write(tmp_path / "x.npy", shape)
    data = FieldDataset(tmp_path / "x.npy", axes=axes)
    z = torch.stack([data[i]["x"] for i in range(len(data))]).double()
    dims = [0, *range(2, len(shape))]
    torch.testing.assert_close(z.mean(dims), torch.zeros(2, dtype=torch.float64), atol=1e-5, rtol=0)
    torch.testing.assert_close(z.std(dims, unbiased=False), torch.ones(2, dtype=torch.float64), atol=1e-5, rtol=0)
    again = FieldNormalizer(data.normalizer.state_dict()).denormalize(z[3], "x")
    np.testing.assert_allclose(again.numpy(), a[3], rtol=1e-5, atol=1e-5)


def test_a_normalizer_of_an_image_run_without_axes_still_loads():
    state = {"x": {"mean": torch.tensor([1.0, 2.0]), "std": torch.tensor([2.0, 4.0]), "log": [False, False], "eps": 1e-6}}
    z = FieldNormalizer(state).normalize(torch.ones(3, 2, 4, 4), "x")
    assert torch.equal(z[:, 1], torch.full((3, 4, 4), -0.25))


def test_the_data_sizes_the_model_and_flips_only_square_slices(tmp_path):
    _write(tmp_path / "seq.npy", (10, 2, 16))
    cfg, _ = fit_to_data(ditkit.load_config("digits", [*TINY, f"data.path={tmp_path / 'seq.npy'}", "data.axes=1",
                                                       "model.patch_size=4"]))
    assert (cfg.data.kind, cfg.model.in_channels, cfg.model.input_size, cfg.data.flip) == ("fields", 2, [16], False)
    _write(tmp_path / "vid.npy", (10, 1, 4, 8, 8))
    cfg, _ = fit_to_data(ditkit.load_config("digits", [*TINY, f"data.path={tmp_path / 'vid.npy'}",
                                                       "model.patch_size=[1, 4, 4]", "model.input_size=[4, 8, 8]",
                                                       "data.flip=true"]))
    assert (cfg.model.in_channels, cfg.model.input_size, cfg.data.flip) == (1, [4, 8, 8], True)  # square frames
    with pytest.raises(ConfigError, match="augment .* set data.flip=false"):
        ditkit.train(ditkit.load_config("digits", [*TINY, f"data.path={tmp_path / 'seq.npy'}", "data.axes=1",
                                                   "model.patch_size=4", "data.flip=true"]), tmp_path / "r", device="cpu")


@pytest.mark.parametrize("name, shape, extra", [
    ("seq", (12, 2, 16), ["data.axes=1", "model.patch_size=4"]),
    ("volume", (12, 1, 4, 8, 8), ["model.patch_size=[2, 4, 4]", "model.input_size=[4, 8, 8]"]),
    ("video", (12, 2, 4, 8, 8), ["model.patch_size=[1, 4, 4]", "model.input_size=[4, 8, 8]", "data.flip=false"]),
])
def test_train_resume_and_sample(tmp_path, name, shape, extra):
    a = _write(tmp_path / f"{name}.npy", shape)
    cfg = lambda *more: ditkit.load_config("digits", [*TINY, f"data.path={tmp_path / name}.npy", *extra, *more])  # noqa: E731
    stored, ckpt = assert_resumes_exactly(cfg, tmp_path, steps=4)
    ref = ckpt.parents[1]
    np.testing.assert_allclose(stored["normalizer"]["x"]["mean"].numpy(), a.mean(axis=(0, *range(2, len(shape)))), rtol=1e-4)
    assert stored["normalizer"]["x"]["axes"] == len(shape) - 2
    assert any(p.suffix == ".png" for p in ref.rglob("*.png"))  # the training grid, of any grid dimension

    model, run_cfg = ditkit.load_model(ref / "checkpoints" / "last.pt", device="cpu")
    out = ditkit.sample(model, run_cfg, num_samples=3, progress=False)
    assert tuple(out.x.shape) == (3, *shape[1:]) and torch.isfinite(out.x).all()
    assert out.images.dtype == np.uint8 and out.images.shape[0] == 3 and out.images.shape[-1] == 3
    main(["sample", "--ckpt", str(ref / "checkpoints" / "last.pt"), "--out", str(tmp_path / "out"), "--num-samples", "4",
          "--batch-size", "2", "--device", "cpu"])
    with np.load(tmp_path / "out" / "samples.npz") as saved:  # in the data's units: the normalisation undone
        assert saved["samples"].shape == (4, *shape[1:])
        physical = FieldNormalizer(stored["normalizer"]).denormalize(out.x.double(), "x").numpy()
        np.testing.assert_allclose(saved["samples"][:3], physical, rtol=1e-4, atol=1e-4)


def test_pictures_of_each_grid():
    assert stretched_images(torch.randn(2, 3, 8, 8)).shape == (2, 8, 8, 3)
    assert stretched_images(torch.randn(2, 1, 5, 8, 6)).shape == (2, 8, 6, 3)
    line = stretched_images(torch.linspace(0, 1, 10).view(1, 1, 10), height=10)
    assert line.shape == (1, 10, 10, 3) and (line[0, :, :, 0] == 255).sum() == 10
    assert line[0, 9, 0, 0] == 255 and line[0, 0, 9, 0] == 255  # the lowest value at the bottom, the highest at the top
