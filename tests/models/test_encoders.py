"""REPA's encoders: ImageNet normalisation, the encoder's grid for a DiT grid, features resampled onto the
DiT's token grid in its row-major order, DINOv2-B's real shapes (768-dim, 16×16 patches at 224×224,
CLS dropped), a saved DINOv2 read back from its folder, and one line naming what to fetch."""
import sys

import pytest
import torch

from ditkit.models.encoders import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    dinov2_encoder,
    encoder_grid,
    encoder_input,
    load_dinov2,
    to_token_grid,
)

transformers = pytest.importorskip("transformers")


def tiny_dinov2():
    torch.manual_seed(0)
    config = transformers.Dinov2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    return transformers.Dinov2Model(config).eval()


def test_input_is_imagenet_normalised_rgb_at_the_encoders_size():
    grey = torch.full((2, 1, 8, 8), 0.0)  # [-1, 1] pixels: 0 is mid-grey, 0.5 in [0, 1]
    x = encoder_input(grey, (16, 16))
    assert x.shape == (2, 3, 16, 16)
    want = torch.tensor([(0.5 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD)]).view(1, 3, 1, 1)
    torch.testing.assert_close(x, want.expand_as(x))
    white = encoder_input(torch.full((1, 3, 4, 4), 255, dtype=torch.uint8), (4, 4))
    torch.testing.assert_close(white[0, :, 0, 0], torch.tensor([(1 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD)]))


def test_encoder_grid_matches_the_dit_grid_from_16_up():
    assert encoder_grid((16, 16)) == (16, 16)  # DiT-XL/2 at 256×256: DINOv2 at 224×224, as the paper
    assert encoder_grid((32, 32)) == (32, 32)  # 512×512: DINOv2 at 448×448, as the paper
    assert encoder_grid((4, 8)) == (16, 16)


def test_features_are_resampled_onto_the_token_grid_row_major():
    rows = torch.arange(16.0).repeat_interleave(16)  # token n = (i, j) of a 16×16 grid holds its row i
    z = torch.stack([rows, torch.ones(256)], dim=-1)[None]  # (1, 256, 2)
    assert to_token_grid(z, (16, 16), (16, 16)) is z
    small = to_token_grid(z, (16, 16), (4, 4))[0]  # (16, 2)
    torch.testing.assert_close(small[:, 1], torch.ones(16))  # a constant stays constant
    grid = small[:, 0].view(4, 4)
    torch.testing.assert_close(grid, grid[:, :1].expand(4, 4))  # rows stay rows, in order
    assert (grid[1:, 0] > grid[:-1, 0]).all()


def test_dinov2_base_gives_768_dim_features_on_the_16x16_grid():
    with torch.device("meta"):  # the real DINOv2-B configuration, shapes only (its weights take seconds to draw)
        model = transformers.Dinov2Model(transformers.Dinov2Config())
        encoder = dinov2_encoder(model, (16, 16))
        z = encoder(torch.empty(1, 3, 256, 256, dtype=torch.uint8))
    assert (model.config.hidden_size, model.config.num_hidden_layers, model.config.patch_size) == (768, 12, 14)
    assert encoder.input_size == (224, 224) and encoder.dim == 768
    assert z.shape == (1, 256, 768)


def test_the_features_are_the_final_patch_tokens_without_cls():
    model = tiny_dinov2()
    image = torch.randint(0, 256, (1, 3, 32, 32), dtype=torch.uint8)
    z = dinov2_encoder(model, (16, 16))(image)
    full = model(pixel_values=encoder_input(image, (224, 224))).last_hidden_state  # (1, 1 + 256, 32)
    torch.testing.assert_close(z, full[:, 1:])
    assert not z.requires_grad


def test_a_saved_dinov2_loads_from_its_folder_and_is_frozen(tmp_path):
    model = tiny_dinov2()
    model.save_pretrained(tmp_path / "dinov2")
    encoder = load_dinov2(tmp_path / "dinov2", (4, 4))
    image = torch.rand(2, 3, 8, 8) * 2 - 1
    torch.testing.assert_close(encoder(image), dinov2_encoder(model, (4, 4))(image))
    assert encoder(image).shape == (2, 16, 32)
    assert not any(p.requires_grad for p in encoder.parameters()) and not encoder.train().training


def test_missing_folder_or_transformers_says_what_to_fetch(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="download facebook/dinov2-base from the Hugging Face hub"):
        load_dinov2(tmp_path / "absent", (16, 16))
    tiny_dinov2().save_pretrained(tmp_path / "dinov2")
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(ValueError, match=r"needs transformers: pip install 'ditkit\[repa\]'"):
        load_dinov2(tmp_path / "dinov2", (16, 16))
