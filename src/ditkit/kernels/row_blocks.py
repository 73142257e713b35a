"""A row of a width that is no power of two, held by a Triton kernel as two power-of-two blocks.

Triton's blocks are powers of two, so one block for a row of fc1's 4608 values is 8192 wide and 44% of its lanes
are masked: registers and instructions held for nothing, fewer rows in flight.  As 4096 + 512 every lane holds a
value.  Measured on an H100 at DiT-XL/2 batch-128 shapes (``benchmarks/rows_kernel_launch.py``): fc1's rows kernel
(``ditkit.fast.fp8_backward``) 0.208 → 0.167 ms.  Tried and not taken (``docs/results/split_block_h100.txt``,
``fused_norm_sweep_row_blocks_h100.txt``): the qkv stacking kernel (0.282 ms as two blocks at its 8 warps, 0.215 as
one) and the norm backward (XL's residual backward 0.218 → 0.203 ms, but slower at DiT-B's width and without the
residual, and no change in the step).
"""
from __future__ import annotations

try:
    import triton
    import triton.language as tl
except ImportError:  # the CPU build of torch comes without Triton
    triton = None


def split(width: int) -> tuple[int, int]:
    """(A, B): A the largest power of two below ``width`` (half of it when ``width`` is one), B the smallest power of
    two that holds the rest; the row is columns [0, A) and [A, A + B), the second masked past ``width``.  A width of 1
    (no layer has one) is refused."""
    if width < 2:
        raise ValueError(f"a row split in two blocks needs at least 2 values, got width {width}")
    a = 1 << (width.bit_length() - 1)
    if a == width:
        return a // 2, a // 2
    return a, 1 << (width - a - 1).bit_length()


if triton is not None:
    @triton.jit
    def load_row(ptr, at, a_cols, b_cols, b_ok):
        """A row's two blocks (``split``) in float32: columns a_cols, and b_cols where b_ok."""
        return (tl.load(ptr + at + a_cols).to(tl.float32),
                tl.load(ptr + at + b_cols, mask=b_ok, other=0.0).to(tl.float32))

    @triton.jit
    def store_row(ptr, at, a_cols, b_cols, b_ok, ta, tb):
        """The row ta | tb in ptr's dtype."""
        tl.store(ptr + at + a_cols, ta.to(ptr.dtype.element_ty))
        tl.store(ptr + at + b_cols, tb.to(ptr.dtype.element_ty), mask=b_ok)

    @triton.jit
    def store_row_e4m3(ptr, at, a_cols, b_cols, b_ok, ta, tb, r):
        """The row ta | tb times r, rounded to e4m3 (saturating at ±448)."""
        e4m3 = ptr.dtype.element_ty
        tl.store(ptr + at + a_cols, tl.clamp(ta * r, -448.0, 448.0).to(e4m3))
        tl.store(ptr + at + b_cols, tl.clamp(tb * r, -448.0, 448.0).to(e4m3), mask=b_ok)
