"""What FP8 would save in the training step's backward products, measured before building it: the ∂x products
whose gradient a norm kernel writes (fc2's, with GELU's derivative in the epilogue, and proj's), at DiT-XL/2's
shapes, bf16 against cuBLASLt FP8 (e4m3 operands; per-tensor scales, or per row of ∂y and of Wᵀ); and the qkv backward as one product over
the stacked ∂qkv against three over ∂q, ∂k, ∂v (what dropping the stacking kernel would cost the products).
Then what ``ditkit.fast.fp8_backward`` runs for fc1's ∂x and ∂b₁ against the bf16 sum and product it replaces,
and for qkv's ∂x and ∂b (``qkv_kernels.stack_rows_fp8`` and the FP8 product) against the stacking kernel and bf16
product (W's quantization compiled, as in the step; the FP8 columns of these two sections are back-to-back eager
calls, so at 8,192 tokens they time the host's launches, not the GPU: read them at 32,768).

    PYTHONPATH=src:benchmarks python benchmarks/fp8_backward_products.py [--tokens 8192,32768]

Each FP8 result is checked against the float32 product of the dequantized operands.  CUDA-event medians of 20
calls.
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from bench import median_ms, rel_err
from fp8_lt_products import quantize

from ditkit.fast import fp8_backward
from ditkit.kernels import cublaslt, fp8_rows
from ditkit.kernels import qkv as qkv_kernels

D, HIDDEN, HEADS, TOKENS = 1152, 4608, 16, 256


def cudnn_layout_grads(m: int, dev: torch.device) -> list[torch.Tensor]:
    """∂q, ∂k, ∂v for ``m`` tokens at XL's shapes, bf16 (N, H, T, Dh) in cuDNN's (N, T, H, Dh) memory, token rows of
    different sizes."""
    return [(torch.randn(m // TOKENS, TOKENS, HEADS, D // HEADS, device=dev)
             * torch.rand(m // TOKENS, TOKENS, 1, 1, device=dev)).to(torch.bfloat16).transpose(1, 2) for _ in range(3)]


def fp8_dx(gq: torch.Tensor, sg: torch.Tensor, wtq: torch.Tensor, sw: torch.Tensor, pre: torch.Tensor | None,
           mode: int = cublaslt.SCALAR):
    """∂x = (sg gq)(sw wtq)ᵀ for gq (M, K) and wtq = Wᵀ (N, K) in e4m3, with GELU's derivative at pre (M, N) in the
    epilogue where given; bf16 (M, N).  ``OUTER_VEC``: sg per row of g, sw per row of Wᵀ."""
    (m, k), n = gq.shape, wtq.shape[0]
    epilogue = cublaslt.DGELU if pre is not None else cublaslt.DEFAULT
    return cublaslt._matmul(epilogue, cublaslt._OP_T, cublaslt._OP_N, wtq, gq, n, m, k, aux=pre,
                            scales=(sw, sg, mode), out_dtype=torch.bfloat16)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", default="8192,32768")
    args = ap.parse_args()
    dev, bf = torch.device("cuda"), torch.bfloat16
    quantize_weight = torch.compile(fp8_backward.quantize_weight_columns)  # as in the compiled step: two kernels
    print(torch.cuda.get_device_name(), "torch", torch.__version__)
    print("| product | tokens | mode | bf16 ms (TFLOP/s) | FP8 ms (TFLOP/s) | speed-up | FP8 rel err |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for m in (int(t) for t in args.tokens.split(",")):
        for name, (k, n) in {"fc2 ∂x (DGELU)": (D, HIDDEN), "proj ∂x": (D, D), "fc1 ∂x": (HIDDEN, D)}.items():
            g = torch.randn(m, k, device=dev, dtype=bf)
            w = (torch.randn(k, n, device=dev) * 0.02).to(bf)  # the layer's weight (out = k, in = n)
            pre = torch.randn(m, n, device=dev, dtype=bf) if "DGELU" in name else None
            bf16 = (lambda: cublaslt.matmul_dgelu(g, w, pre)) if pre is not None else (lambda: cublaslt.mm(g, w))
            bf16()
            t16 = median_ms(bf16, 20, dev)
            flop = 2.0 * m * k * n
            for mode_name, mode, dim in (("scalar", cublaslt.SCALAR, None), ("outer vec", cublaslt.OUTER_VEC, 1)):
                gq, sg = quantize(g, dim)
                wtq, sw = quantize(w.t().contiguous(), dim)
                try:
                    got = fp8_dx(gq, sg, wtq, sw, pre, mode)
                except RuntimeError as e:
                    print(f"| {name} | {m} | {mode_name} | {t16:.3f} ({flop / t16 / 1e9:.0f}) | refused: {e} | | |",
                          flush=True)
                    continue
                exact = (gq.float() * (sg if dim is None else sg[:, None])) @ (wtq.float() * (sw if dim is None else sw[:, None])).t()
                if pre is not None:
                    p = pre.float().requires_grad_()
                    (exact,) = torch.autograd.grad(F.gelu(p, approximate="tanh"), p, exact)
                t8 = median_ms(lambda: fp8_dx(gq, sg, wtq, sw, pre, mode), 20, dev)
                print(f"| {name} | {m} | {mode_name} | {t16:.3f} ({flop / t16 / 1e9:.0f}) | {t8:.3f} ({flop / t8 / 1e9:.0f}) | "
                      f"{t16 / t8:.2f} | {rel_err(got, exact):.1e} |", flush=True)
    print()
    print("| fc1 ∂x and ∂b₁ | tokens | bf16: Σ ∂pre + ∂pre W₁ (ms) | FP8: rows kernel + OUTER_VEC product (ms) | "
          "kernel alone (ms, GB/s) | ∂x rel err | ∂b₁ rel err |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for m in (int(t) for t in args.tokens.split(",")):
        gpre = torch.randn(m, HIDDEN, device=dev, dtype=bf) * torch.rand(m, 1, device=dev, dtype=bf)
        w1 = (torch.randn(HIDDEN, D, device=dev) * 0.02).to(bf)
        summed = torch.compile(lambda t: t.sum(0))
        summed(gpre)
        bf16 = median_ms(lambda: (summed(gpre), cublaslt.mm(gpre, w1)), 20, dev)

        def fp8():
            q, s, sums = fp8_rows.rows_fp8_triton(gpre)
            wtq, sw = quantize_weight(w1)
            return fp8_backward.fp8_dx(q, s, wtq, sw, bf), sums.sum(0)

        dx, db = fp8()
        t8 = median_ms(fp8, 20, dev)
        kernel = median_ms(lambda: fp8_rows.rows_fp8_triton(gpre), 20, dev)
        moved = gpre.numel() * 3 + fp8_rows.programs_per_rows(m, dev)[1] * HIDDEN * 4
        print(f"| fc1 | {m} | {bf16:.3f} | {t8:.3f} | {kernel:.3f} ({moved / kernel / 1e6:.0f}) | "
              f"{rel_err(dx, gpre.float() @ w1.float()):.1e} | {rel_err(db, gpre.float().sum(0)):.1e} |", flush=True)
    print()
    print("| qkv backward (bf16) | tokens | stacked ∂qkv, one product (ms) | ∂q, ∂k, ∂v, three products (ms) |")
    print("| --- | --- | --- | --- |")
    for m in (int(t) for t in args.tokens.split(",")):
        dqkv = torch.randn(m, 3 * D, device=dev, dtype=bf)
        parts = [torch.randn(m, D, device=dev, dtype=bf) for _ in range(3)]
        w = (torch.randn(3 * D, D, device=dev) * 0.02).to(bf)
        h = torch.randn(m, D, device=dev, dtype=bf)
        ws = [w[i * D:(i + 1) * D].contiguous() for i in range(3)]
        one_dx = median_ms(lambda: cublaslt.mm(dqkv, w), 20, dev)
        three_dx = median_ms(lambda: [cublaslt.mm(p, wi) for p, wi in zip(parts, ws)], 20, dev)
        one_dw = median_ms(lambda: cublaslt.mm(dqkv, h, trans_a=True), 20, dev)
        three_dw = median_ms(lambda: [cublaslt.mm(p, h, trans_a=True) for p in parts], 20, dev)
        print(f"| ∂h | {m} | {one_dx:.3f} | {three_dx:.3f} |")
        print(f"| ∂W | {m} | {one_dw:.3f} | {three_dw:.3f} |", flush=True)
    print()
    print("| qkv ∂x and ∂b | tokens | bf16: stacking kernel + Σ + ∂qkv W (ms) | FP8: rows kernel + Σ + OUTER_VEC product "
          "(ms) | stacking kernel (ms, GB/s) | rows kernel (ms, GB/s) | ∂x rel err | ∂b rel err |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for m in (int(t) for t in args.tokens.split(",")):
        grads = cudnn_layout_grads(m, dev)
        w = (torch.randn(3 * D, D, device=dev) * 0.02).to(bf)

        def bf16():
            dqkv, tiles = qkv_kernels.stack_partial(*grads)
            return cublaslt.mm(dqkv, w), tiles.sum(0)

        def fp8():
            dqkv, sums, q, s = qkv_kernels.stack_rows_fp8(*grads)
            wtq, sw = quantize_weight(w)
            return fp8_backward.fp8_dx(q, s, wtq, sw, bf), sums.sum(0)

        (dx16, _), (dx, db) = bf16(), fp8()
        t16, t8 = median_ms(bf16, 20, dev), median_ms(fp8, 20, dev)
        stack = median_ms(lambda: qkv_kernels.stack_partial(*grads), 20, dev)
        rows = median_ms(lambda: qkv_kernels.stack_rows_fp8(*grads), 20, dev)
        moved16 = m * 3 * D * 4 + (m // qkv_kernels.ROWS_PER_TILE) * 3 * D * 4
        moved8 = m * 3 * D * 5 + fp8_rows.programs_per_rows(m, dev)[1] * 3 * D * 4
        dqkv = qkv_kernels.stack_reference(*grads)[0].float()
        print(f"| qkv | {m} | {t16:.3f} | {t8:.3f} | {stack:.3f} ({moved16 / stack / 1e6:.0f}) | {rows:.3f} "
              f"({moved8 / rows / 1e6:.0f}) | {rel_err(dx, dqkv @ w.float()):.1e} (bf16 {rel_err(dx16, dqkv @ w.float()):.1e}) "
              f"| {rel_err(db, dqkv.sum(0)):.1e} |", flush=True)


if __name__ == "__main__":
    main()
