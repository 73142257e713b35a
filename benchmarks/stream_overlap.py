"""What running the backward's weight-gradient products on a second CUDA stream would save, measured before building
it, at DiT-XL/2's shapes: each ∂W product alone, a kernel of the critical path alone (the norm backward, fc1's rows
kernel, cuDNN's attention backward, the DGELU product), the two one after the other, and the two at once on two
streams (with and without stream priorities, and with the product told to plan for fewer multiprocessors,
cuBLASLt's SM_COUNT_TARGET); then the fused MLP's backward operator (``fused_mlp.gelu_mlp_backward``) with its ∂W
products in order and on the side stream.  Before the operator existed this section timed a copy of it written here:
2.100 ms in order, 1.989 on two streams (``docs/results/stream_overlap_h100.txt``).

    PYTHONPATH=src:benchmarks python benchmarks/stream_overlap.py [--tokens 32768]

Every case is one CUDA graph (both streams captured: a fork and a join), timed over 20 replays (CUDA events, median).
"""
from __future__ import annotations

import argparse

import torch

from bench import median_ms
from ditkit.models import cublaslt, fp8_backward, norm_kernels, qkv_kernels
from ditkit.models.fused_attention import _attention, _attention_grads
from ditkit.models.fused_mlp import gelu_mlp_backward
from fp8_backward_products import D, HEADS, HIDDEN, TOKENS

def graphed(*lanes, priorities=(0, 0)):
    """One CUDA graph running each lane (a list of calls) on its own stream, forked from and joined to the first.
    -> a callable that replays it."""
    streams = [torch.cuda.Stream(priority=p) for p in priorities[:len(lanes)]]
    for lane, s in zip(lanes, streams):  # warm-up outside capture (cuBLASLt times its candidates here)
        with torch.cuda.stream(s):
            for call in lane:
                call()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g, stream=streams[0]):
        for s in streams[1:]:
            s.wait_stream(streams[0])
        for lane, s in zip(lanes, streams):
            with torch.cuda.stream(s):
                for call in lane:
                    call()
        for s in streams[1:]:
            streams[0].wait_stream(s)
    return g.replay


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=32768)
    args = ap.parse_args()
    dev, bf, m = torch.device("cuda"), torch.bfloat16, args.tokens
    n = m // TOKENS
    sms = torch.cuda.get_device_properties(dev).multi_processor_count
    print(torch.cuda.get_device_name(), "torch", torch.__version__, f"{sms} SMs, {m} tokens")
    r = lambda *s: torch.randn(*s, device=dev, dtype=bf)  # noqa: E731
    x, gy, o = r(m, D), r(m, D), r(m, D)
    a, pre, gpre = r(m, HIDDEN), r(m, HIDDEN), r(m, HIDDEN)
    w1, w2 = r(HIDDEN, D) * 0.02, r(D, HIDDEN) * 0.02
    dqkv = r(m, 3 * D)
    # the norm backward with the residual, as in every block
    stream_x, gh, g_next, o3 = r(n, TOKENS, D), r(n, TOKENS, D), r(n, TOKENS, D), r(n, TOKENS, D)
    gate, scale = r(n, D), r(n, D)
    mean, rstd = torch.zeros(n, TOKENS, device=dev), torch.ones(n, TOKENS, device=dev)
    # cuDNN's attention backward
    qkv = r(m, 3 * D)
    att_o, _, lse, seed, offset = _attention(qkv, n, HEADS)
    g_att = r(m, D)
    wtq, sw = fp8_backward.quantize_weight_columns(w1)

    def norm_bwd():
        norm_kernels.backward_partial(gh, g_next, stream_x, o3, gate, scale, mean, rstd, (bf, bf))

    def attn_bwd():
        qkv_kernels.stack_rows_fp8(*_attention_grads(g_att, qkv, att_o, lse, seed, offset, n, HEADS))

    flops = lambda k, nn_: 2 * m * k * nn_  # noqa: E731
    products = {"∂W fc1": (lambda t=0: cublaslt.mm(gpre, x, trans_a=True, sm_target=t), flops(HIDDEN, D)),
                "∂W fc2": (lambda t=0: cublaslt.mm(gy, a, trans_a=True, sm_target=t), flops(D, HIDDEN)),
                "∂W qkv": (lambda t=0: cublaslt.mm(dqkv, x, trans_a=True, sm_target=t), flops(3 * D, D)),
                "∂W proj": (lambda t=0: cublaslt.mm(gy, o, trans_a=True, sm_target=t), flops(D, D))}
    critical = {"norm backward": norm_bwd, "fc1 rows kernel": lambda: fp8_backward.rows_fp8_triton(gpre),
                "attention backward + stack": attn_bwd, "DGELU product": lambda: cublaslt.matmul_dgelu(gy, w2, pre)}
    pairs = [("∂W fc1", "norm backward"), ("∂W fc1", "fc1 rows kernel"), ("∂W fc2", "attention backward + stack"),
             ("∂W qkv", "norm backward"), ("∂W proj", "attention backward + stack"), ("∂W fc2", "DGELU product")]
    time = lambda fn: median_ms(fn, 20, dev, warmup=3)  # noqa: E731
    print("| ∂W product | critical kernel | ∂W alone | kernel alone | in order | two streams | "
          "kernel's stream first | ∂W on fewer SMs | saved (best) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for p, c in pairs:
        dw, _ = products[p]
        crit = critical[c]
        t_dw, t_c = time(graphed([dw])), time(graphed([crit]))
        t_seq = time(graphed([crit, dw]))
        t_two = time(graphed([crit], [dw]))
        t_pri = time(graphed([crit], [dw], priorities=(-1, 0)))
        fewer = {k: time(graphed([crit], [lambda k=k: dw(k)], priorities=(-1, 0))) for k in (sms - 16, sms - 32)}
        k_best = min(fewer, key=fewer.get)
        best = min(t_two, t_pri, fewer[k_best])
        print(f"| {p} | {c} | {t_dw:.3f} | {t_c:.3f} | {t_seq:.3f} | {t_two:.3f} | {t_pri:.3f} | "
              f"{fewer[k_best]:.3f} ({k_best}) | {t_seq - best:.3f} |", flush=True)

    # the fused MLP's backward operator as the step runs it (fc1's ∂x in FP8, without b₂), in order and with its ∂W
    # products on the side stream
    mlp = (gy, x, w1, w2, a, pre, wtq, sw)
    t_serial, t_over = (time(graphed([lambda o=o: gelu_mlp_backward(*mlp, has_b2=False, overlap=o)])) for o in (False, True))
    total = products["∂W fc1"][1] + products["∂W fc2"][1]
    print(f"\nfused MLP backward (fc1's ∂x in FP8), {m} tokens: in order {t_serial:.3f} ms, ∂W products on a side stream "
          f"{t_over:.3f} ms (saved {t_serial - t_over:.3f} ms per layer; ∂W FLOPs {total / 1e12:.2f} T)")


if __name__ == "__main__":
    main()
