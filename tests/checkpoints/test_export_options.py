"""Which models export to diffusers: every option diffusers' DiTTransformer2DModel cannot represent is
refused in one line that names its config key, before anything is written; a plain model round-trips."""
import json

import pytest
import torch

import ditkit
from ditkit.checkpoints import export_diffusers
from ditkit.checkpoints.diffusers import to_diffusers_state_dict
from ditkit.checkpoints.official import model_config
from ditkit.cli import main
from ditkit.config import DataConfig, load_config
from ditkit.models.dit import DiT
from ditkit.training.trainer import train
from tests.checkpoints.conftest import SMALL

INSTEAD = "--to safetensors"


def refused(model: DiT, tmp_path, **kwargs) -> str:
    """The message refusing ``model``'s export, after checking that nothing was written."""
    out = tmp_path / "out"
    with pytest.raises(ValueError) as exc:
        export_diffusers(model, out, **kwargs)
    assert not out.exists()
    message = str(exc.value)
    assert len(message.splitlines()) == 1 and INSTEAD in message, message
    return message


@pytest.mark.parametrize("change, setting", [
    (dict(pos_embed="rope"), "model.pos_embed=rope"),
    (dict(norm="rmsnorm"), "model.norm=rmsnorm"),
    (dict(qk_norm=True), "model.qk_norm=true"),
    (dict(mlp="swiglu"), "model.mlp=swiglu"),
    (dict(mlp_ratio=2.0), "model.mlp_ratio=2.0"),
    (dict(repa_depth=1, repa_dim=8), "model.repa_depth=1"),
    (dict(num_params=2), "model.num_params=2"),
    (dict(cond_channels=1), "model.cond_channels=1"),
    (dict(cond_channels=1, field_mode="concat"), "model.cond_channels=1"),
    (dict(cond_mode="cross_attention"), "model.cond_mode=cross_attention"),
    (dict(cond_mode="in_context"), "model.cond_mode=in_context"),
    (dict(num_classes=0), "model.num_classes=0 (unconditional)"),
    (dict(input_size=(16, 8)), "model.input_size=[16, 8]"),
    (dict(input_size=(16,)), "model.input_size=[16]"),
    (dict(input_size=(4, 16, 16), patch_size=(1, 2, 2)), "model.patch_size=[1, 2, 2]"),
])
def test_an_option_diffusers_lacks_is_refused_by_its_key(change, setting, tmp_path):
    assert setting in refused(DiT(**{**SMALL, **change}), tmp_path)


def test_every_such_option_is_named_in_one_line(tmp_path):
    message = refused(DiT(**{**SMALL, "pos_embed": "rope", "norm": "rmsnorm", "qk_norm": True}), tmp_path)
    assert "cannot represent model.pos_embed=rope, model.norm=rmsnorm, model.qk_norm=true;" in message


def test_sequence_conditioning_is_refused(tmp_path):
    assert "model.context_dim=8" in refused(DiT(**{**SMALL, "context_dim": 8}), tmp_path)


def test_a_pipeline_export_refuses_the_option_first(tmp_path):
    """The option's refusal, not the pipeline's: its advice to export without --vae would fail too."""
    (tmp_path / "vae").mkdir()
    (tmp_path / "vae" / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL", "scaling_factor": 0.5}))
    data = DataConfig(kind="latents", latent_norm="channel")  # a run whose latents a DiTPipeline would decode wrongly
    message = refused(DiT(**{**SMALL, "mlp": "swiglu"}), tmp_path, vae=tmp_path / "vae", data=data)
    assert "model.mlp=swiglu" in message and "DiTPipeline" not in message


def test_weights_no_diffusers_layer_holds_are_refused(small_dit):
    state_dict = {**small_dit.state_dict(), "blocks.0.extra.weight": torch.zeros(1)}
    with pytest.raises(ValueError, match=r"no place for 1 weights of this model \(blocks.0.extra.weight\)"):
        to_diffusers_state_dict(state_dict, model_config(small_dit))


def test_a_plain_model_exports_and_reads_back_exactly(small_dit, batch, tmp_path):
    model, _ = ditkit.load_model(export_diffusers(small_dit, tmp_path / "out"), device="cpu")
    ours, back = small_dit.state_dict(), model.state_dict()
    assert ours.keys() == back.keys() and all(torch.equal(ours[k], back[k]) for k in ours)
    with torch.no_grad():
        assert torch.equal(model(*batch), small_dit(*batch))


def test_the_command_refuses_a_rope_rmsnorm_qk_norm_run_in_one_line(tmp_path, capsys):
    run = tmp_path / "run"
    train(load_config("digits", overrides=[
        "model.name=custom", "model.hidden_size=32", "model.depth=1", "model.num_heads=2", "model.pos_embed=rope",
        "model.norm=rmsnorm", "model.qk_norm=true", "train.global_batch_size=4", "train.steps=1"]), run, device="cpu")
    capsys.readouterr()
    out = tmp_path / "hf"
    with pytest.raises(SystemExit) as exc:
        main(["export", "--ckpt", str(run / "checkpoints" / "last.pt"), "--to", "diffusers", "--out", str(out)])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and len(err.splitlines()) == 1, err
    assert "model.pos_embed=rope, model.norm=rmsnorm, model.qk_norm=true" in err and INSTEAD in err
    assert not out.exists()
