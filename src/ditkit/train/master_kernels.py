"""The optimizer's end of a step over flat buffers: the gradients' sum of squares, and AdamW with the
EMA update on float32 master weights that also writes the bf16 copy the model computes with.

Per element, with ĝ = c·g (c the clip coefficient) and the step count s already advanced:
    m ← β₁ m + (1 − β₁) ĝ,   v ← β₂ v + (1 − β₂) ĝ²
    p ← p − lr·λ·p,   p ← p − lr / (1 − β₁ˢ) · m / (√v / √(1 − β₂ˢ) + ε)      (torch's fused AdamW)
    w ← bf16(p)                                                              (the model's weight)
    θ_ema ← θ_ema + (1 − decay) (p − θ_ema)                                  (torch.lerp)
A skipped step (a non-finite gradient norm) leaves p, m, v and w unchanged; the EMA still moves
toward p, as in the trainer's other paths.

1 − β₁ and 1 − β₂ are taken in double precision and then rounded (float32 1 − β₂ would be 1.3e-5 off
for β₂ = 0.999), as torch's AdamW does.  The per-step numbers (c, the skip flag, lr·λ, lr / (1 − β₁ˢ), √(1 − β₂ˢ), 1 − decay) come in one
small float32 device tensor, ``SCALARS``, so nothing here waits for the host and a new learning rate
is a new value, not a new kernel.  Everything is one pass: read g (bf16), p, m, v, θ_ema; write p,
m, v, w, θ_ema — 36 bytes per parameter, at the memory's speed.

``sum_squares_reference`` and ``adamw_ema_reference`` are the same equations in torch: the CPU path,
and what the tests compare the kernels with (Triton's interpreter on the CPU).
"""
from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # the CPU build of torch comes without Triton
    triton = None

SCALARS = ("clip", "keep", "lr_wd", "step_size", "bc2_sqrt", "ema_weight")


def sum_squares_reference(x: torch.Tensor) -> torch.Tensor:
    """Σ x² in float32 (a 0-d tensor)."""
    return x.float().square().sum()


def adamw_ema_reference(grads, master, exp_avg, exp_avg_sq, ema, weights, scalars, beta1: float, beta2: float,
                        eps: float) -> None:
    """The update in place on flat tensors; ``weights`` (the low-precision copy) may be None."""
    clip, keep, lr_wd, step_size, bc2_sqrt, ema_weight = scalars.unbind()
    g = grads.float() * clip
    m = beta1 * exp_avg + (1 - beta1) * g
    v = beta2 * exp_avg_sq + (1 - beta2) * g * g
    p = master - lr_wd * master
    p = p - step_size * (m / (v.sqrt() / bc2_sqrt + eps))
    ok = keep > 0
    for dst, new in ((master, p), (exp_avg, m), (exp_avg_sq, v)):
        dst.copy_(torch.where(ok, new, dst))
    if weights is not None:
        weights.copy_(master)
    ema.lerp_(master, ema_weight)


if triton is not None:
    @triton.jit
    def _sum_squares_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        x = tl.load(x_ptr + offs, mask=offs < n, other=0.0).to(tl.float32)
        tl.store(out_ptr + tl.program_id(0), tl.sum(x * x, axis=0))

    @triton.jit
    def _adamw_ema_kernel(g_ptr, p_ptr, m_ptr, v_ptr, e_ptr, w_ptr, s_ptr, n, beta1, one_minus_beta1, beta2,
                          one_minus_beta2, eps, HAS_W: tl.constexpr, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        p = tl.load(p_ptr + offs, mask=mask, other=0.0)
        if tl.load(s_ptr + 1) != 0:  # not a skipped step
            g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32) * tl.load(s_ptr)
            m = beta1 * tl.load(m_ptr + offs, mask=mask, other=0.0) + one_minus_beta1 * g
            v = beta2 * tl.load(v_ptr + offs, mask=mask, other=0.0) + one_minus_beta2 * g * g
            p = p - tl.load(s_ptr + 2) * p
            denom = tl.div_rn(tl.sqrt_rn(v), tl.load(s_ptr + 4)) + eps
            p = p - tl.load(s_ptr + 3) * tl.div_rn(m, denom)
            tl.store(m_ptr + offs, m, mask=mask)
            tl.store(v_ptr + offs, v, mask=mask)
            tl.store(p_ptr + offs, p, mask=mask)
            if HAS_W:
                tl.store(w_ptr + offs, p.to(w_ptr.dtype.element_ty), mask=mask)
        e = tl.load(e_ptr + offs, mask=mask, other=0.0)
        tl.store(e_ptr + offs, e + tl.load(s_ptr + 5) * (p - e), mask=mask)


SUM_BLOCK, UPDATE_BLOCK, UPDATE_WARPS = 8192, 1024, 4


def sum_squares_triton(x: torch.Tensor) -> torch.Tensor:
    partials = torch.empty(triton.cdiv(x.numel(), SUM_BLOCK), device=x.device, dtype=torch.float32)
    _sum_squares_kernel[(partials.numel(),)](x, partials, x.numel(), BLOCK=SUM_BLOCK, num_warps=8)
    return partials.sum()


def adamw_ema_triton(grads, master, exp_avg, exp_avg_sq, ema, weights, scalars, beta1: float, beta2: float,
                     eps: float) -> None:
    n = master.numel()
    _adamw_ema_kernel[(triton.cdiv(n, UPDATE_BLOCK),)](
        grads, master, exp_avg, exp_avg_sq, ema, weights if weights is not None else master, scalars, n,
        beta1, 1 - beta1, beta2, 1 - beta2, eps, HAS_W=weights is not None, BLOCK=UPDATE_BLOCK, num_warps=UPDATE_WARPS)
