"""Linears whose three products (y = x Wᵀ + b, ∂x = ∂y W, ∂W = ∂yᵀ x) run through the fastest of cuBLASLt's
candidates for their shape (``ditkit.kernels.cublaslt``), instead of the one torch's heuristic picks.

On an H100 at DiT-XL/2 shapes torch's pick is often not the fastest (``benchmarks/gemm_algos.py``,
``docs/results/gemm_algos_h100.txt``): at 32,768 tokens qkv's forward takes 0.348 ms against 0.329 for
the fastest candidate, fc2's ∂x 0.529 against 0.452.  At 8,192 tokens (batch 32) the training step gained
nothing (546.3 against 545.7 img/s): its proj runs without the bias, where torch's kernel was already the
fast one.  The bias is added in the forward product's epilogue; its gradient is a traced sum over the
tokens, which compile may fuse with the kernel that makes ∂y.

``TunedLinear`` is an ``nn.Linear`` with only ``forward`` changed (same Parameters, same state dict);
``convert_to_tuned_linear`` retypes a model's plain linears in place.  The products run on CUDA in
bf16/fp16 (under autocast: its dtype) with contiguous, 256-byte-aligned operands whose last sizes are
multiples of 8; otherwise, and on a CPU, the operators compute the same thing with torch's ops.  Each
call costs ~10–20 µs of host time (ctypes), so this is for CUDA-graph training
(``TrainSpeed.cuda_graphs``), where the host's time drops out.  ``TrainSpeed.tuned_linear``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ditkit.fast.swap import compute_dtype, retype_modules
from ditkit.kernels import cublaslt


def lt_ready(*tensors: torch.Tensor) -> bool:
    """Whether cuBLASLt takes these operands: one half dtype, contiguous, 256-byte aligned, each one's last size
    (between them, every size but the tokens) a multiple of 8.  Else the operators compute with torch's ops."""
    dtype = tensors[0].dtype
    return (dtype in (torch.bfloat16, torch.float16) and all(t.dtype == dtype for t in tensors)
            and all(t.is_contiguous() and t.data_ptr() % 256 == 0 and t.shape[-1] % 8 == 0 for t in tensors)
            and cublaslt.available(tensors[0].device))


@torch.library.custom_op("ditkit::weight_grad", mutates_args=(), schema="(Tensor gy, Tensor x) -> Tensor")
def weight_grad(gy, x):
    """gy (M, N) = ∂y, x (M, K) -> ∂W = gyᵀ x (N, K)."""
    if lt_ready(gy, x):
        return cublaslt.weight_grad(gy, x)
    return gy.t() @ x


@weight_grad.register_fake
def _(gy, x):
    return gy.new_empty(gy.shape[1], x.shape[1])


@torch.library.custom_op("ditkit::tuned_matmul", mutates_args=(), schema="(Tensor a, Tensor b) -> Tensor")
def tuned_matmul(a, b):
    """a (M, K), b (K, N) -> a b (M, N): a linear's ∂x = ∂y W."""
    if lt_ready(a, b):
        return cublaslt.mm(a, b)
    return a @ b


@tuned_matmul.register_fake
def _(a, b):
    return a.new_empty(a.shape[0], b.shape[1])


def linear_product(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """x (M, K), w (N, K), b (N,) or None -> x wᵀ + b (M, N), the bias in the product's epilogue."""
    if lt_ready(x, w, *([b] if b is not None else [])):
        return cublaslt.mm(x, w, trans_b=True, epilogue=cublaslt.BIAS if b is not None else cublaslt.DEFAULT, bias=b)
    return F.linear(x, w, b)


@torch.library.custom_op("ditkit::tuned_linear", mutates_args=(), schema="(Tensor x, Tensor w, Tensor? b) -> Tensor")
def tuned_linear(x, w, b):
    """x (M, K), w (N, K), b (N,) or None -> x wᵀ + b (M, N)."""
    return linear_product(x, w, b)


@tuned_linear.register_fake
def _(x, w, b):
    return x.new_empty(x.shape[0], w.shape[0])


def _setup_context(ctx, inputs, output):
    x, w, b = inputs
    ctx.save_for_backward(x, w)
    ctx.has_bias = b is not None


def _backward(ctx, gy):
    x, w = ctx.saved_tensors
    gy = gy.contiguous()
    return tuned_matmul(gy, w), weight_grad(gy, x), gy.sum(0) if ctx.has_bias else None


tuned_linear.register_autograd(_backward, setup_context=_setup_context)


class TunedLinear(nn.Linear):
    """``nn.Linear`` whose products run through ``tuned_linear`` (see the module docstring).  With
    ``with_bias=False`` the bias is left out, for a caller that adds it itself (``ditkit.fast.fused_norm``)."""

    def forward(self, x: torch.Tensor, with_bias: bool = True) -> torch.Tensor:
        dtype = compute_dtype(x)
        b = self.bias.to(dtype) if with_bias and self.bias is not None else None
        y = tuned_linear(x.reshape(-1, x.shape[-1]).to(dtype), self.weight.to(dtype), b)
        return y.reshape(*x.shape[:-1], y.shape[-1])


def convert_to_tuned_linear(model: nn.Module) -> int:
    """Retype every plain ``nn.Linear`` in ``model`` (in place: the same module, Parameters and state dict)
    as a ``TunedLinear``; returns how many.  Other linear classes (FP8 training's) are left alone."""
    return retype_modules(model, {nn.Linear: TunedLinear})


def revert_tuned_linear(model: nn.Module) -> int:
    """Undo ``convert_to_tuned_linear``; returns how many."""
    return retype_modules(model, {TunedLinear: nn.Linear})
