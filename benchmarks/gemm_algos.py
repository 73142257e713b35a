"""The block linears' products at DiT-XL/2 training shapes: torch's choice against cuBLASLt's candidates.

    PYTHONPATH=src:benchmarks python benchmarks/gemm_algos.py [--tokens 8192,32768] [--candidates 32]

For each linear of a DiT-XL block (qkv, proj, fc1, fc2) and each product of its training step
(forward y = x Wᵀ, input gradient ∂x = ∂y W, weight gradient ∂W = ∂yᵀ x), and for the fused MLP's
GELU products, and the weight gradient with the bias gradient in its epilogue (BGRADB; torch: the
product and a sum): the time of torch's product (median of 20) and of ``ditkit.kernels.cublaslt``'s
fastest candidate (timed at the first call, ``cublaslt._time_all``, then median of 20), with TFLOP/s.  Each
cuBLASLt result is checked against torch's (relative error printed).  It answers whether timing
more candidates than the heuristic's first makes the step's products faster, and where.
"""
from __future__ import annotations

import argparse

import torch
from bench import median_ms, rel_err

from ditkit.kernels import cublaslt

LAYERS = {"qkv": (1152, 3456), "proj": (1152, 1152), "fc1": (1152, 4608), "fc2": (4608, 1152)}


def timed_key(call) -> tuple | None:
    """Run ``call`` once; the cuBLASLt product it timed for the first time (its key in ``cublaslt._timings``)."""
    before = set(cublaslt._timings)
    call()
    return next((k for k in cublaslt._timings if k not in before), None)


def row(name: str, flop: float, torch_call, lt_call, err: float, key: tuple | None, dev: torch.device) -> None:
    times = cublaslt._timings.get(key, [])
    first = times[0] if times else float("nan")
    chosen = cublaslt._chosen.get(key, -1)
    torch_ms, lt_ms = median_ms(torch_call, 20, dev), median_ms(lt_call, 20, dev)
    print(f"{name:28s} torch {torch_ms:7.3f} ({flop / torch_ms / 1e9:4.0f})   cuBLASLt {lt_ms:7.3f} ({flop / lt_ms / 1e9:4.0f})"
          f"   heuristic's first {first:7.3f}   chosen #{chosen:2d} of {len(times)}   rel err {err:.1e}", flush=True)


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
            for op, lt, ref in (("y = x Wᵀ", lambda: cublaslt.mm(x, w, trans_b=True), lambda: x @ w.t()),
                                ("∂x = ∂y W", lambda: cublaslt.mm(gy, w), lambda: gy @ w),
                                ("∂W = ∂yᵀ x", lambda: cublaslt.weight_grad(gy, x), lambda: gy.t() @ x)):
                key = timed_key(lt)
                row(f"{name} {op}", flop, ref, lt, rel_err(lt(), ref().float()), key, dev)
            key = timed_key(lambda: cublaslt.weight_and_bias_grad(gy, x))
            dw, db = cublaslt.weight_and_bias_grad(gy, x)
            err = max(rel_err(dw, (gy.t() @ x).float()), rel_err(db, gy.float().sum(0)))
            row(f"{name} ∂W, ∂b (BGRADB)", flop, lambda: (gy.t() @ x, gy.sum(0)),
                lambda: cublaslt.weight_and_bias_grad(gy, x), err, key, dev)
        k, n = LAYERS["fc1"]
        x = torch.randn(m, k, device=dev, dtype=bf)
        w1, b1 = (torch.randn(n, k, device=dev) * 0.02).to(bf), (torch.randn(n, device=dev) * 0.1).to(bf)
        w2, g = (torch.randn(k, n, device=dev) * 0.02).to(bf), torch.randn(m, k, device=dev, dtype=bf)
        flop = 2.0 * m * k * n
        key = timed_key(lambda: cublaslt.linear_gelu(x, w1, b1))
        a, pre = cublaslt.linear_gelu(x, w1, b1)
        err = rel_err(a, torch.nn.functional.gelu(torch.addmm(b1.float(), x.float(), w1.float().t()), approximate="tanh"))
        row("fc1 GELU_AUX_BIAS", flop, lambda: torch.addmm(b1, x, w1.t()), lambda: cublaslt.linear_gelu(x, w1, b1), err, key,
            dev)
        key = timed_key(lambda: cublaslt.matmul_dgelu(g, w2, pre))
        gpre = cublaslt.matmul_dgelu(g, w2, pre)
        err = rel_err(gpre, torch.ops.aten.gelu_backward(g.float() @ w2.float(), pre.float(), approximate="tanh"))
        row("fc2 ∂x DGELU", flop, lambda: g @ w2, lambda: cublaslt.matmul_dgelu(g, w2, pre), err, key, dev)


if __name__ == "__main__":
    main()
