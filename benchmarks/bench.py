"""Speed of ditkit's DiT on one GPU: matrix peak, training throughput, sampling cost.

    PYTHONPATH=src python benchmarks/bench.py --parts peak,train,sample --models DiT-XL/2 --batches 128 \
        --train-speed reference,fastest --sample-speed reference,fastest   # the figures of docs/speed.md
    PYTHONPATH=src python benchmarks/bench.py --quick       # a subset, ~5 min on an H100 with compilation
    PYTHONPATH=src python benchmarks/bench.py --device cpu --tiny --compile-backend eager   # every code path in seconds

In one process, so that shares are of the peak measured in the same run.  peak: a random 8192³
matmul in bf16 and fp32 (TF32 per --tf32).  flops: matrix FLOPs per image of the network's forward
and forward+backward (FlopCounterMode; 716 GFLOP per training image is the figure usually quoted for XL/2).
gemm (GPU): the block linears' forward, ∂x and ∂W products at the largest batch, bf16 against FP8.
sdpa: the op SDPA dispatches to at each model's head dim (72 for XL/2), fwd+bwd ms of each backend
forced, or why it refuses.  train: the official train.py's work per step on random 32×32×4 latents
and labels (hybrid DDPM loss, backward, AdamW lr 1e-4 wd 0, EMA 0.9999) through the trainer's
``train_step`` (which adds a gradient norm); warm-up and compilation excluded.  sample: DDPM with
classifier-free guidance (2 × batch rows per call) via ``objective.sample`` and ``guided_fn``;
--sample-steps steps are timed one by one (each does the same work whatever its t) and EXTRAPOLATED
to 250 (DDIM: 50); flow matching's Euler and Heun samplers run on the same network (ms per network
evaluation).

A variant is a speed recipe (reference, fast, fastest: ``ditkit.fast``) or fp32 / bf16 (autocast)
plus levers (LEVERS), each one field of ``ditkit.fast.TrainSpeed`` or ``SampleSpeed``: both go through
the door the trainer and ``ditkit sample`` use (``train_speed``, ``sample_speed``).  fp32 and bf16
without levers, with --no-fused-adamw --no-foreach-ema, are the official code's step.  --profile: CUDA
time per step by kernel class and the longest kernels.

Columns: img/s (training images/s); ms/step (median, CUDA events); TFLOP/s (counted FLOPs/s); % peak
(of the bf16 peak); mem GiB (max_memory_allocated, reset per row); tail ms (optimizer + EMA +
gradient norm timed alone: the memory-bound end of a step); host ms (``host_ms``: the CPU's time to
issue one step on an idle GPU); first s (first step or sampler call: compilation).  Markdown on
stdout; JSON, every step time included, to --out (default $OUT/bench.json) after each row.  A failed
row (OOM) says so and the run goes on.
"""
from __future__ import annotations

import argparse
import copy
import functools
import gc
import json
import os
import statistics
import sys
import time
import traceback
import warnings

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from ditkit.config import Config
from ditkit.fast import SAMPLE_RECIPES, TRAIN_RECIPES, SampleSpeed, TrainRun, TrainSpeed, sample_speed, train_speed
from ditkit.fast.fp8 import amax_scales, quantize
from ditkit.fast.sdpa import SDPA_CHOICES, use_sdpa_backend
from ditkit.guidance import guided_fn
from ditkit.models.dit import build_model
from ditkit.objectives.ddpm import create_ddpm
from ditkit.objectives.flow import FlowMatching
from ditkit.training.ema import update_ema
from ditkit.training.trainer import gradient_norm, train_step

QUOTED_XL2_GFLOP = 716.0  # fwd+bwd per training image of DiT-XL/2 at 256 px, the figure usually quoted
TINY = {"depth": 2, "hidden_size": 64, "num_heads": 4, "patch_size": 2}
BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
            "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}
VARIANTS = ("reference", "fast", "fastest", "fp32", "bf16", "fp32+compile", "bf16+compile")
# A variant is a speed recipe of ditkit.fast (reference: float32 eager in sampling, train.precision's bf16 in
# training; fast; fastest), or fp32/bf16 plus levers, each mapped to its field of TrainSpeed / SampleSpeed.
LEVERS = {  # lever: (where it applies, the fields it sets)
    "compile": (("train", "sample"), {"compile": True}),  # torch.compile (inductor) of the network
    "cudagraphs": (("train", "sample"), {"compile": True, "cuda_graphs": True}),  # compile's reduce-overhead mode
    "loss": (("train",), {"compile": True, "compile_loss": True}),  # the loss compiled with the network inside it
    "bf16res": (("train",), {"bf16_residual": True}),  # the residual stream in bf16 instead of float32
    "mlp": (("train",), {"fused_mlp": True}),  # GELU in cuBLASLt's epilogues (ditkit.fast.fused_mlp)
    "attn": (("train",), {"fused_attention": True}),  # qkv linear + cuDNN attention as one operator
    "lt": (("train",), {"tuned_linear": True}),  # the other linears through cuBLASLt's fastest candidate
    "norm": (("train",), {"fused_norm": True}),  # adaLN's LayerNorm, modulation, gated residual as Triton kernels
    "master": (("train",), {"master_weights": True}),  # bf16 weights, float32 masters: one flat AdamW + EMA kernel
    "fp8fwd": (("train",), {"fp8_forward": True}),  # with +norm and +mlp/+attn: fc1's and qkv's forward in FP8
    "fp8bwd": (("train",), {"fp8_backward": True}),  # with +mlp/+attn: fc1's and qkv's ∂x products in FP8
    "fp8": (("sample",), {"fp8": True, "fp8_mlp": True}),  # FP8 block linears, static scales; GELU in fc1's product
    "plainmlp": (("sample",), {"fp8_mlp": False}),  # with +fp8: GELU and fc2's quantization as a compiled pass
}
say = functools.partial(print, flush=True)
QUICK_TRAIN = [("DiT-XL/2", 32, "fp32"), ("DiT-XL/2", 32, "bf16"), ("DiT-XL/2", 128, "bf16"), ("DiT-B/2", 128, "bf16"),
               ("DiT-XL/2", 32, "bf16+compile"), ("DiT-XL/2", 128, "bf16+compile"), ("DiT-B/2", 128, "bf16+compile")]


# ----------------------------------------------------------------------------- timing


def stamp(device: torch.device):
    """A time stamp on the device's timeline (a recorded CUDA event), or the host clock's."""
    if device.type != "cuda":
        return time.perf_counter()
    event = torch.cuda.Event(enable_timing=True)
    event.record()
    return event


def intervals_ms(stamps: list, device: torch.device) -> list[float]:
    if device.type != "cuda":
        return [(b - a) * 1e3 for a, b in zip(stamps, stamps[1:])]
    torch.cuda.synchronize()
    return [a.elapsed_time(b) for a, b in zip(stamps, stamps[1:])]


def times_ms(fn, reps: int, device: torch.device, warmup: int = 2) -> list[float]:
    """ms of each of ``reps`` back-to-back calls of fn (stamps between them), after ``warmup`` calls.
    An event recorded on an idle GPU counts the host's time too: a first call's includes compilation."""
    for _ in range(warmup):
        fn()
    stamps = [stamp(device)]
    for _ in range(reps):
        fn()
        stamps.append(stamp(device))
    return intervals_ms(stamps, device)


def host_ms(fn, reps: int, device: torch.device) -> float:
    """Median host time of one call of fn started on an idle device: what it costs the CPU to issue
    the work (plus any wait for the device inside it).  Near the device time: the step is host-bound
    or synchronises; far below it: the host runs ahead and the device never waits."""
    out = []
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(out)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖ / ‖b‖ (in float64)."""
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def median_ms(fn, reps: int, device: torch.device, warmup: int = 2) -> float:
    return statistics.median(times_ms(fn, reps, device, warmup))


def reset_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


KERNEL_CLASSES = (  # first match wins; names of cuBLAS/CUTLASS GEMMs, SDPA kernels, optimizer kernels, fused code
    ("adaLN norm (ditkit.kernels.norm)", ("adaln_norm",)),
    ("attention", ("flash", "fmha", "attention", "sdpa")),  # before gemm: flash kernels' names mention cutlass
    ("gemm", ("gemm", "nvjet", "cutlass", "xmma", "triton_tem")),  # triton_tem: max-autotune's GEMM templates
    ("optimizer/ema/norm", ("multi_tensor", "foreach", "adam", "lerp", "sum_squares")),
    ("triton (fused by compile)", ("triton",)),
    ("elementwise/reduce", ("elementwise", "vectorized", "reduce", "layer_norm", "softmax", "cat", "copy", "fill")),
)


def profile_kernels(fn, device: torch.device, calls: int = 3) -> dict:
    """CUDA time per call of fn by kernel class, and the 12 longest kernels (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    kernels, spans = {}, []
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            kernels[e.name] = kernels.get(e.name, 0.0) + e.device_time / 1e3 / calls  # ms per call
            spans.append((e.time_range.start, e.time_range.end, e.name))
    classes = {}
    for name, ms in kernels.items():
        cls = next((c for c, keys in KERNEL_CLASSES if any(k in name.lower() for k in keys)), "other")
        classes[cls] = classes.get(cls, 0.0) + ms
    top = sorted(kernels.items(), key=lambda kv: -kv[1])[:40]
    return {"gpu_ms": sum(kernels.values()), "classes": dict(sorted(classes.items(), key=lambda kv: -kv[1])),
            "top": [[name[:160], ms] for name, ms in top], **idle_gaps(spans, calls)}


def idle_gaps(spans: list[tuple[float, float, str]], calls: int) -> dict:
    """Where the GPU ran no kernel between the first kernel and the last (µs time ranges): the idle ms
    per call, the kernel count per call, and the 12 longest gaps (ms, with the kernels either side)."""
    spans.sort()
    gaps, end, before = [], None, None
    for start, stop, name in spans:
        if end is not None and start > end:
            gaps.append(((start - end) / 1e3, before[:60], name[:60]))
        if end is None or stop >= end:
            end, before = stop, name
    return {"idle_ms": sum(g[0] for g in gaps) / calls, "kernels_per_call": len(spans) / calls,
            "gaps": sorted(gaps, reverse=True)[:12]}


def format_profile(p: dict) -> str:
    total = p["gpu_ms"]
    lines = [f"  profile: {total:.1f} GPU-ms per call; " + ", ".join(f"{c} {ms:.1f} ({100 * ms / total:.0f}%)"
                                                                  for c, ms in p["classes"].items())]
    lines += [f"    {ms:7.2f} ms  {name[:110]}" for name, ms in p["top"][:15]]
    if "idle_ms" in p:
        lines.append(f"  GPU idle between kernels: {p['idle_ms']:.2f} ms per call, {p['kernels_per_call']:.0f} kernels per call; "
                     "longest gaps: " + "; ".join(f"{ms:.3f} ms {a} -> {b}" for ms, a, b in p["gaps"][:6]))
    return "\n".join(lines)


# ----------------------------------------------------------------------------- what is measured


def matmul_peak(n: int, dtype: torch.dtype, device: torch.device) -> float:
    """TFLOP/s of an n×n by n×n product, 2n³ FLOPs, on random data (zeros run faster than data)."""
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    c = torch.empty(n, n, device=device, dtype=dtype)
    return 2 * n**3 / (median_ms(lambda: torch.mm(a, b, out=c), 20, device, warmup=3) * 1e-3) / 1e12


def sdpa_check(heads: int, head_dim: int, tokens: int, batch: int, dtype: torch.dtype, device: torch.device) -> dict:
    """The op SDPA dispatches to by default (inputs needing grad, as in training), and the
    fwd+bwd ms of each backend forced, or the reason it refuses."""
    q, k, v = (torch.randn(batch, heads, tokens, head_dim, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
    grad = torch.randn_like(q)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        F.scaled_dot_product_attention(q, k, v)
    row = {"heads": heads, "head_dim": head_dim, "tokens": tokens, "batch": batch, "dtype": str(dtype).split(".")[-1],
           "default_ops": sorted({e.key for e in prof.key_averages() if e.key.startswith("aten::_") and "attention" in e.key})}
    for name, backend in BACKENDS.items():
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                with sdpa_kernel(backend):
                    row[name] = median_ms(lambda: F.scaled_dot_product_attention(q, k, v).backward(grad), 10, device)
            except Exception as err:  # noqa: BLE001 - a refusal is the answer sought
                reasons = [str(w.message).split("\n")[0] for w in caught] + [str(err).split("\n")[0]]
                row[name] = "refused: " + "; ".join(dict.fromkeys(reasons))
    return row


def gemm_check(model: nn.Module, batch: int, device: torch.device) -> list[dict]:
    """The block linears' three training products (forward x Wᵀ, ∂x = ∂y W, ∂W = ∂yᵀ x) at this batch,
    in bf16 (torch.mm, the layouts autograd uses) and in FP8 (``torch._scaled_mm`` with row-wise
    scales on operands quantized beforehand, in the layouts the kernel needs; ``fp8_training`` runs
    the first two): ms and TFLOP/s of each."""
    block, tokens = model.blocks[0], model.pos_embed.shape[1]
    M, rows = batch * tokens, []
    for name in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"):
        N, K = block.get_submodule(name).weight.shape
        x, w, g = (torch.randn(*s, device=device, dtype=torch.bfloat16) for s in ((M, K), (N, K), (M, N)))

        def fp8(a, b):  # a (m, k) row-major @ b (k, n) column-major, each scaled along k
            sa, sb = amax_scales(a, 1), amax_scales(b, 0)
            a8, b8 = quantize(a, sa).contiguous(), quantize(b, sb).t().contiguous().t()
            return lambda: torch._scaled_mm(a8, b8, sa, sb, out_dtype=torch.bfloat16)

        products = {"fwd": (lambda: torch.mm(x, w.t()), fp8(x, w.t())), "dgrad": (lambda: torch.mm(g, w), fp8(g, w)),
                    "wgrad": (lambda: torch.mm(g.t(), x), fp8(g.t(), x))}
        for op, (bf16, fp8_call) in products.items():
            row = {"layer": name, "op": op, "M": M, "N": N, "K": K, "bf16_ms": median_ms(bf16, 20, device),
                   "fp8_ms": median_ms(fp8_call, 20, device)}
            flop = 2 * M * N * K
            row.update(bf16_tflops=flop / row["bf16_ms"] / 1e9, fp8_tflops=flop / row["fp8_ms"] / 1e9)
            rows.append(row)
    return rows


def make_model(name: str, input_size: int, device: torch.device | str) -> nn.Module:
    """A class-conditional DiT on 4-channel latents ("tiny": 2 narrow blocks), every weight non-zero."""
    kwargs = {"input_size": input_size, "in_channels": 4, "num_classes": 1000}
    with torch.device(device):
        model = build_model("custom", **TINY, **kwargs) if name == "tiny" else build_model(name, **kwargs)
    # adaLN-Zero starts every gate and the output layer at zero, so the backward pass through the
    # blocks would multiply exact zeros, which runs faster than real training: small random weights.
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Linear) and not module.weight.any():
                nn.init.normal_(module.weight, std=0.02)
    return model


def random_batch(batch: int, args, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(batch, 4, args.input_size, args.input_size, device=device)  # (B, 4, H, W) latents
    return x, torch.randint(0, 1000, (batch,), device=device)


def count_flops(model: nn.Module, args, device: torch.device) -> dict:
    """Matrix FLOPs per image of one forward, and of forward + backward (batch 2, train mode)."""
    x, y = random_batch(2, args, device)
    with sdpa_kernel(SDPBackend.MATH):
        with FlopCounterMode(display=False) as fwd:
            out = model(x, torch.randint(0, 1000, (2,), device=device), y)
        with FlopCounterMode(display=False) as bwd:
            out.float().square().mean().backward()
    model.zero_grad(set_to_none=True)
    f, b = fwd.get_total_flops(), bwd.get_total_flops()
    return {"fwd_gflop_per_img": f / 2e9, "fwd_bwd_gflop_per_img": (f + b) / 2e9}


class ForeachAdamW(torch.optim.AdamW):
    """AdamW without the fused kernel (the official train.py's).  ``train_step`` hands the fused
    kernel its non-finite skip flag as ``opt.found_inf``; this kernel takes none, so it is dropped."""

    found_inf = property(lambda self: None, lambda self, value: None)


@torch.no_grad()
def ema_loop(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """The official update_ema: one mul_ and one add_ per parameter."""
    ema_params = dict(ema.named_parameters())
    for name, param in model.named_parameters():
        ema_params[name].mul_(decay).add_(param.data, alpha=1 - decay)


def levers(variant: str) -> set[str]:
    return set(variant.split("+")[1:])


def train_levers(variant: str) -> tuple[TrainSpeed | str, torch.dtype | None]:
    """(a recipe name or the TrainSpeed of fp32/bf16 + levers, the autocast dtype)."""
    if variant in TRAIN_RECIPES:
        return variant, torch.bfloat16
    fields = {}
    for lever in sorted(levers(variant)):
        fields.update(LEVERS[lever][1])
    return TrainSpeed(**fields), (torch.bfloat16 if variant.startswith("bf16") else None)


def sample_levers(variant: str) -> SampleSpeed | str:
    if variant in SAMPLE_RECIPES:
        return variant
    fields = {"precision": "amp-bf16" if variant.startswith("bf16") else "fp32"}
    for lever in ("compile", "cudagraphs", "fp8", "plainmlp"):  # plainmlp after fp8: it turns fp8_mlp off
        if lever in levers(variant):
            fields.update({"compile": lever} if lever in ("compile", "cudagraphs") else LEVERS[lever][1])
    if fields.get("compile") == "compile":
        fields["compile"] = "default"
    return SampleSpeed(**fields)


def compiled(variant: str) -> bool:
    return variant in ("fast", "fastest") or bool(levers(variant) & {"compile", "cudagraphs", "loss"})


def compile_options(args) -> dict:
    return {"backend": args.compile_backend}


def bench_train(name: str, batch: int, variant: str, args, device: torch.device, flops: dict) -> dict:
    torch.manual_seed(0)
    model = make_model(name, args.input_size, device).train()
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    speed, amp_dtype = train_levers(variant)
    plan = train_speed(speed, TrainRun(device, amp_dtype))  # the trainer's door: the same levers, the same order
    for note in plan.notes:
        say(f"  {name} b{batch} {variant}: {note}")
    plan.apply(model)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = plan.optimizer(model, ema, max_norm=0.0, lr=1e-4, weight_decay=0)
    tail = opt is not None  # the optimizer's step also does the norm and the EMA
    if tail:
        opt.ema_decay = 0.9999
    else:
        opt = (torch.optim.AdamW(params, lr=1e-4, weight_decay=0, fused=True) if args.fused_adamw
               else ForeachAdamW(params, lr=1e-4, weight_decay=0, foreach=device.type == "cuda"))
    ema_update = update_ema if args.foreach_ema else ema_loop
    graphs = plan.cuda_graphs
    cfg = Config()  # cfg.train: seed 0, grad_clip 0 (off): the official recipe
    net, objective = plan.compile(model, create_ddpm(), **compile_options(args))
    x, y = random_batch(batch, args, device)
    state = {"step": 0}

    def one_step() -> None:
        if graphs:  # a new training iteration: the graphs' previous outputs may be overwritten
            torch.compiler.cudagraph_mark_step_begin()
        state["loss"], _, _ = train_step(net, objective, opt, [{"x": x, "y": y}], state["step"], 0, cfg, amp_dtype, None, device, params)
        if not tail:
            ema_update(ema, model, 0.9999)
        state["step"] += 1

    reset_memory(device)
    first_s = times_ms(one_step, 1, device, warmup=0)[0] / 1e3
    ms = times_ms(one_step, args.steps, device, warmup=args.warmup - 1)
    peak_mem = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None  # before the extra passes below
    host = host_ms(one_step, 3, device)
    with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        objective.loss(net, x, {"y": y})["loss"].mean().backward()  # gradients for timing the tail alone
    if tail:  # the norm and the EMA are inside opt.step
        tail_times = {"opt_ms": median_ms(opt.step, 5, device), "ema_ms": 0.0, "grad_norm_ms": 0.0}
    else:
        tail_times = {"opt_ms": median_ms(opt.step, 5, device), "ema_ms": median_ms(lambda: ema_update(ema, model, 0.9999), 5, device),
                      "grad_norm_ms": median_ms(lambda: gradient_norm(params, 0.0), 5, device)}
    img_s = batch / (statistics.median(ms) * 1e-3)
    opt.zero_grad(set_to_none=True)  # the tail's gradients must not sit in memory during the profiled steps
    profiled = {"profile": profile_kernels(one_step, device)} if args.profile and device.type == "cuda" else {}
    return {**profiled, "peak_mem_gib": peak_mem, "img_per_s": img_s, "step_ms": statistics.median(ms), "step_ms_all": ms,
            "host_ms": host, "first_s": first_s,
            "tflops": flops[name]["fwd_bwd_gflop_per_img"] * img_s / 1e3, "tail_ms": sum(tail_times.values()), **tail_times,
            "loss": state["loss"].item(), "finite": bool(torch.isfinite(state["loss"]))}


def bench_sample(name: str, batch: int, variant: str, args, device: torch.device, flops: dict) -> dict:
    torch.manual_seed(0)
    model, objective = make_model(name, args.input_size, device).eval(), create_ddpm()
    noise, y = random_batch(batch, args, device)
    net, notes = sample_speed(  # as `ditkit sample --speed`: static FP8 scales from one 25-step run on other noise
        model, sample_levers(variant), device, **compile_options(args),
        calibrate=lambda n: objective.sample(guided_fn(n, {"y": y}, args.cfg_scale), torch.randn_like(noise), steps=25))
    for note in notes:
        say(f"  sampling {variant}: {note}")
    fn = guided_fn(net, {"y": y}, args.cfg_scale)
    stamps = []

    def timed_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        stamps.append(stamp(device))  # consecutive network calls bracket one whole sampler step
        return fn(x, t)

    reset_memory(device)
    row = {"cfg_scale": args.cfg_scale}
    with torch.no_grad():
        row["first_s"] = times_ms(lambda: objective.sample(fn, noise, steps=max(args.warmup, 2)), 1, device, warmup=0)[0] / 1e3
        flow = FlowMatching()  # the same network: flow reads the first C output channels
        for sampler, steps, process in (("ddpm", 250, objective), ("ddim", 50, objective), ("euler", 50, flow), ("heun", 25, flow)):
            stamps.clear()
            x0, nfe = process.sample(timed_fn, noise, sampler=sampler, steps=args.sample_steps)
            ms = intervals_ms(stamps + [stamp(device)], device)
            row[sampler] = {"timed_steps": nfe, "ms_per_step_all": ms, "ms_per_nfe": statistics.median(ms), "steps": steps,
                            "s_per_img": steps * statistics.median(ms) / 1e3 / batch, "finite": bool(torch.isfinite(x0).all())}
        t_mid = torch.full((batch,), 500, device=device)
        row["host_ms_per_nfe"] = host_ms(lambda: fn(noise, t_mid), 3, device)
        if args.profile and device.type == "cuda":
            row["profile"] = profile_kernels(lambda: fn(noise, t_mid), device)
    rows_per_s = 2 * batch / (row["ddpm"]["ms_per_nfe"] * 1e-3)  # guidance doubles the rows
    return {**row, "s_per_img": row["ddpm"]["s_per_img"], "extrapolated": args.sample_steps != 250,
            "tflops": flops[name]["fwd_gflop_per_img"] * rows_per_s / 1e3}


# ----------------------------------------------------------------------------- driver


def run_row(kind: str, name: str, batch: int, variant: str, args, device: torch.device, flops: dict, peak) -> dict:
    """One row; an OOM or any other failure becomes its status and the run goes on."""
    try:
        row = {"status": "ok", **(bench_train if kind == "train" else bench_sample)(name, batch, variant, args, device, flops)}
        row.update(share_of_peak=row["tflops"] / peak if peak else None,
                   peak_mem_gib=row.get("peak_mem_gib", torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None))
    except torch.OutOfMemoryError:
        row = {"status": "OOM"}
    except Exception as err:  # noqa: BLE001 - one broken row must not lose the others
        traceback.print_exc()
        row = {"status": f"error: {type(err).__name__}: {(str(err).splitlines() or [''])[0]}"}
    torch._dynamo.reset()  # outside the except: the traceback no longer holds the row's tensors
    reset_memory(device)
    return row


def fmt(v, spec: str = ".1f") -> str:
    return "—" if v is None else format(v, spec) if isinstance(v, (int, float)) else str(v)


TRAIN_HEAD = "| model | batch | variant | img/s | ms/step | host ms | TFLOP/s | % peak | mem GiB | tail ms | first s | status |"
SAMPLE_HEAD = ("| sampling | batch | variant | DDPM-250 s/img | ms/step | DDIM-50 s/img | DDIM ms/NFE | Euler ms/NFE "
               "| Heun ms/NFE | TFLOP/s | % peak | mem GiB | first s | status |")


def table_row(r: dict) -> str:
    share = r.get("share_of_peak") and 100 * r["share_of_peak"]
    tail = [fmt(r.get("tflops")), fmt(share), fmt(r.get("peak_mem_gib"), ".2f")]
    if r["kind"] == "train":
        cells = [r["model"], r["batch"], r["variant"], fmt(r.get("img_per_s")), fmt(r.get("step_ms")), fmt(r.get("host_ms")),
                 *tail, fmt(r.get("tail_ms"))]
    else:
        d, i = r.get("ddpm", {}), r.get("ddim", {})
        cells = [f"{r['model']} cfg {r.get('cfg_scale', '')}", r["batch"], r["variant"], fmt(r.get("s_per_img"), ".3f"),
                 fmt(d.get("ms_per_nfe")), fmt(i.get("s_per_img"), ".3f"), fmt(i.get("ms_per_nfe")),
                 fmt(r.get("euler", {}).get("ms_per_nfe")), fmt(r.get("heun", {}).get("ms_per_nfe")), *tail]
    return "| " + " | ".join(str(c) for c in [*cells, fmt(r.get("first_s")), r["status"]]) + " |"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add, flag = p.add_argument, lambda name, h: p.add_argument(name, action=argparse.BooleanOptionalAction, default=True, help=h)
    add("--device", default="cuda")
    add("--quick", action="store_true", help="the rows of QUICK_TRAIN and fewer timed steps")
    add("--tiny", action="store_true", help="a 2-block model on 8×8 latents: every code path in seconds")
    add("--parts", default="peak,sdpa,train,sample", help="comma list of peak, gemm, sdpa, train, sample")
    add("--models", help="default DiT-XL/2,DiT-B/2; any of --models/--batches/--variants: their product is run")
    add("--batches", help="per-GPU batch sizes, default 32,128")
    add("--variants", "--train-speed", dest="variants", help=f"training: a recipe or fp32/bf16+levers, e.g. "
        f"{', '.join(VARIANTS)}; default fp32,bf16,bf16+compile")
    add("--sample-variants", "--sample-speed", dest="sample_variants", default="fp32,bf16,bf16+compile",
        help="sampling: a recipe or fp32/bf16+levers; '' for none")
    add("--sample-model", default="DiT-XL/2")
    add("--sample-batch", type=int, default=32, help="images per batch (guidance runs twice the rows)")
    add("--sample-steps", type=int, help="sampler steps run and timed (default 10 quick, 25 full; 250: exact)")
    add("--cfg-scale", type=float, default=4.0)
    add("--steps", type=int, help="timed training steps (default 10 quick, 20 full)")
    add("--warmup", type=int, default=3, help="untimed steps first; compilation happens in the first")
    flag("--fused-adamw", "off: foreach AdamW (the official train.py's)")
    flag("--foreach-ema", "ditkit's one foreach lerp; off: the official per-parameter loop")
    flag("--tf32", "torch.backends.cuda.matmul/cudnn.allow_tf32 (the official train.py sets both)")
    flag("--compile", "off: skip the +compile rows")
    add("--sdpa", choices=SDPA_CHOICES, default="auto", help="SDPA kernel preference in train and sample rows "
        "(ditkit.fast.sdpa; auto, PyTorch's order, is ditkit's default)")
    add("--profile", action="store_true", help="also profile 3 steps of each row: CUDA time by kernel class and the top kernels")
    add("--compile-backend", default="inductor", help="'eager': dynamo tracing only (quick CPU checks)")
    add("--max-minutes", type=float, default=9.0, help="rows that would start later are skipped")
    add("--out", default=os.path.join(os.environ["OUT"], "bench.json") if os.environ.get("OUT") else None)
    args = p.parse_args(argv)
    args.matmul_n, args.input_size = (256, 8) if args.tiny else (8192, 32)  # 32×32 latents: 256 px images
    if args.tiny:
        args.sample_model, args.sample_batch, args.warmup = "tiny", 2, min(args.warmup, 2)
        args.models, args.batches, args.steps, args.sample_steps = args.models or "tiny", args.batches or "2,4", args.steps or 3, args.sample_steps or 3
    args.steps = args.steps or (10 if args.quick else 20)
    args.sample_steps = args.sample_steps or (10 if args.quick else 25)
    if not (parts := set(args.parts.split(","))) <= {"peak", "gemm", "sdpa", "train", "sample"}:
        raise ValueError(f"--parts takes peak, gemm, sdpa, train, sample; got {args.parts!r}")
    args.parts = parts
    if args.quick and not (args.models or args.batches or args.variants):
        train = QUICK_TRAIN
    else:
        train = [(m, int(b), v) for v in (args.variants or "fp32,bf16,bf16+compile").split(",")
                 for m in (args.models or "DiT-XL/2,DiT-B/2").split(",") for b in (args.batches or "32,128").split(",")]
    args.rows = [("train", *r) for r in train if "train" in parts]
    args.rows += [("sample", args.sample_model, args.sample_batch, v) for v in args.sample_variants.split(",") if v and "sample" in parts]
    for kind, _, _, variant in args.rows:
        base, extra = variant.split("+")[0], levers(variant)
        if variant in TRAIN_RECIPES and kind == "train" or variant in SAMPLE_RECIPES and kind == "sample":
            continue
        if base not in ("fp32", "bf16") or any(kind not in LEVERS.get(lever, ((),))[0] for lever in extra):
            raise ValueError(f"unknown {kind} variant {variant!r}: reference, fast, fastest, or fp32/bf16 then any of "
                             + ", ".join(f"+{k} ({'/'.join(v[0])})" for k, v in LEVERS.items()) + "; e.g. " + ", ".join(VARIANTS))
        if kind == "train":  # levers that cannot work together are refused here, not in the middle of the run
            speed, amp_dtype = train_levers(variant)
            try:
                train_speed(speed, TrainRun(torch.device(args.device), amp_dtype))
            except ValueError as err:
                raise ValueError(f"train variant {variant!r}: {err}") from None
    # Eager rows first: if the time budget runs out, the long compilations are what is skipped.
    args.rows = sorted((r for r in args.rows if args.compile or not compiled(r[3])), key=lambda r: compiled(r[3]))
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible (use --device cpu --tiny to test on the CPU)")
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = args.tf32
    t_start = time.perf_counter()
    flags = {k: getattr(args, k) for k in ("fused_adamw", "foreach_ema", "tf32", "sdpa", "compile_backend",
                                           "steps", "warmup", "sample_steps", "input_size")}
    res = {"meta": {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "torch": torch.__version__,
                    "cuda": torch.version.cuda, "argv": sys.argv[1:] if argv is None else list(argv), "flags": flags,
                    "quoted_xl2_gflop": QUOTED_XL2_GFLOP}, "peak": {}, "flops": {}, "gemm": [], "sdpa": [], "train": [], "sample": []}

    def save() -> None:
        if args.out:
            os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
            with open(args.out, "w") as f:
                json.dump(res, f, indent=1)

    say(f"# {res['meta']['device']}, torch {torch.__version__}, CUDA {torch.version.cuda}, {flags}")
    if "peak" in args.parts:
        res["peak"] = {"n": args.matmul_n, **{f"{k}_tflops": matmul_peak(args.matmul_n, d, device)
                                              for k, d in (("bf16", torch.bfloat16), ("fp32", torch.float32))}}
        say(f"peak {args.matmul_n}³ matmul: bf16 {res['peak']['bf16_tflops']:.1f} TFLOP/s, "
            f"fp32 (tf32 {args.tf32}) {res['peak']['fp32_tflops']:.1f} TFLOP/s")
    shapes = {}
    for name in sorted({r[1] for r in args.rows}):
        model = make_model(name, args.input_size, device).train()
        shapes[name] = (model.num_heads, model.blocks[0].attn.qkv.in_features // model.num_heads, len(model.pos_embed[0]))
        res["flops"][name] = f = count_flops(model, args, device)
        del model
        quoted = (f" (quoted: {QUOTED_XL2_GFLOP:.0f}; ratio {f['fwd_bwd_gflop_per_img'] / QUOTED_XL2_GFLOP:.3f})"
                  if name == "DiT-XL/2" else "")
        say(f"flops {name}: fwd {f['fwd_gflop_per_img']:.1f} GFLOP/img, fwd+bwd {f['fwd_bwd_gflop_per_img']:.1f} GFLOP/img{quoted}")
    for name in sorted({r[1] for r in args.rows}) if "gemm" in args.parts and device.type == "cuda" else []:
        model = make_model(name, args.input_size, device)
        batch = max(r[2] for r in args.rows if r[1] == name)
        res["gemm"] += [{"model": name, "batch": batch, **r} for r in gemm_check(model, batch, device)]
        del model
        rows = [r for r in res["gemm"] if r["model"] == name]
        total = {k: sum(r[k] for r in rows) for k in ("bf16_ms", "fp8_ms")}
        say(f"gemm {name} batch {batch}, one block's 12 products: bf16 {total['bf16_ms']:.3f} ms, fp8 {total['fp8_ms']:.3f} ms "
            f"(×{total['bf16_ms'] / total['fp8_ms']:.2f}); " + ", ".join(
                f"{r['layer']} {r['op']} {r['bf16_tflops']:.0f}/{r['fp8_tflops']:.0f}" for r in rows) + " TFLOP/s bf16/fp8")
    use_sdpa_backend("auto")  # the sdpa part reports PyTorch's own choice, then forces each kernel
    for name, (heads, head_dim, tokens) in shapes.items() if "sdpa" in args.parts else []:
        for dtype in (torch.bfloat16, torch.float32):
            row = {"model": name, **sdpa_check(heads, head_dim, tokens, args.sample_batch, dtype, device)}
            res["sdpa"].append(row)
            say(f"sdpa {name} head dim {head_dim} {row['dtype']}: default {row['default_ops']}; fwd+bwd ms "
                + ", ".join(f"{b} {fmt(row[b], '.3f')}" for b in BACKENDS))
    reset_memory(device)
    save()
    use_sdpa_backend(args.sdpa)
    for kind, name, batch, variant in args.rows:
        row = {"kind": kind, "model": name, "batch": batch, "variant": variant}
        if time.perf_counter() - t_start > 60 * args.max_minutes:
            row["status"] = "skipped (time budget)"
        else:
            row.update(run_row(kind, name, batch, variant, args, device, res["flops"], res["peak"].get("bf16_tflops")))
        res[kind].append(row)
        say(table_row(row))
        if row.get("profile"):
            say(format_profile(row["profile"]))
        save()
    res["meta"]["wall_s"] = time.perf_counter() - t_start
    save()
    say("\n" + "\n".join([TRAIN_HEAD, "|---" * 12 + "|", *map(table_row, res["train"])]))
    say("\n" + "\n".join([SAMPLE_HEAD, "|---" * 14 + "|", *map(table_row, res["sample"])]))
    if res["sample"]:
        say(f"(sampling: {args.sample_steps} steps timed per sampler, EXTRAPOLATED to 250 DDPM / 50 DDIM steps; "
            "Euler/Heun: flow matching's samplers on the same network; 2 × batch rows per call)")
    say(f"total wall time {res['meta']['wall_s']:.0f} s" + (f"; JSON in {args.out}" if args.out else ""))
    return res


if __name__ == "__main__":
    main()
