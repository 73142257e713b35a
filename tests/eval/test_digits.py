"""The digits demo's metrics: classifier quality on held-out real digits, agreement as a measure
of class fidelity, and the feature-space Fréchet distance as a measure of distribution match."""
import numpy as np
import pytest

from ditkit.eval import digits as D


def test_classifier_is_accurate_on_held_out_real_digits():
    assert D.classifier_accuracy() >= 0.97


def test_agreement_of_real_digits_with_their_labels():
    _, x_test, _, y_test = D.digit_split()
    assert len(x_test) == 450
    assert D.classifier_agreement(x_test, y_test) >= 0.97


def test_agreement_of_shuffled_labels_is_chance():
    _, x_test, _, y_test = D.digit_split()
    shuffled = np.random.default_rng(0).permutation(y_test)
    assert D.classifier_agreement(x_test, shuffled) == pytest.approx(0.1, abs=0.05)


def test_frechet_distance_separates_real_from_noise():
    x_train, x_test, y_train, _ = D.digit_split()
    real = D.digits_frechet_distance(x_test, reference=x_train)
    noise = D.digits_frechet_distance(np.random.default_rng(0).uniform(0, 16, size=(450, 64)), reference=x_train)
    half_the_classes = D.digits_frechet_distance(x_train[y_train < 5])
    prototypes = np.repeat([np.rint(x_train[y_train == k].mean(0)) for k in range(10)], 45, axis=0)
    assert real < 0.5
    assert noise > 20 * real and half_the_classes > 5 * real
    assert D.digits_frechet_distance(prototypes) > 5 * real  # mode collapse within classes is seen
    assert D.real_vs_real_fd() < 0.5


def test_features_are_deterministic():
    _, x_test, _, _ = D.digit_split()
    first = D.digit_features(x_test)
    D._feature_net.cache_clear()
    np.testing.assert_array_equal(D.digit_features(x_test), first)


def test_demo_samples_file_maps_back_to_pixels(tmp_path):
    # The demo's convention: x = v/8 − 1 in [-1, 1], (N, 1, 8, 8) float32, labels (N,) int64.
    _, x_test, _, y_test = D.digit_split()
    x = (x_test / 8 - 1).reshape(-1, 1, 8, 8).astype(np.float32)
    x += np.random.default_rng(0).uniform(-0.06, 0.06, size=x.shape).astype(np.float32)  # under half a level
    x[0, 0, 0, 0] = -1.7  # beyond the range: clipped
    np.savez(tmp_path / "samples.npz", samples=x, labels=y_test)
    pixels, labels = D.load_digit_samples(tmp_path / "samples.npz")
    expected = x_test.copy()
    expected[0, 0] = 0
    np.testing.assert_array_equal(pixels, expected)
    results = D.evaluate_digits(pixels, labels)
    assert results["classifier_agreement"] >= 0.97
    assert "classifier agreement" in D.format_digits(results)


def test_errors_speak_of_the_convention(tmp_path):
    with pytest.raises(ValueError, match=r"must be in \[0, 16\].*to_digit_pixels"):
        D.classifier_agreement(np.full((2, 64), -1.0), np.zeros(2))
    with pytest.raises(ValueError, match="one label per sample"):
        D.classifier_agreement(np.zeros((2, 64)), np.zeros(3))
    np.savez(tmp_path / "wrong.npz", arr_0=np.zeros((2, 8, 8, 3), np.uint8))
    with pytest.raises(ValueError, match=r"wrong.npz lacks 'arr_1' \(it has: arr_0\).*labels"):
        D.load_digit_samples(tmp_path / "wrong.npz")
    np.savez(tmp_path / "other.npz", x=np.zeros(2))
    with pytest.raises(ValueError, match=r"lacks 'samples', 'labels' \(it has: x\)"):
        D.load_digit_samples(tmp_path / "other.npz")
    np.savez(tmp_path / "big.npz", samples=np.zeros((2, 1, 16, 16)), labels=np.zeros(2))
    with pytest.raises(ValueError, match=r"big.npz: expected the digits demo's samples \(N, 1, 8, 8\).*--inception"):
        D.load_digit_samples(tmp_path / "big.npz")
    np.savez(tmp_path / "big_images.npz", arr_0=np.zeros((2, 16, 16, 3), np.uint8), arr_1=np.zeros(2))
    with pytest.raises(ValueError, match=r"big_images.npz: arr_0 holds uint8 images of shape \(16, 16, 3\)"):
        D.load_digit_samples(tmp_path / "big_images.npz")
    np.savez(tmp_path / "s.npz", samples=np.zeros((2, 1, 8, 8)), labels=np.zeros(2))
    (tmp_path / "cut.npz").write_bytes((tmp_path / "s.npz").read_bytes()[:300])
    with pytest.raises(ValueError, match="cut.npz is not an .npz file, or is truncated"):
        D.load_digit_samples(tmp_path / "cut.npz")
    with pytest.raises(IsADirectoryError, match="is a folder; the digits scorer reads a digits run's samples .npz"):
        D.load_digit_samples(tmp_path)


def test_a_damaged_samples_file_is_named(tmp_path):
    np.savez(tmp_path / "s.npz", samples=np.zeros((64, 1, 8, 8), np.float32), labels=np.zeros(64, np.int64))
    data = bytearray((tmp_path / "s.npz").read_bytes())
    start = data.index(b"samples.npy") + 300  # inside the samples' bytes, past the .npy header
    data[start:start + 40] = b"\xff" * 40
    (tmp_path / "bad.npz").write_bytes(bytes(data))
    with pytest.raises(ValueError, match="bad.npz is corrupt or truncated"):
        D.load_digit_samples(tmp_path / "bad.npz")
