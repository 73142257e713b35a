"""fc1's and qkv's ∂x products in FP8 (e4m3) with one scale per token row, in the fused MLP's and the fused
attention's backward.  For fc1:

    ∂pre = (∂y W₂) ⊙ GELU'(pre)                        cuBLASLt's DGELU product, bf16 (as without FP8)
    s_m  = max_j |∂pre_mj| / 448                        per token row m
    one kernel pass over ∂pre: q(∂pre / s) in e4m3, s, and the partial column sums for ∂b₁ = Σ_m ∂pre
    s'_i = max_o |W₁_oi| / 448                          per input channel i, from the bf16 weight
    ∂x   = (s ⊗ s') ⊙ (q(∂pre / s) q(W₁ᵀ / s')ᵀ)         one cuBLASLt FP8 product (OUTER_VEC scales)

with q the rounding to e4m3 (saturating; no value saturates, each row's scale is its own amax).  ∂W₁ = ∂preᵀ x
stays a bf16 product from the bf16 ∂pre, so the weights' gradients are what they are without FP8; only the
gradient that flows on to the layers below goes through e4m3 (measured on random data at XL's shapes: ≈ 4·10⁻²
relative to the bf16 product, e4m3's rounding of the operands; the FP8 product itself adds ≈ 2·10⁻³).

Why this product and not the others (``benchmarks/fp8_backward_products.py``, H100, 32,768 tokens): fc1's ∂x
takes 0.439 ms in bf16, 0.232 in FP8 with per-tensor scales; fc2's ∂x keeps GELU's derivative in its epilogue,
and cuBLASLt's FP8 form of that epilogue is 2.7 times slower than bf16.  Why per-row scales: a per-tensor scale
needs the amax of all of ∂pre before its cast can start (a second pass over 302 MB at XL/2 batch 128), a row's
amax only that row, which the kernel re-reads from the cache.  The pass replaces the column sum for ∂b₁ that
the backward ran anyway (one read of ∂pre) and adds the e4m3 write (half of ∂pre's bytes).

``forward`` of ``rows_fp8_and_column_sums`` is the kernel on CUDA and the same equations in torch elsewhere
(``rows_fp8_reference``, what the tests compare the kernel with under Triton's interpreter); ``fp8_dx`` runs
the product (emulated in float32 from the same quantized operands on a CPU).

qkv's ∂x is the same product with ∂qkv (N·T, 3D) for ∂pre: the kernel that copies cuDNN's ∂q, ∂k, ∂v into ∂qkv
and sums the bias gradient writes its e4m3 copy and row scales in the same pass
(``ditkit.models.qkv_kernels.stack_rows_fp8``).  At 32,768 tokens of XL's width the stacking, the bias sum and ∂x
take 0.467 ms this way against 0.517 with the bf16 product (the rows kernel 0.215 against the stacking kernel's
0.165; ``benchmarks/fp8_backward_products.py``).  The product needs 3D to be a multiple of 16 (FP8's alignment),
which ``FusedAttention`` checks.
``train.fp8_backward`` (``enable_fp8_backward``).
"""
from __future__ import annotations

import torch

from ditkit.models import cublaslt, row_blocks
from ditkit.models.norm_kernels import FP8_MAX, quantize_fp8

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


def quantize_weight_columns(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """W (O, I) -> (q(Wᵀ / s') e4m3 (I, O) contiguous, s' (I,) float32 = max_o |W_oi| / 448): ∂x's second operand
    (K = O contiguous, as Hopper's FP8 kernels take it).  No gradient flows through it."""
    wt = w.detach().t()
    s = row_scales(wt)
    return quantize_rows(wt, s).contiguous(), s


@torch.library.custom_op("ditkit::fp8_dx", mutates_args=(),
                         schema="(Tensor gq, Tensor sg, Tensor wtq, Tensor sw, ScalarType dtype) -> Tensor")
def fp8_dx(gq, sg, wtq, sw, dtype):
    """∂x = (sg ⊗ sw) ⊙ (gq wtqᵀ) in ``dtype``: gq (M, O) e4m3 with sg (M,), wtq (I, O) e4m3 with sw (I,).  One cuBLASLt
    FP8 product on CUDA in bf16, else float32 arithmetic on the same quantized operands, rounded once."""
    if gq.is_cuda and cublaslt.available(gq.device) and dtype == torch.bfloat16:
        return cublaslt.linear_fp8(gq, sg, wtq, sw, mode=cublaslt.OUTER_VEC)
    return ((gq.float() * sg[:, None]) @ (wtq.float() * sw[:, None]).t()).to(dtype)


@fp8_dx.register_fake
def _(gq, sg, wtq, sw, dtype):
    return gq.new_empty(gq.shape[0], wtq.shape[0], dtype=dtype)


PARTS = ("fc1", "qkv")  # the ∂x products enable_fp8_backward can switch: the fused MLP's fc1, the fused attention's qkv


def enable_fp8_backward(model: torch.nn.Module, enabled: bool = True, parts: tuple[str, ...] = PARTS) -> int:
    """Run the ∂x products of ``parts`` in FP8 with per-token scales: fc1's in every ``FusedMlp``, qkv's in every
    ``FusedAttention`` of ``model`` (their ∂qkv then comes in e4m3 from the kernel that stacks it,
    ``ditkit.models.qkv_kernels.stack_rows_fp8``); returns how many modules."""
    from ditkit.models.fused_attention import FusedAttention  # they import this module
    from ditkit.models.fused_mlp import FusedMlp

    if isinstance(parts, str):
        raise TypeError(f"enable_fp8_backward: parts is a tuple of names from {PARTS}, got the string {parts!r}")
    unknown = set(parts) - set(PARTS)
    if unknown:
        raise ValueError(f"enable_fp8_backward: unknown parts {sorted(unknown)}; known: {PARTS}")
    kinds = tuple(kind for part, kind in (("fc1", FusedMlp), ("qkv", FusedAttention)) if part in parts)
    modules = [m for m in model.modules() if kinds and isinstance(m, kinds)]
    for m in modules:
        m.fp8_backward = enabled
    return len(modules)
