"""One DiT-XL block's training step (forward + backward, bf16 autocast, bf16 residual), compiled,
in FP8 training variants: which kernels the row-wise quantization costs and what helps.

    PYTHONPATH=src python benchmarks/fp8_block.py [--batch 128] [--variants bf16,fp8,...]

Prints the median ms per block (× depth ≈ the blocks' share of a step) and each variant's five
most expensive kernels.
"""
from __future__ import annotations

import argparse
import contextlib

import torch
from torch import nn

import ditkit.models.fp8_training as fp8t
from ditkit.models.dit import DiTBlock

VARIANTS = {  # name: (fp8, layers whose ∂x stays bf16, bias gradient by a GEMV, inductor persistent reductions)
    "bf16": (False, (), False, True),
    "bf16 looped-reductions": (False, (), False, False),
    "fp8": (True, (), False, True),
    "fp8 gb-mm": (True, (), True, True),
    "fp8 fc1-dgrad-bf16": (True, ("mlp.fc1",), False, True),
    "fp8 gb-mm fc1-dgrad-bf16": (True, ("mlp.fc1",), True, True),
    "fp8 looped-reductions": (True, (), False, False),
    "fp8 gb-mm looped-reductions": (True, (), True, False),
}


def median_ms(fn, n: int) -> float:
    times = []
    for _ in range(n):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return sorted(times)[n // 2]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--hidden", type=int, default=1152)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--variants", default=",".join(VARIANTS))
    args = p.parse_args()
    import torch._inductor.config as inductor_config
    dev = torch.device("cuda")
    print("| variant | ms per block | × 28 blocks | top kernels (GPU-ms per block) |\n|---|---|---|---|")
    for name in args.variants.split(","):
        fp8, bf16_dgrad, gb_mm, persistent = VARIANTS[name]
        torch.manual_seed(0)
        torch._dynamo.reset()
        blk = DiTBlock(args.hidden, args.heads).to(dev)
        for m in blk.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)
        if fp8:
            fp8t.convert_for_fp8_training(blk)
            for n, m in blk.named_modules():
                if n in bf16_dgrad:
                    m.fp8_dgrad = False
        fp8t.BIAS_GRAD_MM = gb_mm
        inductor_config.triton.persistent_reductions = persistent
        x = torch.randn(args.batch, args.tokens, args.hidden, device=dev, dtype=torch.bfloat16, requires_grad=True)
        c = torch.randn(args.batch, args.hidden, device=dev)
        gout = torch.randn_like(x)
        net = torch.compile(blk)

        def step():
            with torch.autocast("cuda", dtype=torch.bfloat16):
                out = net(x, c)
            out.backward(gout)

        for _ in range(3):
            step()
        ms = median_ms(step, 20)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                step()
            torch.cuda.synchronize()
        kernels = sorted(((e.device_time_total / 3e3, e.key) for e in prof.key_averages()), reverse=True)[:6]
        top = "; ".join(f"{t:.2f} {k[:70]}" for t, k in kernels)
        print(f"| {name} | {ms:.3f} | {28 * ms:.1f} | {top} |", flush=True)
    inductor_config.triton.persistent_reductions = True
    fp8t.BIAS_GRAD_MM = False


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
