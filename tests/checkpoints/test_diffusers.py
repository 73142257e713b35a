"""ditkit's DiT against diffusers' own DiTTransformer2DModel and DiTPipeline (the maintained library)."""
import json

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from ditkit.checkpoints import export_diffusers, from_diffusers, match_official_timestep_embedding
from ditkit.checkpoints.diffusers import WEIGHTS, to_diffusers_state_dict
from ditkit.checkpoints.formats import load_state_dict
from ditkit.checkpoints.official import model_config
from ditkit.models.dit import DiT, TimestepEmbedder
from tests.checkpoints.conftest import SMALL
from tests.conftest import rel_err


@pytest.fixture
def exported(small_dit, tmp_path):
    folder = export_diffusers(small_dit, tmp_path / "dit")
    return folder, diffusers.DiTTransformer2DModel.from_pretrained(folder).eval()


def test_export_fills_every_diffusers_weight(small_dit, exported):
    folder, transformer = exported
    written = load_state_dict(folder / f"{WEIGHTS}.safetensors")
    loaded = transformer.state_dict()
    assert written.keys() == loaded.keys()
    assert all(torch.equal(written[k], loaded[k]) for k in written)


def test_output_equals_ditkit_with_official_timestep_frequencies(small_dit, exported, batch):
    x, t, y = batch
    transformer = match_official_timestep_embedding(exported[1])
    with torch.no_grad():
        ours = small_dit(x, t, y)
        theirs = transformer(x, timestep=t, class_labels=y).sample  # (B, 2C, H, W): ε and the variance logits
    assert theirs.shape == ours.shape == (4, 8, 16, 16)
    assert rel_err(theirs, ours) < 1e-5


def test_stock_diffusers_differs_only_by_its_timestep_frequencies(small_dit, exported, batch, monkeypatch):
    """diffusers embeds t with ω_k = 10000^(-k/127); the official 10000^(-k/128) = P^(-k/128) with
    P = 10000^(128/127).  With that P ditkit computes what stock diffusers computes."""
    x, t, y = batch
    with torch.no_grad():
        theirs = exported[1](x, timestep=t, class_labels=y).sample
        official = small_dit(x, t, y)
        period = 10000 ** (128 / 127)
        monkeypatch.setattr(small_dit.t_embedder, "timestep_embedding",
                            lambda t, dim: TimestepEmbedder.timestep_embedding(t, dim, max_period=period))
        shifted = small_dit(x, t, y)
    assert rel_err(theirs, shifted) < 1e-5
    assert rel_err(theirs, official) > 1e-3


def test_round_trip_gives_identical_state_dict(small_dit, exported):
    model, config = from_diffusers(exported[0])
    assert config == model_config(small_dit)
    ours, back = small_dit.state_dict(), model.state_dict()
    assert ours.keys() == back.keys()
    assert all(torch.equal(ours[k], back[k]) for k in ours)


def test_from_diffusers_reads_bin_weights(small_dit, tmp_path):
    config, state_dict = to_diffusers_state_dict(small_dit.state_dict(), model_config(small_dit))
    (tmp_path / "config.json").write_text(json.dumps(config))
    torch.save(state_dict, tmp_path / f"{WEIGHTS}.bin")
    model, _ = from_diffusers(tmp_path)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in small_dit.state_dict().items())


def test_model_without_label_dropout_gets_a_null_row(batch, tmp_path):
    torch.manual_seed(0)
    model = DiT(**{**SMALL, "class_dropout_prob": 0.0}).eval()
    with torch.no_grad():
        model.final_layer.linear.weight.normal_(std=0.02)
    transformer = match_official_timestep_embedding(
        diffusers.DiTTransformer2DModel.from_pretrained(export_diffusers(model, tmp_path)).eval())
    x, t, _ = batch
    y = torch.tensor([0, 3, 9, 2])
    with torch.no_grad():
        assert rel_err(transformer(x, timestep=t, class_labels=y).sample, model(x, t, y)) < 1e-5


def test_diverged_block_embedders_are_refused(small_dit, tmp_path):
    config, state_dict = to_diffusers_state_dict(small_dit.state_dict(), model_config(small_dit))
    key = "transformer_blocks.1.norm1.emb.timestep_embedder.linear_1.bias"
    state_dict[key] = state_dict[key] + 1
    (tmp_path / "config.json").write_text(json.dumps(config))
    torch.save(state_dict, tmp_path / f"{WEIGHTS}.bin")
    with pytest.raises(ValueError, match="differs from block 0"):
        from_diffusers(tmp_path)


@pytest.mark.parametrize("change, message", [
    (dict(num_classes=0), "unconditional"),
    (dict(cond_mode="in_context"), "cond_mode"),
    (dict(input_size=(16, 8)), "square"),
    (dict(num_params=2), "num_params"),
])
def test_unexportable_models_are_refused(change, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        export_diffusers(DiT(**{**SMALL, **change}), tmp_path)


def test_pipeline_runs_from_local_folders(small_dit, golden, tmp_path):
    vae = diffusers.AutoencoderKL(block_out_channels=(8,), down_block_types=("DownEncoderBlock2D",),
                                  up_block_types=("UpDecoderBlock2D",), latent_channels=4, norm_num_groups=8,
                                  layers_per_block=1, sample_size=16)
    vae.save_pretrained(tmp_path / "vae_src")
    folder = export_diffusers(small_dit, tmp_path / "pipe", vae=tmp_path / "vae_src",
                              id2label={i: f"class {i}, alias {i}" for i in range(10)})
    pipe = diffusers.DiTPipeline.from_pretrained(folder)
    assert isinstance(pipe.scheduler, diffusers.DDIMScheduler)
    assert pipe.get_label_ids(["class 3", "alias 7"]) == [3, 7]
    # guidance_scale 1: DiTPipeline's null label is hard-coded to 1000, the ImageNet count
    images = pipe(class_labels=[1, 2], num_inference_steps=2, guidance_scale=1.0, output_type="np",
                  generator=torch.manual_seed(0)).images
    assert images.shape == (2, 16, 16, 3) and ((images >= 0) & (images <= 1)).all()
    # the scheduler's ᾱ_t is the official 1000-step linear schedule's
    alpha_bar = torch.cumprod(1 - golden["train_losses"]["betas"].double(), 0)
    assert rel_err(pipe.scheduler.alphas_cumprod, alpha_bar) < 1e-6
    model, _ = from_diffusers(folder)  # a pipeline root is read through transformer/
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in small_dit.state_dict().items())
