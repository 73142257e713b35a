"""Row-wise FP8 (e4m3) quantization of a gradient with its column sums, in one pass: for g (M, N)

    s_m = max_j |g_mj| / 448,   q(g_m / s_m) in e4m3,   Σ_m g_m (the bias gradient, as partial sums per program)

``rows_fp8_reference`` is the torch form: the CPU path and what the tests compare the kernel with (Triton's
interpreter on the CPU).  Used by the FP8 ∂x products of ``ditkit.fast.fp8_backward`` and the qkv stacking kernel
(``ditkit.kernels.qkv``).  A row of a width that is no power of two is held as two power-of-two blocks
(``ditkit.kernels.row_blocks``).
"""
from __future__ import annotations

import torch

from ditkit.kernels import row_blocks
from ditkit.kernels.norm import FP8_MAX, quantize_fp8

try:
    import triton
    import triton.language as tl
except ImportError:  # the CPU build of torch comes without Triton
    triton = None

_TINY = 1e-30  # the scale of an all-zero row (its e4m3 values are 0 whatever the scale)


def row_scales(t: torch.Tensor) -> torch.Tensor:
    """max_j |t_mj| / 448 per row of a 2-D tensor, float32 (M,)."""
    return t.detach().abs().amax(dim=1).float().clamp(min=_TINY) / FP8_MAX


def quantize_rows(t: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """t_mj / s_m in e4m3: t ⊙ (1/s) in float32, rounded once, as the kernel computes it."""
    return quantize_fp8(t, s[:, None])


def rows_fp8_reference(g: torch.Tensor, parts: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """g (M, N) -> (q(g / s) e4m3 (M, N), s (M,) float32, column sums (parts, N) float32 whose sum over dim 0 is
    Σ_m g_m).  The reference and CPU path of ``rows_fp8_and_column_sums``."""
    s = row_scales(g)
    sums = torch.zeros(parts, g.shape[1], device=g.device, dtype=torch.float32)
    sums[0] = g.float().sum(0)
    return quantize_rows(g, s), s, sums


if triton is not None:
    @triton.jit
    def _rows_fp8_kernel(g_ptr, q_ptr, s_ptr, part_ptr, n_rows, width, rows_per_program, A: tl.constexpr,
                         B: tl.constexpr, STAGES: tl.constexpr):
        """Program p walks rows [p·rows_per_program, …), one whole row (blocks of A and B columns) at a time: its
        amax, its e4m3 values, and its values added to the program's column sums (registers, written once at the end)."""
        p = tl.program_id(0)
        a_cols = tl.arange(0, A)
        b_cols = A + tl.arange(0, B)
        b_ok = b_cols < width
        sum_a = tl.zeros([A], dtype=tl.float32)
        sum_b = tl.zeros([B], dtype=tl.float32)
        first = p.to(tl.int64) * rows_per_program
        for i in tl.range(0, tl.minimum(rows_per_program, n_rows - first), num_stages=STAGES):
            row = first + i
            ta, tb = row_blocks.load_row(g_ptr, row * width, a_cols, b_cols, b_ok)
            s = tl.maximum(tl.maximum(tl.max(tl.abs(ta), axis=0), tl.max(tl.abs(tb), axis=0)), 1e-30) / 448.0
            tl.store(s_ptr + row, s)
            row_blocks.store_row_e4m3(q_ptr, row * width, a_cols, b_cols, b_ok, ta, tb, 1.0 / s)
            sum_a += ta
            sum_b += tb
        row_blocks.store_row(part_ptr, p.to(tl.int64) * width, a_cols, b_cols, b_ok, sum_a, sum_b)


PER_SM, WARPS, STAGES = 4, 8, 1  # the rows kernels' launch: programs per multiprocessor, warps, loads in flight


def programs_per_rows(n_rows: int, device: torch.device) -> tuple[int, int]:
    """(rows per program, programs): about ``PER_SM`` programs per multiprocessor."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
    per = max(1, -(-n_rows // (PER_SM * sms)))
    return per, -(-n_rows // per)


def rows_fp8_triton(g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``rows_fp8_reference`` as one kernel launch (its column sums in one row per program)."""
    if not g.is_contiguous() or g.dim() != 2:
        raise ValueError(f"rows_fp8_triton takes a contiguous 2-D tensor, got shape {tuple(g.shape)}")
    (m, n), device = g.shape, g.device
    per, programs = programs_per_rows(m, device)
    q = torch.empty(m, n, device=device, dtype=torch.float8_e4m3fn)
    s = torch.empty(m, device=device, dtype=torch.float32)
    sums = torch.empty(programs, n, device=device, dtype=torch.float32)
    a, b = row_blocks.split(n)
    _rows_fp8_kernel[(programs,)](g, q, s, sums, m, n, per, A=a, B=b, STAGES=STAGES, num_warps=WARPS)
    return q, s, sums


@torch.library.custom_op("ditkit::rows_fp8_and_column_sums", mutates_args=())
def rows_fp8_and_column_sums(g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """g (M, N) -> (q(g / s) e4m3, s (M,) float32 = each row's amax / 448, column sums (P, N) float32 to be summed
    over dim 0): the kernel on CUDA, ``rows_fp8_reference`` elsewhere."""
    if g.is_cuda and triton is not None:
        return rows_fp8_triton(g.contiguous())
    return rows_fp8_reference(g, programs_per_rows(g.shape[0], g.device)[1])


@rows_fp8_and_column_sums.register_fake
def _(g):
    m, n = g.shape
    programs = programs_per_rows(m, g.device)[1]
    return (g.new_empty(m, n, dtype=torch.float8_e4m3fn), g.new_empty(m, dtype=torch.float32),
            g.new_empty(programs, n, dtype=torch.float32))
