"""Self-attention's qkv linear and the attention as one operator, whose backward assembles ∂qkv and the qkv
bias's gradient in one kernel (``ditkit.kernels.qkv``).

    forward   qkv = x Wᵀ + b  (N·T, 3D)       cuBLASLt, the bias in the epilogue (``ditkit.fast.tuned_linear``)
              o = attention(q, k, v)          cuDNN's flash attention on q, k, v as views of qkv
    backward  ∂q, ∂k, ∂v                      cuDNN's attention backward
              ∂qkv and Σ_t ∂qkv               one Triton kernel (with ∂qkv in e4m3 too, for an FP8 ∂x)
              ∂x = ∂qkv W,  ∂W = ∂qkvᵀ x      cuBLASLt (∂x in FP8 with ``TrainSpeed.fp8_backward``)

Under plain autograd (compiled or not) the attention's three gradients are stacked into ∂qkv by one
pass, and the bias gradient is another over the same data (1.0 and 0.5 ms per DiT-XL/2 step at batch 32
on an H100; 4.2 and 2.3 at batch 128).  The operator calls the same cuDNN kernels that PyTorch's
``scaled_dot_product_attention`` dispatches to on an H100, so the numbers are those of the plain module.

``FusedAttention`` is the ``Attention`` it replaces with only ``attend`` changed (retyped in place: same
Parameters, same state dict).  The fused path runs where cuDNN's attention takes the inputs (CUDA,
bf16/fp16 under autocast, head sizes ``cudnn_takes``); elsewhere on a GPU the module computes as the plain
one.  On a CPU the operator computes the same equations with torch's ops (what the
tests compare with the plain module's autograd).  ``TrainSpeed.fused_attention``.  Given qkv's input in FP8
(``attend(x, x_fp8)``), qkv's forward is an FP8 product (``ditkit.fast.fp8_forward``).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ditkit.fast.fp8_backward import fp8_dx, quantize_weight_columns
from ditkit.fast.fp8_forward import fp8_linear, quantize_weight
from ditkit.fast.swap import compute_dtype, retype_modules
from ditkit.fast.tuned_linear import TunedLinear, linear_product, tuned_matmul, weight_grad
from ditkit.kernels import qkv as qkv_kernels
from ditkit.kernels.fp8_rows import programs_per_rows
from ditkit.models.dit import Attention


def _heads(qkv: torch.Tensor, n: int, heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v (N, H, T, Dh) as views of qkv (N·T, 3D)."""
    dh = qkv.shape[1] // (3 * heads)
    return qkv.view(n, -1, 3, heads, dh).permute(2, 0, 3, 1, 4).unbind(0)


def _on_cudnn(x: torch.Tensor) -> bool:
    """Whether the operator runs cuDNN's attention: decided from the device and dtype alone, so that the fake
    implementation agrees (``FusedAttention`` checks the head size before it calls the operator)."""
    return x.is_cuda and x.dtype in (torch.bfloat16, torch.float16)


def cudnn_takes(head_dim: int) -> bool:
    """Head sizes cuDNN's flash attention takes on Ampere and Hopper: multiples of 8 up to 128."""
    return head_dim % 8 == 0 and head_dim <= 128


def _attention(qkv: torch.Tensor, n: int, heads: int):
    q, k, v = _heads(qkv, n, heads)
    if _on_cudnn(qkv):
        out, lse, _, _, _, _, seed, offset, _ = torch.ops.aten._scaled_dot_product_cudnn_attention(
            q, k, v, None, True, 0.0, False, False)
    else:
        out = F.scaled_dot_product_attention(q, k, v)
        lse, seed, offset = (qkv.new_empty(0, dtype=torch.float32) for _ in range(3))
    return out.transpose(1, 2).reshape(qkv.shape[0], -1), qkv, lse, seed, offset


@torch.library.custom_op("ditkit::qkv_attention", mutates_args=(),
                         schema="(Tensor x, Tensor w, Tensor? b, int n, int heads, Tensor? xq=None, Tensor? sx=None, "
                                "Tensor? wq=None, Tensor? sw=None, bool fp8_dx=False) -> (Tensor, Tensor, Tensor, Tensor, Tensor)")
def qkv_attention(x, w, b, n, heads, xq=None, sx=None, wq=None, sw=None, fp8_dx=False):
    """x (N·T, D), w (3D, D), b (3D,) -> (o (N·T, D): the heads' outputs, the input of ``proj``; for the
    backward: qkv (N·T, 3D), cuDNN's log-sum-exp and its two random-number states (empty off cuDNN)).  Given
    e4m3 xq ≈ x / sx and wq ≈ W / sw (per-tensor scales), qkv = sx sw · xq wqᵀ + b (``ditkit.fast.fp8_forward``).
    ``fp8_dx``: the backward's ∂x product in FP8 with per-token scales (``ditkit.fast.fp8_backward``)."""
    qkv = linear_product(x, w, b) if xq is None else fp8_linear(xq, sx, wq, sw, b, x.dtype)
    return _attention(qkv, n, heads)


@qkv_attention.register_fake
def _(x, w, b, n, heads, xq=None, sx=None, wq=None, sw=None, fp8_dx=False):
    return _attention(x.new_empty(x.shape[0], w.shape[0]), n, heads)  # cuDNN's output shapes from its own fake kernel


def _attention_grads_reference(g, q, k, v):
    """∂q, ∂k, ∂v of softmax(q kᵀ/√Dh) v for ∂out = g, all (N, H, T, Dh), computed in float32."""
    g, q, k, v = (t.float() for t in (g, q, k, v))
    s = 1.0 / math.sqrt(q.shape[-1])
    p = torch.softmax(q @ k.transpose(-1, -2) * s, dim=-1)
    dp = g @ v.transpose(-1, -2)
    ds = p * (dp - (dp * p).sum(-1, keepdim=True))
    return ds @ k * s, ds.transpose(-1, -2) @ q * s, p.transpose(-1, -2) @ g


def _attention_grads(g, qkv, o, lse, seed, offset, n, heads):
    """∂q, ∂k, ∂v (N, H, T, Dh) for ∂o = g (N·T, D): cuDNN's backward (``lse`` non-empty), else float32 equations."""
    q, k, v = _heads(qkv, n, heads)
    dh = q.shape[-1]
    as_heads = lambda t: t.reshape(n, -1, heads, dh).transpose(1, 2)  # noqa: E731 - (N·T, D) -> (N, H, T, Dh)
    if lse.numel():
        tokens = q.shape[2]
        return torch.ops.aten._scaled_dot_product_cudnn_attention_backward(
            as_heads(g), q, k, v, as_heads(o), lse, seed, offset, None, None, None, tokens, tokens, 0.0, False)
    return tuple(t.to(qkv.dtype) for t in _attention_grads_reference(as_heads(g), q, k, v))


def _on_kernel(qkv, grads) -> bool:
    """Whether the Triton kernels take cuDNN's gradients: CUDA, Triton, and ``qkv_kernels.rows_layout``."""
    return qkv_kernels.triton is not None and qkv.is_cuda and all(map(qkv_kernels.rows_layout, grads))


@torch.library.custom_op("ditkit::qkv_attention_backward", mutates_args=(),
                         schema="(Tensor g, Tensor qkv, Tensor o, Tensor lse, Tensor seed, Tensor offset, int n, "
                                "int heads) -> (Tensor, Tensor)")
def qkv_attention_backward(g, qkv, o, lse, seed, offset, n, heads):
    """-> (∂qkv (N·T, 3D) in qkv's dtype, Σ_t ∂qkv per tile of ``qkv_kernels.ROWS_PER_TILE`` rows
    (⌈N·T / 64⌉, 3D) float32, summed by the traced backward) for ∂o = g (N·T, D)."""
    grads = _attention_grads(g, qkv, o, lse, seed, offset, n, heads)
    if _on_kernel(qkv, grads):
        return qkv_kernels.stack_partial(*grads)
    dqkv, _ = qkv_kernels.stack_reference(*grads)
    return dqkv, qkv_kernels.tile_sums(dqkv)


@qkv_attention_backward.register_fake
def _(g, qkv, o, lse, seed, offset, n, heads):
    tiles = -(-qkv.shape[0] // qkv_kernels.ROWS_PER_TILE)
    return qkv.new_empty(qkv.shape), qkv.new_empty(tiles, qkv.shape[1], dtype=torch.float32)


@torch.library.custom_op("ditkit::qkv_attention_backward_fp8", mutates_args=(),
                         schema="(Tensor g, Tensor qkv, Tensor o, Tensor lse, Tensor seed, Tensor offset, int n, "
                                "int heads) -> (Tensor, Tensor, Tensor, Tensor)")
def qkv_attention_backward_fp8(g, qkv, o, lse, seed, offset, n, heads):
    """``qkv_attention_backward`` with ∂qkv also in e4m3 for the FP8 ∂x product: -> (∂qkv, column sums
    (P, 3D) float32 to be summed over dim 0, q(∂qkv / s) e4m3 (N·T, 3D), s (N·T,) float32 = each row's amax / 448)."""
    grads = _attention_grads(g, qkv, o, lse, seed, offset, n, heads)
    if _on_kernel(qkv, grads):
        return qkv_kernels.stack_rows_fp8(*grads)
    return qkv_kernels.stack_rows_fp8_reference(*grads, parts=programs_per_rows(qkv.shape[0], qkv.device)[1])


@qkv_attention_backward_fp8.register_fake
def _(g, qkv, o, lse, seed, offset, n, heads):
    rows, cols = qkv.shape
    return (qkv.new_empty(rows, cols), qkv.new_empty(programs_per_rows(rows, qkv.device)[1], cols, dtype=torch.float32),
            qkv.new_empty(rows, cols, dtype=torch.float8_e4m3fn), qkv.new_empty(rows, dtype=torch.float32))


def _setup_context(ctx, inputs, output):
    x, w, b, n, heads, *_, fp8_dx = inputs
    o, qkv, lse, seed, offset = output
    ctx.save_for_backward(x, w, o, qkv, lse, seed, offset)
    ctx.mark_non_differentiable(qkv, lse, seed, offset)
    ctx.n, ctx.heads, ctx.bias_dtype = n, heads, (b.dtype if b is not None else None)
    ctx.fp8_dx = fp8_dx


def _backward(ctx, g, *_):
    x, w, o, qkv, lse, seed, offset = ctx.saved_tensors
    args = (g.contiguous(), qkv, o, lse, seed, offset, ctx.n, ctx.heads)
    if ctx.fp8_dx:
        dqkv, sums, dqkv_e4m3, s = qkv_attention_backward_fp8(*args)
        dx = fp8_dx(dqkv_e4m3, s, *quantize_weight_columns(w), dqkv.dtype)
    else:
        dqkv, sums = qkv_attention_backward(*args)
        dx = tuned_matmul(dqkv, w)
    return (dx, weight_grad(dqkv, x), sums.sum(0).to(ctx.bias_dtype) if ctx.bias_dtype is not None else None,
            None, None, None, None, None, None, None)


qkv_attention.register_autograd(_backward, setup_context=_setup_context)


class FusedAttention(Attention):
    """``Attention`` whose ``attend`` runs through ``qkv_attention`` (see the module docstring); ``fp8_backward``:
    qkv's ∂x product in FP8 (``ditkit.fast.fp8_backward.enable_fp8_backward``)."""

    fp8_backward = False

    def attend(self, x: torch.Tensor, x_fp8: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """``x_fp8``: (x / s in e4m3, s (1,) float32), qkv's input for an FP8 forward (``ditkit.fast.fp8_forward``)."""
        n, tokens, width = x.shape
        dtype = compute_dtype(x)
        plain = x.is_cuda and (dtype not in (torch.bfloat16, torch.float16) or not cudnn_takes(width // self.num_heads))
        if type(self.qkv) not in (nn.Linear, TunedLinear) or plain:
            return super().attend(x)  # FP8 training's qkv layer, or what cuDNN does not take on a GPU: the plain path
        w = self.qkv.weight.to(dtype)
        b = self.qkv.bias.to(dtype) if self.qkv.bias is not None else None
        quantized = () if x_fp8 is None else (x_fp8[0].reshape(n * tokens, width), x_fp8[1], *quantize_weight(w))
        fp8_dx = self.fp8_backward and width % 16 == 0  # FP8 products take sizes in multiples of 16 bytes
        o, _, _, _, _ = qkv_attention(x.reshape(n * tokens, width).to(dtype), w, b, n, self.num_heads, *quantized,
                                      fp8_dx=fp8_dx)
        return o.view(n, tokens, width)


def convert_to_fused_attention(model: nn.Module) -> int:
    """Retype every plain ``Attention`` in ``model`` as a ``FusedAttention`` (in place: the same module,
    Parameters and state dict); returns how many.  Attentions with QK-norm or RoPE are left alone: the
    operator has no room for them between the qkv product and attention."""
    official = [m for m in model.modules() if type(m) is Attention and m.is_official]
    return sum(retype_modules(m, {Attention: FusedAttention}) for m in official)


def revert_fused_attention(model: nn.Module) -> int:
    """Undo ``convert_to_fused_attention``; returns how many."""
    return retype_modules(model, {FusedAttention: Attention})
