"""adaLN's modulated LayerNorm, with the gated residual before it, as two Triton kernels.

    forward   x' = x + α ⊙ (o + b)                    (the gated residual, when o is given; b: o's bias, if any)
              μ, r = mean(x'), 1 / sqrt(var(x') + ε)  over the hidden size D, per token
              x̂ = (x' − μ) r,   h = x̂ ⊙ (1 + γ) + β
    backward  u = ∂h ⊙ (1 + γ)
              ∂x' = r (u − mean(u) − x̂ mean(u ⊙ x̂)) + ∂x'_next     (∂x'_next: from the stream below)
              ∂β = Σ_t ∂h,   ∂γ = Σ_t ∂h ⊙ x̂,   ∂x = ∂x',   ∂o = ∂x' ⊙ α
              Σ_t ∂x' ⊙ o and S = Σ_t ∂x', from which ∂α = Σ_t ∂x' ⊙ o + b ⊙ S and ∂b = Σ_n α ⊙ S

x, o, x', h are (N, T, D); α, β, γ are per sample, (N, D) with any row stride (the chunks of the
adaLN output are views); b is (D,).  One forward program normalises a few whole rows; one backward
program walks a slice of one sample's tokens, so the token sums stay in registers and only one
partial sum per slice is written; one sum over the slices then gives all of them, stacked (in the
operator's traced backward, where compile fuses it with what follows).
Everything is computed in float32 and rounded once on store.  Handing o's bias to the kernel saves
the bias-gradient reduction over ∂o (a pass over a (tokens × D) tensor per residual): S is one more
token sum in registers.

Compiled by inductor, the same step reads and writes the stream several more times: XL's rows
(1152) are past its 1024-element limit for keeping a row in registers, and the token sums come out
as separate reduction kernels (``benchmarks/bench.py --profile``: about 33 GPU-ms of a 218-ms
DiT-XL/2 step at batch 128).

``forward_reference`` and ``backward_reference`` are the same equations in torch: the CPU path of
``ditkit.models.fused_norm``'s operators, and what the tests compare the kernels with (run by
Triton's interpreter on the CPU, ``TRITON_INTERPRET=1``).
"""
from __future__ import annotations

import torch

from ditkit.models import row_blocks

try:
    import triton
    import triton.language as tl
except ImportError:  # the CPU build of torch comes without Triton
    triton = None

FP8_MAX = 448.0  # the largest finite e4m3 value


def quantize_fp8(t: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """t / s as e4m3 (saturating at ±448), with s a float32 tensor that broadcasts against t ((1,): one scale;
    (M, 1): one per row): t ⊙ (1/s) in float32, rounded once, as the kernels compute it."""
    return (t.float() * (1.0 / scale.float())).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)


def forward_reference(x, o, gate, bias, shift, scale, eps: float, dtype: torch.dtype, fp8_scale=None):
    """-> (x' (or None without o), h in ``dtype``, μ (N, T) float32, r (N, T) float32), and with ``fp8_scale``
    (a (1,) float32 s) a fifth: h / s in e4m3, quantized from h's float32 value (not the rounded h)."""
    stream = x
    if o is not None:
        branch = o.float() + bias.float() if bias is not None else o.float()
        stream = (x.float() + gate.float().unsqueeze(1) * branch).to(x.dtype)
    xf = stream.float()
    mean = xf.mean(-1)
    rstd = torch.rsqrt(xf.var(-1, unbiased=False) + eps)
    h = (xf - mean.unsqueeze(-1)) * rstd.unsqueeze(-1) * (1 + scale.float().unsqueeze(1)) + shift.float().unsqueeze(1)
    out = (stream if o is not None else None), h.to(dtype), mean, rstd
    return out if fp8_scale is None else out + (quantize_fp8(h, fp8_scale),)


def backward_reference(gh, g_next, stream, o, gate, scale, mean, rstd):
    """-> (∂x (N, T, D) float32, ∂o or None, the token sums (∂β, ∂γ, and with o: Σ_t ∂x' ⊙ o, Σ_t ∂x') stacked,
    (2 or 4, N, D) float32)."""
    gh = gh.float()
    xhat = (stream.float() - mean.unsqueeze(-1)) * rstd.unsqueeze(-1)
    u = gh * (1 + scale.float().unsqueeze(1))
    dx = rstd.unsqueeze(-1) * (u - u.mean(-1, keepdim=True) - xhat * (u * xhat).mean(-1, keepdim=True))
    if g_next is not None:
        dx = dx + g_next.float()
    sums = [gh.sum(1), (gh * xhat).sum(1)]
    if o is None:
        return dx, None, torch.stack(sums)
    return dx, dx * gate.float().unsqueeze(1), torch.stack(sums + [(dx * o.float()).sum(1), dx.sum(1)])


if triton is not None:
    @triton.jit
    def _adaln_norm_forward_kernel(x_ptr, o_ptr, gate_ptr, bias_ptr, shift_ptr, scale_ptr, stream_ptr, h_ptr, mean_ptr,
                        rstd_ptr, q_ptr, q_scale_ptr, n_rows, tokens, width, stride_gate, stride_shift, stride_scale, eps,
                        RESIDUAL: tl.constexpr, BIAS: tl.constexpr, FP8: tl.constexpr, ROWS: tl.constexpr,
                        BLOCK: tl.constexpr):
        rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        cols = tl.arange(0, BLOCK)
        row_ok = rows < n_rows
        mask = row_ok[:, None] & (cols < width)[None, :]
        rows = rows.to(tl.int64)
        sample = rows // tokens
        at = rows[:, None] * width + cols[None, :]
        x = tl.load(x_ptr + at, mask=mask, other=0.0).to(tl.float32)
        if RESIDUAL:
            o = tl.load(o_ptr + at, mask=mask, other=0.0).to(tl.float32)
            if BIAS:
                o += tl.load(bias_ptr + cols, mask=cols < width, other=0.0).to(tl.float32)[None, :]
            gate = tl.load(gate_ptr + sample[:, None] * stride_gate + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            stream = (x + gate * o).to(stream_ptr.dtype.element_ty)
            tl.store(stream_ptr + at, stream, mask=mask)
            x = stream.to(tl.float32)  # normalise the stream as stored, which the backward reads
        mean = tl.sum(x, axis=1) / width
        xc = tl.where(mask, x - mean[:, None], 0.0)
        rstd = tl.math.rsqrt(tl.sum(xc * xc, axis=1) / width + eps)
        shift = tl.load(shift_ptr + sample[:, None] * stride_shift + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        scale = tl.load(scale_ptr + sample[:, None] * stride_scale + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        h = xc * rstd[:, None] * (1.0 + scale) + shift
        tl.store(h_ptr + at, h.to(h_ptr.dtype.element_ty), mask=mask)
        if FP8:
            q = tl.clamp(h * (1.0 / tl.load(q_scale_ptr)), -448.0, 448.0)
            tl.store(q_ptr + at, q.to(q_ptr.dtype.element_ty), mask=mask)
        tl.store(mean_ptr + rows, mean, mask=row_ok)
        tl.store(rstd_ptr + rows, rstd, mask=row_ok)

    @triton.jit
    def _adaln_norm_backward_kernel(gh_ptr, next_ptr, x_ptr, o_ptr, gate_ptr, scale_ptr, mean_ptr, rstd_ptr,
                         gx_ptr, go_ptr, partial_ptr, tokens, width, chunk, plane, stride_gate, stride_scale,
                         RESIDUAL: tl.constexpr, HAS_NEXT: tl.constexpr, ROWS: tl.constexpr, A: tl.constexpr,
                         B: tl.constexpr):
        """Program (n, part) walks tokens [part·chunk, …) of sample n, ROWS at a time, each row as blocks of A and B
        columns (``ditkit.models.row_blocks``); every input of a row is loaded before its arithmetic starts."""
        n = tl.program_id(0)
        part = tl.program_id(1)
        a_cols = tl.arange(0, A)
        b_cols = A + tl.arange(0, B)
        b_ok = b_cols < width
        scale1_a = 1.0 + tl.load(scale_ptr + n * stride_scale + a_cols).to(tl.float32)
        scale1_b = 1.0 + tl.load(scale_ptr + n * stride_scale + b_cols, mask=b_ok, other=0.0).to(tl.float32)
        gate_a = tl.zeros([A], dtype=tl.float32)
        gate_b = tl.zeros([B], dtype=tl.float32)
        if RESIDUAL:
            gate_a = tl.load(gate_ptr + n * stride_gate + a_cols).to(tl.float32)
            gate_b = tl.load(gate_ptr + n * stride_gate + b_cols, mask=b_ok, other=0.0).to(tl.float32)
        d_shift_a, d_scale_a = tl.zeros([A], dtype=tl.float32), tl.zeros([A], dtype=tl.float32)
        d_gate_a, d_stream_a = tl.zeros([A], dtype=tl.float32), tl.zeros([A], dtype=tl.float32)
        d_shift_b, d_scale_b = tl.zeros([B], dtype=tl.float32), tl.zeros([B], dtype=tl.float32)
        d_gate_b, d_stream_b = tl.zeros([B], dtype=tl.float32), tl.zeros([B], dtype=tl.float32)
        start = part * chunk
        stop = tl.minimum(start + chunk, tokens)
        for t0 in range(start, stop, ROWS):
            tok = t0 + tl.arange(0, ROWS)
            row_ok = tok < stop
            rows = n.to(tl.int64) * tokens + tok
            mask_a = row_ok[:, None] & (a_cols < A)[None, :]
            mask_b = row_ok[:, None] & b_ok[None, :]
            at_a = rows[:, None] * width + a_cols[None, :]
            at_b = rows[:, None] * width + b_cols[None, :]
            gh_a = tl.load(gh_ptr + at_a, mask=mask_a, other=0.0).to(tl.float32)
            gh_b = tl.load(gh_ptr + at_b, mask=mask_b, other=0.0).to(tl.float32)
            x_a = tl.load(x_ptr + at_a, mask=mask_a, other=0.0).to(tl.float32)
            x_b = tl.load(x_ptr + at_b, mask=mask_b, other=0.0).to(tl.float32)
            if HAS_NEXT:
                next_a = tl.load(next_ptr + at_a, mask=mask_a, other=0.0).to(tl.float32)
                next_b = tl.load(next_ptr + at_b, mask=mask_b, other=0.0).to(tl.float32)
            if RESIDUAL:
                o_a = tl.load(o_ptr + at_a, mask=mask_a, other=0.0).to(tl.float32)
                o_b = tl.load(o_ptr + at_b, mask=mask_b, other=0.0).to(tl.float32)
            mean = tl.load(mean_ptr + rows, mask=row_ok, other=0.0)[:, None]
            rstd = tl.load(rstd_ptr + rows, mask=row_ok, other=0.0)[:, None]
            xhat_a = tl.where(mask_a, (x_a - mean) * rstd, 0.0)
            xhat_b = tl.where(mask_b, (x_b - mean) * rstd, 0.0)
            d_shift_a += tl.sum(gh_a, axis=0)
            d_shift_b += tl.sum(gh_b, axis=0)
            d_scale_a += tl.sum(gh_a * xhat_a, axis=0)
            d_scale_b += tl.sum(gh_b * xhat_b, axis=0)
            u_a = gh_a * scale1_a[None, :]
            u_b = gh_b * scale1_b[None, :]
            mean_u = ((tl.sum(u_a, axis=1) + tl.sum(u_b, axis=1)) / width)[:, None]
            mean_ux = ((tl.sum(u_a * xhat_a, axis=1) + tl.sum(u_b * xhat_b, axis=1)) / width)[:, None]
            dx_a = rstd * (u_a - mean_u - xhat_a * mean_ux)
            dx_b = rstd * (u_b - mean_u - xhat_b * mean_ux)
            if HAS_NEXT:
                dx_a += next_a
                dx_b += next_b
            tl.store(gx_ptr + at_a, dx_a.to(gx_ptr.dtype.element_ty), mask=mask_a)
            tl.store(gx_ptr + at_b, dx_b.to(gx_ptr.dtype.element_ty), mask=mask_b)
            if RESIDUAL:
                tl.store(go_ptr + at_a, (dx_a * gate_a[None, :]).to(go_ptr.dtype.element_ty), mask=mask_a)
                tl.store(go_ptr + at_b, (dx_b * gate_b[None, :]).to(go_ptr.dtype.element_ty), mask=mask_b)
                d_gate_a += tl.sum(tl.where(mask_a, dx_a * o_a, 0.0), axis=0)
                d_gate_b += tl.sum(tl.where(mask_b, dx_b * o_b, 0.0), axis=0)
                d_stream_a += tl.sum(tl.where(mask_a, dx_a, 0.0), axis=0)
                d_stream_b += tl.sum(tl.where(mask_b, dx_b, 0.0), axis=0)
        here = (n * tl.num_programs(1) + part).to(tl.int64) * width
        plane = plane.to(tl.int64)
        row_blocks.store_row(partial_ptr, here, a_cols, b_cols, b_ok, d_shift_a, d_shift_b)
        row_blocks.store_row(partial_ptr, plane + here, a_cols, b_cols, b_ok, d_scale_a, d_scale_b)
        if RESIDUAL:
            row_blocks.store_row(partial_ptr, 2 * plane + here, a_cols, b_cols, b_ok, d_gate_a, d_gate_b)
            row_blocks.store_row(partial_ptr, 3 * plane + here, a_cols, b_cols, b_ok, d_stream_a, d_stream_b)


def _row_view(t: torch.Tensor) -> torch.Tensor:
    """A per-sample (N, D) tensor the kernels can index with one row stride."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _shape(x: torch.Tensor) -> tuple[int, int, int, int]:
    n, tokens, width = x.shape
    block = triton.next_power_of_2(width)
    return n, tokens, width, block


# Launch configurations chosen by ``benchmarks/fused_norm_check.py --sweep`` on an H100 at DiT-XL's
# and DiT-B's shapes (session 7: 8 warps made DiT-B's backward 2.6-3.6× slower than 4).  Session 10's
# sweep, after the backward gained its fourth token sum (``fused_norm_sweep_bias_h100.txt``): XL's
# residual backward is fastest with 4 rows per step (0.208 against 0.318 ms at batch 128, 0.065 against
# 0.091 at 32), B's with 2.  Its best forward for XL (4 rows, 8 warps: 0.116 against 0.129 ms alone)
# was slower inside the step (1.85 against 1.66 ms per XL/2 batch-32 step), so the forward keeps its own.
# Session 16's sweep, the backward's rows as two blocks (``ditkit.models.row_blocks``,
# ``fused_norm_sweep_row_blocks_h100.txt``): one row per step and 2 warps; XL's residual backward 0.203 ms at
# batch 128 (0.218 before), 0.060 at 32 (0.063); B's 0.154 (0.145); without the residual (one call per step)
# XL's 0.116 (0.102), B's 0.078 (0.062).
def forward_config(width: int) -> tuple[int, int]:
    """(rows per program, warps) of the forward kernel."""
    return max(1, 4096 // triton.next_power_of_2(width)), 4


def backward_config(n: int, tokens: int, width: int, residual: bool, device: torch.device) -> tuple[int, int, int]:
    """(rows per loop step, warps, tokens per program) of the backward kernel: as many tokens per program
    as still give about three programs per multiprocessor (the per-sample partial sums stay few)."""
    rows, warps = (1, 2) if residual else (2, 2)
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 8
    chunk = next((c for c in (64, 32, 16) if n * triton.cdiv(tokens, c) >= 3 * sms), 8)
    return rows, warps, triton.cdiv(chunk, rows) * rows


def backward_slices(n: int, tokens: int, width: int, residual: bool, device: torch.device) -> int:
    """How many token slices ``backward_partial`` writes a partial sum for (the default config's)."""
    return triton.cdiv(tokens, backward_config(n, tokens, width, residual, device)[2])


def forward_triton(x, o, gate, bias, shift, scale, eps: float, dtype: torch.dtype, fp8_scale=None,
                   config: tuple[int, int] | None = None):
    """``forward_reference`` as one kernel launch; x and o contiguous (N, T, D).  ``config``: see ``forward_config``."""
    n, tokens, width, block = _shape(x)
    residual = o is not None
    shift, scale = _row_view(shift), _row_view(scale)
    gate = _row_view(gate) if residual else shift
    stream = torch.empty_like(x) if residual else x
    h = torch.empty(x.shape, device=x.device, dtype=dtype)
    mean = torch.empty(n, tokens, device=x.device, dtype=torch.float32)
    rstd = torch.empty_like(mean)
    rows, warps = config or forward_config(width)
    grid = (triton.cdiv(n * tokens, rows),)
    has_bias = residual and bias is not None
    fp8 = fp8_scale is not None
    q = torch.empty(x.shape, device=x.device, dtype=torch.float8_e4m3fn) if fp8 else h
    _adaln_norm_forward_kernel[grid](x, o if residual else x, gate, bias if has_bias else shift, shift, scale, stream, h,
                                     mean, rstd, q, fp8_scale.float() if fp8 else mean, n * tokens, tokens, width,
                                     gate.stride(0), shift.stride(0), scale.stride(0), eps, RESIDUAL=residual,
                                     BIAS=has_bias, FP8=fp8, ROWS=rows, BLOCK=block, num_warps=warps)
    out = (stream if residual else None), h, mean, rstd
    return out + (q,) if fp8 else out


def backward_triton(gh, g_next, stream, o, gate, scale, mean, rstd, grad_dtypes,
                    config: tuple[int, int, int] | None = None):
    """``backward_reference`` as one kernel launch and one sum over the token slices; returns ∂x and ∂o in
    ``grad_dtypes`` (those of x and o) and the stacked per-sample sums in float32.  All (N, T, D) operands contiguous.
    ``config``: see ``backward_config``."""
    gx, go, partial = backward_partial(gh, g_next, stream, o, gate, scale, mean, rstd, grad_dtypes, config)
    return gx, go, partial.sum(2)


def backward_partial(gh, g_next, stream, o, gate, scale, mean, rstd, grad_dtypes,
                     config: tuple[int, int, int] | None = None):
    """``backward_triton`` without the sum over the slices: the partial sums come stacked as
    (2 or 4, N, slices, D) float32, for a caller whose compiled code sums them with what it makes of them
    (``ditkit.models.fused_norm``: one fused reduction instead of a torch sum of its own, ~10 µs per call)."""
    n, tokens, width, _ = _shape(stream)
    blocks = row_blocks.split(width)
    residual = o is not None
    scale = _row_view(scale)
    gate = _row_view(gate) if residual else scale
    rows, warps, chunk = config or backward_config(n, tokens, width, residual, stream.device)
    splits = triton.cdiv(tokens, chunk)
    gx = torch.empty(stream.shape, device=stream.device, dtype=grad_dtypes[0])
    go = torch.empty(stream.shape, device=stream.device, dtype=grad_dtypes[1]) if residual else gx
    partial = torch.empty(4 if residual else 2, n, splits, width, device=stream.device, dtype=torch.float32)
    _adaln_norm_backward_kernel[(n, splits)](
        gh, g_next if g_next is not None else gh, stream, o if residual else stream, gate, scale, mean, rstd, gx, go,
        partial, tokens, width, chunk, n * splits * width, gate.stride(0), scale.stride(0),
        RESIDUAL=residual, HAS_NEXT=g_next is not None, ROWS=rows, A=blocks[0], B=blocks[1], num_warps=warps)
    return gx, (go if residual else None), partial
