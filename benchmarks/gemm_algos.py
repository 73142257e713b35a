"""The block linears' products at DiT-XL/2 training shapes: torch's choice against cuBLASLt's candidates.

    PYTHONPATH=src:benchmarks python benchmarks/gemm_algos.py [--tokens 8192,32768] [--candidates 32]

For each linear of a DiT-XL block (qkv, proj, fc1, fc2) and each product of its training step
(forward y = x Wᵀ, input gradient ∂x = ∂y W, weight gradient ∂W = ∂yᵀ x), and for the fused MLP's
GELU products, and the weight gradient with the bias gradient in its epilogue (BGRADB; torch: the
product and a sum): the time of torch's product (median of 20) and of ``ditkit.models.cublaslt``'s
fastest candidate (timed at the first call, ``cublaslt._time_all``, then median of 20), with TFLOP/s.  Each
cuBLASLt result is checked against torch's (relative error printed).  It answers whether timing
more candidates than the heuristic's first makes the step's products faster, and where.
"""
from __future__ import annotations

import argparse

import torch

from bench import median_ms, rel_err
from ditkit.models import cublaslt

LAYERS = {"qkv": (1152, 3456), "proj": (1152, 1152), "fc1": (1152, 4608), "fc2": (4608, 1152)}


def row(name: str, flop: float, torch_ms: float | None, lt_ms: float, err: float, key: tuple) -> dict:
    times = cublaslt._timings.get(key, [])
    first = times[0] if times else float("nan")
    chosen = cublaslt._chosen.get(key, -1)
    t = f"{torch_ms:7.3f} ({flop / torch_ms / 1e9:4.0f})" if torch_ms else "      —       "
    print(f"{name:28s} torch {t}   cuBLASLt {lt_ms:7.3f} ({flop / lt_ms / 1e9:4.0f})   heuristic's first {first:7.3f}"
          f"   chosen #{chosen:2d} of {len(times)}   rel err {err:.1e}", flush=True)
    return {"name": name, "flop": flop, "torch_ms": torch_ms, "cublaslt_ms": lt_ms, "first_ms": first, "chosen": chosen,
            "candidates": len(times), "rel_err": err}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", default="8192,32768", help="token counts (batch × 256 for XL/2)")
    ap.add_argument("--candidates", type=int, default=32, help="algorithms asked of cuBLASLt's heuristic")
    args = ap.parse_args()
    cublaslt._CANDIDATES = args.candidates
    dev, bf = torch.device("cuda"), torch.bfloat16
    print(torch.cuda.get_device_name(), "torch", torch.__version__)
    for m in (int(t) for t in args.tokens.split(",")):
        print(f"\n{m} tokens:")
        for name, (k, n) in LAYERS.items():
            x = torch.randn(m, k, device=dev, dtype=bf)
            w = (torch.randn(n, k, device=dev) * 0.02).to(bf)
            gy = torch.randn(m, n, device=dev, dtype=bf)
            flop = 2.0 * m * k * n
            for op, lt, ref, transposes in (
                    ("y = x Wᵀ", lambda: cublaslt.mm(x, w, trans_b=True), lambda: x @ w.t(), (cublaslt._OP_T, cublaslt._OP_N, n, m, k)),
                    ("∂x = ∂y W", lambda: cublaslt.mm(gy, w), lambda: gy @ w, (cublaslt._OP_N, cublaslt._OP_N, k, m, n)),
                    ("∂W = ∂yᵀ x", lambda: cublaslt.weight_grad(gy, x), lambda: gy.t() @ x, (cublaslt._OP_N, cublaslt._OP_T, k, n, m))):
                err = rel_err(lt(), ref().float())
                key = (cublaslt._DTYPES[bf], cublaslt.DEFAULT, *transposes, dev.index or 0)
                row(f"{name} {op}", flop, median_ms(ref, 20, dev), median_ms(lt, 20, dev), err, key)
            dw, db = cublaslt.weight_and_bias_grad(gy, x)
            err = max(rel_err(dw, (gy.t() @ x).float()), rel_err(db, gy.float().sum(0)))
            row(f"{name} ∂W, ∂b (BGRADB)", flop, median_ms(lambda: (gy.t() @ x, gy.sum(0)), 20, dev),
                median_ms(lambda: cublaslt.weight_and_bias_grad(gy, x), 20, dev), err,
                (cublaslt._DTYPES[bf], cublaslt.BGRADB, cublaslt._OP_N, cublaslt._OP_T, k, n, m, dev.index or 0))
        k, n = LAYERS["fc1"]
        x = torch.randn(m, k, device=dev, dtype=bf)
        w1, b1 = (torch.randn(n, k, device=dev) * 0.02).to(bf), (torch.randn(n, device=dev) * 0.1).to(bf)
        w2, g = (torch.randn(k, n, device=dev) * 0.02).to(bf), torch.randn(m, k, device=dev, dtype=bf)
        flop = 2.0 * m * k * n
        a, pre = cublaslt.linear_gelu(x, w1, b1)
        err = rel_err(a, torch.nn.functional.gelu(torch.addmm(b1.float(), x.float(), w1.float().t()), approximate="tanh"))
        row("fc1 GELU_AUX_BIAS", flop, median_ms(lambda: torch.addmm(b1, x, w1.t()), 20, dev),
            median_ms(lambda: cublaslt.linear_gelu(x, w1, b1), 20, dev), err,
            (cublaslt._DTYPES[bf], cublaslt.GELU_AUX_BIAS, cublaslt._OP_T, cublaslt._OP_N, n, m, k, dev.index or 0))
        gpre = cublaslt.matmul_dgelu(g, w2, pre)
        err = rel_err(gpre, torch.ops.aten.gelu_backward(g.float() @ w2.float(), pre.float(), approximate="tanh"))
        row("fc2 ∂x DGELU", flop, median_ms(lambda: g @ w2, 20, dev),
            median_ms(lambda: cublaslt.matmul_dgelu(g, w2, pre), 20, dev), err,
            (cublaslt._DTYPES[bf], cublaslt.DGELU, cublaslt._OP_N, cublaslt._OP_N, n, m, k, dev.index or 0))


if __name__ == "__main__":
    main()
