"""Softmax attention of short sequences at head sizes that are no power of two, as two Triton kernels that read
q, k, v from the qkv linear's output and write in the layouts its neighbours use.

    forward   o = softmax(q kᵀ / √Dh) v            q, k, v: views of qkv (N·T, 3D); o (N·T, D), proj's input
              lse = log₂ Σ_j exp₂(s_ij)            per row, s = q kᵀ log₂(e) / √Dh (kept for the backward)
    backward  p = exp₂(s − lse),  δ_i = Σ_d ∂o_id o_id
              ∂v = pᵀ ∂o,  ∂s = p ∘ (∂o vᵀ − δ)
              ∂q = ∂s k / √Dh,  ∂k = ∂sᵀ q / √Dh   written into ∂qkv (N·T, 3D), qkv's layout

Why not cuDNN's: at DiT-XL's head size 72 cuDNN's flash kernels pad the head to 128 (78% more products than the
arithmetic) and its backward runs two helpers beside it (δ, and ∂q accumulated in float32 then converted).  Here a
head is two power-of-two column blocks (72 = 64 + 16 with 8 masked, ``head_blocks``), so the products do 11% more
than the arithmetic.  The backward is one program per (sample, head): for each block of keys it walks every block
of queries, keeping ∂k, ∂v in registers and adding the block's ∂q into a float32 scratch row (its own: no atomics,
no memset); the last block of keys writes ∂q in qkv's dtype.  δ is computed where it is used.  That costs the
backward its parallelism over key blocks, which short sequences (DiT: 256 tokens at 256², patch 2) do not need:
N·H programs already fill the GPU.  ``benchmarks/attention_kernels.py`` times both against cuDNN.

``attention_reference`` is the same in torch (float32): what the tests compare the kernels with (Triton's
interpreter on the CPU).
"""
from __future__ import annotations

import math

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # the CPU build of torch comes without Triton
    triton = None

LOG2E = 1.4426950408889634


def head_blocks(dh: int) -> tuple[int, int]:
    """(A, B): a head of ``dh`` values as columns [0, A) and [A, A + B), both powers of two of at least 16 (the
    smallest product tile) with B masked past ``dh``; B = 0 when one block holds the head.  72 -> (64, 16)."""
    if dh < 1:
        raise ValueError(f"head size must be positive, got {dh}")
    a = max(16, 1 << (dh.bit_length() - 1))
    rest = dh - a
    return a, (0 if rest <= 0 else max(16, 1 << (rest - 1).bit_length()))


def _heads(qkv: torch.Tensor, n: int, heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v (N, H, T, Dh) as views of qkv (N·T, 3D)."""
    return qkv.view(n, -1, 3, heads, qkv.shape[1] // (3 * heads)).permute(2, 0, 3, 1, 4).unbind(0)


def attention_reference(qkv: torch.Tensor, n: int, heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (o (N·T, D) in qkv's dtype, lse (N, H, T) float32 in log₂ units): the forward's equations in float32."""
    q, k, v = (t.float() for t in _heads(qkv, n, heads))
    s = q @ k.transpose(-1, -2) * (LOG2E / math.sqrt(q.shape[-1]))  # (N, H, T, T), base-2 logits
    lse = torch.logsumexp(s / LOG2E, dim=-1) * LOG2E
    o = torch.exp2(s - lse[..., None]) @ v  # (N, H, T, Dh)
    return o.transpose(1, 2).reshape(qkv.shape[0], -1).to(qkv.dtype), lse


def attention_backward_reference(g: torch.Tensor, qkv: torch.Tensor, n: int, heads: int) -> torch.Tensor:
    """∂qkv (N·T, 3D) in qkv's dtype for ∂o = g (N·T, D): the backward's equations in float32 (p recomputed)."""
    q, k, v = (t.float() for t in _heads(qkv, n, heads))
    dh = q.shape[-1]
    go = g.float().view(n, -1, heads, dh).transpose(1, 2)  # (N, H, T, Dh)
    p = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(dh), dim=-1)
    dp = go @ v.transpose(-1, -2)
    ds = p * (dp - (p * dp).sum(-1, keepdim=True))  # δ_i = Σ_j p_ij ∂p_ij = Σ_d ∂o_id o_id
    grads = (ds @ k / math.sqrt(dh), ds.transpose(-1, -2) @ q / math.sqrt(dh), p.transpose(-1, -2) @ go)
    return torch.stack(grads, dim=1).permute(0, 3, 1, 2, 4).reshape(qkv.shape).to(qkv.dtype)  # (N, T, 3, H, Dh)


if triton is not None:
    @triton.jit
    def _load_head(base, rows, rows_ok, stride, cols, cols_ok):
        """A (rows × cols) tile of one head, zeros outside the sequence and past the head size."""
        return tl.load(base + rows[:, None] * stride + cols[None, :], mask=rows_ok[:, None] & cols_ok[None, :],
                       other=0.0)

    @triton.jit
    def _store_head(base, rows, rows_ok, stride, cols, cols_ok, t):
        tl.store(base + rows[:, None] * stride + cols[None, :], t.to(base.dtype.element_ty),
                 mask=rows_ok[:, None] & cols_ok[None, :])

    @triton.jit
    def _forward_kernel(qkv_ptr, o_ptr, lse_ptr, tokens, heads, scale_log2, dh: tl.constexpr,
                        A: tl.constexpr, B: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        """Program (i, n·H + h): query rows [i·BLOCK_M, …) of head h of sample n, online softmax over key blocks."""
        bh = tl.program_id(1)
        n, h = bh // heads, bh % heads
        width = heads * dh
        stride = 3 * width
        q_base = qkv_ptr + (n * tokens).to(tl.int64) * stride + h * dh
        k_base, v_base = q_base + width, q_base + 2 * width
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        rows_ok = rows < tokens
        ca = tl.arange(0, A)
        ca_ok = ca < dh
        q_a = _load_head(q_base, rows, rows_ok, stride, ca, ca_ok)
        if B > 0:
            cb = A + tl.arange(0, B)
            cb_ok = cb < dh
            q_b = _load_head(q_base, rows, rows_ok, stride, cb, cb_ok)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc_a = tl.zeros([BLOCK_M, A], tl.float32)
        if B > 0:
            acc_b = tl.zeros([BLOCK_M, B], tl.float32)
        for start in range(0, tokens, BLOCK_N):
            keys = start + tl.arange(0, BLOCK_N)
            keys_ok = keys < tokens
            s = tl.dot(q_a, tl.trans(_load_head(k_base, keys, keys_ok, stride, ca, ca_ok)))
            if B > 0:
                s += tl.dot(q_b, tl.trans(_load_head(k_base, keys, keys_ok, stride, cb, cb_ok)))
            s = tl.where(keys_ok[None, :], s * scale_log2, float("-inf"))  # (BLOCK_M, BLOCK_N), base-2 logits
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            p = tl.exp2(s - m_new[:, None])
            alpha = tl.exp2(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, axis=1)
            if B > 0:  # float32 (TF32) operands: see the module docstring
                v_b = _load_head(v_base, keys, keys_ok, stride, cb, cb_ok).to(tl.float32)
                acc_b = acc_b * alpha[:, None] + tl.dot(p, v_b)
            p = p.to(qkv_ptr.dtype.element_ty)
            acc_a = acc_a * alpha[:, None] + tl.dot(p, _load_head(v_base, keys, keys_ok, stride, ca, ca_ok))
            m_i = m_new
        o_base = o_ptr + (n * tokens).to(tl.int64) * width + h * dh
        _store_head(o_base, rows, rows_ok, width, ca, ca_ok, acc_a / l_i[:, None])
        if B > 0:
            _store_head(o_base, rows, rows_ok, width, cb, cb_ok, acc_b / l_i[:, None])
        tl.store(lse_ptr + bh.to(tl.int64) * tokens + rows, m_i + tl.log2(l_i), mask=rows_ok)

    @triton.jit
    def _backward_kernel(qkv_ptr, o_ptr, g_ptr, lse_ptr, dqkv_ptr, dq_ptr, tokens, heads, scale, scale_log2,
                         dh: tl.constexpr, A: tl.constexpr, B: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        """Program n·H + h: head h of sample n.  Outer loop over key blocks (∂k, ∂v in registers), inner over query
        blocks; ∂q's partial sums in this program's float32 scratch dq_ptr (T, A + B) until the last key block."""
        bh = tl.program_id(0)
        n, h = bh // heads, bh % heads
        width = heads * dh
        stride = 3 * width
        first_row = (n * tokens).to(tl.int64)
        q_base = qkv_ptr + first_row * stride + h * dh
        k_base, v_base = q_base + width, q_base + 2 * width
        o_base = o_ptr + first_row * width + h * dh
        g_base = g_ptr + first_row * width + h * dh
        dq_base = dqkv_ptr + first_row * stride + h * dh
        dk_base, dv_base = dq_base + width, dq_base + 2 * width
        acc_base = dq_ptr + bh.to(tl.int64) * tokens * (A + B)
        lse_base = lse_ptr + bh.to(tl.int64) * tokens
        ca = tl.arange(0, A)
        ca_ok = ca < dh
        if B > 0:
            cb = A + tl.arange(0, B)
            cb_ok = cb < dh
        dtype = qkv_ptr.dtype.element_ty
        for start_n in range(0, tokens, BLOCK_N):
            keys = start_n + tl.arange(0, BLOCK_N)
            keys_ok = keys < tokens
            k_a = _load_head(k_base, keys, keys_ok, stride, ca, ca_ok)
            v_a = _load_head(v_base, keys, keys_ok, stride, ca, ca_ok)
            dk_a = tl.zeros([BLOCK_N, A], tl.float32)
            dv_a = tl.zeros([BLOCK_N, A], tl.float32)
            if B > 0:
                k_b = _load_head(k_base, keys, keys_ok, stride, cb, cb_ok)
                v_b = _load_head(v_base, keys, keys_ok, stride, cb, cb_ok)
                dk_b = tl.zeros([BLOCK_N, B], tl.float32)
                dv_b = tl.zeros([BLOCK_N, B], tl.float32)
            for start_m in range(0, tokens, BLOCK_M):
                rows = start_m + tl.arange(0, BLOCK_M)
                rows_ok = rows < tokens
                q_a = _load_head(q_base, rows, rows_ok, stride, ca, ca_ok)
                g_a = _load_head(g_base, rows, rows_ok, width, ca, ca_ok)
                delta = tl.sum(g_a.to(tl.float32) * _load_head(o_base, rows, rows_ok, width, ca, ca_ok).to(tl.float32), 1)
                s_t = tl.dot(k_a, tl.trans(q_a))  # (BLOCK_N, BLOCK_M): sᵀ, keys down, queries across
                dp_t = tl.dot(v_a, tl.trans(g_a))
                if B > 0:
                    q_b = _load_head(q_base, rows, rows_ok, stride, cb, cb_ok)
                    g_b = _load_head(g_base, rows, rows_ok, width, cb, cb_ok)
                    delta += tl.sum(g_b.to(tl.float32) * _load_head(o_base, rows, rows_ok, width, cb, cb_ok).to(tl.float32), 1)
                    s_t += tl.dot(k_b, tl.trans(q_b))
                    dp_t += tl.dot(v_b, tl.trans(g_b))
                lse = tl.load(lse_base + rows, mask=rows_ok, other=float("inf"))  # rows past T: p = 0
                p_t = tl.exp2(s_t * scale_log2 - lse[None, :])
                p_t = tl.where(keys_ok[:, None], p_t, 0.0)
                ds_t = p_t * (dp_t - delta[None, :])
                if B > 0:  # float32 (TF32) operands: see the module docstring
                    dv_b += tl.dot(p_t, g_b.to(tl.float32))
                    dk_b += tl.dot(ds_t, q_b.to(tl.float32))
                    dq_b = tl.dot(tl.trans(ds_t), k_b.to(tl.float32))
                ds_t = ds_t.to(dtype)
                p_t = p_t.to(dtype)
                dv_a += tl.dot(p_t, g_a)
                dk_a += tl.dot(ds_t, q_a)
                dq_a = tl.dot(tl.trans(ds_t), k_a)  # (BLOCK_M, A)
                acc_at = acc_base + rows[:, None] * (A + B)
                if start_n > 0:
                    dq_a += tl.load(acc_at + ca[None, :], mask=rows_ok[:, None], other=0.0)
                    if B > 0:
                        dq_b += tl.load(acc_at + cb[None, :], mask=rows_ok[:, None], other=0.0)
                if start_n + BLOCK_N < tokens:
                    tl.store(acc_at + ca[None, :], dq_a, mask=rows_ok[:, None])
                    if B > 0:
                        tl.store(acc_at + cb[None, :], dq_b, mask=rows_ok[:, None])
                else:
                    _store_head(dq_base, rows, rows_ok, stride, ca, ca_ok, dq_a * scale)
                    if B > 0:
                        _store_head(dq_base, rows, rows_ok, stride, cb, cb_ok, dq_b * scale)
            _store_head(dk_base, keys, keys_ok, stride, ca, ca_ok, dk_a * scale)
            _store_head(dv_base, keys, keys_ok, stride, ca, ca_ok, dv_a)
            if B > 0:
                _store_head(dk_base, keys, keys_ok, stride, cb, cb_ok, dk_b * scale)
                _store_head(dv_base, keys, keys_ok, stride, cb, cb_ok, dv_b)


# Launch settings, read at each call (``benchmarks/attention_kernels.py`` sweeps them): (BLOCK_M, BLOCK_N, warps, stages)
FORWARD = (128, 64, 8, 2)
BACKWARD = (64, 128, 8, 1)


def _check(qkv: torch.Tensor, heads: int, caller: str) -> int:
    if qkv.dim() != 2 or qkv.shape[1] % (3 * heads):
        raise ValueError(f"{caller}: qkv must be (N·T, 3·heads·Dh) with heads={heads}, got {tuple(qkv.shape)}")
    if not qkv.is_contiguous():
        raise ValueError(f"{caller}: qkv must be contiguous, got strides {qkv.stride()}")
    return qkv.shape[1] // (3 * heads)


def attention_forward(qkv: torch.Tensor, n: int, heads: int, block_m: int | None = None, block_n: int | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """``attention_reference`` as one kernel launch: -> (o (N·T, D), lse (N, H, T) float32, log₂ units)."""
    dh = _check(qkv, heads, "attention_forward")
    tokens = qkv.shape[0] // n
    bm, bn, warps, stages = FORWARD
    bm, bn = block_m or bm, block_n or bn
    a, b = head_blocks(dh)
    o = torch.empty(qkv.shape[0], heads * dh, device=qkv.device, dtype=qkv.dtype)
    lse = torch.empty(n, heads, tokens, device=qkv.device, dtype=torch.float32)
    _forward_kernel[(triton.cdiv(tokens, bm), n * heads)](qkv, o, lse, tokens, heads, LOG2E / math.sqrt(dh), dh=dh,
                                                          A=a, B=b, BLOCK_M=bm, BLOCK_N=bn, num_warps=warps,
                                                          num_stages=stages)
    return o, lse


def attention_backward(g: torch.Tensor, qkv: torch.Tensor, o: torch.Tensor, lse: torch.Tensor, n: int, heads: int,
                       block_m: int | None = None, block_n: int | None = None) -> torch.Tensor:
    """``attention_backward_reference`` as one kernel launch, given the forward's o and lse: -> ∂qkv (N·T, 3D)."""
    dh = _check(qkv, heads, "attention_backward")
    tokens = qkv.shape[0] // n
    bm, bn, warps, stages = BACKWARD
    bm, bn = block_m or bm, block_n or bn
    a, b = head_blocks(dh)
    dqkv = torch.empty_like(qkv)
    scratch = qkv.new_empty(n * heads, tokens if tokens > bn else 0, a + b, dtype=torch.float32)
    _backward_kernel[(n * heads,)](qkv, o, g, lse, dqkv, scratch, tokens, heads, 1.0 / math.sqrt(dh),
                                   LOG2E / math.sqrt(dh), dh=dh, A=a, B=b, BLOCK_M=bm, BLOCK_N=bn, num_warps=warps,
                                   num_stages=stages)
    return dqkv
