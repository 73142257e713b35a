"""The config: presets load, overrides apply, and every bad value fails at load naming its field."""
import re

import pytest

from ditkit.config import ConfigError, load_config, preset_names


def test_presets_load_and_validate():
    assert {"digits", "imagenet256", "imagenet512"} <= set(preset_names())
    for name in preset_names():
        load_config(name)


def test_override_applies_with_type_coercion():
    cfg = load_config("digits", overrides=["train.lr=3e-4", "train.steps=10", "objective.name=flow", "sample.sampler=heun"])
    assert cfg.train.lr == pytest.approx(3e-4) and cfg.train.steps == 10 and cfg.objective.name == "flow"
    assert isinstance(load_config("digits", overrides=["train.lr=1"]).train.lr, float)


@pytest.mark.parametrize("override, message", [
    ("train.lr=fast", "train.lr must be float"),
    ("train.steps=1.5", "train.steps must be int"),
    ("train.batch=3", "unknown config key train.batch"),
    ("trainer.lr=3", "unknown config section 'trainer'"),
    ("objective.name=score", "objective.name must be ddpm or flow"),
    ("model.depth=3", "model.depth is set by the variant"),
    ("train.precision=fp8", "train.precision must be"),
    ("lr=3", "is not of the form section.key=value"),
])
def test_bad_values_name_the_field(override, message):
    overrides = [override] if override != "model.depth=3" else ["model.name=DiT-S/2", override]
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config("digits", overrides=overrides)


def test_bad_yaml_file_is_named(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train: {lr: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml is not valid YAML"):
        load_config(path=path)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(path=tmp_path / "missing.yaml")


def test_sampler_must_fit_objective():
    with pytest.raises(ConfigError, match="sample.sampler 'ddim' does not fit objective.name='flow'"):
        load_config("digits", overrides=["objective.name=flow"])


@pytest.mark.parametrize("override, message", [
    ("train.ckpt_every=0", "train.ckpt_every must be a positive integer"),
    ("train.log_every=0", "train.log_every must be a positive integer"),
    ("train.max_nonfinite=0", "train.max_nonfinite must be at least 1"),
    ("model.class_dropout_prob=0", "needs the model.s nulls"),
])
def test_values_that_would_crash_a_started_run_fail_at_load(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config("digits", overrides=[override])


def test_objective_shortcut_keeps_the_users_sampler_settings():
    from ditkit.cli import _resolve_config, build_parser

    args = build_parser().parse_args(["train", "--preset", "digits", "--objective", "flow", "--set", "sample.steps=50",
                                      "--run-dir", "x"])
    cfg = _resolve_config(args)
    assert (cfg.objective.name, cfg.sample.sampler, cfg.sample.steps) == ("flow", "heun", 50)


def test_guidance_channel_and_param_dropout_checks():
    with pytest.raises(ConfigError, match="guided_channels must be in 1..1"):
        load_config("digits", overrides=["sample.guided_channels=3"])
    with pytest.raises(ConfigError, match="param_dropout_prob"):
        load_config("fields64", overrides=["model.param_dropout_prob=0", "sample.cfg_scale=3"])


@pytest.mark.parametrize("override, message", [
    ("train.lr=.inf", "train.lr must be a finite number, got inf"),
    ("train.lr=inf", "train.lr must be a finite number, got inf"),  # YAML reads it as a string
    ("train.lr=NaN", "train.lr must be a finite number, got nan"),
    ("train.ema_decay=.nan", "train.ema_decay must be a finite number, got nan"),
    ("train.weight_decay=-.inf", "train.weight_decay must be a finite number, got -inf"),
    ("train.grad_clip=.inf", "train.grad_clip must be a finite number, got inf"),
    ("train.max_minutes=.inf", "train.max_minutes must be a finite number, got inf"),
    ("sample.cfg_scale=.inf", "sample.cfg_scale must be a finite number, got inf"),
    ("sample.guidance_interval=[0, .inf]", "sample.guidance_interval must be a finite number, got inf"),
    ("objective.logit_std=.nan", "objective.logit_std must be a finite number, got nan"),
    ("objective.time_scale=.inf", "objective.time_scale must be a finite number, got inf"),
    ("model.class_dropout_prob=.nan", "model.class_dropout_prob must be a finite number, got nan"),
])
def test_every_float_must_be_finite(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config("digits", overrides=[override])


@pytest.mark.parametrize("override, message", [
    ("train.lr=-1e-4", "train.lr must be positive, got -0.0001"),
    ("train.weight_decay=-0.1", "train.weight_decay must be non-negative"),
    ("train.grad_clip=-1", "train.grad_clip must be non-negative"),
    ("train.adam_betas=[0.9, 1.5]", "train.adam_betas must be two numbers in [0, 1)"),
    ("train.ema_decay=1", "train.ema_decay must be in [0, 1)"),
    ("model.class_dropout_prob=1.5", "model.class_dropout_prob must be in [0, 1]"),
    ("objective.shift=0", "objective.shift must be positive"),
    ("objective.logit_std=0", "objective.logit_std must be positive"),
    ("sample.eta=-1", "sample.eta must be non-negative"),
])
def test_out_of_range_floats_are_named(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config("digits", overrides=[override])


def test_finite_values_still_load():
    cfg = load_config("digits", overrides=["train.weight_decay=0.01", "train.grad_clip=1", "objective.shift=3"])
    assert (cfg.train.weight_decay, cfg.train.grad_clip, cfg.objective.shift) == (0.01, 1.0, 3.0)


def test_spike_factor_is_off_or_above_one():
    assert load_config("digits", ["train.spike_factor=0"]).train.spike_factor == 0
    with pytest.raises(ConfigError, match="train.spike_factor must be 0 .off. or above 1"):
        load_config("digits", ["train.spike_factor=0.5"])
