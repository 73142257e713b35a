"""The cosmology framework's dit.ini read as ditkit's config: each key lands on its field, the rest
comes from the base preset, a bad value names the file, key and value, and unknown keys are listed
in one warning."""
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import ditkit
from ditkit.cli import main
from ditkit.config import ConfigError, format_config, load_config
from ditkit.models.dit import build_model

FIXTURE = Path(__file__).parent / "fixtures" / "dit.ini"
ROOT = Path(__file__).resolve().parents[1]

# What tests/fixtures/dit.ini sets, in ditkit's spelling over the cosmo128 preset.
FIXTURE_AS_OVERRIDES = ["model.name=DiT-B/8", "model.mlp_ratio=4.0", "train.lr=3e-4", "train.precision=bf16",
                        "sample.steps=100"]


def write(tmp_path: Path, text: str, name: str = "dit.ini") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_the_frameworks_file_gives_every_key_of_the_expected_config():
    expected = load_config("cosmo128", FIXTURE_AS_OVERRIDES).to_dict()
    for cfg in (ditkit.load_config(str(FIXTURE)), load_config(path=FIXTURE), load_config(FIXTURE)):
        assert cfg.to_dict() == expected


def test_a_preset_given_with_the_file_is_its_base():
    cfg = load_config("fields64", path=FIXTURE)
    expected = load_config("fields64", FIXTURE_AS_OVERRIDES)
    assert cfg.to_dict() == expected.to_dict()
    assert cfg.objective.name == "flow" != load_config(path=FIXTURE).objective.name  # fields64's, not cosmo128's


@pytest.mark.parametrize("text, name, sizes", [
    # the sizes of the named variant: the variant's name (the patch from the base, DiT-S/4, when not given)
    ("[MODEL]\ndit_variant = DiT-L\n", "DiT-L/4", (24, 1024, 16, 4)),
    ("[MODEL]\ndit_variant = dit-xl\npatch_size = 2\nhidden_size = 1152\n", "DiT-XL/2", (28, 1152, 16, 2)),
    ("[MODEL]\npatch_size = 8\n", "DiT-S/8", (12, 384, 6, 8)),
    # sizes that are not the variant's: custom, each size from the file, else the variant, else the base
    ("[MODEL]\ndit_variant = DiT-S\nhidden_size = 256\nnum_heads = 4\ndepth = 6\n", "custom", (6, 256, 4, 4)),
    ("[MODEL]\ndit_variant = DiT-B\ndepth = 6\n", "custom", (6, 768, 12, 4)),
    ("[MODEL]\ndit_variant = DiT-S\npatch_size = 16\n", "custom", (12, 384, 6, 16)),  # no DiT-S/16
])
def test_variant_and_sizes_give_the_model(tmp_path, text, name, sizes):
    cfg = load_config(path=write(tmp_path, text)).model
    assert cfg.name == name
    with torch.device("meta"):  # the network's shapes without its memory
        net = build_model(cfg.name, **cfg.kwargs())
    assert (len(net.blocks), net.pos_embed.shape[-1], net.num_heads, net.patch_size) == sizes


def test_a_custom_base_keeps_the_sizes_the_file_leaves_out(tmp_path):
    digits = load_config("digits").model
    cfg = load_config("digits", path=write(tmp_path, "[MODEL]\ndepth = 2\n")).model
    assert (cfg.name, cfg.depth, cfg.hidden_size, cfg.num_heads, cfg.patch_size) == (
        "custom", 2, digits.hidden_size, digits.num_heads, digits.patch_size)


@pytest.mark.parametrize("value, precision", [
    ("32", "fp32"), ("16", "fp16"), ("16-mixed", "fp16"), ("bf16", "bf16"), ("bf16-mixed", "bf16"),
    ('"bf16-mixed"', "bf16"),
])
def test_precision(tmp_path, value, precision):
    assert load_config(path=write(tmp_path, f"[TRAINING]\nprecision = {value}\n")).train.precision == precision


def test_keys_in_any_section_with_comments_and_defaults(tmp_path):
    text = ("[DEFAULT]\nmlp_ratio = 2.0\n\n[optim]\nlearning_rate = 2e-4  # AdamW\n\n"
            "[sampling]\n; the sampler\nn_sampling_steps = 50\n")
    cfg = load_config(path=write(tmp_path, text))
    assert (cfg.model.mlp_ratio, cfg.train.lr, cfg.sample.steps) == (2.0, 2e-4, 50)
    assert cfg.to_dict() == load_config("cosmo128", ["model.mlp_ratio=2.0", "train.lr=2e-4",
                                                    "sample.steps=50"]).to_dict()


@pytest.mark.parametrize("line, message", [
    ("learning_rate = fast", "[TRAINING] learning_rate = 'fast' is not a positive number"),
    ("learning_rate = inf", "[TRAINING] learning_rate = 'inf' is not a positive number"),
    ("mlp_ratio = -1", "[TRAINING] mlp_ratio = '-1' is not a positive number"),
    ("depth = twelve", "[TRAINING] depth = 'twelve' is not a positive integer"),
    ("patch_size = 2.5", "[TRAINING] patch_size = '2.5' is not a positive integer"),
    ("n_sampling_steps = 0", "[TRAINING] n_sampling_steps = '0' is not a positive integer"),
    ("precision = 64", "[TRAINING] precision = '64' is not a precision ditkit trains in; choose one of 32,"),
    ("dit_variant = DiT-M", "[TRAINING] dit_variant = 'DiT-M' is not a DiT variant; choose one of DiT-XL, DiT-L"),
])
def test_a_bad_value_names_the_file_key_and_value(tmp_path, line, message):
    path = write(tmp_path, f"[TRAINING]\n{line}\n")
    with pytest.raises(ConfigError) as err:
        load_config(path=path)
    assert str(err.value).startswith(f"config file {path}: {message}"), str(err.value)
    assert "\n" not in str(err.value)


def test_a_key_set_twice_to_different_values_is_an_error(tmp_path):
    path = write(tmp_path, "[TRAINING]\nlearning_rate = 1e-4\n[OPTIM]\nlearning_rate = 2e-4\n")
    with pytest.raises(ConfigError, match=r"learning_rate is set twice, to '1e-4' in \[TRAINING\] and to '2e-4' in \[OPTIM\]"):
        load_config(path=path)
    same = write(tmp_path, "[TRAINING]\nlearning_rate = 1e-4\n[OPTIM]\nlearning_rate = 1e-4\n", "same.ini")
    assert load_config(path=same).train.lr == 1e-4


def test_files_that_are_not_ini_or_missing_are_named(tmp_path):
    with pytest.raises(ConfigError, match="nosection.ini is not a valid INI file"):
        load_config(path=write(tmp_path, "learning_rate = 1e-4\n", "nosection.ini"))
    with pytest.raises(ConfigError, match="missing.ini does not exist"):
        load_config(str(tmp_path / "missing.ini"))


def test_unknown_keys_are_listed_in_one_warning(caplog):
    with caplog.at_level(logging.WARNING):
        load_config(path=FIXTURE)
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(lines) == 1 and "\n" not in lines[0], lines
    listed = lines[0].split(": ")[-1].split(", ")
    assert listed == ["dataset", "data_root", "batch_size", "max_epochs", "model_name"]
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        load_config("cosmo128")
    assert not caplog.records  # the preset alone warns of nothing


def test_ditkit_config_prints_the_resolved_config():
    out = subprocess.run([sys.executable, "-m", "ditkit", "config", "--config", "tests/fixtures/dit.ini"],
                         cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout == format_config(load_config("cosmo128", FIXTURE_AS_OVERRIDES))
    assert out.stderr.count("\n") == 1 and "ignoring 5 key(s)" in out.stderr


def test_ditkit_train_with_a_bad_ini_is_one_line(capsys, tmp_path):
    path = write(tmp_path, "[TRAINING]\nlearning_rate = 1e-4x\n")
    with pytest.raises(SystemExit) as exc:
        main(["train", "--config", str(path), "--run-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and err == f"ditkit: error: config file {path}: [TRAINING] learning_rate = '1e-4x' " \
                                          "is not a positive number"
