"""REPA in ``ditkit.train``: the digits preset trains with a (tiny, random) DINOv2 saved in a folder, logs
the term, resumes bit for bit and samples from its checkpoint; a latent cache extracted with its images
feeds them to the encoder; every wrong setting is one line naming its key."""
import json
import logging
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import ditkit
from ditkit.checkpoints.training import load_checkpoint
from ditkit.cli import main
from ditkit.config import ConfigError, load_config
from ditkit.training.trainer import train

transformers = pytest.importorskip("transformers")

TINY = ["model.hidden_size=32", "model.depth=2", "model.num_heads=2", "train.global_batch_size=8", "train.log_every=1",
        "train.warmup_steps=2", "train.ema_decay=0.9", "model.repa_depth=1", "model.repa_dim=32"]


@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory) -> Path:
    """A randomly initialised DINOv2 (32-dim features, patch 14) saved as transformers saves one."""
    torch.manual_seed(0)
    config = transformers.Dinov2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    path = tmp_path_factory.mktemp("dinov2")
    transformers.Dinov2Model(config).save_pretrained(path)
    return path


def digits(encoder_dir, *extra):
    return load_config("digits", [*TINY, f"train.repa_encoder={encoder_dir}", *extra])


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_digits_with_repa_logs_the_term_resumes_exactly_and_samples(tmp_path, encoder_dir):
    train(digits(encoder_dir, "train.steps=4", "train.ckpt_every=2"), tmp_path / "full", device="cpu")
    full = records(tmp_path / "full")
    assert [r["step"] for r in full] == [1, 2, 3, 4]
    assert all(-1 <= r["repa"] <= 1 for r in full)

    train(digits(encoder_dir, "train.steps=2"), tmp_path / "part", device="cpu")
    train(digits(encoder_dir, "train.steps=4"), tmp_path / "part", device="cpu", resume=True)
    part = records(tmp_path / "part")
    assert [(r["loss"], r["repa"]) for r in part] == [(r["loss"], r["repa"]) for r in full]
    a, b = (load_checkpoint(tmp_path / run / "checkpoints" / "last.pt") for run in ("full", "part"))
    assert any(k.startswith("repa_projector.") for k in a["model"])
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]) and torch.equal(a["ema"][k], b["ema"][k]), k

    for weights in ("checkpoints/last.pt", "ema.safetensors"):  # sampling never calls the projector
        model, cfg = ditkit.load_model(tmp_path / "full" / weights, device="cpu")
        out = ditkit.sample(model, cfg, labels=[0, 1], steps=2, progress=False)
        assert out.x.shape == (2, 1, 8, 8) and torch.isfinite(out.x).all()


def test_a_repa_checkpoint_fine_tunes_a_model_without_repa_and_samples_from_the_cli(tmp_path, encoder_dir, caplog):
    """--init-from a REPA run into a model without REPA drops the projector with one line; ``ditkit sample``
    rebuilds the checkpoint's model from its config, projector included, and never calls it."""
    train(digits(encoder_dir, "train.steps=1"), tmp_path / "repa", device="cpu")
    ckpt = tmp_path / "repa" / "checkpoints" / "last.pt"
    plain = load_config("digits", [o for o in TINY if not o.startswith("model.repa")] + ["train.steps=1"])
    with caplog.at_level(logging.INFO, logger="ditkit.train"):
        train(plain, tmp_path / "plain", device="cpu", init_from=str(ckpt))
    lines = [r.getMessage() for r in caplog.records if "projector" in r.getMessage()]
    assert lines == [f"fine-tune: dropped REPA's projector (6 tensors of {ckpt}): a training-only head, and this "
                     "model has none (model.repa_depth unset)"]
    for speed in ("reference", "fp8+fp8_mlp"):
        main(["sample", "--ckpt", str(ckpt), "--out", str(tmp_path / speed), "--num-samples", "2", "--steps", "2",
              "--speed", speed])
        samples = np.load(tmp_path / speed / "samples.npz")["samples"]
        assert samples.shape[0] == 2


def test_a_latent_cache_with_images_feeds_them_to_the_encoder(tmp_path, encoder_dir, vae):
    from ditkit.data.images import ImageDataset
    from ditkit.data.latents import extract_latents

    rng = np.random.default_rng(0)
    for c in ("cats", "dogs"):
        (tmp_path / "imgs" / c).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(tmp_path / "imgs" / c / f"{i}.png")
    images = ImageDataset(tmp_path / "imgs", image_size=32, random_flip=False)
    for out, keep in (("with", True), ("without", False)):
        extract_latents(images, vae, tmp_path / out, num_workers=0, images=keep)
    common = ["model.name=custom", "model.input_size=4", "model.patch_size=2", "model.num_classes=2",
              "data.kind=latents", "data.num_workers=0", "train.steps=2", "train.global_batch_size=4",
              "train.precision=fp32"]
    cfg = digits(encoder_dir, *common, f"data.path={tmp_path / 'with'}")
    train(cfg, tmp_path / "run", device="cpu")
    assert all(-1 <= r["repa"] <= 1 for r in records(tmp_path / "run"))
    with pytest.raises(ConfigError, match=r"data.path: .* holds no images.*`ditkit extract \.\.\. --images`"):
        train(digits(encoder_dir, *common, f"data.path={tmp_path / 'without'}"), tmp_path / "run2", device="cpu")


@pytest.mark.parametrize("overrides, message", [
    (["train.repa_encoder=null"], "model.repa_depth needs train.repa_encoder"),
    (["train.repa_encoder=/nonexistent/dinov2"], "train.repa_encoder: no DINOv2 model at /nonexistent/dinov2 .*facebook"),
    (["model.repa_dim=768"], "model.repa_dim is 768 but the encoder at .* gives 32-dim features"),
])
def test_settings_the_run_cannot_use_are_named_at_start(tmp_path, encoder_dir, overrides, message):
    with pytest.raises(ConfigError, match=message):
        train(digits(encoder_dir, "train.steps=1", *overrides), tmp_path, device="cpu")


@pytest.mark.parametrize("overrides, message", [
    (["model.repa_depth=3"], r"model.repa_depth must be a block in 1..2"),
    (["objective.repa_weight=0"], "objective.repa_weight must be positive"),
    (["objective.cos_weight=-0.1"], "objective.cos_weight must be non-negative"),
    (["data.kind=fields"], "model.repa_depth aligns with an image encoder: data.kind must be"),
    (["data.kind=sequences"], "model.repa_depth aligns with an image encoder: .* not sequences"),
])
def test_bad_values_fail_at_load_naming_the_key(encoder_dir, overrides, message):
    with pytest.raises(ConfigError, match=message):
        digits(encoder_dir, *overrides)


def tiny_registers_model(registers: int = 4):
    torch.manual_seed(1)
    config = transformers.Dinov2WithRegistersConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                                    intermediate_size=64, num_register_tokens=registers,
                                                    patch_size=14)  # facebook/dinov2-with-registers-base's
    return transformers.Dinov2WithRegistersModel(config).eval()


def test_a_dinov2_with_registers_gives_its_patch_tokens_without_the_registers(tmp_path):
    """Its tokens are [CLS, 4 registers, 16×16 patches]: the features are the last 256, in order."""
    from ditkit.models.encoders import encoder_input
    from ditkit.models.encoders import load_dinov2

    model = tiny_registers_model()
    model.save_pretrained(tmp_path / "dinov2-reg")
    encoder = load_dinov2(tmp_path / "dinov2-reg", (16, 16))
    image = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    assert encoder.input_size == (224, 224)
    full = model(pixel_values=encoder_input(image, (224, 224))).last_hidden_state  # (2, 1 + 4 + 256, 32)
    assert full.shape == (2, 261, 32)
    torch.testing.assert_close(encoder(image), full[:, 5:])
    assert not torch.allclose(full[:, 1:5], full[:, 5:9])  # the registers are not patches


def test_digits_trains_with_a_dinov2_with_registers(tmp_path):
    tiny_registers_model().save_pretrained(tmp_path / "dinov2-reg")
    train(digits(tmp_path / "dinov2-reg", "train.steps=1"), tmp_path / "run", device="cpu")
    assert -1 <= records(tmp_path / "run")[0]["repa"] <= 1


def vit_folder(path: Path) -> None:
    config = transformers.ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                                    image_size=28, patch_size=14)
    transformers.ViTModel(config).save_pretrained(path)


def vae_folder(path: Path) -> None:
    diffusers = pytest.importorskip("diffusers")
    diffusers.AutoencoderKL(down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
                            block_out_channels=(8,), layers_per_block=1, norm_num_groups=4).save_pretrained(path)


def image_folder(path: Path) -> None:
    (path / "cats").mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(path / "cats" / "0.png")


def dinov2_without_weights(path: Path) -> None:
    path.mkdir()
    (path / "config.json").write_text(transformers.Dinov2Config(hidden_size=32).to_json_string())


def dinov2_lacking_a_tensor(path: Path) -> None:
    from safetensors.torch import load_file, save_file

    config = transformers.Dinov2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    transformers.Dinov2Model(config).save_pretrained(path)
    weights = load_file(path / "model.safetensors")
    del weights["layernorm.weight"]
    save_file(weights, path / "model.safetensors", metadata={"format": "pt"})


@pytest.mark.parametrize("make, message", [
    (vit_folder, (r"holds a transformers model of model_type 'vit', not DINOv2: expected a transformers DINOv2 "
                  r"folder \(model_type 'dinov2'")),
    (vae_folder, r"holds a diffusers AutoencoderKL, not DINOv2: expected"),
    (image_folder, (r"is not a DINOv2 model folder \(no config.json\): download facebook/dinov2-base into a new "
                    r"folder, e.g. `huggingface-cli download facebook/dinov2-base --local-dir DINOV2_DIR`")),
    (dinov2_without_weights, r"has the config.json of a dinov2 model but no weights transformers can read"),
    (dinov2_lacking_a_tensor, (r": its weights leave 1 of the dinov2 model's tensors at random "
                               r"\(layernorm.weight\): download the model again")),
])
def test_a_folder_that_is_not_a_whole_dinov2_is_refused_in_one_line(tmp_path, make, message):
    make(tmp_path / "encoder")
    with pytest.raises(ConfigError, match="^train.repa_encoder: " + re.escape(str(tmp_path / "encoder"))) as err:
        train(digits(tmp_path / "encoder", "train.steps=1"), tmp_path / "run", device="cpu")
    assert re.search(message, str(err.value)) and "\n" not in str(err.value), err.value
    assert f"--local-dir {tmp_path / 'encoder'}" not in str(err.value)  # never download into a folder in use


def test_only_an_absent_or_empty_folder_is_offered_as_the_download_target(tmp_path):
    (tmp_path / "empty").mkdir()
    for path in (tmp_path / "absent", tmp_path / "empty"):
        with pytest.raises(ConfigError, match=rf"no DINOv2 model at {re.escape(str(path))} .* --local-dir "
                                              rf"{re.escape(str(path))}`$"):
            train(digits(path, "train.steps=1"), tmp_path / "run", device="cpu")
