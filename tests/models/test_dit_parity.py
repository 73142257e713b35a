"""ditkit's DiT against the official code's outputs (../shared/golden, copied into fixtures)."""
import pytest
import torch

import ditkit
from ditkit.models.dit import DiT
from tests.conftest import rel_err


@pytest.mark.parametrize("name", list(ditkit.DiT_models))
def test_variant_layout_matches_official(golden, name):
    ref = golden["layout_32px"][name]
    with torch.device("meta"):
        model = ditkit.DiT_models[name](input_size=32, num_classes=1000)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes == {k: tuple(v) for k, v in ref["keys"].items()}
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == ref["trainable"]


def test_all_twelve_variants_exist():
    assert sorted(ditkit.DiT_models) == sorted(f"DiT-{s}/{p}" for s in ("S", "B", "L", "XL") for p in (2, 4, 8))


@pytest.fixture(scope="module")
def small(golden):
    model = DiT(**golden["small"]["config"])
    model.load_state_dict(golden["small"]["state_dict"], strict=True)
    return model.eval()


def test_network_output_matches_official(golden, small):
    g = golden["small"]
    with torch.no_grad():
        out = small(g["x"], g["t"], g["y"])
    assert rel_err(out, g["out"]) < 1e-5


def test_forward_with_cfg_matches_official(golden, small):
    g = golden["small"]
    with torch.no_grad():
        out = small.forward_with_cfg(g["cfg_x"], g["cfg_t"], g["cfg_y"], g["cfg_scale"])
    assert rel_err(out, g["cfg_out"]) < 1e-5


def test_guidance_on_all_channels_differs_only_beyond_three(golden, small):
    g = golden["small"]
    with torch.no_grad():
        official = small.forward_with_cfg(g["cfg_x"], g["cfg_t"], g["cfg_y"], g["cfg_scale"])
        all_ch = small.forward_with_cfg(g["cfg_x"], g["cfg_t"], g["cfg_y"], g["cfg_scale"], guided_channels=None)
    assert torch.equal(official[:, :3], all_ch[:, :3])
    assert not torch.allclose(official[:, 3:4], all_ch[:, 3:4])
    torch.testing.assert_close(official[:, 4:], all_ch[:, 4:])


def test_fresh_model_is_adaln_zero():
    """adaLN-Zero: at initialisation every block is the identity and the output is exactly zero."""
    model = DiT(input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=2, num_heads=2, num_classes=3)
    out = model(torch.randn(2, 1, 8, 8), torch.tensor([1.0, 500.0]), torch.tensor([0, 2]))
    assert out.shape == (2, 2, 8, 8) and torch.count_nonzero(out) == 0
