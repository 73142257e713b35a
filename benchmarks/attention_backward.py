"""Attention's backward at DiT-XL/2's training shapes (head size 72, 256 tokens) through each of PyTorch's kernels:
cuDNN's (what the fused attention calls), FlashAttention-2's (SDPA's flash backend) and the memory-efficient one,
each after its own forward, and FlashAttention-2's backward after cuDNN's forward (its log-sum-exp reused).  Asks
whether another backward than cuDNN's (which pads head size 72 to 128 and runs two helper kernels) is faster.

    PYTHONPATH=src:benchmarks python benchmarks/attention_backward.py [--batches 32,128]

CUDA-event medians of 20 calls; ∂q, ∂k, ∂v checked against cuDNN's (relative error) and their strides printed (the
∂qkv stacking kernel takes cuDNN's (N, T, H, Dh) layout).
"""
from __future__ import annotations

import argparse

import torch
from bench import median_ms, rel_err

HEADS, TOKENS, DH = 16, 256, 72
aten = torch.ops.aten


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", default="32,128")
    args = ap.parse_args()
    dev = torch.device("cuda")
    print(torch.cuda.get_device_name(), "torch", torch.__version__)
    print("| backend | batch | forward ms | backward ms | backward TFLOP/s | ∂q, ∂k, ∂v rel err vs cuDNN | ∂q strides |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for n in (int(b) for b in args.batches.split(",")):
        qkv = torch.randn(n * TOKENS, 3 * HEADS * DH, device=dev, dtype=torch.bfloat16)
        q, k, v = qkv.view(n, TOKENS, 3, HEADS, DH).permute(2, 0, 3, 1, 4).unbind(0)
        g = torch.randn(n, TOKENS, HEADS, DH, device=dev, dtype=torch.bfloat16).transpose(1, 2)
        flop = 2.5 * 4 * n * HEADS * TOKENS * TOKENS * DH  # backward: five products of the forward's two

        def cudnn_fwd():
            return aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, False, False)

        out, lse, _, _, _, _, seed, offset, _ = cudnn_fwd()

        def cudnn_bwd():
            return aten._scaled_dot_product_cudnn_attention_backward(g, q, k, v, out, lse, seed, offset, None, None, None,
                                                                     TOKENS, TOKENS, 0.0, False)

        ref = cudnn_bwd()
        rows = {"cuDNN": (cudnn_fwd, cudnn_bwd)}

        def flash_fwd():
            return aten._scaled_dot_product_flash_attention(q, k, v, 0.0, False, False)

        def flash_bwd_of(o, l, fo):
            return lambda: aten._scaled_dot_product_flash_attention_backward(g, q, k, v, o, l, fo[2], fo[3], TOKENS, TOKENS,
                                                                              0.0, False, fo[6], fo[7])

        def eff_fwd():
            return aten._scaled_dot_product_efficient_attention(q, k, v, None, True, 0.0, False)

        try:
            fo = flash_fwd()
            rows["flash"] = (flash_fwd, flash_bwd_of(fo[0], fo[1], fo))
            rows["cuDNN forward + flash backward"] = (cudnn_fwd, flash_bwd_of(out, lse.view(n, HEADS, TOKENS), fo))
        except RuntimeError as e:
            print(f"| flash | {n} | refused: {str(e).splitlines()[0]} | | | | |")
        try:
            eo = eff_fwd()
            rows["efficient"] = (eff_fwd, lambda: aten._scaled_dot_product_efficient_attention_backward(
                g, q, k, v, None, eo[0], eo[1], eo[2], eo[3], 0.0, [True, True, True, False], False))
        except RuntimeError as e:
            print(f"| efficient | {n} | refused: {str(e).splitlines()[0]} | | | | |")
        for name, (fwd, bwd) in rows.items():
            try:
                grads = bwd()[:3]
                f_ms, b_ms = median_ms(fwd, 20, dev), median_ms(bwd, 20, dev)
            except RuntimeError as e:
                print(f"| {name} | {n} | refused: {str(e).splitlines()[0]} | | | | |", flush=True)
                continue
            err = max(rel_err(a, b) for a, b in zip(grads, ref[:3]))
            print(f"| {name} | {n} | {f_ms:.3f} | {b_ms:.3f} | {flop / b_ms / 1e9:.0f} | {err:.1e} | {tuple(grads[0].stride())} |",
                  flush=True)


if __name__ == "__main__":
    main()
