"""The MLP's first product in FP8 (e4m3), with GELU still in its epilogue: fc1's forward in a fused block.

    h   = LN(x)(1 + γ) + β                          the norm kernel writes h (bf16) and q(h / s_h) (e4m3)
    s_h = (√(D−1)·max|1 + γ| + max|β|) / 448        a bound on |h| from the modulation alone (below)
    s_W = max|W₁| / 448                             per tensor, each step, from the bf16 weight
    pre = s_h s_W · q(h / s_h) q(W₁ / s_W)ᵀ + b₁,   a = GELU(pre)       one cuBLASLt FP8 product (GELU_AUX_BIAS)

with q the rounding to e4m3.  The backward is the fused MLP's, in bf16: ∂W₁ = ∂preᵀ h from the bf16 h, and
∂h = ∂pre W₁ from the bf16 weight (the quantization passes the gradient straight through).

Why fc1 only: measured on an H100 (``benchmarks/fp8_lt_products.py``), fc1's FP8 product with its GELU epilogue
took 0.106 ms against 0.151 in bf16 at 8,192 tokens (0.417 against 0.577 at 32,768); without an epilogue to
keep, row-wise FP8 had not paid for fc1 (session 12), and qkv's input goes to cuDNN's attention operator.
Why one scale per tensor: cuBLASLt's per-row scales (``OUTER_VEC``) took 0.125 ms.  Why a bound and not the
amax of h: the amax is a reduction over the whole (tokens × D) h that must finish before its cast can start,
a second pass; the bound needs only the (N, D) modulation.  LayerNorm without an affine map gives x̂ with mean
0 and Σ x̂² ≤ D, so |x̂| ≤ √(D−1), and |h| = |x̂ (1 + γ) + β| ≤ √(D−1)·|1 + γ| + |β|: h / s_h never saturates.
The bound is looser than the amax (|x̂| rarely passes 10 at D = 1152, where √(D−1) ≈ 34); that costs range
at the bottom, where e4m3 turns subnormal below 2⁻⁶·s_h (|h| < 0.0015 at a bound of 40), not precision.

``ditkit.models.fused_norm.enable_fp8_forward`` switches it on in a DiT converted by ``convert_to_fused_norm``
whose MLPs are ``FusedMlp``s (``train.fp8_forward``); the network's Parameters, state dict and checkpoints are unchanged, so
the EMA and any sampler use the ordinary layers.  On a CPU the product is emulated in float32 from the same
quantized operands (what the tests compare the GPU against).
"""
from __future__ import annotations

import math

import torch

from ditkit.models.norm_kernels import FP8_MAX, quantize_fp8


def norm_output_scale(shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """s_h (1,) float32 for h = LN(x)(1 + γ) + β over D = shift.shape[-1]: the bound on |h| over every sample / 448."""
    bound = math.sqrt(shift.shape[-1] - 1) * (1 + scale.float()).abs() + shift.float().abs()  # (N, D)
    return (bound.amax() / FP8_MAX).clamp(min=1e-12).reshape(1)


def quantize_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q(W / s_W) e4m3, s_W (1,) float32) with s_W = max|W| / 448; no gradient flows through it."""
    w = w.detach()
    s = (w.abs().amax().float() / FP8_MAX).clamp(min=1e-12).reshape(1)
    return quantize_fp8(w, s), s

