"""Official DiT checkpoints (plain state dicts and train.py's dicts) against the official code's outputs."""
import argparse

import pytest
import torch

from ditkit.checkpoints import (
    CheckpointError,
    export_diffusers,
    load_official_checkpoint,
    load_pretrained,
    save_pretrained,
    save_state_dict,
)
from ditkit.checkpoints.official import build_from_state_dict, infer_config, official_name
from ditkit.models.dit import DiT
from tests.conftest import rel_err


def _golden_output(model, golden):
    g = golden["small"]
    with torch.no_grad():
        return rel_err(model(g["x"], g["t"], g["y"]), g["out"])


def test_golden_checkpoint_loads_and_matches_official_output(golden, tmp_path):
    path = tmp_path / "small.pt"
    torch.save(golden["small"]["state_dict"], path)
    state_dict, config = load_official_checkpoint(path, num_heads=4)
    assert config == golden["small"]["config"]
    assert _golden_output(build_from_state_dict(state_dict, config), golden) < 1e-5


def test_train_py_checkpoint_prefers_ema(golden, tmp_path):
    ema = golden["small"]["state_dict"]
    raw = {k: v + 1 if v.is_floating_point() else v for k, v in ema.items()}
    path = tmp_path / "0400000.pt"
    torch.save({"model": raw, "ema": ema, "opt": {"state": {}, "param_groups": []},
                "args": argparse.Namespace(model="DiT-custom", image_size=128)}, path)
    state_dict, _ = load_official_checkpoint(path, num_heads=4)
    assert all(torch.equal(state_dict[k], ema[k]) for k in ema)
    state_dict, _ = load_official_checkpoint(path, num_heads=4, key="model")
    assert torch.equal(state_dict["final_layer.linear.bias"], raw["final_layer.linear.bias"])


@pytest.mark.parametrize("name", ["DiT-XL/2", "DiT-L/4", "DiT-B/8", "DiT-S/2"])
def test_official_variants_are_recognised_from_shapes(golden, name):
    layout = golden["layout_32px"][name]["keys"]
    state_dict = {k: torch.empty(shape, device="meta") for k, shape in layout.items()}
    config = infer_config(state_dict)
    assert official_name(config) == name
    assert (config["input_size"], config["num_classes"], config["learn_sigma"]) == (32, 1000, True)


def test_unknown_width_needs_num_heads(golden, tmp_path):
    path = tmp_path / "small.pt"
    torch.save(golden["small"]["state_dict"], path)
    with pytest.raises(CheckpointError, match="hidden size 96 .*pass num_heads"):
        load_official_checkpoint(path)


def test_not_a_dit_is_named(tmp_path):
    path = tmp_path / "other.pt"
    torch.save({"encoder.weight": torch.zeros(2)}, path)
    with pytest.raises(CheckpointError, match="other.pt: not a DiT state dict"):
        load_official_checkpoint(path)


def test_load_pretrained_reads_every_format(small_dit, tmp_path):
    save_state_dict(small_dit.state_dict(), tmp_path / "w.safetensors")
    torch.save(small_dit.state_dict(), tmp_path / "w.pt")
    export_diffusers(small_dit, tmp_path / "diffusers")
    for source in ("w.safetensors", "w.pt", "diffusers"):
        model, config = load_pretrained(tmp_path / source, num_heads=4)
        assert config["depth"] == 2 and not model.training
        assert all(torch.equal(v, model.state_dict()[k]) for k, v in small_dit.state_dict().items())


def test_saved_config_needs_no_inference(tmp_path):
    """A model no shape inference could rebuild (extensions, non-square input) round-trips
    through the config stored in the safetensors header."""
    model = DiT(input_size=(16, 8), patch_size=2, in_channels=4, hidden_size=48, depth=1, num_heads=3,
                num_classes=5, num_params=2, cond_channels=1, cond_mode="in_context")
    save_pretrained(model, tmp_path / "m.safetensors")
    loaded, config = load_pretrained(tmp_path / "m.safetensors")
    assert config["num_params"] == 2 and config["cond_mode"] == "in_context" and config["input_size"] == [16, 8]
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in model.state_dict().items())


def test_a_model_on_sequences_of_embeddings_round_trips(tmp_path):
    """context_dim and context_len are recorded, so the cross-attention weights have a home when loaded back."""
    model = DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=48, depth=1, num_heads=3, num_classes=0,
                context_dim=12, context_len=20, param_dropout_prob=0.2)
    save_pretrained(model, tmp_path / "m.safetensors")
    loaded, config = load_pretrained(tmp_path / "m.safetensors")
    assert (config["context_dim"], config["context_len"], config["param_dropout_prob"]) == (12, 20, 0.2)
    assert loaded.cond.sequence.max_len == 20
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in model.state_dict().items())
