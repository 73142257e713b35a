"""The MLP with GELU in cuBLASLt's epilogues (``ditkit.fast.fused_mlp``) against torch, on a GPU.

    PYTHONPATH=src python benchmarks/fused_mlp_check.py

1. Each fused product against a float32 computation from the same bf16 operands, beside the
   unfused bf16 path's error (and, for the forward, against the exact erf GELU: cuBLASLt's GELU
   must be the tanh approximation DiT uses).  Times of the fused and the unfused products.
2. ``FusedMlp`` against ``Mlp`` under bf16 autocast, eager and compiled (also with CUDA graphs):
   output and gradients against the float32 MLP, for both.
Exits non-zero if an error exceeds bf16 tolerances.
"""
from __future__ import annotations

import argparse
import copy
import sys

import torch
import torch.nn.functional as F
from bench import median_ms  # benchmarks/, on the path when run as a script
from bench import rel_err as rel

from ditkit.fast.fused_mlp import FusedMlp, convert_to_fused_mlp
from ditkit.kernels import cublaslt
from ditkit.models.dit import Mlp


def products(tokens: int, d: int, h: int, dev: torch.device) -> list[tuple[str, float, float]]:
    bf = torch.bfloat16
    x, g = torch.randn(tokens, d, device=dev, dtype=bf), torch.randn(tokens, d, device=dev, dtype=bf) * 1e-3
    w1, w2 = (torch.randn(h, d, device=dev) * 0.02).to(bf), (torch.randn(d, h, device=dev) * 0.02).to(bf)
    b1 = (torch.randn(h, device=dev) * 0.1).to(bf)
    pre32 = torch.addmm(b1.float(), x.float(), w1.float().t())
    a, pre = cublaslt.linear_gelu(x, w1, b1)
    pre_u = torch.addmm(b1, x, w1.t())
    gpre32 = torch.ops.aten.gelu_backward((g.float() @ w2.float()), pre.float(), approximate="tanh")
    gpre = cublaslt.matmul_dgelu(g, w2, pre)
    gpre_u = torch.ops.aten.gelu_backward(g @ w2, pre, approximate="tanh")
    rows = [("pre = x W₁ᵀ + b₁", rel(pre, pre32), rel(pre_u, pre32)),
            ("a = GELU(pre), tanh", rel(a, F.gelu(pre32, approximate="tanh")), rel(F.gelu(pre_u, approximate="tanh"), F.gelu(pre32, approximate="tanh"))),
            ("a against erf GELU", rel(a, F.gelu(pre32)), rel(F.gelu(pre_u, approximate="tanh"), F.gelu(pre32))),
            ("∂pre", rel(gpre, gpre32), rel(gpre_u, gpre32))]
    calls = {"fwd fused": lambda: cublaslt.linear_gelu(x, w1, b1),
             "fwd unfused": lambda: F.gelu(torch.addmm(b1, x, w1.t()), approximate="tanh"),
             "fwd product alone": lambda: torch.addmm(b1, x, w1.t()),
             "bwd fused": lambda: cublaslt.matmul_dgelu(g, w2, pre),
             "bwd unfused": lambda: torch.ops.aten.gelu_backward(g @ w2, pre, approximate="tanh"),
             "bwd product alone": lambda: g @ w2}
    t = {name: median_ms(call, 20, dev, warmup=3) for name, call in calls.items()}
    flop = 2 * tokens * d * h
    print(f"\ntokens {tokens}, D {d}, H {h}: ms (TFLOP/s) " + ", ".join(f"{k} {v:.3f} ({flop / v / 1e9:.0f})" for k, v in t.items()))
    return rows


def which_gelu(dev: torch.device) -> tuple[float, float]:
    """Max |cuBLASLt GELU − GELU| for the tanh and the erf form, on exact fp16 inputs in [-4, 0]
    (outputs small enough for fp16 to tell the forms apart: they differ by up to ~2e-4 there)."""
    x = torch.zeros(256, 64, device=dev, dtype=torch.float16)
    x[:, 0] = torch.linspace(-4, 0, 257, device=dev)[:256]  # multiples of 1/64: exact
    w = torch.zeros(64, 64, device=dev, dtype=torch.float16)
    w[:, 0] = 1
    a, pre = cublaslt.linear_gelu(x, w, torch.zeros(64, device=dev, dtype=torch.float16))
    p32 = pre.float()
    return ((a.float() - F.gelu(p32, approximate="tanh")).abs().max().item(), (a.float() - F.gelu(p32)).abs().max().item())


def modules(tokens: int, d: int, dev: torch.device, compile_mode: str | None) -> list[tuple[str, float, float]]:
    torch.manual_seed(0)
    ref = Mlp(d, 4 * d).to(dev)
    plain, parent = copy.deepcopy(ref), torch.nn.ModuleDict({"mlp": copy.deepcopy(ref)})
    convert_to_fused_mlp(parent)  # a lone Mlp is converted through a parent
    fused = parent["mlp"]
    assert isinstance(fused, FusedMlp)
    x = torch.randn(8, tokens // 8, d, device=dev)
    gy = torch.randn_like(x)
    out = {}
    for name, m in (("ref", ref), ("plain", plain), ("fused", fused)):
        xi = x.clone().requires_grad_()
        net = m if name == "ref" or compile_mode is None else torch.compile(m, mode=compile_mode)
        for _ in range({"reduce-overhead": 3}.get(compile_mode, 1)):  # CUDA graphs: warm up, record, replay
            for p in m.parameters():
                p.grad = None
            xi.grad = None
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=name != "ref"):
                y = net(xi)
            y.float().backward(gy)
        out[name] = [y.detach().clone(), xi.grad.clone()] + [p.grad.clone() for p in m.parameters()]
    names = ["y", "∂x", "∂W₁", "∂b₁", "∂W₂", "∂b₂"]
    return [(n, rel(f, r), rel(p, r)) for n, r, p, f in zip(names, out["ref"], out["plain"], out["fused"])]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--hidden", type=int, default=1152)
    args = p.parse_args()
    dev = torch.device("cuda")
    if not cublaslt.available(dev):
        sys.exit("cuBLASLt not found")
    worst = 0.0
    tanh_err, erf_err = which_gelu(dev)
    print(f"cuBLASLt GELU, max error against the tanh form {tanh_err:.1e}, against erf {erf_err:.1e}")
    for tokens in (8192, 32768):  # DiT-XL/2 at batch 32 and 128
        rows = products(tokens, args.hidden, 4 * args.hidden, dev)
        print("| product | fused error | unfused bf16 error |\n|---|---|---|")
        for name, f, u in rows:
            print(f"| {name} | {f:.2e} | {u:.2e} |")
            if "erf" not in name:
                worst = max(worst, f / max(u, 1e-3))
    for mode in (None, "default", "reduce-overhead"):
        rows = modules(4096, args.hidden, dev, mode)
        print(f"\nFusedMlp and Mlp (bf16 autocast, {mode or 'eager'}) against the float32 Mlp\n"
              "| tensor | fused error | plain error |\n|---|---|---|")
        for name, f, u in rows:
            print(f"| {name} | {f:.2e} | {u:.2e} |")
            worst = max(worst, f / max(u, 1e-3))
    print(f"\nworst fused error / max(unfused error, 1e-3): {worst:.2f}")
    sys.exit(0 if worst < 1.5 and tanh_err < erf_err else 1)


if __name__ == "__main__":
    main()
