"""cuBLASLt FP8 products with their epilogues (``cublaslt.linear_fp8``) against the bf16 products the training
step runs now, at DiT-XL/2's forward shapes.

    PYTHONPATH=src:benchmarks python benchmarks/fp8_lt_products.py [--tokens 8192,32768]

Per shape and scale mode: the bf16 product (fc1: GELU_AUX_BIAS, the fused MLP's; the others: BIAS), the FP8
one with the same epilogue (``SCALAR``: one float32 scale per operand; ``OUTER_VEC``: one per token and one per
output channel), or why cuBLASLt refuses it; each FP8 result is checked against the float32 product of the
dequantized operands (and GELU of it).  Then what per-tensor FP8 costs around the product: the weight's
quantization (amax and cast, compiled) and the scale of the input from the bound of a modulated LayerNorm's
output, |h| ≤ √(D−1)·max|1+γ| + max|β| (compiled, on an (N, D) adaLN chunk).  CUDA-event medians of 20 calls.
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from bench import median_ms, rel_err

from ditkit.kernels import cublaslt

E4M3_MAX = 448.0
SHAPES = {"fc1": (1152, 4608), "qkv": (1152, 3456), "proj": (1152, 1152), "fc2": (4608, 1152)}


def quantize(t: torch.Tensor, dim: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (t / s in e4m3, s float32): s = amax / 448 over the tensor (dim None) or per row (dim 1)."""
    amax = t.abs().amax() if dim is None else t.abs().amax(dim=dim)
    scale = amax.float().clamp(min=1e-12) / E4M3_MAX
    q = (t.float() / (scale if dim is None else scale[:, None])).to(torch.float8_e4m3fn)
    return q, scale.reshape(-1) if dim is not None else scale.reshape(1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", default="8192,32768")
    args = ap.parse_args()
    dev, bf = torch.device("cuda"), torch.bfloat16
    print(torch.cuda.get_device_name(), "torch", torch.__version__, "cuBLASLt", cublaslt._loaded_library())
    print("| product | tokens | mode | bf16 ms (TFLOP/s) | FP8 ms (TFLOP/s) | speed-up | FP8 rel err |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for m in (int(t) for t in args.tokens.split(",")):
        for name, (k, n) in SHAPES.items():
            gelu = name == "fc1"
            x = torch.randn(m, k, device=dev, dtype=bf)
            w = (torch.randn(n, k, device=dev) * 0.02).to(bf)
            b = (torch.randn(n, device=dev) * 0.02).to(bf)
            flop = 2.0 * m * k * n
            if gelu:
                bf16 = lambda: cublaslt.linear_gelu(x, w, b)  # noqa: E731
            else:
                bf16 = lambda: cublaslt.mm(x, w, trans_b=True, epilogue=cublaslt.BIAS, bias=b)  # noqa: E731
            bf16()
            t16 = median_ms(bf16, 20, dev)
            for mode_name, mode, dim in (("scalar", cublaslt.SCALAR, None), ("outer vec", cublaslt.OUTER_VEC, 1)):
                xq, sx = quantize(x, dim)
                wq, sw = quantize(w, dim)
                fp8 = lambda: cublaslt.linear_fp8(xq, sx, wq, sw, b, gelu=gelu, mode=mode)  # noqa: E731
                try:
                    got = fp8()
                except RuntimeError as e:
                    print(f"| {name} | {m} | {mode_name} | {t16:.3f} ({flop / t16 / 1e9:.0f}) | refused: {e} | | |",
                          flush=True)
                    continue
                xs = xq.float() * (sx if dim is None else sx[:, None])
                ws = wq.float() * (sw if dim is None else sw[:, None])
                exact = xs @ ws.t() + b.float()
                err = rel_err(got[0], F.gelu(exact, approximate="tanh")) if gelu else rel_err(got, exact)
                if gelu:
                    err = max(err, rel_err(got[1], exact))
                t8 = median_ms(fp8, 20, dev)
                print(f"| {name} | {m} | {mode_name} | {t16:.3f} ({flop / t16 / 1e9:.0f}) | {t8:.3f} ({flop / t8 / 1e9:.0f}) "
                      f"| {t16 / t8:.2f} | {err:.1e} |", flush=True)
    print()
    print("| around the product (per-tensor FP8) | ms |")
    print("| --- | --- |")
    for name, (k, n) in SHAPES.items():
        w = (torch.randn(n, k, device=dev) * 0.02).to(bf)
        wquant = torch.compile(lambda t: quantize(t, None))
        wquant(w)
        print(f"| {name} weight ({n}×{k}): amax and cast, compiled | {median_ms(lambda: wquant(w), 20, dev):.4f} |")
    ada = torch.randn(32, 6 * 1152, device=dev, dtype=bf)

    def bound_scale(mod: torch.Tensor) -> torch.Tensor:
        shift, scale = mod[:, :1152], mod[:, 1152:2304]
        return ((1152 - 1) ** 0.5 * (1 + scale.float()).abs() + shift.float().abs()).amax() / E4M3_MAX

    bound = torch.compile(bound_scale)
    bound(ada)
    print(f"| input scale from the LayerNorm bound (32 × 1152 chunk), compiled | {median_ms(lambda: bound(ada), 20, dev):.4f} |")


if __name__ == "__main__":
    main()
