"""The optimizer's end of a step over flat buffers: the gradients' sum of squares, and AdamW with the
EMA update on float32 master weights that also writes the bf16 copy the model computes with.

Per element, with ĝ = c·g (c the clip coefficient) and the step count s already advanced:
    m ← β₁ m + (1 − β₁) ĝ,   v ← β₂ v + (1 − β₂) ĝ²
    p ← p − lr·λ·p,   p ← p − lr / (1 − β₁ˢ) · m / (√v / √(1 − β₂ˢ) + ε)      (torch's fused AdamW)
    w ← bf16(p)                                                              (the model's weight)
    θ_ema ← θ_ema + (1 − decay) (p − θ_ema)                                  (torch.lerp)
A skipped step (a non-finite gradient norm) leaves p, m, v and w unchanged; the EMA still moves
toward p, as in the trainer's other paths.

With bf16 weights the float32 master is not stored whole: its upper 16 bits would repeat the bf16
weight w (they are w, up to the rounding), so the master is kept as w and a 16-bit remainder,
``lo = bits(p) − bits(w)`` (``split_master``; ``join_master`` puts them together).  The kernel reads w
and lo (4 bytes) instead of p (4), and writes w and lo (4) instead of p and w (6).  w stays p rounded
to nearest even, as autocast casts it.  The remainder spans −2¹⁵ … 2¹⁵; the one value past int16, +2¹⁵
(an exact tie that rounded down), is stored as 2¹⁵ − 1, which moves that master by one float32 step,
toward w (about 1 in 131,072 elements per step; w = bf16(p) still holds).

1 − β₁ and 1 − β₂ are taken in double precision and then rounded (float32 1 − β₂ would be 1.3e-5 off
for β₂ = 0.999), as torch's AdamW does.  The per-step numbers (c, the skip flag, lr·λ, lr / (1 − β₁ˢ), √(1 − β₂ˢ), 1 − decay) come in one
small float32 device tensor, ``SCALARS``, so nothing here waits for the host and a new learning rate
is a new value, not a new kernel.  Everything is one pass: read g (bf16), w and lo, m, v, θ_ema; write
w and lo, m, v, θ_ema — 34 bytes per parameter (36 with p whole), at the memory's speed.

The gradients stay where autograd put them, one tensor per parameter: the kernels read them through
a table of their addresses, made each step (``pointer_table``), and a fixed table that maps each
program's block to one parameter and its place in the flat buffers (``FlatLayout``).  Copying them
into one flat buffer first would be another 4 bytes per parameter (1.2 ms per DiT-XL/2 step).

``sum_squares_reference`` and ``adamw_ema_reference`` are the same equations in torch: the CPU path,
and what the tests compare the kernels with (Triton's interpreter on the CPU).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # the CPU build of torch comes without Triton
    triton = None

SCALARS = ("clip", "keep", "lr_wd", "step_size", "bc2_sqrt", "ema_weight")  # their order in the device tensor
BLOCK, WARPS = 1024, 4
ALIGN = 128  # elements: each parameter starts 256 bytes in (bf16), as cuBLASLt's fused epilogues want


@dataclass
class FlatLayout:
    """Where each parameter sits in the flat buffers (``offset``, ``numel``; starts padded to ALIGN),
    and for each block of BLOCK elements the parameter it reads (``block_param``) and where in it
    (``block_start``).  ``size``: the flat buffers' length."""
    offsets: list[int]
    size: int
    offset: torch.Tensor  # (P,) int64
    numel: torch.Tensor  # (P,) int64
    block_param: torch.Tensor  # (B,) int32
    block_start: torch.Tensor  # (B,) int64
    block: int = BLOCK  # elements per program
    warps: int = WARPS


def flat_layout(numels: list[int], device: torch.device, block: int = BLOCK, warps: int = WARPS) -> FlatLayout:
    offsets, end = [], 0
    for n in numels:
        offsets.append(end)
        end += -(-n // ALIGN) * ALIGN
    blocks = [(i, s) for i, n in enumerate(numels) for s in range(0, n, block)]
    return FlatLayout(offsets, end, torch.tensor(offsets, dtype=torch.int64, device=device),
                      torch.tensor(numels, dtype=torch.int64, device=device),
                      torch.tensor([i for i, _ in blocks], dtype=torch.int32, device=device),
                      torch.tensor([s for _, s in blocks], dtype=torch.int64, device=device), block, warps)


def pointer_table(grads: list[torch.Tensor], device: torch.device) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The gradients' addresses as an int64 device tensor (copied from pinned memory, no host wait),
    and the tensors it points to (contiguous copies where a gradient is not), to keep alive until
    the kernels are queued."""
    grads = [g if g.is_contiguous() else g.contiguous() for g in grads]
    table = torch.tensor([g.data_ptr() for g in grads], dtype=torch.int64)
    if device.type == "cuda":
        return table.pin_memory().to(device, non_blocking=True), grads
    return table, grads


def _gathered(grads: list[torch.Tensor], layout: FlatLayout) -> torch.Tensor:
    """The gradients as one float32 flat tensor in ``layout`` (zeros in the padding)."""
    flat = torch.zeros(layout.size, device=grads[0].device)
    for g, start in zip(grads, layout.offsets):
        flat[start:start + g.numel()] = g.reshape(-1)
    return flat


def split_master(p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 p -> (w = bf16(p), rounded to nearest even; lo = bits(p) − bits(w) as int16, +2¹⁵ stored as 2¹⁵ − 1)."""
    w = p.to(torch.bfloat16)
    lo = p.view(torch.int32).to(torch.int64) - w.float().view(torch.int32).to(torch.int64)
    return w, lo.clamp(max=32767).to(torch.int16)


def join_master(w: torch.Tensor, lo: torch.Tensor) -> torch.Tensor:
    """The float32 master from ``split_master``'s halves (bits(w) + lo; same sign, so no int32 overflow)."""
    return (w.float().view(torch.int32) + lo.to(torch.int32)).view(torch.float32)


def sum_squares_reference(grads: list[torch.Tensor], layout: FlatLayout) -> torch.Tensor:
    """Σ g² over all the gradients, in float32 (a 0-d tensor)."""
    return _gathered(grads, layout).square().sum()


def adamw_ema_reference(grads: list[torch.Tensor], layout: FlatLayout, master, exp_avg, exp_avg_sq, ema, weights, scalars,
                        beta1: float, beta2: float, eps: float) -> None:
    """The update in place on the flat tensors.  With ``weights`` (the bf16 copy), ``master`` is the int16
    remainder (``split_master``); without, the float32 master."""
    clip, keep, lr_wd, step_size, bc2_sqrt, ema_weight = scalars.unbind()
    old = join_master(weights, master) if weights is not None else master
    g = _gathered(grads, layout) * clip
    m = beta1 * exp_avg + (1 - beta1) * g
    v = beta2 * exp_avg_sq + (1 - beta2) * g * g
    p = old - lr_wd * old
    p = p - step_size * (m / (v.sqrt() / bc2_sqrt + eps))
    ok = keep > 0
    p = torch.where(ok, p, old)
    for dst, new in ((exp_avg, m), (exp_avg_sq, v)):
        dst.copy_(torch.where(ok, new, dst))
    if weights is not None:
        w, lo = split_master(p)
        weights.copy_(w)
        master.copy_(lo)
        p = join_master(w, lo)
    else:
        master.copy_(p)
    ema.lerp_(p, ema_weight)


if triton is not None:
    # a jitted kernel may read module-level names only as constexprs
    _CLIP, _KEEP, _LR_WD, _STEP_SIZE, _BC2_SQRT, _EMA_WEIGHT = map(tl.constexpr, range(len(SCALARS)))  # SCALARS

    @triton.jit
    def _block(table_ptr, offset_ptr, numel_ptr, block_param_ptr, block_start_ptr, G_TYPE: tl.constexpr,
               BLOCK: tl.constexpr):
        """This program's block: its gradient pointers, its offsets in the flat buffers, its mask."""
        i = tl.load(block_param_ptr + tl.program_id(0))
        local = tl.load(block_start_ptr + tl.program_id(0)) + tl.arange(0, BLOCK)
        mask = local < tl.load(numel_ptr + i)
        g_ptrs = tl.load(table_ptr + i).to(tl.pointer_type(G_TYPE)) + local
        return g_ptrs, tl.load(offset_ptr + i) + local, mask

    @triton.jit
    def _bf16_nearest_even(x):
        """float32 -> bf16, rounded to nearest even in integer arithmetic: what torch's cast does, and
        the same in Triton's interpreter (whose own cast truncates).  The masters are finite."""
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        return bits.to(tl.uint16).to(tl.bfloat16, bitcast=True)

    @triton.jit
    def _joined(w, lo):
        """float32 from bf16 w and int16 lo: bits(w) · 2¹⁶ + lo, in wrapping uint32 arithmetic."""
        hi = w.to(tl.uint16, bitcast=True).to(tl.uint32)
        return ((hi << 16) + lo.to(tl.int32).to(tl.uint32, bitcast=True)).to(tl.float32, bitcast=True)

    @triton.jit
    def _remainder(p, w):
        """int16 bits(p) − bits(w) for w = bf16(p) (|·| ≤ 2¹⁵; +2¹⁵ stored as 2¹⁵ − 1)."""
        hi = w.to(tl.uint16, bitcast=True).to(tl.uint32) << 16
        diff = p.to(tl.int32, bitcast=True) - hi.to(tl.int32, bitcast=True)
        return tl.minimum(diff, 32767).to(tl.int16)

    @triton.jit
    def _sum_squares_kernel(table_ptr, offset_ptr, numel_ptr, block_param_ptr, block_start_ptr, out_ptr,
                            G_TYPE: tl.constexpr, BLOCK: tl.constexpr):
        g_ptrs, _, mask = _block(table_ptr, offset_ptr, numel_ptr, block_param_ptr, block_start_ptr, G_TYPE, BLOCK)
        g = tl.load(g_ptrs, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + tl.program_id(0), tl.sum(g * g, axis=0))

    @triton.jit
    def _adamw_ema_kernel(table_ptr, offset_ptr, numel_ptr, block_param_ptr, block_start_ptr, p_ptr, m_ptr, v_ptr,
                          e_ptr, w_ptr, s_ptr, beta1, one_minus_beta1, beta2, one_minus_beta2, eps,
                          G_TYPE: tl.constexpr, HAS_W: tl.constexpr, BLOCK: tl.constexpr):
        g_ptrs, offs, mask = _block(table_ptr, offset_ptr, numel_ptr, block_param_ptr, block_start_ptr, G_TYPE, BLOCK)
        if HAS_W:  # p_ptr: the int16 remainder
            p = _joined(tl.load(w_ptr + offs, mask=mask, other=0.0), tl.load(p_ptr + offs, mask=mask, other=0))
        else:
            p = tl.load(p_ptr + offs, mask=mask, other=0.0)
        if tl.load(s_ptr + _KEEP) != 0:  # not a skipped step
            g = tl.load(g_ptrs, mask=mask, other=0.0).to(tl.float32) * tl.load(s_ptr + _CLIP)
            m = beta1 * tl.load(m_ptr + offs, mask=mask, other=0.0) + one_minus_beta1 * g
            v = beta2 * tl.load(v_ptr + offs, mask=mask, other=0.0) + one_minus_beta2 * g * g
            p = p - tl.load(s_ptr + _LR_WD) * p
            denom = tl.div_rn(tl.sqrt_rn(v), tl.load(s_ptr + _BC2_SQRT)) + eps
            p = p - tl.load(s_ptr + _STEP_SIZE) * tl.div_rn(m, denom)
            tl.store(m_ptr + offs, m, mask=mask)
            tl.store(v_ptr + offs, v, mask=mask)
            if HAS_W:
                w = _bf16_nearest_even(p)
                lo = _remainder(p, w)
                tl.store(w_ptr + offs, w, mask=mask)
                tl.store(p_ptr + offs, lo, mask=mask)
                p = _joined(w, lo)  # the master as stored: the EMA moves toward it
            else:
                tl.store(p_ptr + offs, p, mask=mask)
        e = tl.load(e_ptr + offs, mask=mask, other=0.0)
        tl.store(e_ptr + offs, e + tl.load(s_ptr + _EMA_WEIGHT) * (p - e), mask=mask)

    G_TYPES = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}


def _layout_args(layout: FlatLayout, table: torch.Tensor) -> tuple:
    return table, layout.offset, layout.numel, layout.block_param, layout.block_start


def sum_squares_triton(table: torch.Tensor, grad_dtype: torch.dtype, layout: FlatLayout) -> torch.Tensor:
    """Σ g² of the gradients at the addresses in ``table`` (``pointer_table``)."""
    partials = torch.empty(layout.block_param.numel(), device=layout.offset.device, dtype=torch.float32)
    _sum_squares_kernel[(partials.numel(),)](*_layout_args(layout, table), partials, G_TYPE=G_TYPES[grad_dtype],
                                             BLOCK=layout.block, num_warps=layout.warps)
    return partials.sum()


def adamw_ema_triton(table: torch.Tensor, grad_dtype: torch.dtype, layout: FlatLayout, master, exp_avg, exp_avg_sq, ema,
                     weights, scalars, beta1: float, beta2: float, eps: float) -> None:
    """``adamw_ema_reference`` for the gradients at the addresses in ``table``; ``weights`` bf16 (``master``
    then the int16 remainder) or None."""
    _adamw_ema_kernel[(layout.block_param.numel(),)](
        *_layout_args(layout, table), master, exp_avg, exp_avg_sq, ema, weights if weights is not None else master,
        scalars, beta1, 1 - beta1, beta2, 1 - beta2, eps, G_TYPE=G_TYPES[grad_dtype], HAS_W=weights is not None,
        BLOCK=layout.block, num_warps=layout.warps)
