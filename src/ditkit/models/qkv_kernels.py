"""The gradient of attention's packed input: ∂q, ∂k, ∂v, each (N, H, T, Dh) with any strides, laid out as
∂qkv (N·T, 3·D) (the layout of the qkv linear's output, D = H·Dh), and the column sums Σ_t ∂qkv (the qkv
bias's gradient) in the same pass.

Compiled, autograd's stacking of ∂q, ∂k, ∂v is one pass and the bias gradient another that reads them
again (``benchmarks/bench.py --profile``: 1.0 and 0.5 ms per DiT-XL/2 step at batch 32 on an H100).  One
program copies a (rows × columns) tile and keeps its column sums; a torch sum over the row tiles'
partial sums finishes them.  ``stack_reference`` is the same in torch: the CPU path, and what the tests
compare the kernel with (Triton's interpreter on the CPU).
"""
from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # the CPU build of torch comes without Triton
    triton = None


def stack_reference(dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (∂qkv (N·T, 3·H·Dh) in dq's dtype, its column sums (3·H·Dh,) float32)."""
    n, heads, tokens, dh = dq.shape
    dqkv = torch.stack([dq, dk, dv], dim=1).permute(0, 3, 1, 2, 4).reshape(n * tokens, 3 * heads * dh)
    return dqkv, dqkv.float().sum(0)


if triton is not None:
    @triton.jit
    def _stack_heads_kernel(q_ptr, k_ptr, v_ptr, out_ptr, partial_ptr, rows, tokens, width, head_dim,
                            s_n, s_h, s_t, s_d, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        pid_m = tl.program_id(0)
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        col_ok = cols < 3 * width
        which = cols // width
        c = cols % width
        src_col = (c // head_dim) * s_h + (c % head_dim) * s_d
        row_ok = m < rows
        m64 = m.to(tl.int64)
        src_row = (m64 // tokens) * s_n + (m64 % tokens) * s_t
        at = src_row[:, None] + src_col[None, :]
        mask = row_ok[:, None] & col_ok[None, :]
        g = tl.load(q_ptr + at, mask=mask & (which == 0)[None, :], other=0.0)
        g += tl.load(k_ptr + at, mask=mask & (which == 1)[None, :], other=0.0)
        g += tl.load(v_ptr + at, mask=mask & (which == 2)[None, :], other=0.0)
        tl.store(out_ptr + m64[:, None] * (3 * width) + cols[None, :], g, mask=mask)
        tl.store(partial_ptr + pid_m.to(tl.int64) * (3 * width) + cols, tl.sum(g.to(tl.float32), axis=0), mask=col_ok)


def stack_triton(dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor, block_m: int = 64, block_n: int = 128
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """``stack_reference`` as one kernel launch and a sum over the row tiles; dq, dk, dv share their strides."""
    if not (dq.stride() == dk.stride() == dv.stride() and dq.shape == dk.shape == dv.shape):
        raise ValueError(f"stack_triton: ∂q, ∂k, ∂v must share shape and strides, got {dq.stride()}, {dk.stride()}, "
                         f"{dv.stride()}")
    n, heads, tokens, dh = dq.shape
    rows, width = n * tokens, heads * dh
    out = torch.empty(rows, 3 * width, device=dq.device, dtype=dq.dtype)
    tiles = triton.cdiv(rows, block_m)
    partial = torch.empty(tiles, 3 * width, device=dq.device, dtype=torch.float32)
    s_n, s_h, s_t, s_d = dq.stride()
    _stack_heads_kernel[(tiles, triton.cdiv(3 * width, block_n))](
        dq, dk, dv, out, partial, rows, tokens, width, dh, s_n, s_h, s_t, s_d, BLOCK_M=block_m, BLOCK_N=block_n,
        num_warps=4)
    return out, partial.sum(0)
