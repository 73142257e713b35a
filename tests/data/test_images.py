"""ImageDataset: both layouts, ADM's center crop against direct computations, seeded flips,
unreadable files skipped and counted, and each start-time error."""
import logging
import re

import numpy as np
import pytest
import torch
from PIL import Image

from ditkit.data.images import ImageDataset, center_crop_arr, sample_seed, to_rgb


def gradient(w, h, seed=0):
    """An image with no left-right symmetry, so a flip is visible."""
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    arr[:, : w // 2, 0] = 0
    return arr


def save(path, arr):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)
    return path


@pytest.fixture
def folder(tmp_path):
    """ImageFolder: classes created out of order, one image nested, one non-image file."""
    root = tmp_path / "train"
    save(root / "dog" / "d0.png", gradient(16, 16, 0))
    save(root / "cat" / "c0.png", gradient(16, 16, 1))
    save(root / "cat" / "sub" / "c1.jpg", gradient(16, 16, 2))
    save(root / "bird" / "b0.png", gradient(16, 16, 3))
    (root / "bird" / "notes.txt").write_text("not an image")
    return root


def test_image_folder_layout(folder):
    ds = ImageDataset(folder, image_size=16, random_flip=False)
    assert ds.classes == ["bird", "cat", "dog"] and ds.num_classes == 3
    names = [p.split("/")[-1] for p in ds.paths]
    assert names == ["b0.png", "c0.png", "c1.jpg", "d0.png"]
    assert ds.labels == [0, 1, 1, 2]
    x, y = ds[3]
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32 and y == 2
    # pixel p ↦ p / 127.5 − 1 (so 0 ↦ −1 and 255 ↦ 1)
    expected = torch.from_numpy(gradient(16, 16, 0)).permute(2, 0, 1).double() / 127.5 - 1
    torch.testing.assert_close(x.double(), expected, rtol=0, atol=1e-6)


def test_labels_file_layout(tmp_path):
    save(tmp_path / "imgs" / "a.png", gradient(16, 16, 0))
    save(tmp_path / "imgs" / "with space.png", gradient(16, 16, 1))
    absolute = save(tmp_path / "elsewhere" / "c.png", gradient(16, 16, 2))
    labels = tmp_path / "train_labels.txt"
    labels.write_text(f"imgs/a.png 7\n\nimgs/with space.png 3\n{absolute} 0\n")
    for ds in (
        ImageDataset(labels, image_size=16, num_classes=10),
        ImageDataset(tmp_path, image_size=16, labels_file="train_labels.txt", num_classes=10),
    ):
        assert ds.labels == [7, 3, 0] and ds.num_classes == 10 and len(ds) == 3
        assert ds.paths[1] == str(tmp_path / "imgs" / "with space.png") and ds.paths[2] == str(absolute)
        assert ds[1][1] == 3
    assert ImageDataset(labels, image_size=16).num_classes == 8  # inferred: max label + 1


def test_crop_of_exact_size_is_identity():
    arr = gradient(16, 16)
    np.testing.assert_array_equal(center_crop_arr(Image.fromarray(arr), 16), arr)


def test_crop_halves_with_box_filter():
    """A 2S×2S image: one BOX halving (= the mean of each 2×2 block), then nothing to resize."""
    arr = gradient(32, 32)
    blocks = arr.reshape(16, 2, 16, 2, 3).astype(np.float64).mean(axis=(1, 3))
    out = center_crop_arr(Image.fromarray(arr), 16)
    assert out.shape == (16, 16, 3)
    assert np.abs(out - blocks).max() <= 1  # PIL rounds in fixed point


def test_crop_cuts_the_center_of_a_wide_image():
    arr = gradient(48, 16)  # W = 3S, H = S: short side already S, no resampling
    np.testing.assert_array_equal(center_crop_arr(Image.fromarray(arr), 16), arr[:, 16:32])


def test_crop_keeps_a_centered_pattern_centered():
    """100×60 → BOX to 50×30 → BICUBIC to 27×16 → 16×16 crop from column (27 − 16) // 2 = 5; the
    disk, centered at column 13 of 27, lands at column 8 (ADM's floor puts the odd pixel on the right)."""
    h, w = 60, 100
    yy, xx = np.mgrid[:h, :w]
    disk = ((yy - (h - 1) / 2) ** 2 + (xx - (w - 1) / 2) ** 2 <= 15**2).astype(np.uint8) * 255
    out = center_crop_arr(Image.fromarray(np.stack([disk] * 3, -1)), 16)
    assert out.shape == (16, 16, 3)
    mass = out[..., 0].astype(np.float64)
    cy, cx = (np.mgrid[:16, :16] * mass).reshape(2, -1).sum(1) / mass.sum()
    assert abs(cy - 7.5) < 0.05 and abs(cx - 8.0) < 0.05
    # the disk (radius 15 of 60 → 4 of 16 pixels) is inside the crop, not cut off
    assert out[0].max() < 128 and out[-1].max() < 128 and out[:, 0].max() < 128 and out[:, -1].max() < 128


def test_flips_are_seeded_and_worker_independent(folder):
    plain = ImageDataset(folder, image_size=16, random_flip=False)
    a = ImageDataset(folder, image_size=16, seed=5)
    b = ImageDataset(folder, image_size=16, seed=5)
    flipped = []
    for epoch in range(4):
        a.set_epoch(epoch)
        b.set_epoch(epoch)
        for i in range(len(a)):
            x = a[i][0]
            torch.testing.assert_close(x, b[i][0], rtol=0, atol=0)
            is_flipped = bool(sample_seed(5, epoch, i) & 1)
            torch.testing.assert_close(x, plain[i][0].flip(-1) if is_flipped else plain[i][0], rtol=0, atol=0)
            flipped.append(is_flipped)
    assert 0 < sum(flipped) < len(flipped)  # both outcomes happen
    a.set_epoch(0)
    serial = torch.stack([a[i][0] for i in range(len(a))])
    loader = torch.utils.data.DataLoader(a, batch_size=2, num_workers=2)
    torch.testing.assert_close(torch.cat([x for x, _ in loader]), serial, rtol=0, atol=0)


def test_sample_seed_flips_are_balanced():
    bits = [sample_seed(0, 0, i) & 1 for i in range(4000)]
    assert abs(sum(bits) / len(bits) - 0.5) < 0.03  # 4 standard deviations
    assert sample_seed(0, 0, 1) != sample_seed(0, 1, 0) != sample_seed(1, 0, 0)


def test_unreadable_files_are_skipped_and_counted(folder, caplog):
    (folder / "cat" / "c0.png").write_bytes(b"this is not a png")
    good = folder / "bird" / "b0.png"
    (folder / "bird" / "b1.png").write_bytes(good.read_bytes()[:60])  # truncated PNG
    ds = ImageDataset(folder, image_size=16, random_flip=False)
    assert [p.split("/")[-1] for p in ds.paths] == ["b0.png", "b1.png", "c0.png", "c1.jpg", "d0.png"]
    with caplog.at_level(logging.WARNING):
        x, y = ds[1]  # b1 is truncated, c0 is not an image: both give way to c1
    torch.testing.assert_close(x, ds[3][0], rtol=0, atol=0)
    assert y == 1 and ds.num_unreadable == 2
    assert sorted(p.split("/")[-1] for p in ds.unreadable_files()) == ["b1.png", "c0.png"]
    assert "b1.png" in caplog.text and "c0.png" in caplog.text
    # DataLoader workers report to the main process, and the epoch goes through
    fresh = ImageDataset(folder, image_size=16, random_flip=False)
    batches = list(torch.utils.data.DataLoader(fresh, batch_size=5, num_workers=2))
    assert batches[0][0].shape == (5, 3, 16, 16) and fresh.num_unreadable == 2


def test_no_readable_image_at_all_fails_at_start(tmp_path):
    for k, name in enumerate(("a/x.png", "a/y.png", "b/z.jpg")):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_bytes(b"junk" * k)
    with pytest.raises(ValueError, match=re.escape(f"no readable image in {tmp_path}: 3 file(s) skipped as unreadable")):
        ImageDataset(tmp_path, image_size=16)


def test_sixteen_bit_grayscale_is_scaled_not_clipped(tmp_path):
    # a 16-bit gradient 0..65535 along x: 8-bit value = round(v / 257), the inverse of v8 · 257
    v = np.tile(np.linspace(0, 65535, 16).round().astype(np.uint16), (16, 1))
    Image.fromarray(v).save(tmp_path / "g16.png")
    with Image.open(tmp_path / "g16.png") as im:
        assert im.mode in ("I;16", "I")  # Pillow's name for it depends on its version
        rgb = np.asarray(to_rgb(im))
    expected = np.rint(v / 257).astype(np.uint8)
    np.testing.assert_array_equal(rgb, np.stack([expected] * 3, -1))
    assert rgb.min() == 0 and rgb.max() == 255 and len(np.unique(rgb)) == 16
    for mode, raw in (("I;16B", v.astype(">u2")), ("I", v.astype(np.int32))):
        im = Image.frombytes(mode, (16, 16), raw.tobytes()) if mode == "I;16B" else Image.fromarray(raw)
        assert im.mode == mode
        np.testing.assert_array_equal(np.asarray(to_rgb(im))[..., 0], expected)
    floats = Image.fromarray((v / 65535).astype(np.float32))  # mode F in [0, 1]
    np.testing.assert_array_equal(np.asarray(to_rgb(floats))[..., 0], np.rint(v / 65535 * 255).astype(np.uint8))
    # through the dataset: x = pixel / 127.5 − 1 spans [−1, 1]
    (tmp_path / "c").mkdir()
    Image.fromarray(v).save(tmp_path / "c" / "g16.png")
    x, _ = ImageDataset(tmp_path, image_size=16, random_flip=False)[0]
    torch.testing.assert_close(x[0, 0], torch.from_numpy(expected[0]).float() / 127.5 - 1)


def test_alpha_and_palette_images_become_rgb(tmp_path):
    rgb = gradient(8, 8)
    rgba = np.concatenate([rgb, np.full((8, 8, 1), 128, np.uint8)], -1)
    cases = {"RGBA": Image.fromarray(rgba, "RGBA"), "LA": Image.fromarray(rgb[..., :2], "LA"),
             "P": Image.fromarray(rgb).quantize(16)}
    for mode, im in cases.items():
        assert im.mode == mode
        out = to_rgb(im)
        assert out.mode == "RGB" and out.size == (8, 8)
        np.testing.assert_array_equal(np.asarray(out), np.asarray(im.convert("RGB")))  # alpha dropped, as ADM
    np.testing.assert_array_equal(np.asarray(to_rgb(cases["RGBA"])), rgb)


def test_unconditional_dataset_reads_every_image_and_ignores_labels(tmp_path, folder):
    ds = ImageDataset(folder, image_size=16, num_classes=0, random_flip=False)
    assert ds.num_classes == 0 and ds.labels == [0] * 4 and len(ds) == 4
    save(tmp_path / "flat" / "a.png", gradient(16, 16))  # no class folders at all
    assert len(ImageDataset(tmp_path / "flat", image_size=16, num_classes=0)) == 1
    labels = tmp_path / "train_labels.txt"
    labels.write_text("flat/a.png 999\n")  # class ids beyond any range are ignored
    assert ImageDataset(labels, image_size=16, num_classes=0).labels == [0]
    labels.write_text("flat/a.png\n\nflat/a.png 3\n")  # or absent: a line may be the path alone
    assert ImageDataset(labels, image_size=16, num_classes=0).labels == [0, 0]


def test_unconditional_training_on_an_image_folder(tmp_path):
    from ditkit.config import load_config
    from ditkit.data import build_dataset
    from ditkit.training.trainer import train

    for k in range(8):
        save(tmp_path / "imgs" / f"class{k % 2}" / f"{k}.png", gradient(8, 8, k))
    cfg = load_config("digits", ["data.kind=images", f"data.path={tmp_path / 'imgs'}", "data.image_size=8",
                                 "model.num_classes=0", "model.in_channels=3", "model.hidden_size=32", "model.depth=2",
                                 "model.num_heads=2", "train.global_batch_size=4", "train.steps=2"])
    assert set(build_dataset(cfg)[0, 0]) == {"x"}  # no "y": DiT.forward gets y=None
    assert train(cfg, tmp_path / "run", device="cpu")["step"] == 2


def test_start_time_errors(tmp_path):
    with pytest.raises(ValueError, match="image folder .*nowhere does not exist"):
        ImageDataset(tmp_path / "nowhere", image_size=16)
    with pytest.raises(ValueError, match="no class folders in"):
        ImageDataset(tmp_path, image_size=16)
    (tmp_path / "empty_class").mkdir()
    with pytest.raises(ValueError, match="class folder .*empty_class holds no images"):
        ImageDataset(tmp_path, image_size=16)
    for k in range(3):
        save(tmp_path / "empty_class" / f"{k}.png", gradient(8, 8))
        save(tmp_path / f"class{k}" / "x.png", gradient(8, 8))
    with pytest.raises(ValueError, match="has 4 class folders, more than num_classes=3"):
        ImageDataset(tmp_path, image_size=16, num_classes=3)
    with pytest.raises(ValueError, match="labels file .*missing.txt does not exist"):
        ImageDataset(tmp_path, image_size=16, labels_file="missing.txt")

    labels = tmp_path / "train_labels.txt"
    cases = {
        "class0/x.png 1\nclass1/x.png\n": r"train_labels.txt line 2: expected 'image_path class_id', got 'class1/x.png'",
        "class0/x.png 1\nclass1/x.png one\n": "train_labels.txt line 2: expected 'image_path class_id'",
        "class0/x.png 1\n\nclass1/x.png 10\n": r"train_labels.txt line 3: class id 10 out of range \(num_classes=10\)",
        "class0/x.png -1\n": "train_labels.txt line 1: class id -1 out of range",
        "nope/x.png 1\n": "train_labels.txt line 1: image .*nope/x.png not found",
        "\n\n": "no images in .*train_labels.txt",
    }
    for text, message in cases.items():
        labels.write_text(text)
        with pytest.raises(ValueError, match=message):
            ImageDataset(labels, image_size=16, num_classes=10)
