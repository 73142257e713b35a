"""adaLN's fused norm kernels (``ditkit.kernels.norm``) on a GPU: accuracy against their
equations in float32, and time against the same ops compiled by inductor.

    PYTHONPATH=src python benchmarks/fused_norm_check.py [--sweep]

For DiT-XL's and DiT-B's shapes, bf16 operands (the bf16 residual stream): each output's relative
L2 error against ``forward_reference`` / ``backward_reference`` (float32 math, one rounding), and
the GPU time (profiler: the kernels' own time, as under CUDA graphs; Python's launch cost left out)
of the forward and the backward with the bandwidth they reach, next to the same computation
(x + α o, LayerNorm, modulation; forward, and backward with ∂β, ∂γ, ∂α) as torch.compile makes it.  Exits 1 if an error exceeds bf16's rounding (4e-3).
"""
from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from bench import median_ms, profile_kernels, rel_err  # benchmarks/, on the path when run as a script

from ditkit.kernels import norm as norm_kernels
from ditkit.models.dit import modulate

EPS = 1e-6
SHAPES = {"XL b128": (128, 256, 1152), "XL b32": (32, 256, 1152), "B b128": (128, 256, 768)}


def case(n: int, tokens: int, width: int, residual: bool, device: torch.device) -> tuple[tuple, tuple]:
    """bf16 operands at one shape: the forward's arguments, and the backward's (at the reference forward)."""
    torch.manual_seed(0)
    x = torch.randn(n, tokens, width, device=device).to(torch.bfloat16)
    o = torch.randn_like(x) if residual else None
    cond = (torch.randn(n, 6 * width, device=device) * 0.3).to(torch.bfloat16).chunk(6, dim=1)  # views, as in a block
    gate, shift, scale = (cond[2] if residual else None), cond[3], cond[4]
    bias = (torch.randn(width, device=device) * 0.1) if residual else None  # o's bias, float32 (autocast's parameter)
    args = (x, o, gate, bias, shift, scale, EPS, torch.bfloat16)
    stream, _, mean, rstd = norm_kernels.forward_reference(*args)
    bwd = (torch.randn_like(x), torch.randn_like(x) if residual else None, stream if residual else x, o, gate, scale, mean, rstd)
    return args, bwd


def plain(x, o, gate, bias, shift, scale):
    """The block's ops as DiTBlock writes them (under bf16 autocast, with a bf16 stream; the bias inside o)."""
    if o is not None:
        x = x + gate.unsqueeze(1) * (o + bias).to(torch.bfloat16)
    return x, modulate(F.layer_norm(x, x.shape[-1:], eps=EPS), shift, scale).to(torch.bfloat16)


def gpu_ms(fn, device: torch.device) -> float:
    for _ in range(3):  # compilation, autotuning
        fn()
    return profile_kernels(fn, device, calls=20)["gpu_ms"]


def graph_ms(fn, device: torch.device) -> float:
    """Median ms of fn replayed as a CUDA graph: the GPU's time without Python's launch cost."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return median_ms(graph.replay, 30, device, warmup=3)


def sweep(device: torch.device) -> None:
    """Every launch configuration of both kernels at each shape, the fastest first (to choose
    ``forward_config`` and ``backward_config``)."""
    for label, (n, tokens, width) in SHAPES.items():
        for residual in (True, False):
            args, bwd = case(n, tokens, width, residual, device)
            bwd = (*bwd, (torch.bfloat16, torch.bfloat16))
            fwd_times = sorted((graph_ms(lambda: norm_kernels.forward_triton(*args, config=(r, w)), device), (r, w))
                               for r in (1, 2, 4, 8) for w in (2, 4, 8, 16) if r * width <= 16384)
            bwd_times = sorted((graph_ms(lambda: norm_kernels.backward_triton(*bwd, config=(r, w, c)), device), (r, w, c))
                               for r in (1, 2, 4) for w in (2, 4, 8) for c in (16, 32, 64, 128)
                               if c % r == 0 and r * width <= 8192)
            default_f = graph_ms(lambda: norm_kernels.forward_triton(*args), device)
            default_b = graph_ms(lambda: norm_kernels.backward_triton(*bwd), device)
            print(f"{label} residual={residual}: forward default {default_f:.3f} ms, best "
                  + ", ".join(f"{t:.3f} {c}" for t, c in fwd_times[:4])
                  + f"; backward default {default_b:.3f} ms, best " + ", ".join(f"{t:.3f} {c}" for t, c in bwd_times[:4]),
                  flush=True)


def main() -> int:
    dev = torch.device("cuda")
    if "--sweep" in sys.argv:
        sweep(dev)
        return 0
    worst = 0.0
    print("| shape | residual | max rel. error (outputs, gradients) | fwd ms | fwd GB/s | bwd ms | bwd GB/s "
          "| compiled fwd ms | compiled fwd+bwd ms | kernels fwd+bwd ms |\n|---|---|---|---|---|---|---|---|---|---|")
    for label, (n, tokens, width) in SHAPES.items():
        for residual in (True, False):
            args, bwd = case(n, tokens, width, residual, dev)
            x, o, gate, bias, shift, scale = args[:6]
            gh, g_next = bwd[:2]
            ref, got = norm_kernels.forward_reference(*args), norm_kernels.forward_triton(*args)
            ref_b = norm_kernels.backward_reference(*bwd)
            got_b = norm_kernels.backward_triton(*bwd, (torch.bfloat16, torch.bfloat16))
            errs = [rel_err(b, a) for a, b in zip(ref + ref_b, got + got_b) if a is not None]
            worst = max(worst, *errs)
            fwd_ms = gpu_ms(lambda: norm_kernels.forward_triton(*args), dev)
            bwd_ms = gpu_ms(lambda: norm_kernels.backward_triton(*bwd, (torch.bfloat16, torch.bfloat16)), dev)
            pass_bytes = x.numel() * x.element_size()
            fwd_gbs = (4 if residual else 2) * pass_bytes / fwd_ms / 1e6
            bwd_gbs = (6 if residual else 3) * pass_bytes / bwd_ms / 1e6

            leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (x, o, gate, bias, shift, scale)]
            torch._dynamo.reset()
            compiled = torch.compile(plain)

            def plain_fwd():
                with torch.no_grad():
                    compiled(*leaves)

            def plain_step():  # gradients returned, not accumulated into .grad (the kernels do not accumulate either)
                s, h = compiled(*leaves)
                outs, grads = ((s, h), (g_next, gh)) if residual else ((h,), (gh,))
                torch.autograd.grad(outs, [t for t in leaves if t is not None], grads)

            c_fwd, c_step = gpu_ms(plain_fwd, dev), gpu_ms(plain_step, dev)
            print(f"| {label} | {residual} | {max(errs):.1e} | {fwd_ms:.3f} | {fwd_gbs:,.0f} | {bwd_ms:.3f} | {bwd_gbs:,.0f} "
                  f"| {c_fwd:.3f} | {c_step:.3f} | {fwd_ms + bwd_ms:.3f} |", flush=True)
    ok = worst < 4e-3
    print(f"\nworst relative error {worst:.2e}: {'within' if ok else 'BEYOND'} bf16 rounding (4e-3)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
