"""ADM's .npz batch format, streamed reads, folders of images and reference statistics."""
import numpy as np
import pytest
from PIL import Image

from ditkit.eval.batches import (
    has_images,
    load_sample_batch,
    npz_arrays,
    open_images,
    read_reference_stats,
    save_sample_batch,
)


@pytest.fixture
def images():
    return np.random.default_rng(0).integers(0, 256, size=(7, 5, 6, 3), dtype=np.uint8)


def test_sample_batch_round_trip_in_adm_keys(tmp_path, images):
    labels = np.arange(7)
    save_sample_batch(tmp_path / "s.npz", images, labels)
    with np.load(tmp_path / "s.npz") as npz:
        assert sorted(npz.files) == ["arr_0", "arr_1"]
    got_images, got_labels = load_sample_batch(tmp_path / "s.npz")
    np.testing.assert_array_equal(got_images, images)
    np.testing.assert_array_equal(got_labels, labels)
    save_sample_batch(tmp_path / "u.npz", images)
    assert load_sample_batch(tmp_path / "u.npz")[1] is None


@pytest.mark.parametrize("save", [np.savez, np.savez_compressed])
def test_npz_images_stream_in_batches(tmp_path, images, save):
    save(tmp_path / "b.npz", arr_0=images, mu=np.zeros(3))
    source = open_images(tmp_path / "b.npz")
    assert (source.num_images, source.image_shape) == (7, (5, 6, 3))
    batches = list(source.batches(3))
    assert [len(b) for b in batches] == [3, 3, 1]
    np.testing.assert_array_equal(np.concatenate(batches), images)


@pytest.mark.parametrize("save", [np.savez, np.savez_compressed])
def test_npz_arrays_reads_the_headers_as_numpy_reads_the_arrays(tmp_path, images, save):
    save(tmp_path / "b.npz", arr_0=images, arr_1=np.arange(7), mu=np.zeros(3, np.float32))
    with np.load(tmp_path / "b.npz") as npz:
        assert npz_arrays(tmp_path / "b.npz") == {k: (npz[k].shape, npz[k].dtype) for k in npz.files}


def test_bad_batches_name_the_file_and_key(tmp_path, images):
    np.savez(tmp_path / "nokey.npz", samples=images)
    with pytest.raises(ValueError, match=r"nokey.npz has no 'arr_0' array \(it has: samples\)"):
        open_images(tmp_path / "nokey.npz")
    np.savez(tmp_path / "float.npz", arr_0=images.astype(np.float32))
    with pytest.raises(ValueError, match=r"float.npz\[arr_0\]: images must be uint8"):
        open_images(tmp_path / "float.npz")
    np.savez(tmp_path / "nchw.npz", arr_0=images.transpose(0, 3, 1, 2))
    with pytest.raises(ValueError, match="channels first"):
        open_images(tmp_path / "nchw.npz")
    (tmp_path / "x.txt").write_text("hello")
    with pytest.raises(ValueError, match="not an .npz"):
        open_images(tmp_path / "x.txt")
    with pytest.raises(FileNotFoundError, match="missing.npz"):
        open_images(tmp_path / "missing.npz")


def test_folder_of_images_in_name_order(tmp_path, images):
    for i, image in enumerate(images):
        Image.fromarray(image).save(tmp_path / f"{i:03d}.png")
    (tmp_path / "notes.txt").write_text("ignored")
    source = open_images(tmp_path)
    assert source.num_images == 7 and has_images(tmp_path)
    np.testing.assert_array_equal(np.concatenate(list(source.batches(4))), images)

    Image.fromarray(images[0, :4]).save(tmp_path / "999.png")
    with pytest.raises(ValueError, match="999.png is 6×4"):
        list(open_images(tmp_path).batches(4))


def test_reference_statistics(tmp_path, images):
    mu, sigma = np.arange(3.0), np.eye(3)
    np.savez(tmp_path / "ref.npz", arr_0=images, mu=mu, sigma=sigma)
    stats = read_reference_stats(tmp_path / "ref.npz")
    assert sorted(stats) == ["mu", "sigma"]
    np.testing.assert_array_equal(stats["mu"], mu)

    np.savez(tmp_path / "stats_only.npz", mu=mu, sigma=sigma, mu_s=mu, sigma_s=sigma)
    assert not has_images(tmp_path / "stats_only.npz")
    assert len(read_reference_stats(tmp_path / "stats_only.npz")) == 4

    np.savez(tmp_path / "half.npz", mu=mu)
    with pytest.raises(ValueError, match="'mu' without 'sigma'"):
        read_reference_stats(tmp_path / "half.npz")
    np.savez(tmp_path / "wrong.npz", mu=mu, sigma=np.eye(2))
    with pytest.raises(ValueError, match=r"'sigma' has shape \(2, 2\), expected \(3, 3\)"):
        read_reference_stats(tmp_path / "wrong.npz")


@pytest.mark.parametrize("save", [np.savez, np.savez_compressed])
def test_truncated_or_damaged_npz_is_named(tmp_path, images, save):
    save(tmp_path / "good.npz", arr_0=images, mu=np.zeros(3), sigma=np.eye(3))
    data = (tmp_path / "good.npz").read_bytes()
    (tmp_path / "cut.npz").write_bytes(data[: len(data) // 2])
    for read in (open_images, load_sample_batch, read_reference_stats, has_images):
        with pytest.raises(ValueError, match="cut.npz is not an .npz file, or is truncated"):
            read(tmp_path / "cut.npz")
    damaged = bytearray(data)
    start = data.index(b"arr_0.npy") + 200  # inside the images' bytes, past the .npy header
    damaged[start:start + 40] = bytes(40)
    (tmp_path / "bad.npz").write_bytes(bytes(damaged))
    for read in (lambda p: list(open_images(p).batches(4)), load_sample_batch):
        with pytest.raises(ValueError, match="bad.npz is corrupt or truncated"):
            read(tmp_path / "bad.npz")


def test_folder_of_sixteen_bit_images_is_scaled_to_eight_bits(tmp_path):
    v = np.tile(np.linspace(0, 65535, 6).round().astype(np.uint16), (5, 1))  # (5, 6) gradient
    Image.fromarray(v).save(tmp_path / "a.png")
    (batch,) = open_images(tmp_path).batches(4)
    np.testing.assert_array_equal(batch[0], np.stack([np.rint(v / 257).astype(np.uint8)] * 3, -1))
    (tmp_path / "b.png").write_bytes(b"junk")
    with pytest.raises(ValueError, match="image .*b.png cannot be read"):
        list(open_images(tmp_path).batches(4))
