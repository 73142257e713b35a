"""FP8 (e4m3) forward products for the two linears whose input a norm kernel makes: qkv, and the MLP's fc1 with
GELU still in its epilogue.

    h   = LN(x)(1 + γ) + β                          the norm kernel writes h (bf16) and q(h / s_h) (e4m3)
    s_h = (√(D−1)·max|1 + γ| + max|β|) / 448        a bound on |h| from the modulation alone (below)
    s_W = max|W| / 448                              per tensor, each step, from the bf16 weight
    qkv = s_h s_W · q(h / s_h) q(W_qkv / s_W)ᵀ + b                       one cuBLASLt FP8 product (BIAS)
    pre = s_h s_W · q(h / s_h) q(W₁ / s_W)ᵀ + b₁,   a = GELU(pre)       one cuBLASLt FP8 product (GELU_AUX_BIAS)

with q the rounding to e4m3.  The backward is the fused operators' own, in bf16: ∂W = ∂yᵀ h from the bf16 h and
∂h = ∂y W from the bf16 weight (the quantization passes the gradient straight through).

Measured on an H100 at DiT-XL/2's shapes, 8,192 tokens (``benchmarks/fp8_lt_products.py``): qkv 0.094 → 0.060 ms,
fc1 with its GELU epilogue 0.151 → 0.106.  Not proj and fc2: their inputs come from cuDNN's attention and from
fc1's epilogue, which write bf16 (the backward's ∂W needs it), so FP8 would cost a cast pass of its own; proj
gains nothing anyway (0.053 → 0.057).  Why one scale per tensor: cuBLASLt's per-row scales (``OUTER_VEC``) took
0.125 ms for fc1.  Why a bound and not the amax of h: the amax is a reduction over the whole (tokens × D) h
that must finish before its cast can start, a second pass; the bound needs only the (N, D) modulation.
LayerNorm without an affine map gives x̂ with mean 0 and Σ x̂² ≤ D, so |x̂| ≤ √(D−1), and
|h| = |x̂ (1 + γ) + β| ≤ √(D−1)·|1 + γ| + |β|: h / s_h never saturates.  The bound is looser than the amax
(√(D−1) ≈ 34 at D = 1152); that costs range at the bottom, where e4m3 turns subnormal below 2⁻⁶·s_h
(|h| < 0.0015 at a bound of 40), not precision.

``ditkit.fast.fused_norm.enable_fp8_forward`` switches it on in a DiT converted by ``convert_to_fused_norm``
whose MLPs are ``FusedMlp``s and attentions ``FusedAttention``s (``TrainSpeed.fp8_forward``); the network's Parameters,
state dict and checkpoints are unchanged, so the EMA and any sampler use the ordinary layers.  On a CPU the
products are emulated in float32 from the same quantized operands (what the tests compare the GPU against).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ditkit.kernels import cublaslt
from ditkit.kernels.norm import FP8_MAX, quantize_fp8


def norm_output_scale(shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """s_h (1,) float32 for h = LN(x)(1 + γ) + β over D = shift.shape[-1]: the bound on |h| over every sample / 448."""
    bound = math.sqrt(shift.shape[-1] - 1) * (1 + scale.float()).abs() + shift.float().abs()  # (N, D)
    return (bound.amax() / FP8_MAX).clamp(min=1e-12).reshape(1)


def quantize_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q(W / s_W) e4m3, s_W (1,) float32) with s_W = max|W| / 448; no gradient flows through it."""
    w = w.detach()
    s = (w.abs().amax().float() / FP8_MAX).clamp(min=1e-12).reshape(1)
    return quantize_fp8(w, s), s


def fp8_linear(xq, sx, wq, sw, b, dtype: torch.dtype, gelu: bool = False):
    """y = sx sw · xq wqᵀ + b in ``dtype`` (and with ``gelu``: (GELU(y), y)), xq (M, K) and wq (N, K) e4m3 with (1,)
    float32 scales: one cuBLASLt FP8 product on CUDA in bf16, else float32 arithmetic on the same quantized operands
    (GELU of the float32 y; each result rounded once)."""
    if xq.is_cuda and cublaslt.available(xq.device) and dtype == torch.bfloat16:
        return cublaslt.linear_fp8(xq, sx, wq, sw, b.to(dtype) if b is not None else None, gelu=gelu)
    y = (xq.float() * sx) @ (wq.float() * sw).t()
    y = y + b.float() if b is not None else y
    return (F.gelu(y, approximate="tanh").to(dtype), y.to(dtype)) if gelu else y.to(dtype)
