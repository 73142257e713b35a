"""ditkit's Triton attention (``ditkit.models.attention_kernels``) against cuDNN's at DiT training shapes: forward,
backward, and the backward with ∂q, ∂k, ∂v stacked into ∂qkv (what the fused attention needs; the Triton backward
writes ∂qkv itself).  Each row is checked first against the float32 equations (relative error), then timed; a
sweep of the kernels' launch settings (block sizes, warps, stages) picks the defaults.

    PYTHONPATH=src:benchmarks python benchmarks/attention_kernels.py [--shapes xl128,xl32,b128] [--quick]

CUDA-event medians of 30 calls.  TFLOP/s count the arithmetic at the true head size (forward 4·N·H·T²·Dh, backward
2.5 times that), not the padded one.
"""
from __future__ import annotations

import argparse
import itertools

import torch

from bench import median_ms, rel_err
from ditkit.models import attention_kernels as ak
from ditkit.models import qkv_kernels

SHAPES = {"xl128": (128, 16, 256, 72), "xl32": (32, 16, 256, 72), "b128": (128, 12, 256, 64), "xl128d64": (128, 16, 256, 64), "xl128d128": (128, 16, 256, 128)}
FORWARD_SWEEP = [(128, 64, 8, 2), (128, 128, 8, 2), (64, 64, 4, 2), (64, 128, 4, 2), (128, 64, 4, 2), (128, 128, 8, 3),
                 (128, 64, 8, 3), (64, 128, 4, 3)]
BACKWARD_SWEEP = [(m, n, w, s) for m, n, w, s in itertools.product((32, 64), (64, 128), (4, 8), (1, 2))]


def cudnn(qkv, n, heads, g):
    q, k, v = ak._heads(qkv, n, heads)
    tokens, dh = q.shape[2], q.shape[3]
    go = g.view(n, tokens, heads, dh).transpose(1, 2)

    def fwd():
        return torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, False, False)

    out, lse, _, _, _, _, seed, offset, _ = fwd()

    def bwd():
        return torch.ops.aten._scaled_dot_product_cudnn_attention_backward(
            go, q, k, v, out, lse, seed, offset, None, None, None, tokens, tokens, 0.0, False)

    def bwd_stacked():
        return qkv_kernels.stack_partial(*bwd())

    return fwd, bwd, bwd_stacked, out.transpose(1, 2).reshape(g.shape), bwd_stacked()[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="xl128,xl32,b128")
    ap.add_argument("--quick", action="store_true", help="the defaults only, no sweep")
    args = ap.parse_args()
    dev = torch.device("cuda")
    defaults = ak.FORWARD, ak.BACKWARD
    print(torch.cuda.get_device_name(), "torch", torch.__version__)
    print("| shape (N, H, T, Dh) | kernel | launch (BLOCK_M, BLOCK_N, warps, stages) | ms | TFLOP/s | rel err vs float32 |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name in args.shapes.split(","):
        n, heads, tokens, dh = SHAPES[name]
        torch.manual_seed(0)
        qkv = torch.randn(n * tokens, 3 * heads * dh, device=dev, dtype=torch.bfloat16)
        g = torch.randn(n * tokens, heads * dh, device=dev, dtype=torch.bfloat16)
        flop = 4 * n * heads * tokens * tokens * dh
        ref_o, _ = ak.attention_reference(qkv[: 4 * tokens].float(), 4, heads)  # the first 4 samples, in float32
        ref_d = ak.attention_backward_reference(g[: 4 * tokens].float(), qkv[: 4 * tokens].float(), 4, heads)
        rows = 4 * tokens
        shape = f"({n}, {heads}, {tokens}, {dh})"

        def report(kernel, launch, fn, work, got, ref):
            ms = median_ms(fn, 30, dev)
            err = rel_err(got[:rows].float(), ref) if got is not None else float("nan")
            print(f"| {shape} | {kernel} | {launch} | {ms:.3f} | {work / ms / 1e9:.0f} | {err:.1e} |", flush=True)
            return ms

        c_fwd, c_bwd, c_stacked, c_o, c_d = cudnn(qkv, n, heads, g)
        report("cuDNN forward", "", c_fwd, flop, c_o, ref_o)
        report("cuDNN backward (∂q, ∂k, ∂v)", "", c_bwd, 2.5 * flop, None, ref_d)
        report("cuDNN backward + stacking into ∂qkv", "", c_stacked, 2.5 * flop, c_d, ref_d)
        for launch in [ak.FORWARD] + ([] if args.quick else [c for c in FORWARD_SWEEP if c != ak.FORWARD]):
            ak.FORWARD = launch
            try:
                o, lse = ak.attention_forward(qkv, n, heads)
                report("Triton forward", launch, lambda: ak.attention_forward(qkv, n, heads), flop, o, ref_o)
            except Exception as e:  # a launch the GPU cannot hold (shared memory, registers)
                print(f"| {shape} | Triton forward | {launch} | refused: {str(e).splitlines()[0][:80]} | | |", flush=True)
        ak.FORWARD = defaults[0]
        o, lse = ak.attention_forward(qkv, n, heads)
        for launch in [ak.BACKWARD] + ([] if args.quick else [c for c in BACKWARD_SWEEP if c != ak.BACKWARD]):
            ak.BACKWARD = launch
            try:
                d = ak.attention_backward(g, qkv, o, lse, n, heads)
                report("Triton backward (∂qkv)", launch, lambda: ak.attention_backward(g, qkv, o, lse, n, heads),
                       2.5 * flop, d, ref_d)
            except Exception as e:
                print(f"| {shape} | Triton backward | {launch} | refused: {str(e).splitlines()[0][:80]} | | |", flush=True)
        ak.BACKWARD = defaults[1]


if __name__ == "__main__":
    main()
