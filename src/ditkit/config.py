"""One config object for a run, validated once at load.

A run is described by YAML (the format of fast-DiT, SiT's successors and most PyTorch research
code: nested, typed, commentable, diffable), filled into these dataclasses.  The command line
overrides any field with ``--set section.field=value``; the resolved config is written beside the
checkpoints and stored inside them, so a checkpoint alone says how to sample from it.
"""
from __future__ import annotations

import math
import re
import types
import typing
from dataclasses import asdict, dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

SPEEDS = ("auto", "reference", "fast", "fastest")  # train.speed, sample.speed (ditkit.fast.recipes)


# A float written as YAML reads it as a string: 1e-4 (YAML 1.1 wants a dot), and inf or nan (YAML wants
# .inf, .nan).  Both are taken as floats so that a non-finite value meets the finite check by its name.
_FLOAT_RE = re.compile(r"^[+-]?((\d+\.?\d*|\.\d+)([eE][+-]?\d+)?|inf|infinity|nan)$", re.IGNORECASE)


DDPM_SAMPLERS = ("ddpm", "ddim")
FLOW_SAMPLERS = ("euler", "heun", "dopri5", "sde")


RUN_CONFIG_KEY = "ditkit_run_config"  # a run's whole config, in the header of its ema.safetensors


class ConfigError(ValueError):
    """An invalid config value; the message names the field."""


def parse_profile(spec: str) -> tuple[int, int] | None:
    """``"A-B"`` → (A - 1, B): the profiler starts before step A and stops after step B. ``""`` → None."""
    if not spec:
        return None
    try:
        a, b = (int(part) for part in str(spec).split("-"))
    except ValueError:
        raise ConfigError(f"train.profile must be 'A-B' (profile steps A to B), got {spec!r}") from None
    if not 1 <= a <= b:
        raise ConfigError(f"train.profile={spec!r}: needs 1 <= A <= B")
    return a - 1, b


@dataclass
class ModelConfig:
    name: str = "DiT-XL/2"  # a DiT_models name, or "custom" (then depth/hidden_size/num_heads/patch_size)
    input_size: Any = 32  # int or [H, W] (latent or pixel grid the network sees)
    in_channels: int = 4
    num_classes: int = 1000  # 0: unconditional
    class_dropout_prob: float = 0.1
    learn_sigma: bool = True
    depth: int | None = None
    hidden_size: int | None = None
    num_heads: int | None = None
    patch_size: int | None = None
    mlp_ratio: float = 4.0
    num_params: int = 0
    param_dropout_prob: float = 0.1
    cond_channels: int = 0
    field_mode: str = "cross_attention"
    cond_mode: str = "adaln"

    def kwargs(self) -> dict:
        """Constructor keyword arguments for ``build_model(self.name, **kwargs)``."""
        kw = {k: v for k, v in asdict(self).items() if k != "name" and v is not None}
        if self.name != "custom":
            for k in ("depth", "hidden_size", "num_heads", "patch_size"):
                if kw.pop(k, None) is not None:
                    raise ConfigError(f"model.{k} is set by the variant {self.name}; use model.name=custom to choose it")
        return kw


@dataclass
class ObjectiveConfig:
    name: str = "ddpm"  # ddpm | flow
    # DDPM (the official DiT diffusion)
    diffusion_steps: int = 1000
    noise_schedule: str = "linear"
    # flow matching / rectified flow (t = 0 noise, t = 1 data)
    path: str = "linear"  # linear | gvp | vp
    prediction: str = "velocity"  # velocity | noise | score
    time_sampling: str = "uniform"  # uniform | logit_normal
    logit_mean: float = 0.0
    logit_std: float = 1.0
    shift: float = 1.0
    time_scale: float = 1000.0  # network time = time_scale · t (SiT's own checkpoints: 1)


@dataclass
class DataConfig:
    kind: str = "latents"  # digits | images | latents | fields
    path: str | None = None
    labels_file: str | None = None
    image_size: int = 256
    flip: bool = True
    num_workers: int = 4
    # fields (ditkit.data.fields): path is the x array; parameters table and conditioning fields
    params_file: str | None = None
    field_file: str | None = None
    param_names: list | None = None
    log_transform: list = field(default_factory=list)  # channels of x to log-transform
    field_log_transform: list = field(default_factory=list)


@dataclass
class TrainConfig:
    steps: int = 400_000
    global_batch_size: int = 256
    grad_accum: int = 1
    lr: float = 1e-4
    weight_decay: float = 0.0
    adam_betas: list = field(default_factory=lambda: [0.9, 0.999])
    warmup_steps: int = 0
    grad_clip: float = 0.0  # 0: off (the official recipe); 1.0 is the seeds' advice
    ema_decay: float = 0.9999
    ema_warmup: bool = False  # decay_t = min(decay, (1 + t) / (10 + t)), for short runs
    precision: str = "auto"  # auto (bf16 on a GPU, fp32 on a CPU) | fp32 | bf16 | fp16
    seed: int = 0
    distributed: str = "ddp"  # ddp | fsdp (when launched with torchrun)
    speed: str = "auto"  # auto | reference | fast | fastest, or levers joined by + (ditkit.fast.recipes; auto: fastest on a GPU)
    activation_checkpointing: bool = False  # recompute each block in the backward (less memory, ~1/3 more compute)
    log_every: int = 100
    ckpt_every: int = 50_000
    keep_last: int = 3
    ckpt_format: str = "pt"  # pt | safetensors (same content; safetensors never runs pickle)
    sample_every: int = 0  # 0: off
    max_nonfinite: int = 10  # consecutive bad steps (non-finite, or loss spikes) before the run stops as diverged
    spike_factor: float = 10.0  # a loss over this × the running mean of good losses is a bad step (skipped); 0: off
    max_minutes: float = 0.0  # wall-clock budget: checkpoint and stop at the first log step past it (0: off)
    profile: str = ""  # "A-B": the PyTorch profiler over steps A to B, written to the run folder (ditkit.training.profiling)
    fsdp_reshard: bool = True  # FSDP: free each block's gathered weights after its forward (false: keep them for the backward)
    fsdp_bf16_gather: bool = False  # FSDP: gather the weights in bf16 (half the all-gather traffic; gradients reduced in float32)
    vae: str | None = None  # local VAE (folder or file) to decode the sample grids of latent runs


@dataclass
class SampleConfig:
    sampler: str = "ddpm"  # ddpm | ddim | euler | heun | dopri5 | sde
    steps: int = 250
    cfg_scale: float = 1.0
    guided_channels: int | None = None  # None: all predicted channels (3 = the official code)
    guidance_interval: list | None = None  # [a, b] on the noise level
    eta: float = 0.0  # ddim
    grid: str = "uniform"  # euler/heun/sde time grid: uniform | shifted (objective.shift)
    sde_diffusion: str = "sigma"  # sde: sigma | constant | SBDM | linear | decreasing | increasing-decreasing
    speed: str = "auto"  # auto | reference | fast | fastest: the speed recipe (ditkit.fast.recipes; auto: fastest on a GPU)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)

    def to_dict(self) -> dict:
        return asdict(self)

    def validate(self) -> "Config":
        self._check_finite()
        t, m, o = self.train, self.model, self.objective
        betas = t.adam_betas
        checks = [
            (self.objective.name in ("ddpm", "flow"), "objective.name", "ddpm or flow"),
            (self.data.kind in ("digits", "images", "latents", "fields"), "data.kind", "digits, images, latents or fields"),
            (self.train.precision in ("auto", "fp32", "bf16", "fp16"), "train.precision", "auto, fp32, bf16 or fp16"),
            (self.train.distributed in ("ddp", "fsdp"), "train.distributed", "ddp or fsdp"),
            (self.train.ckpt_format in ("pt", "safetensors"), "train.ckpt_format", "pt or safetensors"),
            (self.sample.sampler in ("ddpm", "ddim", "euler", "heun", "dopri5", "sde"), "sample.sampler",
             "ddpm, ddim, euler, heun, dopri5 or sde"),
            (self.train.global_batch_size > 0, "train.global_batch_size", "a positive integer"),
            (self.train.grad_accum > 0, "train.grad_accum", "a positive integer"),
            (self.train.steps >= 0, "train.steps", "a non-negative integer"),
            (0.0 <= self.train.ema_decay < 1.0, "train.ema_decay", "in [0, 1)"),
            (self.train.lr > 0, "train.lr", "positive"),
            (t.weight_decay >= 0, "train.weight_decay", "non-negative (0: off)"),
            (t.grad_clip >= 0, "train.grad_clip", "non-negative (0: off)"),
            (len(betas) == 2 and all(isinstance(b, (int, float)) and 0 <= b < 1 for b in betas), "train.adam_betas",
             "two numbers in [0, 1), e.g. [0.9, 0.999]"),
            (t.warmup_steps >= 0, "train.warmup_steps", "a non-negative integer"),
            (0 <= m.class_dropout_prob <= 1, "model.class_dropout_prob", "in [0, 1]"),
            (0 <= m.param_dropout_prob <= 1, "model.param_dropout_prob", "in [0, 1]"),
            (m.mlp_ratio > 0, "model.mlp_ratio", "positive"),
            (m.num_classes >= 0, "model.num_classes", "a non-negative integer (0: unconditional)"),
            (o.logit_std > 0, "objective.logit_std", "positive"),
            (o.shift > 0, "objective.shift", "positive"),
            (o.time_scale > 0, "objective.time_scale", "positive"),
            (self.sample.steps > 0, "sample.steps", "a positive integer"),
            (self.sample.eta >= 0, "sample.eta", "non-negative"),
            (self.train.log_every > 0, "train.log_every", "a positive integer"),
            (self.train.ckpt_every > 0, "train.ckpt_every", "a positive integer (a checkpoint is also written at the end)"),
            (self.train.sample_every >= 0, "train.sample_every", "0 (off) or a positive integer"),
            (self.train.max_nonfinite >= 1, "train.max_nonfinite", "at least 1"),
            (self.train.spike_factor == 0 or self.train.spike_factor > 1, "train.spike_factor",
             "0 (off) or above 1 (a loss over that many times its running mean is a spike)"),
            (self.train.max_minutes >= 0, "train.max_minutes", "non-negative (0: no time limit)"),
            (self.train.distributed == "fsdp" or (self.train.fsdp_reshard and not self.train.fsdp_bf16_gather),
             "train.distributed", "fsdp with train.fsdp_reshard=false or train.fsdp_bf16_gather=true (FSDP's options)"),
        ]
        for ok, name, what in checks:
            if not ok:
                raise ConfigError(f"{name} must be {what}, got {_get(self, name)!r}")
        parse_profile(self.train.profile)
        from ditkit.fast.recipes import check_speed

        for kind in ("train", "sample"):
            try:
                check_speed(getattr(self, kind).speed, kind)
            except ValueError as err:
                raise ConfigError(f"{kind}.speed: {err}") from None
        from ditkit.models.dit import DiT_models

        if self.model.name != "custom" and self.model.name not in DiT_models:
            raise ConfigError(f"unknown model {self.model.name!r}; known models: {', '.join(DiT_models)}, custom")
        conditioned = self.model.num_classes > 0 or self.model.num_params > 0 or self.model.cond_channels > 0
        drop = self.model.class_dropout_prob if self.model.num_classes > 0 else self.model.param_dropout_prob
        if self.sample.cfg_scale != 1.0 and conditioned and drop <= 0:
            which = "class_dropout_prob" if self.model.num_classes > 0 else "param_dropout_prob"
            raise ConfigError(f"sample.cfg_scale={self.sample.cfg_scale} needs the model's nulls, but model.{which} "
                              "is 0 (the model was not trained for guidance); use sample.cfg_scale=1")
        if self.sample.guided_channels is not None and not 0 < self.sample.guided_channels <= self.model.in_channels:
            raise ConfigError(f"sample.guided_channels must be in 1..{self.model.in_channels} (the predicted ε/v "
                              f"channels, never the variance), got {self.sample.guided_channels}")
        if self.sample.grid not in ("uniform", "shifted"):
            raise ConfigError(f"sample.grid must be uniform or shifted, got {self.sample.grid!r}")
        allowed = DDPM_SAMPLERS if self.objective.name == "ddpm" else FLOW_SAMPLERS
        if self.sample.sampler not in allowed:
            raise ConfigError(f"sample.sampler {self.sample.sampler!r} does not fit objective.name={self.objective.name!r}; "
                              f"choose one of {', '.join(allowed)}")
        self.model.kwargs()
        return self

    def _check_finite(self) -> None:
        """Every float of the config, alone or in a list, is finite: an inf or nan learning rate or
        guidance scale would run for hours and write nothing but non-finite steps."""
        for section in fields(self):
            for f in fields(getattr(self, section.name)):
                value = getattr(getattr(self, section.name), f.name)
                for v in value if isinstance(value, list) else [value]:
                    if isinstance(v, float) and not math.isfinite(v):
                        raise ConfigError(f"{section.name}.{f.name} must be a finite number, got {v}")


def _get(cfg: Config, dotted: str) -> Any:
    section, key = dotted.split(".")
    return getattr(getattr(cfg, section), key)


def _check_type(value: Any, annotation: Any, name: str) -> Any:
    """Coerce ints to floats where a float is expected; reject everything else that mismatches."""
    hint = eval(annotation, vars(typing) | {"Any": Any}) if isinstance(annotation, str) else annotation
    if hint is Any:
        return value
    options = typing.get_args(hint) if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union else (hint,)
    for opt in options:
        if opt is type(None) and value is None:
            return None
        if opt is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if opt is float and isinstance(value, str) and _FLOAT_RE.match(value):
            return float(value)  # YAML 1.1 reads 1e-4 (no dot) as a string
        if opt is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if opt in (str, bool, list) and isinstance(value, opt):
            return value
    names = " or ".join("null" if o is type(None) else o.__name__ for o in options)
    raise ConfigError(f"{name} must be {names}, got {value!r} ({type(value).__name__})")


# Speed keys of configs written before the speed recipes (ditkit.fast.recipes): one key per lever.
_OLD_TRAIN_SPEED = ("compile", "compile_mode", "compile_loss", "fp8", "fused_mlp", "fused_attention", "tuned_linear",
                    "fused_norm", "fp8_forward", "fp8_backward", "bf16_residual", "fused_tail", "bf16_weights", "sdpa")
_OLD_SAMPLE_SPEED = ("precision", "compile", "sdpa")


def migrate(data: dict) -> dict:
    """A config dict with the per-lever speed keys of older configs and checkpoints replaced by the
    recipe that ran what they asked for: any FP8 lever -> ``fastest``; any other lever -> ``fast``;
    none -> ``reference`` (what such a run computed).  Levers without a recipe (the fused optimizer
    tail, row-wise FP8 training, bf16 sampling weights, a forced SDPA kernel) are dropped."""
    if not isinstance(data, dict):
        return data
    data = {k: dict(v) if isinstance(v, dict) else v for k, v in data.items()}
    train, sample = data.get("train"), data.get("sample")
    if isinstance(train, dict) and any(k in train for k in _OLD_TRAIN_SPEED) and "speed" not in train:
        old = {k: train.pop(k) for k in _OLD_TRAIN_SPEED if k in train}
        on = {k for k, v in old.items() if v is True or (k == "compile_mode" and v == "cudagraphs")}
        train["speed"] = ("fastest" if on & {"fp8", "fp8_forward", "fp8_backward"}
                          else "fast" if on - {"fused_tail"} else "reference")
    if isinstance(sample, dict) and any(k in sample for k in _OLD_SAMPLE_SPEED) and "speed" not in sample:
        old = {k: sample.pop(k) for k in _OLD_SAMPLE_SPEED if k in sample}
        fast = old.get("precision", "fp32") != "fp32" or old.get("compile", "none") != "none"
        sample["speed"] = "fast" if fast else "reference"
    return data


def from_dict(data: dict, base: Config | None = None) -> Config:
    """Fill a Config from nested dicts; unknown sections or keys and wrong types are errors.  The
    per-lever speed keys of older configs are migrated to a recipe (``migrate``)."""
    cfg = base or Config()
    if not isinstance(data, dict):
        raise ConfigError(f"a config must be a mapping of sections, got {type(data).__name__}")
    data = migrate(data)
    sections = {f.name: f for f in fields(Config)}
    for section, values in data.items():
        if section not in sections:
            raise ConfigError(f"unknown config section {section!r}; sections are {', '.join(sections)}")
        if not isinstance(values, dict):
            raise ConfigError(f"config section {section!r} must be a mapping, got {values!r}")
        target = getattr(cfg, section)
        known = {f.name: f for f in fields(target)}
        for key, value in values.items():
            if key not in known:
                raise ConfigError(f"unknown config key {section}.{key}; known: {', '.join(known)}")
            setattr(target, key, _check_type(value, known[key].type, f"{section}.{key}"))
    return cfg


def parse_override(text: str) -> dict:
    """``section.key=value`` (value parsed as YAML) -> {section: {key: value}}."""
    if "=" not in text or "." not in text.split("=", 1)[0]:
        raise ConfigError(f"override {text!r} is not of the form section.key=value")
    dotted, raw = text.split("=", 1)
    section, key = dotted.split(".", 1)
    return {section: {key: yaml.safe_load(raw)}}


def preset_names() -> list[str]:
    return sorted(p.name[: -len(".yaml")] for p in resources.files("ditkit.presets").iterdir() if p.name.endswith(".yaml"))


def load_config(preset: str | Path | None = None, overrides: list[str] = (), path: str | Path | None = None) -> Config:
    """``load_config("digits", ["train.steps=100"])``: a preset (packaged YAML) or a YAML file, then a
    YAML file given as ``path`` (applied after the preset), then ``section.key=value`` overrides."""
    if preset is not None and (str(preset).endswith((".yaml", ".yml")) or Path(preset).is_file()):
        if path is not None:
            raise ConfigError(f"give one config file: {preset} or {path}")
        preset, path = None, preset
    cfg = Config()
    if preset is not None:
        if preset not in preset_names():
            raise ConfigError(f"unknown preset {preset!r} (and no such file); presets: {', '.join(preset_names())}")
        cfg = from_dict(yaml.safe_load(resources.files("ditkit.presets").joinpath(f"{preset}.yaml").read_text()), cfg)
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"config file {path} is not valid YAML: {err}") from None
        cfg = from_dict(data, cfg)
    for text in overrides:
        cfg = from_dict(parse_override(text), cfg)
    return cfg.validate()


def config_from_checkpoint(data: dict) -> Config:
    """The resolved config stored in a checkpoint (keys unknown to this version are an error)."""
    return from_dict(data).validate()


def save_config(cfg: Config, path: Path) -> None:
    from ditkit.utils.io import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))


__all__ = [
    "Config", "ConfigError", "DataConfig", "ModelConfig", "ObjectiveConfig", "SampleConfig", "TrainConfig",
    "config_from_checkpoint", "from_dict", "load_config", "migrate", "parse_override", "preset_names", "save_config",
]
