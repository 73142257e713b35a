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
``ditkit.fast.fused_norm``'s operators, and what the tests compare the kernels with (run by
Triton's interpreter on the CPU, ``TRITON_INTERPRET=1``).
"""
from __future__ import annotations

import torch

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
                         RESIDUAL: tl.constexpr, HAS_NEXT: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr):
        n = tl.program_id(0)
        part = tl.program_id(1)
        cols = tl.arange(0, BLOCK)
        col_ok = cols < width
        scale1 = 1.0 + tl.load(scale_ptr + n * stride_scale + cols, mask=col_ok, other=0.0).to(tl.float32)
        gate = tl.zeros([BLOCK], dtype=tl.float32)
        if RESIDUAL:
            gate = tl.load(gate_ptr + n * stride_gate + cols, mask=col_ok, other=0.0).to(tl.float32)
        d_shift = tl.zeros([BLOCK], dtype=tl.float32)
        d_scale = tl.zeros([BLOCK], dtype=tl.float32)
        d_gate = tl.zeros([BLOCK], dtype=tl.float32)
        d_stream = tl.zeros([BLOCK], dtype=tl.float32)
        start = part * chunk
        stop = tl.minimum(start + chunk, tokens)
        for t0 in range(start, stop, ROWS):
            tok = t0 + tl.arange(0, ROWS)
            row_ok = tok < stop
            rows = n.to(tl.int64) * tokens + tok
            mask = row_ok[:, None] & col_ok[None, :]
            at = rows[:, None] * width + cols[None, :]
            gh = tl.load(gh_ptr + at, mask=mask, other=0.0).to(tl.float32)
            x = tl.load(x_ptr + at, mask=mask, other=0.0).to(tl.float32)
            mean = tl.load(mean_ptr + rows, mask=row_ok, other=0.0)
            rstd = tl.load(rstd_ptr + rows, mask=row_ok, other=0.0)
            xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
            d_shift += tl.sum(gh, axis=0)
            d_scale += tl.sum(gh * xhat, axis=0)
            u = gh * scale1[None, :]
            mean_u = tl.sum(u, axis=1) / width
            mean_ux = tl.sum(u * xhat, axis=1) / width
            dx = rstd[:, None] * (u - mean_u[:, None] - xhat * mean_ux[:, None])
            if HAS_NEXT:
                dx += tl.load(next_ptr + at, mask=mask, other=0.0).to(tl.float32)
            tl.store(gx_ptr + at, dx.to(gx_ptr.dtype.element_ty), mask=mask)
            if RESIDUAL:
                o = tl.load(o_ptr + at, mask=mask, other=0.0).to(tl.float32)
                tl.store(go_ptr + at, (dx * gate[None, :]).to(go_ptr.dtype.element_ty), mask=mask)
                d_gate += tl.sum(tl.where(mask, dx * o, 0.0), axis=0)
                d_stream += tl.sum(tl.where(mask, dx, 0.0), axis=0)
        here = (n * tl.num_programs(1) + part).to(tl.int64) * width + cols
        plane = plane.to(tl.int64)
        tl.store(partial_ptr + here, d_shift, mask=col_ok)
        tl.store(partial_ptr + plane + here, d_scale, mask=col_ok)
        if RESIDUAL:
            tl.store(partial_ptr + 2 * plane + here, d_gate, mask=col_ok)
            tl.store(partial_ptr + 3 * plane + here, d_stream, mask=col_ok)


def _row_view(t: torch.Tensor) -> torch.Tensor:
    """A per-sample (N, D) tensor the kernels can index with one row stride."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _shape(x: torch.Tensor) -> tuple[int, int, int, int]:
    n, tokens, width = x.shape
    block = triton.next_power_of_2(width)
    return n, tokens, width, block


# Launch configurations chosen by ``benchmarks/fused_norm_check.py --sweep`` on an H100 at DiT-XL's
# and DiT-B's shapes (8 warps made DiT-B's backward 2.6-3.6× slower than 4).  The sweep after the
# backward gained its fourth token sum (``fused_norm_sweep_bias_h100.txt``): XL's
# residual backward is fastest with 4 rows per step (0.208 against 0.318 ms at batch 128, 0.065 against
# 0.091 at 32), B's with 2.  Its best forward for XL (4 rows, 8 warps: 0.116 against 0.129 ms alone)
# was slower inside the step (1.85 against 1.66 ms per XL/2 batch-32 step), so the forward keeps its own.
# The backward with a row as two blocks was tried too (``ditkit.kernels.row_blocks``;
# ``fused_norm_sweep_row_blocks_h100.txt``): XL's residual backward 0.203 ms at batch 128 (0.218 here), but B's
# 0.154 (0.145) and without the residual XL's 0.116 (0.102), B's 0.078 (0.062); in the step no change
# (XL/2 batch 128: 707.6 img/s before, 706.5 with it and fc1's rows kernel as two blocks).  Kept as it was.
def forward_config(width: int) -> tuple[int, int]:
    """(rows per program, warps) of the forward kernel."""
    return max(1, 4096 // triton.next_power_of_2(width)), 4


def backward_config(n: int, tokens: int, width: int, residual: bool, device: torch.device) -> tuple[int, int, int]:
    """(rows per loop step, warps, tokens per program) of the backward kernel: as many tokens per program
    as still give about three programs per multiprocessor (the per-sample partial sums stay few)."""
    block = triton.next_power_of_2(width)
    rows = 2 if residual and block == 1024 else min(4, max(1, 8192 // block))
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 8
    chunk = next((c for c in (64, 32, 16) if n * triton.cdiv(tokens, c) >= 3 * sms), 8)
    return rows, 4, triton.cdiv(chunk, rows) * rows


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
    (``ditkit.fast.fused_norm``: one fused reduction instead of a torch sum of its own, ~10 µs per call)."""
    n, tokens, width, block = _shape(stream)
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
        RESIDUAL=residual, HAS_NEXT=g_next is not None, ROWS=rows, BLOCK=block, num_warps=warps)
    return gx, (go if residual else None), partial
