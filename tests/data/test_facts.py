"""What the data fixes is read at start-up: kept where the config agrees, filled where the user left it
to a preset, refused (naming both values) where the user set something the data contradicts."""
import json

import numpy as np
import pytest
from PIL import Image

from ditkit.cli import main
from ditkit.config import Config, ConfigError, load_config
from ditkit.data.facts import fit_to_data, kind_of_path


SMALL = "train.global_batch_size=8"  # the folder holds 9 images


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    """An image folder of 24×24 RGB images in three named classes."""
    root = tmp_path_factory.mktemp("shapes")
    rng = np.random.default_rng(0)
    for name in ("circle", "square", "triangle"):
        (root / name).mkdir()
        for i in range(3):
            Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(root / name / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def fields(tmp_path_factory):
    root = tmp_path_factory.mktemp("fields")
    np.save(root / "x.npy", np.zeros((6, 2, 16, 12), np.float32))
    np.save(root / "cond.npy", np.zeros((6, 3, 16, 12), np.float32))
    np.savetxt(root / "params.csv", np.zeros((6, 4)), delimiter=",", header="a,b,c,d", comments="")
    return root


def test_the_kind_follows_the_path(shapes, fields, tmp_path):
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "manifest.json").write_text("{}")
    (tmp_path / "labels.txt").write_text("")
    assert kind_of_path(shapes) == "images"
    assert kind_of_path(tmp_path / "cache") == "latents"
    assert kind_of_path(fields / "x.npy") == "fields"
    assert kind_of_path(tmp_path / "labels.txt") == "images"
    with pytest.raises(ConfigError, match="does not exist"):
        kind_of_path(tmp_path / "nothing")


def test_an_image_folder_on_the_digits_preset_fills_sizes_channels_and_classes(shapes):
    cfg, notes = fit_to_data(load_config("digits", [SMALL, f"data.path={shapes}"]))
    assert cfg.data.kind == "images"
    assert (cfg.data.image_size, cfg.model.input_size, cfg.model.in_channels) == (24, 24, 3)
    assert cfg.model.num_classes == 3 and cfg.data.class_names == ["circle", "square", "triangle"]
    assert any("model.input_size = 24" in n and "9 images in 3 class folders of 24×24" in n for n in notes)


def test_a_contradiction_the_user_set_names_both_values(shapes):
    with pytest.raises(ConfigError, match=r"model.in_channels=1 contradicts the data: .* fixes model.in_channels=3"):
        fit_to_data(load_config("digits", [SMALL, f"data.path={shapes}", "model.in_channels=1"]))
    with pytest.raises(ConfigError, match=r"model.num_classes=2 is too small for the data: .*needs at least 3"):
        fit_to_data(load_config("digits", [SMALL, f"data.path={shapes}", "model.num_classes=2"]))
    with pytest.raises(ConfigError, match=r"model.input_size=8 contradicts the data.*data.image_size=16"):
        fit_to_data(load_config("digits", [SMALL, f"data.path={shapes}", "data.image_size=16", "model.input_size=8"]))


def test_a_choice_the_data_allows_is_kept(shapes):
    cfg, _ = fit_to_data(load_config("digits", [SMALL, f"data.path={shapes}", "model.input_size=16", "model.num_classes=10"]))
    assert (cfg.data.image_size, cfg.model.input_size, cfg.model.num_classes) == (16, 16, 10)  # crop to 16, spare ids
    cfg, _ = fit_to_data(load_config("digits", [SMALL, f"data.path={shapes}", "model.num_classes=0"]))
    assert cfg.model.num_classes == 0 and cfg.data.class_names is None


def test_a_config_built_in_code_counts_as_set_in_full(shapes):
    cfg = Config()
    cfg.data.kind, cfg.data.path = "images", str(shapes)
    with pytest.raises(ConfigError, match="model.in_channels=4 contradicts"):
        fit_to_data(cfg)


def test_a_latent_cache_fixes_the_latent_grid_and_its_class_names(tmp_path):
    from ditkit.data.latents import FORMAT, MANIFEST

    manifest = {"format": FORMAT, "count": 1000, "latent_shape": [4, 16, 16], "shards": [], "scale_factor": 0.18215,
                "source": "x", "vae": "x", "shard_size": 10, "image_shape": [3, 128, 128], "dtype": "float16",
                "num_classes": 2, "classes": ["cat", "dog"]}
    (tmp_path / MANIFEST).write_text(json.dumps(manifest))
    cfg, _ = fit_to_data(load_config("imagenet256", [f"data.path={tmp_path}"]))
    assert (cfg.model.input_size, cfg.model.in_channels, cfg.model.num_classes) == (16, 4, 2)
    assert cfg.data.class_names == ["cat", "dog"]
    with pytest.raises(ConfigError, match=r"model.input_size=32 contradicts the data: .*4×16×16.*model.input_size=16"):
        fit_to_data(load_config("imagenet256", [f"data.path={tmp_path}", "model.input_size=32"]))


def test_fields_fix_channels_grid_parameters_and_the_conditioning_field(fields):
    cfg, _ = fit_to_data(load_config("fields64", ["train.global_batch_size=4", f"data.path={fields / 'x.npy'}",
                                                  f"data.params_file={fields / 'params.csv'}",
                                                  f"data.field_file={fields / 'cond.npy'}"]))
    m = cfg.model
    assert (m.in_channels, m.input_size, m.num_params, m.cond_channels, m.num_classes) == (2, [16, 12], 4, 3, 0)
    with pytest.raises(ConfigError, match="model.num_params=2 contradicts the data: .*4 parameters"):
        fit_to_data(load_config("fields64", ["train.global_batch_size=4", f"data.path={fields / 'x.npy'}", f"data.params_file={fields / 'params.csv'}",
                                             f"data.field_file={fields / 'cond.npy'}", "model.num_params=2"]))


def test_the_digits_preset_agrees_with_its_data():
    cfg, notes = fit_to_data(load_config("digits"))
    assert cfg.model.input_size == 8 and cfg.data.class_names == [str(k) for k in range(10)]


def test_ditkit_config_shows_what_the_data_fixes(shapes, capsys):
    main(["config", "--preset", "digits", "--data", str(shapes), "--set", SMALL, "--yaml"])
    out, err = capsys.readouterr()
    assert "in_channels: 3" in out and "- circle" in out and "model.input_size = 24" in err


def test_train_fails_before_any_step_on_a_contradiction(shapes, tmp_path):
    with pytest.raises(SystemExit) as stop:
        main(["train", "--preset", "digits", "--data", str(shapes), "--set", SMALL, "--set", "model.in_channels=1",
              "--run-dir", str(tmp_path / "run"), "--device", "cpu"])
    assert stop.value.code == 2 and not (tmp_path / "run" / "metrics.jsonl").exists()


def test_a_batch_larger_than_the_data_is_refused_at_start_up(shapes):
    with pytest.raises(ConfigError, match=r"holds 9 samples, fewer than train.global_batch_size=128: give --set "
                                          r"train.global_batch_size=9 or less"):
        fit_to_data(load_config("digits", [f"data.path={shapes}"]))
