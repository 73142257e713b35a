"""Row-wise scaled FP8 products (``torch._scaled_mm``) against the bf16 products the training step runs now,
at DiT-XL/2's forward shapes for qkv and fc1 (the two linears whose input a norm kernel makes).

    PYTHONPATH=src:benchmarks python benchmarks/fp8_rowwise_products.py [--tokens 8192,32768]

Per shape: the bf16 product (cuBLASLt's fastest candidate, ``ditkit.kernels.cublaslt``; for fc1 also the
GELU_AUX_BIAS product the fused MLP runs), the FP8 product with per-row scales for the input and per
output-channel scales for the weight (bias in the epilogue), the weight's quantization (amax per row and
cast, once per step), and GELU as a pass of its own (what FP8 fc1 would need).  Each FP8 result is checked
against the float32 product of the dequantized operands.  CUDA-event medians of 20 calls.
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from bench import median_ms, rel_err

from ditkit.kernels import cublaslt

E4M3_MAX = 448.0
SHAPES = {"qkv": (1152, 3456), "fc1": (1152, 4608)}


def quantize_rows(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (t / s in e4m3, s (rows, 1) float32) with s = amax of the row / 448."""
    scale = t.abs().amax(dim=1, keepdim=True).float().clamp(min=1e-12) / E4M3_MAX
    return (t.float() / scale).to(torch.float8_e4m3fn), scale


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", default="8192,32768")
    args = ap.parse_args()
    dev, bf = torch.device("cuda"), torch.bfloat16
    print(torch.cuda.get_device_name(), "torch", torch.__version__)
    print("| product | tokens | bf16 ms (TFLOP/s) | FP8 ms (TFLOP/s) | W quantization ms | GELU pass ms | FP8 rel err |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for m in (int(t) for t in args.tokens.split(",")):
        for name, (k, n) in SHAPES.items():
            x = torch.randn(m, k, device=dev, dtype=bf)
            w = (torch.randn(n, k, device=dev) * 0.02).to(bf)
            b = (torch.randn(n, device=dev) * 0.02).to(bf)
            flop = 2.0 * m * k * n
            x8, sx = quantize_rows(x)
            w8, sw = quantize_rows(w)
            fp8 = lambda: torch._scaled_mm(x8, w8.t(), scale_a=sx, scale_b=sw.t(), bias=b, out_dtype=bf)  # noqa: E731
            if name == "fc1":
                bf16 = lambda: cublaslt.linear_gelu(x, w, b)  # noqa: E731
            else:
                bf16 = lambda: cublaslt.mm(x, w, trans_b=True, epilogue=cublaslt.BIAS, bias=b)  # noqa: E731
            bf16()
            exact = (x8.float() * sx) @ (w8.float() * sw).t() + b.float()
            err = rel_err(fp8(), exact)
            t16, t8 = median_ms(bf16, 20, dev), median_ms(fp8, 20, dev)
            tq = median_ms(lambda: quantize_rows(w), 20, dev)
            pre = fp8()
            tg = median_ms(lambda: F.gelu(pre, approximate="tanh"), 20, dev) if name == "fc1" else float("nan")
            label = f"{name} {'GELU_AUX_BIAS' if name == 'fc1' else 'bias'}"
            print(f"| {label} | {m} | {t16:.3f} ({flop / t16 / 1e9:.0f}) | {t8:.3f} ({flop / t8 / 1e9:.0f}) | {tq:.3f} | "
                  f"{tg:.3f} | {err:.1e} |", flush=True)


if __name__ == "__main__":
    main()
