"""The FID InceptionV3 feature path on a randomly initialised network of the real architecture
(the real weights are ~95 MB and never downloaded), its weight loader and its input resizing."""
import numpy as np
import pytest
import torch

from ditkit.eval.batches import ArrayImages
from ditkit.eval.evaluate import compute_activations
from ditkit.eval.inception import (
    WEIGHTS_FILE,
    WEIGHTS_URL,
    FIDInceptionV3,
    full_fp32,
    load_inception,
    preprocess,
    resize_tf1,
)


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(0).integers(0, 256, size=(2, 24, 20, 3), dtype=np.uint8)


def test_pytorch_fid_state_dict_layout():
    sd = FIDInceptionV3().state_dict()
    assert sd["fc.weight"].shape == (1008, 2048)
    assert sd["Conv2d_1a_3x3.conv.weight"].shape == (32, 3, 3, 3)
    assert sd["Mixed_7c.branch_pool.conv.weight"].shape == (192, 2048, 1, 1)
    # torchvision's InceptionV3 has 27,161,264 parameters; less its aux classifier (3,326,696)
    # and with 1008 instead of 1000 classes (+8·2049): 23,850,960.
    assert sum(p.numel() for p in FIDInceptionV3().parameters()) == 23_850_960


def test_features_shapes_batching_and_weight_round_trip(weights_file, images):
    model = load_inception(weights_file)
    feats = compute_activations(model, ArrayImages(images), batch_size=1)  # one image a batch
    assert feats["pool"].shape == (2, 2048)
    assert feats["spatial"].shape == (2, 17 * 17 * 7)
    assert feats["probs"].shape == (2, 1008)
    np.testing.assert_allclose(feats["probs"].sum(1), 1.0, rtol=1e-5)
    assert (feats["pool"] >= 0).all() and feats["pool"].std() > 1e-3  # post-ReLU means, not vanished
    assert not np.allclose(feats["pool"][0], feats["pool"][1])

    # a second load of the same file, one batch: the same features (deterministic, batch-independent)
    again = compute_activations(load_inception(weights_file), ArrayImages(images), batch_size=2)
    for key in feats:
        np.testing.assert_allclose(again[key], feats[key], rtol=1e-4, atol=1e-6)


def test_spatial_features_are_first_seven_channels_of_mixed_6d_in_hwc_order(weights_file, images):
    model = load_inception(weights_file)
    captured = {}
    model.Mixed_6d.branch1x1.register_forward_hook(lambda m, i, o: captured.update(out=o))
    with torch.no_grad():
        out = model(preprocess(torch.from_numpy(images[:1])))
    expected = captured["out"][:, :7].permute(0, 2, 3, 1).reshape(1, -1)
    torch.testing.assert_close(out["spatial"], expected)


def test_missing_weights_name_the_file_and_where_to_get_it(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        load_inception(tmp_path / "nowhere.pth")
    assert WEIGHTS_FILE in str(e.value) and WEIGHTS_URL in str(e.value)


def test_mismatched_weights_are_rejected(tmp_path, weights_file):
    sd = torch.load(weights_file, weights_only=True)
    sd["fc.weight"] = torch.zeros(1000, 2048)  # torchvision's classifier, not the TF graph's
    del sd["Mixed_5b.branch1x1.conv.weight"]
    bad = tmp_path / "torchvision_inception.pth"
    torch.save(sd, bad)
    with pytest.raises(ValueError, match="missing keys: 1.*wrong shapes: 1") as e:
        load_inception(bad)
    assert str(bad) in str(e.value) and WEIGHTS_FILE in str(e.value)

    garbage = tmp_path / "page.html"
    garbage.write_text("<html>not found</html>")
    with pytest.raises(ValueError, match="not a readable torch state dict"):
        load_inception(garbage)


def test_weights_without_num_batches_tracked_load(tmp_path, weights_file):
    sd = {k: v for k, v in torch.load(weights_file, weights_only=True).items() if "num_batches_tracked" not in k}
    path = tmp_path / "old.pth"
    torch.save(sd, path)
    torch.testing.assert_close(load_inception(path).fc.weight, sd["fc.weight"])


# -- input preprocessing ------------------------------------------------------------------------

def test_pytorch_fid_preprocessing_maps_uint8_to_unit_range():
    img = torch.tensor([0, 255, 51], dtype=torch.uint8).repeat(299 * 299).reshape(1, 299, 299, 3)
    x = preprocess(img)  # 299 in, 299 out: the bilinear resize is the identity
    assert x.shape == (1, 3, 299, 299)
    torch.testing.assert_close(x[0, :, 0, 0], torch.tensor([-1.0, 1.0, 2 * 51 / 255 - 1]))
    assert preprocess(img[:, :32, :48]).shape == (1, 3, 299, 299)


def test_tf1_resize_is_tensorflow_legacy_bilinear():
    # TF 1.x, align_corners=False: output pixel i samples input at i·(in/out), no half-pixel shift;
    # upsampling ×2 keeps every input pixel at even positions, averages neighbours at odd ones and
    # repeats the last pixel at the edge.
    x = torch.tensor([[0.0, 2.0, 6.0], [4.0, 8.0, 10.0]]).reshape(1, 1, 2, 3)
    y = resize_tf1(x, 6)
    torch.testing.assert_close(y[0, 0, 0], torch.tensor([0.0, 1.0, 2.0, 4.0, 6.0, 6.0]))
    torch.testing.assert_close(y[0, 0, :, 0], torch.tensor([0.0, 4 / 3, 8 / 3, 4.0, 4.0, 4.0]))
    img = torch.full((1, 10, 10, 3), 128, dtype=torch.uint8)
    torch.testing.assert_close(preprocess(img, resize="tf1"), torch.zeros(1, 3, 299, 299))
    with pytest.raises(ValueError, match="resize must be one of"):
        preprocess(img, resize="area")


def test_preprocess_rejects_non_uint8_images():
    with pytest.raises(ValueError, match=r"uint8 \(N, H, W, 3\)"):
        preprocess(torch.zeros(1, 3, 8, 8))


def test_full_fp32_turns_tf32_off_and_restores_the_settings():
    before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True
    try:
        with full_fp32():
            assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32
        assert torch.backends.cudnn.allow_tf32 and torch.backends.cuda.matmul.allow_tf32
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before
