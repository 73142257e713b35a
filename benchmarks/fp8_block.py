"""One DiT-XL block's training step (forward + backward, bf16 autocast, bf16 residual), compiled,
in variants: FP8 training (which kernels the row-wise quantization costs), the MLP with GELU in the
products' epilogues (``ditkit.models.fused_mlp``), adaLN's norm as Triton kernels (``ditkit.models.fused_norm``).

    PYTHONPATH=src python benchmarks/fp8_block.py [--batch 128] [--variants bf16,fp8,...]

Prints the median ms per block (× depth ≈ the blocks' share of a step) and each variant's five
most expensive kernels.
"""
from __future__ import annotations

import argparse
import contextlib

import torch
from torch import nn
from torch._inductor.utils import run_and_get_code

from bench import median_ms  # benchmarks/, on the path when run as a script
import ditkit.models.fp8_training as fp8t
from ditkit.models.dit import DiTBlock
from ditkit.models.fused_mlp import convert_to_fused_mlp
from ditkit.models.fused_norm import convert_to_fused_norm

ALL = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")
VARIANTS = {  # name: (fp8, the layers whose ∂y is quantized by fp8_kernels' opaque operator, fused MLP, fused norm)
    "bf16": (False, (), False, False),
    "fp8 traced": (True, (), False, False),  # every quantization traced, fused by compile
    "fp8": (True, fp8t.GRAD_OP, False, False),  # ditkit's choice
    "fp8 grad-op all": (True, ALL, False, False),
    "bf16 mlp": (False, (), True, False),  # GELU in the MLP products' epilogues (train.fused_mlp)
    "bf16 norm": (False, (), False, True),  # adaLN's norm, modulation and residual as Triton kernels (train.fused_norm)
    "bf16 mlp norm": (False, (), True, True),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--hidden", type=int, default=1152)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--check-only", action="store_true", help="only the kernel's bit-identity check")
    p.add_argument("--kernels", default="", help="for these variants, print every kernel's GPU-ms per block")
    p.add_argument("--dump", help="write the generated kernels whose name contains this to DUMP_TO.VARIANT.py")
    p.add_argument("--dump-to", default="kernels")
    args = p.parse_args()
    dev = torch.device("cuda")
    from ditkit.models.fp8 import quantize_rows
    from ditkit.models.fp8_kernels import quantize_rows_op
    for k in (1152, 4608, 1000):  # the Triton kernel against the traced quantization, bit for bit
        t = torch.randn(4096, k, device=dev, dtype=torch.bfloat16) * torch.logspace(-8, 4, 4096, device=dev)[:, None]
        t[7, 3], t[9, 0], t[11] = float("nan"), float("inf"), 0  # a NaN, an inf, a zero row
        (q, s), (q_ref, s_ref) = quantize_rows_op(t), quantize_rows(t)
        qf, qf_ref = q.float(), q_ref.float()  # exact: every e4m3 value is a float32
        same = all(torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num())
                   for a, b in ((qf, qf_ref), (s, s_ref)))  # NaN where the traced form has NaN (bit patterns may differ)
        nan_rows = qf.isnan().any(1).nonzero().flatten().tolist()
        print(f"quantize_rows_op K={k}: {'identical' if same else 'DIFFERS'} to the traced quantization "
              f"(rows with NaN: {nan_rows}, expected [7, 9])")
    if args.check_only:
        return
    listing = []
    print("| variant | ms per block | × 28 blocks | persistent / looped reductions | top kernels (GPU-ms per block) |\n|---|---|---|---|---|")
    for name in args.variants.split(","):
        fp8, grad_op, fused_mlp, fused_norm = VARIANTS[name]
        torch.manual_seed(0)
        torch._dynamo.reset()
        blk = DiTBlock(args.hidden, args.heads).to(dev)
        for m in blk.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)
        if fp8:
            fp8t.convert_for_fp8_training(blk)
            for n, m in blk.named_modules():
                if isinstance(m, fp8t.Float8TrainingLinear):
                    m.grad_op = n in grad_op
        if fused_mlp:
            convert_to_fused_mlp(blk)
        if fused_norm:
            blk = nn.ModuleDict({"block": blk})
            convert_to_fused_norm(blk)  # a lone block is converted through a parent
            blk = blk["block"]
        x = torch.randn(args.batch, args.tokens, args.hidden, device=dev, dtype=torch.bfloat16, requires_grad=True)
        c = torch.randn(args.batch, args.hidden, device=dev)
        gout = torch.randn_like(x)
        net = torch.compile(blk)

        def step():
            with torch.autocast("cuda", dtype=torch.bfloat16):
                out = net(x, c)
            out.backward(gout)

        _, codes = run_and_get_code(step)  # the first (compiling) step
        reductions = {kind: sum(c.count(f"@triton_heuristics.{kind}(") for c in codes) for kind in ("persistent_reduction", "reduction")}
        if args.dump:
            with open(f"{args.dump_to}.{name.replace(' ', '_')}.py", "w") as f:
                for code in codes:
                    for part in code.split("\n\n\n"):
                        if "def triton" in part and args.dump in part:
                            f.write(part + "\n\n\n")
        for _ in range(3):
            step()
        ms = median_ms(step, 20, dev, warmup=0)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                step()
            torch.cuda.synchronize()
        kernels = sorted(((e.device_time_total / 3e3, e.key) for e in prof.key_averages()), reverse=True)
        top = "; ".join(f"{t:.2f} {k[:70]}" for t, k in kernels[:6])
        print(f"| {name} | {ms:.3f} | {28 * ms:.1f} | {reductions['persistent_reduction']} / {reductions['reduction']} | {top} |", flush=True)
        if name in args.kernels.split(","):
            listing.append(f"\n{name}: every kernel, GPU-ms per block\n" + "\n".join(f"  {t:6.3f}  {k[:120]}" for t, k in kernels))
    print("\n".join(listing))


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
