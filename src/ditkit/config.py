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
import weakref
from dataclasses import asdict, dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

SPEEDS = ("auto", "reference", "fast", "fastest")  # train.speed, sample.speed (ditkit.fast.recipes)
LOG_BACKENDS = ("tensorboard", "wandb")  # train.log_to (ditkit.training.loggers)


# A float written as YAML reads it as a string: 1e-4 (YAML 1.1 wants a dot), and inf or nan (YAML wants
# .inf, .nan).  Both are taken as floats so that a non-finite value meets the finite check by its name.
_FLOAT_RE = re.compile(r"^[+-]?((\d+\.?\d*|\.\d+)([eE][+-]?\d+)?|inf|infinity|nan)$", re.IGNORECASE)


DDPM_SAMPLERS = ("ddpm", "ddim")
FLOW_SAMPLERS = ("euler", "heun", "dopri5", "sde")
GRID_SAMPLERS = ("euler", "heun", "sde")  # the samplers that step along a time grid (sample.grid)


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


def parse_log_to(spec: str) -> tuple[str, ...]:
    """train.log_to -> its backends: ``"tensorboard+wandb"`` -> ("tensorboard", "wandb"), ``"none"`` -> ()."""
    names = () if spec == "none" else tuple(str(spec).split("+"))
    if any(n not in LOG_BACKENDS for n in names) or len(set(names)) != len(names):
        raise ConfigError(f"train.log_to must be none, or {' | '.join(LOG_BACKENDS)} joined by + "
                          f"(e.g. tensorboard+wandb), got {spec!r}")
    return names


def opt(default: Any, help: str) -> Any:
    """A config field with its documentation (``ditkit config`` prints it); a list default is copied per config."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


def field_help(f) -> str:
    """The documentation of a config field (``opt``'s help)."""
    return f.metadata.get("help", "")


@dataclass
class ModelConfig:
    """The network: a DiT variant, or a custom one."""
    name: str = opt("DiT-XL/2", 'a DiT_models name, or "custom" (then depth/hidden_size/num_heads/patch_size)')
    input_size: int | list = opt(32, "the grid the network sees: an int (H = W) or one size per axis, [L], [H, W] or "
                                     "[T, H, W] (sequences, images, volumes or videos)")
    in_channels: int = opt(4, "channels of x (4: SD-VAE latents, 3: RGB pixels)")
    num_classes: int = opt(1000, "class labels of a class-conditional model (0: unconditional)")
    class_dropout_prob: float = opt(0.1, "probability a label is replaced by the null class in training (for guidance)")
    learn_sigma: bool = opt(True, "also predict the variance (DDPM's learned sigma, twice the output channels)")
    depth: int | None = opt(None, "number of transformer blocks (model.name=custom only)")
    hidden_size: int | None = opt(None, "width of the token embeddings (model.name=custom only)")
    num_heads: int | None = opt(None, "attention heads per block (model.name=custom only)")
    patch_size: int | list | None = opt(None, "side of a patch in grid cells, an int or one per axis of input_size, "
                                              "e.g. [1, 2, 2] (model.name=custom only)")
    mlp_ratio: float = opt(4.0, "hidden width of each block's MLP, as a multiple of hidden_size")
    num_params: int = opt(0, "length of a vector of continuous parameters to condition on (0: none)")
    param_dropout_prob: float = opt(0.1, "probability the parameters are dropped in training (for guidance)")
    cond_channels: int = opt(0, "channels of a conditioning field (0: none)")
    field_mode: str = opt("cross_attention", "how a conditioning field enters: cross_attention | concat (to the input)")
    cond_mode: str = opt("adaln", "how t and the class reach the blocks: adaln | cross_attention | in_context")
    pos_embed: str = opt("sincos", "positions: sincos (the fixed table added to the tokens) | rope (axial rotary q, k on each "
                                      "of the 1, 2 or 3 axes)")
    norm: str = opt("layernorm", "the blocks' adaLN norm: layernorm | rmsnorm")
    qk_norm: bool = opt(False, "RMSNorm on each head's q and k before attention")
    mlp: str = opt("gelu", "each block's feed-forward: gelu (the official MLP) | swiglu (about the same parameter count)")
    repa_depth: int | None = opt(None, "REPA: align the tokens after this block (1..depth; the paper: 8 of 28) with a "
                                       "frozen encoder's features through a projector MLP (none: off)")
    repa_dim: int = opt(768, "REPA: width of the encoder's patch features (DINOv2-B: 768)")
    context_dim: int = opt(0, "width of per-sample sequences of embeddings to cross-attend to (a text encoder's, or "
                              "any; data.context_path), 0: none")
    context_len: int = opt(256, "the longest conditioning sequence, in entries (the sin-cos table's length)")

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
    """The training objective: DDPM (the official DiT diffusion) or flow matching (t = 0 noise, t = 1 data)."""
    name: str = opt("ddpm", "ddpm | flow")
    diffusion_steps: int = opt(1000, "ddpm: number of diffusion steps T")
    noise_schedule: str = opt("linear", "ddpm: the beta schedule (linear, the official one, or cosine)")
    path: str = opt("linear", "flow: the interpolation path: linear | gvp | vp")
    prediction: str = opt("velocity", "flow: what the network predicts: velocity | noise | score")
    time_sampling: str = opt("uniform", "how training draws the noise level: uniform | logit_normal (SD3, LightningDiT: "
                                        "sigmoid(N(logit_mean, logit_std))); ddpm: t = floor(level · T)")
    logit_mean: float = opt(0.0, "mean of the logit-normal noise level (> 0: more training on noisy inputs)")
    logit_std: float = opt(1.0, "standard deviation of the logit-normal noise level")
    shift: float = opt(1.0, "time shift toward noise (1: none) of the training draw; flow: also the shift of the "
                            "sampler's grid when sample.grid=shifted and sample.shift is unset")
    time_scale: float = opt(1000.0, "flow: network time = time_scale · t (SiT's own checkpoints: 1)")
    repa_weight: float = opt(0.5, "REPA (model.repa_depth set): λ of the term λ · mean over tokens of −cos(projected "
                                  "token, encoder feature)")
    cos_weight: float = opt(0.0, "w of the direction term w · (1 − cos(prediction, target)), the cosine along the "
                                 "channels at each position averaged over the positions, added to the MSE "
                                 "(LightningDiT's velocity-direction loss, weight 1 there; ddpm: on ε; 0: off)")


@dataclass
class DataConfig:
    """The training data."""
    kind: str = opt("latents", "digits | images | latents | fields | sequences")
    path: str | None = opt(None, "the data: an image folder, a latent cache, or the fields' x array (digits: none)")
    labels_file: str | None = opt(None, "images: a file of 'image_path class_id' lines (none: ImageFolder classes)")
    class_names: list | None = opt(None, "names of the class ids 0..K-1 (taken from the class folders or the "
                                         "latent cache; sampling takes them in place of ids)")
    image_size: int = opt(256, "images: side after the center crop and resize")
    flip: bool = opt(True, "random horizontal flips (fields: one random symmetry of the square over the last two axes)")
    num_workers: int = opt(4, "DataLoader worker processes (0: load in the training process)")
    pad_multiple: int = opt(0, "sequences: pad each batch's extent on every axis up to a multiple of this (a multiple of "
                                "the patch; capped at the model's size), so that a compiled run sees few shapes (0: the patch)")
    length_buckets: int = opt(0, "sequences: sort each window of this many global batches by length, so that a batch "
                                 "holds sequences of like lengths and little padding (0: off)")
    params_file: str | None = opt(None, "fields: table of the parameters to condition on; sequences: a CSV with a 'file' "
                                        "column (each sample's .npy below data.path) and one column per parameter")
    field_file: str | None = opt(None, "fields: array of the conditioning fields")
    axes: int | None = opt(None, "fields, sequences: the grid axes of one sample, 1 ((N, C, L) sequences), 2 ((N, C, H, W)) "
                                 "or 3 ((N, C, D, H, W) volumes, (N, C, T, H, W) videos); none: fields 3 for five-axis "
                                 "arrays, else 2; sequences 1")
    context_path: str | None = opt(None, "a folder of per-sample sequences of embeddings to condition on (model.context_dim): "
                                         "<sample name>.npy or .safetensors, (M, E), M varying; by index for datasets "
                                         "without file names")
    param_names: list | None = opt(None, "fields: columns of params_file to use (none: all)")
    log_transform: list = opt([], "fields: channels of x to log-transform")
    field_log_transform: list = opt([], "fields: channels of the conditioning field to log-transform")
    latent_norm: str = opt("none", "latents: none (the VAE's scale and shift only) | channel ((z − μ_c) / σ_c with the "
                                   "cache's per-channel statistics, undone before decoding; LightningDiT's latent_norm)")
    latent_mean: list | None = opt(None, "latents: μ_c of latent_norm=channel (filled from the cache's manifest)")
    latent_std: list | None = opt(None, "latents: σ_c of latent_norm=channel (filled from the cache's manifest)")
    latent_scale: float | None = opt(None, "latents: the VAE's scaling_factor the cache was made with (filled from "
                                           "its manifest; none: the decoding VAE's own)")
    latent_shift: float | None = opt(None, "latents: the VAE's shift_factor the cache was made with (filled from "
                                           "its manifest; none: the decoding VAE's own)")


@dataclass
class TrainConfig:
    """The training loop."""
    steps: int = opt(400_000, "optimizer steps in all")
    global_batch_size: int = opt(256, "samples per optimizer step, over all processes and accumulation")
    grad_accum: int = opt(1, "micro-batches accumulated per optimizer step")
    lr: float = opt(1e-4, "AdamW learning rate")
    weight_decay: float = opt(0.0, "AdamW weight decay")
    adam_betas: list = opt([0.9, 0.999], "AdamW betas [beta1, beta2]")
    warmup_steps: int = opt(0, "linear learning-rate warmup from 0 (0: none)")
    grad_clip: float = opt(0.0, "clip the gradient norm to this (0: off, the official recipe; 1.0 is the seeds' advice)")
    ema_decay: float = opt(0.9999, "decay of the EMA of the weights that samples come from")
    ema_warmup: bool = opt(False, "decay_t = min(decay, (1 + t) / (10 + t)), for short runs")
    precision: str = opt("auto", "auto (bf16 on a GPU, fp32 on a CPU) | fp32 | bf16 | fp16")
    seed: int = opt(0, "seed of the weights, the data order and the noise")
    distributed: str = opt("ddp", "ddp | fsdp (when launched with torchrun)")
    speed: str = opt("auto", "auto | reference | fast | fastest, or levers joined by + (ditkit.fast.recipes; "
                             "auto: fastest on a GPU)")
    activation_checkpointing: bool = opt(False, "recompute each block in the backward (less memory, ~1/3 more compute)")
    log_every: int = opt(100, "steps between logged metrics")
    log_to: str = opt("tensorboard", "where scalars and sample grids go besides metrics.jsonl: tensorboard | wandb | "
                                     "tensorboard+wandb | none (one not installed is left out with a warning; "
                                     "WANDB_MODE=offline logs W&B offline)")
    ckpt_every: int = opt(50_000, "steps between checkpoints (one is also written at the end)")
    keep_last: int = opt(3, "checkpoints kept in run-dir/checkpoints")
    ckpt_format: str = opt("pt", "pt | safetensors (same content; safetensors never runs pickle)")
    sample_every: int = opt(0, "steps between sample grids in run-dir/samples, and one at the last step (0: off)")
    max_nonfinite: int = opt(10, "consecutive bad steps (non-finite, or loss spikes) before the run stops as diverged")
    spike_factor: float = opt(10.0, "a loss over this × the running mean of good losses is a bad step (skipped); 0: off")
    max_minutes: float = opt(0.0, "this process's wall-clock budget: checkpoint and stop at the first log step past "
                                  "it (0: off)")
    budget_minutes: float = opt(0.0, "the run's training time summed over every resume (each checkpoint keeps it): "
                                     "checkpoint and stop at the first log step past it (0: off)")
    profile: str = opt("", '"A-B": the PyTorch profiler over steps A to B, written to the run folder '
                           "(ditkit.training.profiling)")
    fsdp_reshard: bool = opt(True, "FSDP: free each block's gathered weights after its forward (false: keep them "
                                   "for the backward)")
    fsdp_bf16_gather: bool = opt(False, "FSDP: gather the weights in bf16 (half the all-gather traffic; gradients "
                                        "reduced in float32)")
    ddp_bucket_mb: float | None = opt(None, "DDP: the gradient bucket size in MiB (torch's bucket_cap_mb); under "
                                            "torch.compile the graph is cut at every bucket, so larger buckets mean "
                                            "fewer pieces. Default: all gradients in one bucket when the step is "
                                            "compiled with CUDA graphs, else torch's 25")
    vae: str | None = opt(None, "local VAE (folder or file) to decode the sample grids of latent runs")
    repa_encoder: str | None = opt(None, "REPA: local folder of the frozen encoder (facebook/dinov2-base from the Hugging "
                                         "Face hub, or a DINOv2 with registers; read by transformers); needed with "
                                         "model.repa_depth")


@dataclass
class SampleConfig:
    """Sampling: the sample grids of training and the defaults of ``ditkit sample``."""
    sampler: str = opt("ddpm", "ddpm | ddim (objective ddpm); euler | heun | dopri5 | sde (objective flow)")
    steps: int = opt(250, "sampling steps")
    cfg_scale: float = opt(1.0, "classifier-free guidance scale (1: no guidance)")
    guided_channels: int | None = opt(None, "guide only the first N predicted channels (none: all; 3: the official code)")
    guidance_interval: list | None = opt(None, "[a, b]: guide only for noise levels in [a, b] (none: always)")
    eta: float = opt(0.0, "ddim: eta (0: deterministic)")
    grid: str = opt("uniform", "euler/heun/sde time grid: uniform | shifted (by sample.shift)")
    shift: float | None = opt(None, "the shifted grid's shift t' = t / (s − (s − 1) t), s > 1 spending more steps at high "
                                    "noise (none: objective.shift, the training draw's)")
    sde_diffusion: str = opt("sigma", "sde: sigma | constant | SBDM | linear | decreasing | increasing-decreasing")
    speed: str = opt("auto", "auto | reference | fast | fastest: the speed recipe (ditkit.fast.recipes; auto: "
                             "fastest on a GPU)")


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
            (self.data.kind in ("digits", "images", "latents", "fields", "sequences"), "data.kind",
             "digits, images, latents, fields or sequences"),
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
            (m.pos_embed in ("sincos", "rope"), "model.pos_embed", "sincos or rope"),
            (m.norm in ("layernorm", "rmsnorm"), "model.norm", "layernorm or rmsnorm"),
            (m.mlp in ("gelu", "swiglu"), "model.mlp", "gelu or swiglu"),
            (m.num_classes >= 0, "model.num_classes", "a non-negative integer (0: unconditional)"),
            (self.data.latent_norm in ("none", "channel"), "data.latent_norm", "none or channel"),
            (self.data.length_buckets >= 0, "data.length_buckets", "a non-negative integer (0: off)"),
            (self.data.pad_multiple >= 0, "data.pad_multiple", "a non-negative integer (0: the patch size)"),
            (self.data.length_buckets == 0 or self.data.kind == "sequences", "data.length_buckets",
             "0 unless data.kind is sequences"),
            (self.data.latent_norm == "none" or self.data.kind == "latents", "data.latent_norm",
             "none unless data.kind is latents"),
            (self.data.latent_scale is None or self.data.latent_scale > 0, "data.latent_scale", "positive"),
            (o.time_sampling in ("uniform", "logit_normal"), "objective.time_sampling", "uniform or logit_normal"),
            (o.logit_std > 0, "objective.logit_std", "positive"),
            (o.shift > 0, "objective.shift", "positive"),
            (o.time_scale > 0, "objective.time_scale", "positive"),
            (o.repa_weight > 0, "objective.repa_weight", "positive"),
            (o.cos_weight >= 0, "objective.cos_weight", "non-negative (0: off)"),
            # 1 − cos along the channels at each position: with one channel the cosine is only the sign of each
            # value, whose gradient vanishes; on the digits it collapsed the samples (docs/reports, modern options)
            (o.cos_weight == 0 or m.in_channels > 1, "objective.cos_weight",
             "0 for one-channel data (the cosine is taken along the channels at each position)"),
            (m.repa_dim > 0, "model.repa_dim", "a positive integer (the encoder's feature width)"),
            (self.sample.steps > 0, "sample.steps", "a positive integer"),
            (self.sample.eta >= 0, "sample.eta", "non-negative"),
            (self.train.log_every > 0, "train.log_every", "a positive integer"),
            (self.train.ckpt_every > 0, "train.ckpt_every", "a positive integer (a checkpoint is also written at the end)"),
            (self.train.sample_every >= 0, "train.sample_every", "0 (off) or a positive integer"),
            (self.train.max_nonfinite >= 1, "train.max_nonfinite", "at least 1"),
            (self.train.spike_factor == 0 or self.train.spike_factor > 1, "train.spike_factor",
             "0 (off) or above 1 (a loss over that many times its running mean is a spike)"),
            (self.train.max_minutes >= 0, "train.max_minutes", "non-negative (0: no time limit)"),
            (self.train.budget_minutes >= 0, "train.budget_minutes", "non-negative (0: no budget)"),
            (self.train.ddp_bucket_mb is None or self.train.ddp_bucket_mb >= 1, "train.ddp_bucket_mb",
             "at least 1 (MiB; under torch.compile no bucket may be smaller than dynamo's first, 1 MiB)"),
            (self.train.distributed == "fsdp" or (self.train.fsdp_reshard and not self.train.fsdp_bf16_gather),
             "train.distributed", "fsdp with train.fsdp_reshard=false or train.fsdp_bf16_gather=true (FSDP's options)"),
            (self.train.distributed == "ddp" or self.train.ddp_bucket_mb is None,
             "train.distributed", "ddp with train.ddp_bucket_mb (DDP's option)"),
        ]
        for ok, name, what in checks:
            if not ok:
                raise ConfigError(f"{name} must be {what}, got {_get(self, name)!r}")
        names = self.data.class_names
        if names is not None and (not isinstance(names, list) or not all(isinstance(n, str) and n for n in names)
                                  or len(set(names)) != len(names)):
            raise ConfigError(f"data.class_names must be a list of distinct non-empty names, got {names!r}")
        self._check_latent_stats()
        parse_profile(self.train.profile)
        parse_log_to(self.train.log_to)
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
        if self.sample.shift is not None and not self.sample.shift > 0:
            raise ConfigError(f"sample.shift must be positive, got {self.sample.shift}")
        if self.sample.shift is not None and self.sample.grid != "shifted":
            raise ConfigError(f"sample.shift={self.sample.shift} moves the shifted grid: set sample.grid=shifted too")
        allowed = DDPM_SAMPLERS if self.objective.name == "ddpm" else FLOW_SAMPLERS
        if self.sample.sampler not in allowed:
            raise ConfigError(f"sample.sampler {self.sample.sampler!r} does not fit objective.name={self.objective.name!r}; "
                              f"choose one of {', '.join(allowed)}")
        if self.sample.grid == "shifted" and self.sample.sampler not in GRID_SAMPLERS:
            raise ConfigError(f"sample.grid=shifted (--grid, --shift) moves the time grid of {', '.join(GRID_SAMPLERS)}; "
                              f"sample.sampler {self.sample.sampler!r} has no such grid "
                              + ("(its steps are the model's T steps, evenly spaced)" if self.sample.sampler in DDPM_SAMPLERS
                                 else "(its steps are adaptive)"))
        self.model.kwargs()
        self._check_grid()
        self._check_repa()
        return self

    def _check_grid(self) -> None:
        """model.input_size and model.patch_size are an int or a list of positive ints, one per axis, and each
        axis's size is divisible by its patch (``ditkit.models.grid.TokenGrid``)."""
        m = self.model
        for key in ("input_size", "patch_size"):
            value = getattr(m, key)
            values = value if isinstance(value, list) else [value]
            if not (key == "patch_size" and value is None or 1 <= len(values) <= 3 and all(
                    isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in values)):
                raise ConfigError(f"model.{key} must be a positive int or a list of 1 to 3 positive ints, got {value!r}")
        patch = m.patch_size if m.name == "custom" else int(m.name.rsplit("/", 1)[1])
        if patch is None:
            return
        from ditkit.models.grid import TokenGrid

        try:
            grid = TokenGrid.of(m.input_size, patch)
        except ValueError as err:
            raise ConfigError(f"model.input_size={m.input_size} with model.patch_size={patch}: {err}") from None
        if m.name != "custom" or not (m.hidden_size and m.num_heads):
            return
        if m.hidden_size % m.num_heads:
            raise ConfigError(f"model.hidden_size={m.hidden_size} is not divisible by model.num_heads={m.num_heads}")
        head, axes = m.hidden_size // m.num_heads, len(grid.size)
        if m.pos_embed == "rope" and (head % 4 or head // 2 < axes):  # a rotation pair per axis
            raise ConfigError(f"model.pos_embed=rope needs a head size (model.hidden_size / model.num_heads = {head}) "
                              f"divisible by 4, with a rotation pair for each of the {axes} axes")

    def _check_latent_stats(self) -> None:
        """data.latent_mean and data.latent_std: one number per channel of x, each σ_c positive."""
        d = self.data
        for name in ("latent_mean", "latent_std"):
            v = getattr(d, name)
            if v is None:
                continue
            if not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v) or \
                    len(v) != self.model.in_channels:
                raise ConfigError(f"data.{name} must hold {self.model.in_channels} numbers (one per channel of "
                                  f"model.in_channels), got {v!r}")
            if name == "latent_std" and not all(x > 0 for x in v):
                raise ConfigError(f"data.latent_std must be positive, got {v!r}")

    def _check_repa(self) -> None:
        """REPA's block exists and its data are images (the encoder is checked when training starts)."""
        m = self.model
        if m.repa_depth is None:
            return
        from ditkit.models.dit import DiT_models

        depth = m.depth if m.name == "custom" else DiT_models[m.name].depth
        if depth is not None and not 1 <= m.repa_depth <= depth:
            raise ConfigError(f"model.repa_depth must be a block in 1..{depth} (the model's depth), got {m.repa_depth}")
        if self.data.kind in ("fields", "sequences"):
            raise ConfigError("model.repa_depth aligns with an image encoder: data.kind must be images, latents "
                              f"(extracted with --images) or digits, not {self.data.kind}")

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


# The keys the user set, per Config object from load_config: kept outside the object so that copying its
# fields (``Config(**vars(cfg))``, ``dataclasses.replace``) sees only config fields.
_USER_KEYS: dict[int, frozenset[str]] = {}


def user_keys(cfg: Config) -> frozenset[str] | None:
    """The ``section.key`` names the user set (a config file's keys and the overrides, not the preset's),
    as ``load_config`` recorded them; None for a config built otherwise (then every key counts as set)."""
    return _USER_KEYS.get(id(cfg))


def remember_user_keys(cfg: Config, keys) -> None:
    _USER_KEYS[id(cfg)] = frozenset(keys)
    weakref.finalize(cfg, _USER_KEYS.pop, id(cfg), None)


def _dotted(data: dict) -> set[str]:
    return {f"{section}.{key}" for section, values in migrate(data).items() if isinstance(values, dict) for key in values}


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
    YAML file given as ``path`` (applied after the preset), then ``section.key=value`` overrides.  A
    ``.ini`` file is the cosmology framework's ``dit.ini`` (``ditkit.config_ini``), over the
    ``cosmo128`` preset unless a preset is given."""
    if preset is not None and (str(preset).endswith((".yaml", ".yml", ".ini")) or Path(preset).is_file()):
        if path is not None:
            raise ConfigError(f"give one config file: {preset} or {path}")
        preset, path = None, preset
    ini = path is not None and Path(path).suffix.lower() == ".ini"
    if ini:
        from ditkit.config_ini import BASE_PRESET, ini_config

        preset = BASE_PRESET if preset is None else preset
    cfg, mine = Config(), set()
    if preset is not None:
        if preset not in preset_names():
            raise ConfigError(f"unknown preset {preset!r} (and no such file); presets: {', '.join(preset_names())}")
        cfg = from_dict(yaml.safe_load(resources.files("ditkit.presets").joinpath(f"{preset}.yaml").read_text()), cfg)
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        if ini:
            try:
                data = ini_config(path, cfg.model)
            except ValueError as err:
                raise ConfigError(str(err)) from None
        else:
            try:
                data = yaml.safe_load(path.read_text()) or {}
            except yaml.YAMLError as err:
                raise ConfigError(f"config file {path} is not valid YAML: {err}") from None
        cfg = from_dict(data, cfg)
        mine |= _dotted(data)
    for text in overrides:
        data = parse_override(text)
        cfg = from_dict(data, cfg)
        mine |= _dotted(data)
    remember_user_keys(cfg, mine)
    return cfg.validate()


def config_from_checkpoint(data: dict) -> Config:
    """The resolved config stored in a checkpoint (keys unknown to this version are an error)."""
    return from_dict(data).validate()


def to_yaml(cfg: Config) -> str:
    """The config as YAML, sections and keys in their declared order (what ``save_config`` writes)."""
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


def save_config(cfg: Config, path: Path) -> None:
    from ditkit.utils.io import atomic_write_text

    atomic_write_text(path, to_yaml(cfg))


def format_config(cfg: Config) -> str:
    """Every key of ``cfg``, section by section: its value (as YAML writes it), its type and its help."""
    rows = []
    for section in fields(cfg):
        part = getattr(cfg, section.name)
        rows.append((f"{section.name}:", "", "", " ".join(type(part).__doc__.split())))
        for f in fields(part):
            value = yaml.safe_dump(getattr(part, f.name), default_flow_style=True, width=math.inf)
            rows.append((f"  {section.name}.{f.name}", value.removesuffix("...\n").strip(), str(f.type), field_help(f)))
    widths = [max(len(r[i]) for r in rows if r[1]) for i in range(3)]
    return "".join((f"{r[0]:<{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]:<{widths[2]}}  {r[3]}" if r[1] else
                    f"\n{r[0]} {r[3]}").rstrip() + "\n" for r in rows).lstrip("\n")


__all__ = [
    "Config", "ConfigError", "DataConfig", "ModelConfig", "ObjectiveConfig", "SampleConfig", "TrainConfig",
    "config_from_checkpoint", "field_help", "format_config", "from_dict", "load_config", "migrate", "opt",
    "parse_override", "preset_names", "save_config", "to_yaml",
]
