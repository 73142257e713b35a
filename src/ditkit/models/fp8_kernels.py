"""Row-wise FP8 quantization as one operator: ``quantize_rows_op(x) -> (q, s)`` with s = max|row| / 448
and q = round(x / s) in e4m3, exactly ``fp8.quantize_rows``.

Under ``torch.compile`` the traced form of that quantization is fused into the kernel producing x,
which is usually what one wants.  Not after GELU's backward in the MLP: inductor fused the gradient
of GELU, the row amax and the cast into one persistent reduction that ran at a third of the memory
bandwidth (benchmarks/fp8_block.py: 1.19 ms per XL block at batch 128, against 0.28 ms for the
GELU gradient alone).  This operator is opaque to the compiler: the producer writes x as it would
anyway, and one Triton kernel reads each row once and writes its e4m3 copy and scale.  On a CPU, or
without Triton, it is the traced form run eagerly.
"""
from __future__ import annotations

import torch

from ditkit.models.fp8 import FP8, FP8_MAX, quantize_rows

try:
    import triton
    import triton.language as tl
except ImportError:  # the CPU build of torch comes without Triton
    triton = None

if triton is not None:
    @triton.jit
    def _quantize_rows_kernel(x_ptr, q_ptr, s_ptr, n_cols, stride_x, FP8_MAX: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < n_cols
        x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        s = tl.maximum(tl.max(tl.abs(x), axis=0), 1e-12) / FP8_MAX
        s = tl.where(tl.sum((x != x).to(tl.int32), axis=0) > 0, float("nan"), s)  # a NaN makes the row NaN, as amax does
        q = tl.clamp(tl.math.div_rn(x, s), -FP8_MAX, FP8_MAX, propagate_nan=tl.PropagateNan.ALL)
        tl.store(q_ptr + row * n_cols + cols, q.to(tl.float8e4nv), mask=mask)
        tl.store(s_ptr + row, s)


@torch.library.custom_op("ditkit::quantize_rows", mutates_args=(), schema="(Tensor x) -> (Tensor, Tensor)")
def quantize_rows_op(x):
    """(M, K) -> (q (M, K) e4m3, s (M, 1) float32), q · s ≈ x per row."""
    if triton is None or not x.is_cuda:
        q, s = quantize_rows(x.contiguous())  # contiguous, as the fake function promises
        return q, s
    x = x.contiguous()
    m, k = x.shape
    q = torch.empty(m, k, device=x.device, dtype=FP8)
    s = torch.empty(m, 1, device=x.device, dtype=torch.float32)
    block = triton.next_power_of_2(k)
    _quantize_rows_kernel[(m,)](x, q, s, k, x.stride(0), FP8_MAX=FP8_MAX, BLOCK=block, num_warps=min(16, max(4, block // 512)))
    return q, s


@quantize_rows_op.register_fake
def _(x):
    return x.new_empty(x.shape, dtype=FP8), x.new_empty(x.shape[0], 1, dtype=torch.float32)

