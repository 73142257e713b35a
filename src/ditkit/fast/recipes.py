"""The one door for speed: a named recipe (or a set of levers) applied to a run's network.

Training and sampling each take ``reference | fast | fastest`` (or ``auto``, the default), or a
``TrainSpeed`` / ``SampleSpeed`` with one field per lever for ablations from Python.  The trainer,
``ditkit sample``, ``ditkit.sample`` and ``benchmarks/bench.py`` all go through ``train_speed`` and
``sample_speed``; nothing else in ditkit swaps a module or launches a kernel of ``ditkit.kernels``.

- A named recipe leaves out each lever that cannot serve the run (a CPU, a GPU without FP8 tensor
  cores, fp32 or fp16 arithmetic, cross-attention, blocks with RMSNorm, RoPE, QK-norm or SwiGLU) and
  says so in one line per lever.  ``auto`` is ``reference`` on a CPU and ``fastest`` on a GPU.
- Every lever composes with DDP, FSDP2 and gradient accumulation.  Under FSDP, ``master_weights`` is
  served by FSDP2's own mixed precision (float32 masters and AdamW state sharded, bf16 all-gathers,
  gradients reduce-scattered in float32), which the plan reports as ``bf16_gather``.
- Levers given explicitly are applied as given (off a GPU the fused modules compute with torch's
  ops, which is what the CPU tests compare); a lever that cannot work at all with the run is a
  ``ValueError`` naming it.

The state dict never changes: checkpoints written with any recipe load into the reference model.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

SPEEDS = ("auto", "reference", "fast", "fastest")


@dataclass(frozen=True)
class TrainSpeed:
    """The training levers.  All off: the network as written, eager."""
    compile: bool = False  # torch.compile of the network (inductor)
    cuda_graphs: bool = False  # with compile: compile's reduce-overhead mode, each step's graphs replayed (CUDA)
    compile_loss: bool = False  # with compile: the loss compiled with the network inside it (ditkit.fast.compiled_loss)
    fused_mlp: bool = False  # GELU and its derivative in cuBLASLt's epilogues (ditkit.fast.fused_mlp)
    fused_attention: bool = False  # qkv linear + cuDNN attention as one operator (ditkit.fast.fused_attention)
    tuned_linear: bool = False  # the other linears through cuBLASLt's fastest candidate (ditkit.fast.tuned_linear)
    fused_norm: bool = False  # adaLN's LayerNorm, modulation and gated residual as Triton kernels (ditkit.fast.fused_norm)
    bf16_residual: bool = False  # the residual stream in bf16 under bf16 autocast (ditkit.fast.blocks)
    master_weights: bool = False  # bf16 weights, float32 masters, AdamW + EMA in one flat kernel (ditkit.fast.master_weights)
    fp8_forward: bool = False  # fc1's and qkv's forward products in FP8 (ditkit.fast.fp8_forward)
    fp8_backward: bool = False  # fc1's and qkv's ∂x products in FP8, per-token scales (ditkit.fast.fp8_backward)
    sdpa: str = "auto"  # SDPA's kernel on CUDA: auto | flash | cudnn | efficient | math (ditkit.fast.sdpa)


@dataclass(frozen=True)
class SampleSpeed:
    """The sampling levers.  Defaults: the official sample.py's numerics (float32, eager)."""
    precision: str = "fp32"  # fp32 | amp-bf16 (ditkit.fast.inference)
    fp8: bool = False  # block linears in FP8 with static scales calibrated on a short run (ditkit.fast.fp8)
    fp8_mlp: bool = False  # with fp8: GELU and fc2's input quantization in fc1's product (ditkit.fast.fp8_mlp)
    compile: str = "none"  # none | default | cudagraphs (ditkit.fast.inference.compiled)
    sdpa: str = "auto"  # SDPA's kernel on CUDA (ditkit.fast.sdpa)


_FAST_TRAIN = TrainSpeed(compile=True, cuda_graphs=True, compile_loss=True, fused_mlp=True, fused_attention=True,
                         tuned_linear=True, fused_norm=True, bf16_residual=True, master_weights=True)
TRAIN_RECIPES = {
    "reference": TrainSpeed(),
    "fast": _FAST_TRAIN,  # bf16 arithmetic throughout, no FP8
    "fastest": dataclasses.replace(_FAST_TRAIN, fp8_forward=True, fp8_backward=True),
}
SAMPLE_RECIPES = {
    "reference": SampleSpeed(),
    "fast": SampleSpeed(precision="amp-bf16", compile="cudagraphs"),
    "fastest": SampleSpeed(precision="amp-bf16", fp8=True, fp8_mlp=True, compile="cudagraphs"),
}


def fp8_tensor_cores(device: torch.device) -> bool:
    """FP8 matrix products in hardware: CUDA compute capability 8.9 (Ada) or 9.0 (Hopper) and up."""
    return device.type == "cuda" and torch.cuda.is_available() and torch.cuda.get_device_capability(device) >= (8, 9)


def parse_levers(text: str, cls: type) -> TrainSpeed | SampleSpeed:
    """``"fused_mlp+fused_norm"`` -> ``TrainSpeed(fused_mlp=True, fused_norm=True)``: levers joined by ``+``, the
    spelling of ablations in a config (``train.speed``) or on the command line (``--speed``).  For sampling,
    ``amp_bf16`` sets the precision and ``compile`` / ``cudagraphs`` the compilation."""
    flags = [f.name for f in dataclasses.fields(cls) if f.type in ("bool", bool)]
    extra = {"amp_bf16": {"precision": "amp-bf16"}, "compile": {"compile": "default"},
             "cudagraphs": {"compile": "cudagraphs"}} if cls is SampleSpeed else {}
    fields = {}
    for token in filter(None, text.split("+")):
        if token in extra:
            fields.update(extra[token])
        elif token in flags:
            fields[token] = True
        else:
            raise ValueError(f"unknown speed lever {token!r}: a speed is {', '.join(SPEEDS)} or levers joined by '+' "
                             f"from {', '.join([*flags, *extra])}")
    if cls is TrainSpeed and fields.get("cuda_graphs"):
        fields["compile"] = True
    return cls(**fields)


def check_speed(text: str, kind: str) -> None:
    """Raise ValueError unless ``text`` is a recipe name or a valid lever list for ``kind`` (train | sample)."""
    if text not in SPEEDS:
        parse_levers(text, TrainSpeed if kind == "train" else SampleSpeed)


def _named(speed, recipes: dict, device: torch.device, kind: str) -> tuple[str | None, object]:
    """(the recipe's name or None for explicit levers, its levers); ``auto`` resolved for ``device``."""
    if not isinstance(speed, str):
        return None, speed
    if speed not in SPEEDS:
        return None, parse_levers(speed, TrainSpeed if kind == "train" else SampleSpeed)
    if speed == "auto":
        speed = "reference" if device.type != "cuda" else "fastest"
    return speed, recipes[speed]


#################################################################################
#                                    Training                                    #
#################################################################################


@dataclass(frozen=True)
class TrainRun:
    """What of a run decides which levers can serve it."""
    device: torch.device
    amp_dtype: torch.dtype | None  # autocast's dtype (None: float32)
    world_size: int = 1
    grad_accum: int = 1
    parallel: str = "none"  # the model's wrapper: none | ddp | fsdp (torchrun wraps even one process)
    cross_attention: bool = False  # the blocks attend to conditioning tokens (fields, cond_mode)
    activation_checkpointing: bool = False
    block: frozenset[str] = frozenset()  # the blocks' architecture options off the official block (block_options)
    masked: bool = False  # batches of variable lengths: the network gets a padding mask (DiT.forward's mask)


# option -> (the lever that computes the official block's form of it, why it cannot serve the option)
_BLOCK_CONFLICTS = {
    "rmsnorm": ("fused_norm", "its kernels compute LayerNorm and the blocks use RMSNorm (model.norm=rmsnorm)"),
    "rope": ("fused_attention", "its operator runs the qkv product and attention as one call, with no room for "
                                "RoPE (model.pos_embed=rope)"),
    "qk_norm": ("fused_attention", "its operator runs the qkv product and attention as one call, with no room for "
                                   "QK-norm (model.qk_norm=true)"),
    "swiglu": ("fused_mlp", "its epilogues compute the GELU MLP and the blocks use SwiGLU (model.mlp=swiglu)"),
}


def block_options(model: nn.Module | None = None, **config) -> frozenset[str]:
    """The architecture options of a DiT's blocks that differ from the official block, from the model
    (its ``options``) or from the model config's keys (``pos_embed``, ``norm``, ``qk_norm``, ``mlp``)."""
    opts = dict(getattr(model, "options", {}) if model is not None else config)
    on = {"rmsnorm": opts.get("norm") == "rmsnorm", "rope": opts.get("pos_embed") == "rope",
          "qk_norm": bool(opts.get("qk_norm")), "swiglu": opts.get("mlp") == "swiglu"}
    return frozenset(k for k, v in on.items() if v)


def _train_conflicts(s: TrainSpeed, run: TrainRun) -> dict[str, str]:
    """lever -> why it cannot serve ``run`` (with the other levers of ``s``)."""
    why = {}
    bf16 = run.amp_dtype == torch.bfloat16
    for lever in ("bf16_residual", "master_weights", "fp8_forward", "fp8_backward"):
        if getattr(s, lever) and not bf16:
            why[lever] = "it needs bf16 arithmetic (train.precision=bf16, or auto on a GPU)"
    if s.cuda_graphs and not s.compile:
        why["cuda_graphs"] = "CUDA graphs come with compile=True"
    if s.cuda_graphs and run.parallel == "fsdp":
        why["cuda_graphs"] = ("FSDP2 gathers the parameters into new memory every step, so the graphs would be "
                              "recorded again each step (measured on one H100: 16 img/s against 557 without FSDP)")
    if s.compile_loss and not s.compile:
        why["compile_loss"] = "it compiles the loss with the network inside: it needs compile=True"
    if s.fused_attention and s.sdpa not in ("auto", "cudnn"):
        why["fused_attention"] = f"its operator calls cuDNN's attention (sdpa={s.sdpa!r})"
    if s.fp8_forward and not (s.fused_norm and (s.fused_mlp or s.fused_attention)):
        why["fp8_forward"] = "it runs inside the fused norm and the fused MLP or attention"
    if s.fp8_backward and not (s.fused_mlp or s.fused_attention):
        why["fp8_backward"] = "it runs inside the fused MLP or attention's backward"
    for option in sorted(run.block):
        lever, reason = _BLOCK_CONFLICTS[option]
        if getattr(s, lever):
            why.setdefault(lever, reason)
    if run.masked:  # the plain modules take the mask; these compute attention in operators without one
        for lever, reason in (("fused_attention", "its operator takes no attention mask (variable lengths)"),
                              ("fused_norm", "its blocks call attention without the padding mask (variable lengths)")):
            if getattr(s, lever):
                why.setdefault(lever, reason)
    if (s.fp8_forward or s.fp8_backward) and run.cross_attention:
        for lever in ("fp8_forward", "fp8_backward"):
            if getattr(s, lever):
                why.setdefault(lever, "the FP8 products serve blocks without cross-attention only")
    return why


def _check_sdpa(s) -> None:
    from ditkit.fast.sdpa import SDPA_CHOICES

    if s.sdpa not in SDPA_CHOICES:
        raise ValueError(f"{type(s).__name__}.sdpa must be one of {', '.join(SDPA_CHOICES)}, got {s.sdpa!r}")


def resolve_train_speed(speed: str | TrainSpeed, run: TrainRun) -> tuple[TrainSpeed, list[str]]:
    """The levers that will run and one line per lever left out (named recipes) or a ValueError
    (explicit levers that cannot work together with the run)."""
    name, s = _named(speed, TRAIN_RECIPES, run.device, "train")
    _check_sdpa(s)
    s, notes = _serving(name, s, run)
    if s.master_weights and run.parallel == "fsdp":  # said here, once: ``TrainPlan.apply`` calls _serving again
        notes.append("master_weights under FSDP: FSDP2's mixed precision serves them (float32 masters and AdamW "
                     "state sharded, bf16 all-gathers, gradients reduce-scattered in float32)")
    return s, notes


TORCH_DDP_BUCKET_MB = 25.0  # DistributedDataParallel's own bucket_cap_mb

# The training levers whose modules also run on a CPU (their kernels have eager forms): what the CPU tests compare.
CPU_LEVERS = "fused_mlp+fused_attention+tuned_linear+fused_norm+bf16_residual"


def _serving(name: str | None, s: TrainSpeed, run: TrainRun) -> tuple[TrainSpeed, list[str]]:
    """The levers of ``s`` that serve ``run``: for a named recipe, the rest left out with one line each."""
    notes = []
    if name is not None and name != "reference" and run.device.type != "cuda":
        notes.append(f"speed {name}: the fast levers need a CUDA GPU; this run is on {run.device.type}: "
                     f"training the reference modules (named, {CPU_LEVERS} run on a CPU too)")
        return TRAIN_RECIPES["reference"], notes
    if name is not None and not fp8_tensor_cores(run.device) and (s.fp8_forward or s.fp8_backward):
        s = dataclasses.replace(s, fp8_forward=False, fp8_backward=False)
        notes.append(f"speed {name}: left out the FP8 products (this GPU has no FP8 tensor cores: compute capability < 8.9)")
    while True:
        why = _train_conflicts(s, run)
        if not why:
            return s, notes
        if name is None:
            lever, reason = next(iter(why.items()))
            raise ValueError(f"TrainSpeed.{lever}=True cannot serve this run: {reason}")
        for lever, reason in why.items():
            notes.append(f"speed {name}: left out {lever}: {reason}")
        s = dataclasses.replace(s, **{lever: False for lever in why})


@dataclass
class TrainPlan:
    """A resolved training recipe: ``apply`` converts the network (after the EMA copy, before DDP/FSDP),
    ``optimizer`` makes the optimizer, ``compile`` gives the network and objective a step calls."""
    speed: TrainSpeed
    run: TrainRun
    notes: list[str] = field(default_factory=list)
    name: str | None = None  # the recipe's name (None: explicit levers)

    def apply(self, model: nn.Module) -> list[str]:
        """Swap the modules of ``model`` in place; returns one line per lever applied, and one per lever
        left out because the model's blocks have options the run did not name (``TrainRun.block``)."""
        from ditkit.fast import blocks
        from ditkit.fast.fused_attention import convert_to_fused_attention
        from ditkit.fast.fused_mlp import convert_to_fused_mlp
        from ditkit.fast.fused_norm import convert_to_fused_norm
        from ditkit.fast.sdpa import use_sdpa_backend
        from ditkit.fast.tuned_linear import convert_to_tuned_linear

        done = []
        run = dataclasses.replace(self.run, block=self.run.block | block_options(model))
        if _train_conflicts(self.speed, run):
            self.run = run
            self.speed, left_out = _serving(self.name, self.speed, run)
            self.notes += left_out
            done += left_out
        s = self.speed
        use_sdpa_backend(s.sdpa)
        if s.fused_mlp:
            done.append(f"fused MLP ({convert_to_fused_mlp(model)})")
        if s.fused_attention:
            done.append(f"fused attention ({convert_to_fused_attention(model)})")
        if s.tuned_linear:
            done.append(f"tuned linears ({convert_to_tuned_linear(model)})")
        if s.fused_norm:
            n = convert_to_fused_norm(model, defer_residual=not self.run.activation_checkpointing)
            done.append(f"fused norm ({n})")
        if s.fp8_forward:
            done.append(f"FP8 forward ({blocks.enable_fp8_forward(model)} blocks)")
        if s.fp8_backward:
            done.append(f"FP8 ∂x products ({blocks.enable_fp8_backward(model)} layers)")
        if s.bf16_residual:  # after the swaps: a hook on the first block, which the fused norm rebuilds
            blocks.residual_stream_in(model, torch.bfloat16)
            done.append("bf16 residual stream")
        if self.run.activation_checkpointing:  # last: it retypes the blocks in place, keeping their hooks
            done.append(f"activation checkpointing ({blocks.checkpoint_blocks(model)} blocks)")
        return done

    @property
    def bf16_gather(self) -> bool:
        """FSDP all-gathers bf16 weights (FSDP2's form of ``master_weights``)."""
        return self.speed.master_weights and self.run.parallel == "fsdp"

    def optimizer(self, model: nn.Module, ema: nn.Module, max_norm: float, **adamw) -> torch.optim.Optimizer | None:
        """The master-weight AdamW (its step also clips, skips a non-finite step and updates the EMA), or None
        for the caller's fused AdamW.  ``model`` is the unwrapped network: under DDP this comes before the
        wrapper, which then reduces the bf16 gradients (``ddp_comm_hook``)."""
        if not self.speed.master_weights or self.run.parallel == "fsdp":
            return None
        from ditkit.fast.master_weights import MasterWeightAdamW

        return MasterWeightAdamW(model, ema, **adamw, max_norm=max_norm)

    def compile(self, model: nn.Module, objective, **options) -> tuple[nn.Module, object]:
        """(the network a step calls, the objective whose loss it calls): compiled as the levers say
        (``options``: more torch.compile arguments, e.g. a backend for a quick check)."""
        s = self.speed
        if not s.compile:
            return model, objective
        kwargs = {"mode": "reduce-overhead", **options} if s.cuda_graphs else options
        if s.compile_loss:
            from ditkit.fast.compiled_loss import CompiledLoss

            return model, CompiledLoss(objective, **kwargs)
        return torch.compile(model, **kwargs), objective

    def ddp_comm_hook(self):
        """The DDP communication hook for this plan's gradients, or None for DDP's own all-reduce.  With
        bf16 master weights the gradients are bf16: they are averaged in float32 (the traffic of the plain
        float32 run) and rounded to bf16 once, so that the sum over ranks is not rounded at every hop."""
        if not self.speed.master_weights or self.run.parallel != "ddp":
            return None
        from ditkit.fast.master_weights import float32_allreduce_hook

        return float32_allreduce_hook

    def ddp_bucket_mb(self, model: nn.Module, configured: float | None) -> tuple[float, str | None]:
        """(DDP's bucket size in MiB, a line for the log or None): ``configured`` (``train.ddp_bucket_mb``) when
        set; else, for a step compiled with CUDA graphs, one bucket that holds every gradient, else torch's 25.

        Why one bucket: dynamo cuts the compiled step at every bucket (so that each bucket's all-reduce can start
        during the backward), and each piece is a CUDA graph of its own with the communication hook run eagerly
        between them; at small batches per GPU the step is bound by that host work (docs/multi_gpu.md).  One
        bucket leaves a few pieces (dynamo closes its first bucket at 1 MiB; three for a small DiT in
        tests/training/test_ddp_graph_pieces.py) instead of one per 25 MiB, at the price of starting most of the
        all-reduce after the backward."""
        if configured is not None:
            return configured, None
        if not (self.run.parallel == "ddp" and self.cuda_graphs):
            return TORCH_DDP_BUCKET_MB, None
        size = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad) / 2 ** 20
        mb = float(math.ceil(size) + 1)
        return mb, (f"DDP: the gradients in one bucket of {mb:.0f} MiB, so that dynamo cuts the compiled step into "
                    "a few pieces, not one per bucket (train.ddp_bucket_mb sets smaller buckets, which start the "
                    "all-reduce during the backward)")

    @property
    def cuda_graphs(self) -> bool:
        return self.speed.compile and self.speed.cuda_graphs


def train_speed(speed: str | TrainSpeed, run: TrainRun) -> TrainPlan:
    """The one door for training: ``speed`` (a recipe name or levers) resolved for ``run``."""
    levers, notes = resolve_train_speed(speed, run)
    return TrainPlan(levers, run, notes, _named(speed, TRAIN_RECIPES, run.device, "train")[0])


#################################################################################
#                                    Sampling                                    #
#################################################################################


def resolve_sample_speed(speed: str | SampleSpeed, device: torch.device) -> tuple[SampleSpeed, list[str]]:
    """As ``resolve_train_speed``, for sampling."""
    name, s = _named(speed, SAMPLE_RECIPES, device, "sample")
    _check_sdpa(s)
    notes = []
    if name is not None and name != "reference" and device.type != "cuda":
        notes.append(f"speed {name}: the fast levers need a CUDA GPU; sampling on {device.type} with the reference numerics")
        return SAMPLE_RECIPES["reference"], notes
    if name is not None and s.fp8 and not fp8_tensor_cores(device):
        s = dataclasses.replace(s, fp8=False, fp8_mlp=False)
        notes.append(f"speed {name}: left out FP8 (this GPU has no FP8 tensor cores: compute capability < 8.9)")
    from ditkit.fast.inference import COMPILE_MODES, PRECISIONS

    if s.precision not in PRECISIONS:
        raise ValueError(f"SampleSpeed.precision must be one of {', '.join(PRECISIONS)}, got {s.precision!r}")
    if s.compile not in COMPILE_MODES:
        raise ValueError(f"SampleSpeed.compile must be one of {', '.join(COMPILE_MODES)}, got {s.compile!r}")
    if s.compile == "cudagraphs" and device.type != "cuda":
        raise ValueError(f"SampleSpeed.compile='cudagraphs' needs a CUDA GPU, this run is on {device.type}")
    if s.fp8_mlp and not s.fp8:
        raise ValueError("SampleSpeed.fp8_mlp=True works with fp8=True (it is FP8's MLP)")
    return s, notes


def sample_speed(model: nn.Module, speed: str | SampleSpeed, device: torch.device,
                 calibrate: Callable[[nn.Module], None] | None = None, **compile_options) -> tuple[nn.Module, list[str]]:
    """The one door for sampling: ``model`` (eval mode, changed in place) as the network to sample with,
    and one line per lever applied or left out.  With FP8, ``calibrate(net)`` runs the sampler on a few
    samples of their own to set static activation scales (``calibrate_fp8``) before compilation; without
    it the scales stay dynamic (per token, slower).  ``compile_options``: more torch.compile arguments."""
    from ditkit.fast.fp8 import calibrate_fp8
    from ditkit.fast.inference import compiled, for_inference
    from ditkit.fast.sdpa import use_sdpa_backend

    s, notes = resolve_sample_speed(speed, device)
    use_sdpa_backend(s.sdpa)
    net = for_inference(model, s.precision, fp8=s.fp8, fp8_mlp=s.fp8_mlp)
    if s.fp8 and not net.fp8_layers:
        notes.append("fp8: no block linear has sizes that are multiples of 16: sampling without FP8")
    elif s.fp8:
        notes.append(f"fp8: {net.fp8_layers} block linears in float8_e4m3fn (row-wise weight scales"
                     + ("; fc1 per tensor, its GELU and fc2's input cast in its product)" if s.fp8_mlp else ")"))
        if calibrate is not None:
            notes.append(f"fp8: static activation scales of {calibrate_fp8(model, lambda: calibrate(net))} layers calibrated")
    return compiled(net, s.compile, **compile_options), notes


def describe(speed) -> str:
    """The levers that are on, for a start-up line."""
    on = [f.name for f in dataclasses.fields(speed) if getattr(speed, f.name) is True]
    extra = [f"{k}={getattr(speed, k)}" for k in ("precision", "compile", "sdpa")
             if isinstance(getattr(speed, k, None), str) and getattr(speed, k) not in ("fp32", "none", "auto")]
    return ", ".join(on + extra) or "none (the reference modules)"
