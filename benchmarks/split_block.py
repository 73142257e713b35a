"""Whether the row kernels that loop over tokens (the norm backward, fc1's rows kernel) reach more bandwidth when a
row of a width that is no power of two is held as two power-of-two parts (1152 = 1024 + 128, 4608 = 4096 + 512)
instead of one block padded to the next power of two (2048, 8192: 44% of the lanes masked, registers held for
nothing).  Trial kernels here, timed against the library's at DiT-XL/2 batch-128 shapes, outputs compared.

    PYTHONPATH=src:benchmarks python benchmarks/split_block.py
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from bench import median_ms
from ditkit.models import fp8_backward, norm_kernels


@triton.jit
def _rows_fp8_split(g_ptr, q_ptr, s_ptr, part_ptr, n_rows, width, rows_per_program, A: tl.constexpr, B: tl.constexpr):
    p = tl.program_id(0)
    ca = tl.arange(0, A)
    cb = A + tl.arange(0, B)
    okb = cb < width
    sa = tl.zeros([A], dtype=tl.float32)
    sb = tl.zeros([B], dtype=tl.float32)
    first = p.to(tl.int64) * rows_per_program
    for i in range(0, tl.minimum(rows_per_program, n_rows - first)):
        row = first + i
        ta = tl.load(g_ptr + row * width + ca).to(tl.float32)
        tb = tl.load(g_ptr + row * width + cb, mask=okb, other=0.0).to(tl.float32)
        s = tl.maximum(tl.maximum(tl.max(tl.abs(ta), axis=0), tl.max(tl.abs(tb), axis=0)), 1e-30) / 448.0
        tl.store(s_ptr + row, s)
        tl.store(q_ptr + row * width + ca, tl.clamp(ta * (1.0 / s), -448.0, 448.0).to(q_ptr.dtype.element_ty))
        tl.store(q_ptr + row * width + cb, tl.clamp(tb * (1.0 / s), -448.0, 448.0).to(q_ptr.dtype.element_ty), mask=okb)
        sa += ta
        sb += tb
    tl.store(part_ptr + p.to(tl.int64) * width + ca, sa)
    tl.store(part_ptr + p.to(tl.int64) * width + cb, sb, mask=okb)


def rows_split(g, a, b, per_sm=4, warps=8):
    m, n = g.shape
    sms = torch.cuda.get_device_properties(g.device).multi_processor_count
    per = -(-m // (per_sm * sms))
    programs = -(-m // per)
    q = torch.empty(m, n, device=g.device, dtype=torch.float8_e4m3fn)
    s = torch.empty(m, device=g.device, dtype=torch.float32)
    sums = torch.empty(programs, n, device=g.device, dtype=torch.float32)
    _rows_fp8_split[(programs,)](g, q, s, sums, m, n, per, A=a, B=b, num_warps=warps)
    return q, s, sums


@triton.jit
def _norm_bwd_split(gh_ptr, next_ptr, x_ptr, o_ptr, gate_ptr, scale_ptr, mean_ptr, rstd_ptr, gx_ptr, go_ptr, partial_ptr,
                    tokens, width, chunk, plane, stride_gate, stride_scale, A: tl.constexpr, B: tl.constexpr):
    """The residual backward of norm_kernels (HAS_NEXT, RESIDUAL), one token per loop step, a row as A + B columns."""
    n = tl.program_id(0)
    part = tl.program_id(1)
    ca = tl.arange(0, A)
    cb = A + tl.arange(0, B)
    okb = cb < width
    s1a = 1.0 + tl.load(scale_ptr + n * stride_scale + ca).to(tl.float32)
    s1b = 1.0 + tl.load(scale_ptr + n * stride_scale + cb, mask=okb, other=0.0).to(tl.float32)
    ga = tl.load(gate_ptr + n * stride_gate + ca).to(tl.float32)
    gb = tl.load(gate_ptr + n * stride_gate + cb, mask=okb, other=0.0).to(tl.float32)
    d_shift_a = tl.zeros([A], dtype=tl.float32)
    d_scale_a = tl.zeros([A], dtype=tl.float32)
    d_gate_a = tl.zeros([A], dtype=tl.float32)
    d_stream_a = tl.zeros([A], dtype=tl.float32)
    d_shift_b = tl.zeros([B], dtype=tl.float32)
    d_scale_b = tl.zeros([B], dtype=tl.float32)
    d_gate_b = tl.zeros([B], dtype=tl.float32)
    d_stream_b = tl.zeros([B], dtype=tl.float32)
    start = part * chunk
    stop = tl.minimum(start + chunk, tokens)
    for t in range(start, stop):
        row = n.to(tl.int64) * tokens + t
        at_a = row * width + ca
        at_b = row * width + cb
        gh_a = tl.load(gh_ptr + at_a).to(tl.float32)
        gh_b = tl.load(gh_ptr + at_b, mask=okb, other=0.0).to(tl.float32)
        x_a = tl.load(x_ptr + at_a).to(tl.float32)
        x_b = tl.load(x_ptr + at_b, mask=okb, other=0.0).to(tl.float32)
        nx_a = tl.load(next_ptr + at_a).to(tl.float32)
        nx_b = tl.load(next_ptr + at_b, mask=okb, other=0.0).to(tl.float32)
        o_a = tl.load(o_ptr + at_a).to(tl.float32)
        o_b = tl.load(o_ptr + at_b, mask=okb, other=0.0).to(tl.float32)
        mean = tl.load(mean_ptr + row)
        rstd = tl.load(rstd_ptr + row)
        xh_a = (x_a - mean) * rstd
        xh_b = tl.where(okb, (x_b - mean) * rstd, 0.0)
        d_shift_a += gh_a
        d_shift_b += gh_b
        d_scale_a += gh_a * xh_a
        d_scale_b += gh_b * xh_b
        u_a = gh_a * s1a
        u_b = gh_b * s1b
        mean_u = (tl.sum(u_a, axis=0) + tl.sum(u_b, axis=0)) / width
        mean_ux = (tl.sum(u_a * xh_a, axis=0) + tl.sum(u_b * xh_b, axis=0)) / width
        dx_a = rstd * (u_a - mean_u - xh_a * mean_ux) + nx_a
        dx_b = tl.where(okb, rstd * (u_b - mean_u - xh_b * mean_ux) + nx_b, 0.0)
        tl.store(gx_ptr + at_a, dx_a.to(gx_ptr.dtype.element_ty))
        tl.store(gx_ptr + at_b, dx_b.to(gx_ptr.dtype.element_ty), mask=okb)
        tl.store(go_ptr + at_a, (dx_a * ga).to(go_ptr.dtype.element_ty))
        tl.store(go_ptr + at_b, (dx_b * gb).to(go_ptr.dtype.element_ty), mask=okb)
        d_gate_a += dx_a * o_a
        d_gate_b += dx_b * o_b
        d_stream_a += dx_a
        d_stream_b += dx_b
    here = (n * tl.num_programs(1) + part).to(tl.int64) * width
    plane = plane.to(tl.int64)
    tl.store(partial_ptr + here + ca, d_shift_a)
    tl.store(partial_ptr + here + cb, d_shift_b, mask=okb)
    tl.store(partial_ptr + plane + here + ca, d_scale_a)
    tl.store(partial_ptr + plane + here + cb, d_scale_b, mask=okb)
    tl.store(partial_ptr + 2 * plane + here + ca, d_gate_a)
    tl.store(partial_ptr + 2 * plane + here + cb, d_gate_b, mask=okb)
    tl.store(partial_ptr + 3 * plane + here + ca, d_stream_a)
    tl.store(partial_ptr + 3 * plane + here + cb, d_stream_b, mask=okb)


def norm_bwd_split(gh, g_next, stream, o, gate, scale, mean, rstd, chunk, warps, a=1024, b=128):
    n, tokens, width = stream.shape
    splits = triton.cdiv(tokens, chunk)
    gx, go = torch.empty_like(stream), torch.empty_like(stream)
    partial = torch.empty(4, n, splits, width, device=stream.device, dtype=torch.float32)
    _norm_bwd_split[(n, splits)](gh, g_next, stream, o, gate, scale, mean, rstd, gx, go, partial, tokens, width, chunk,
                                 n * splits * width, gate.stride(0), scale.stride(0), A=a, B=b, num_warps=warps)
    return gx, go, partial


def main() -> None:
    dev, bf = torch.device("cuda"), torch.bfloat16
    print(torch.cuda.get_device_name(), "torch", torch.__version__)
    m, width, hidden = 32768, 1152, 4608
    gpre = torch.randn(m, hidden, device=dev, dtype=bf) * torch.rand(m, 1, device=dev, dtype=bf)
    want = fp8_backward.rows_fp8_triton(gpre)
    t = median_ms(lambda: fp8_backward.rows_fp8_triton(gpre), 30, dev)
    moved = m * hidden * 3
    print(f"| fc1 rows kernel | library (8192 block) | {t:.3f} ms | {moved / t / 1e6:.0f} GB/s | |")
    for per_sm, warps in ((4, 8), (4, 4), (8, 4), (2, 8), (8, 8)):
        got = rows_split(gpre, 4096, 512, per_sm, warps)
        same = torch.equal(got[0].float(), want[0].float()) and torch.equal(got[1], want[1]) and torch.allclose(
            got[2].sum(0), want[2].sum(0), rtol=1e-5, atol=1e-3)
        t = median_ms(lambda: rows_split(gpre, 4096, 512, per_sm, warps), 30, dev)
        print(f"| fc1 rows kernel | 4096 + 512, {per_sm}/SM, {warps} warps | {t:.3f} ms | {moved / t / 1e6:.0f} GB/s | same: {same} |",
              flush=True)
    n, tokens = 128, 256
    r = lambda: torch.randn(n, tokens, width, device=dev, dtype=bf)  # noqa: E731
    gh, g_next, stream, o = r(), r(), r(), r()
    cond = (torch.randn(n, 6 * width, device=dev) * 0.3).to(bf).chunk(6, dim=1)
    gate, scale = cond[2], cond[4]
    mean = stream.float().mean(-1)
    rstd = torch.rsqrt(stream.float().var(-1, unbiased=False) + 1e-6)
    args = (gh, g_next, stream, o, gate, scale, mean, rstd)
    want = norm_kernels.backward_partial(*args, (bf, bf))
    t = median_ms(lambda: norm_kernels.backward_partial(*args, (bf, bf)), 30, dev)
    moved = n * tokens * width * 2 * 6
    print(f"| norm backward (residual) | library (2048 block) | {t:.3f} ms | {moved / t / 1e6:.0f} GB/s | |")
    for chunk, warps in ((64, 4), (32, 4), (16, 4), (64, 2), (32, 2), (16, 2), (32, 8)):
        got = norm_bwd_split(*args, chunk, warps)
        same = all(torch.allclose(g.float(), w.float(), rtol=1e-2, atol=1e-2) for g, w in zip(got[:2], want[:2])) and \
            torch.allclose(got[2].sum(2), want[2].sum(2), rtol=1e-4, atol=1e-2)
        t = median_ms(lambda: norm_bwd_split(*args, chunk, warps), 30, dev)
        print(f"| norm backward (residual) | 1024 + 128, {chunk} tokens, {warps} warps | {t:.3f} ms | {moved / t / 1e6:.0f} GB/s | "
              f"same: {same} |", flush=True)


if __name__ == "__main__":
    main()
