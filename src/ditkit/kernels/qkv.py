"""The gradient of attention's packed input: ∂q, ∂k, ∂v, each (N, H, T, Dh), laid out as
∂qkv (N·T, 3·D) (the layout of the qkv linear's output, D = H·Dh), and the column sums Σ_t ∂qkv (the qkv
bias's gradient) in the same pass.

Compiled, autograd's stacking of ∂q, ∂k, ∂v is one pass and the bias gradient another that reads them
again (``benchmarks/bench.py --profile``: 1.0 and 0.5 ms per DiT-XL/2 step at batch 32 on an H100).  One
program copies a (rows × columns) tile of one of the three and keeps its column sums; a sum over the row tiles'
partial sums finishes them (``stack_partial``: left to the caller's traced code, where compile fuses it with
what follows).  ``stack_reference`` is the same in torch: the CPU path, and what the tests compare the kernel
with (Triton's interpreter on the CPU).

For an FP8 ∂x product (``TrainSpeed.fp8_backward``) the copy also writes ∂qkv in e4m3 with one scale per token row,
s_m = max_j |∂qkv_mj| / 448 (``stack_rows_fp8``): one program then walks whole rows (the three gradients' 3D
values at once), as ``ditkit.fast.fp8_backward``'s kernel does for fc1's ∂pre.  Unlike that kernel it keeps one
block of the next power of two per gradient: as two blocks (``ditkit.kernels.row_blocks``) it took 0.282 ms at XL/2
batch-128 shapes with 8 warps, 0.216 with 4, against 0.215 as one (``benchmarks/rows_kernel_launch.py``, H100).
"""
from __future__ import annotations

import torch

from ditkit.kernels import fp8_rows  # its launch constants, read at each call (a benchmark sweeps them)
from ditkit.kernels.fp8_rows import programs_per_rows, rows_fp8_reference

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


ROWS_PER_TILE = 64  # the kernel's rows per program: one partial column sum per tile of rows


def tile_sums(dqkv: torch.Tensor, block_m: int = ROWS_PER_TILE) -> torch.Tensor:
    """dqkv (R, C) -> its column sums per tile of ``block_m`` rows, (⌈R / block_m⌉, C) float32: the kernel's partial sums."""
    rows, cols = dqkv.shape
    tiles = -(-rows // block_m)
    padded = torch.nn.functional.pad(dqkv.float(), (0, 0, 0, tiles * block_m - rows))
    return padded.view(tiles, block_m, cols).sum(1)


def rows_layout(g: torch.Tensor) -> bool:
    """Whether g (N, H, T, Dh) lies in memory as (N, T, H, Dh), i.e. as a row-major (N·T, H·Dh) matrix: the
    layout cuDNN gives its gradients when q, k, v are views of one qkv tensor.  The kernel takes only this."""
    n, heads, tokens, dh = g.shape
    return g.stride() == (tokens * heads * dh, dh, heads * dh, 1)


def _check_rows_layout(caller: str, dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor) -> None:
    if not (dq.shape == dk.shape == dv.shape and all(map(rows_layout, (dq, dk, dv)))):
        raise ValueError(f"{caller}: ∂q, ∂k, ∂v must be (N, H, T, Dh) laid out as (N, T, H, Dh), got strides "
                         f"{dq.stride()}, {dk.stride()}, {dv.stride()}")


if triton is not None:
    @triton.jit
    def _stack_heads_kernel(q_ptr, k_ptr, v_ptr, out_ptr, partial_ptr, rows, width,
                            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        pid_m = tl.program_id(0)
        which = tl.program_id(2)
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
        col_ok = cols < width
        mask = (m < rows)[:, None] & col_ok[None, :]
        at = m[:, None] * width + cols[None, :]
        if which == 0:
            g = tl.load(q_ptr + at, mask=mask, other=0.0)
        elif which == 1:
            g = tl.load(k_ptr + at, mask=mask, other=0.0)
        else:
            g = tl.load(v_ptr + at, mask=mask, other=0.0)
        out_cols = which * width + cols
        tl.store(out_ptr + m[:, None] * (3 * width) + out_cols[None, :], g, mask=mask)
        tl.store(partial_ptr + pid_m.to(tl.int64) * (3 * width) + out_cols, tl.sum(g.to(tl.float32), axis=0), mask=col_ok)


def stack_triton(dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor, block_m: int = ROWS_PER_TILE, block_n: int = 128
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """``stack_reference`` as one kernel launch and a sum over the row tiles; dq, dk, dv in ``rows_layout``."""
    out, partial = stack_partial(dq, dk, dv, block_m, block_n)
    return out, partial.sum(0)


def stack_partial(dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor, block_m: int = ROWS_PER_TILE, block_n: int = 128
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """``stack_triton`` without the sum over the row tiles: (∂qkv, ``tile_sums(∂qkv, block_m)``)."""
    _check_rows_layout("stack_triton", dq, dk, dv)
    n, heads, tokens, dh = dq.shape
    rows, width = n * tokens, heads * dh
    out = torch.empty(rows, 3 * width, device=dq.device, dtype=dq.dtype)
    tiles = triton.cdiv(rows, block_m)
    partial = torch.empty(tiles, 3 * width, device=dq.device, dtype=torch.float32)
    _stack_heads_kernel[(tiles, triton.cdiv(width, block_n), 3)](dq, dk, dv, out, partial, rows, width,
                                                                 BLOCK_M=block_m, BLOCK_N=block_n, num_warps=4)
    return out, partial


def stack_rows_fp8_reference(dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor, parts: int = 1
                             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (∂qkv (N·T, 3D), its column sums (parts, 3D) float32 to be summed over dim 0, q(∂qkv / s) e4m3, s (N·T,)
    float32 = each row's amax / 448): the reference and CPU path of ``stack_rows_fp8``."""
    dqkv, _ = stack_reference(dq, dk, dv)
    q, s, sums = rows_fp8_reference(dqkv, parts)
    return dqkv, sums, q, s


if triton is not None:
    @triton.jit
    def _stack_rows_fp8_kernel(q_ptr, k_ptr, v_ptr, out_ptr, out8_ptr, s_ptr, part_ptr, n_rows, width,
                               rows_per_program, BLOCK: tl.constexpr, STAGES: tl.constexpr):
        """Program p walks rows [p·rows_per_program, …): a row's ∂q, ∂k, ∂v (``width`` values each) copied into
        ∂qkv's row, their amax over all three, the row in e4m3, and the program's column sums (written at the end)."""
        p = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        ok = cols < width
        sum_q = tl.zeros([BLOCK], dtype=tl.float32)
        sum_k = tl.zeros([BLOCK], dtype=tl.float32)
        sum_v = tl.zeros([BLOCK], dtype=tl.float32)
        first = p.to(tl.int64) * rows_per_program
        for i in tl.range(0, tl.minimum(rows_per_program, n_rows - first), num_stages=STAGES):
            row = first + i
            src = row * width + cols
            dst = row * (3 * width) + cols
            gq = tl.load(q_ptr + src, mask=ok, other=0.0)
            gk = tl.load(k_ptr + src, mask=ok, other=0.0)
            gv = tl.load(v_ptr + src, mask=ok, other=0.0)
            tl.store(out_ptr + dst, gq, mask=ok)
            tl.store(out_ptr + dst + width, gk, mask=ok)
            tl.store(out_ptr + dst + 2 * width, gv, mask=ok)
            fq, fk, fv = gq.to(tl.float32), gk.to(tl.float32), gv.to(tl.float32)
            amax = tl.maximum(tl.maximum(tl.max(tl.abs(fq), axis=0), tl.max(tl.abs(fk), axis=0)),
                              tl.max(tl.abs(fv), axis=0))
            s = tl.maximum(amax, 1e-30) / 448.0
            tl.store(s_ptr + row, s)
            r = 1.0 / s
            e4m3 = out8_ptr.dtype.element_ty
            tl.store(out8_ptr + dst, tl.clamp(fq * r, -448.0, 448.0).to(e4m3), mask=ok)
            tl.store(out8_ptr + dst + width, tl.clamp(fk * r, -448.0, 448.0).to(e4m3), mask=ok)
            tl.store(out8_ptr + dst + 2 * width, tl.clamp(fv * r, -448.0, 448.0).to(e4m3), mask=ok)
            sum_q += fq
            sum_k += fk
            sum_v += fv
        part = part_ptr + p.to(tl.int64) * (3 * width) + cols
        tl.store(part, sum_q, mask=ok)
        tl.store(part + width, sum_k, mask=ok)
        tl.store(part + 2 * width, sum_v, mask=ok)


def stack_rows_fp8(dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``stack_rows_fp8_reference`` as one kernel launch (dq, dk, dv in ``rows_layout``; the column sums one row per
    program, ``programs_per_rows``)."""
    _check_rows_layout("stack_rows_fp8", dq, dk, dv)
    n, heads, tokens, dh = dq.shape
    rows, width, device = n * tokens, heads * dh, dq.device
    per, programs = programs_per_rows(rows, device)
    out = torch.empty(rows, 3 * width, device=device, dtype=dq.dtype)
    out8 = torch.empty(rows, 3 * width, device=device, dtype=torch.float8_e4m3fn)
    s = torch.empty(rows, device=device, dtype=torch.float32)
    sums = torch.empty(programs, 3 * width, device=device, dtype=torch.float32)
    _stack_rows_fp8_kernel[(programs,)](dq, dk, dv, out, out8, s, sums, rows, width, per,
                                        BLOCK=triton.next_power_of_2(width), STAGES=fp8_rows.STAGES,
                                        num_warps=fp8_rows.WARPS)
    return out, sums, out8, s
