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
(``ditkit.kernels.qkv.stack_rows_fp8``).  At 32,768 tokens of XL's width the stacking, the bias sum and ∂x
take 0.467 ms this way against 0.517 with the bf16 product (the rows kernel 0.215 against the stacking kernel's
0.165; ``benchmarks/fp8_backward_products.py``).  The product needs 3D to be a multiple of 16 (FP8's alignment),
which ``FusedAttention`` checks.
``TrainSpeed.fp8_backward`` (``ditkit.fast.blocks.enable_fp8_backward``).
"""
from __future__ import annotations

import torch

from ditkit.kernels import cublaslt
from ditkit.kernels.fp8_rows import quantize_rows, row_scales


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
