"""FP8 matrix products for training: the block linears' forward and input-gradient products in FP8.

Each ``Float8TrainingLinear`` keeps its ``weight`` and ``bias`` Parameters (float32, same names,
same state dict, same optimizer and EMA); only the products of a step change:

    forward   y  = x Wᵀ + b       x: e4m3, one scale per token;  W: e4m3, one per output row
    backward  ∂x = ∂y W           ∂y: e4m3, one scale per token; W: e4m3, one per input column
              ∂W = ∂yᵀ x          in the compute dtype (bf16 under autocast), as the plain linear

with s = amax(|row|) / 448 and q = round(t / s) (torchao's "rowwise" recipe).  Scales per token,
not per tensor, because a per-tensor amax is a reduction over the whole activation that must
finish before the cast can start: a second pass over every operand.  A row's amax is reduced in
the same kernel that produces the row (LayerNorm, GELU and their gradients already reduce or
hold whole rows), and the cast follows in that kernel.  Measured on an H100 (DiT-XL/2, batch 128)
the per-tensor recipe was 8% slower than bf16 (README, Speed).

Why ∂W is not in FP8: Hopper's FP8 kernel takes both operands with the reduced dimension
contiguous, and for ∂W that dimension is the tokens, so ∂y and x would need transposed FP8 copies;
measured, those transposes cost more than the FP8 products saved.

The products accumulate in float32 and return bf16 (the row-wise kernel's result), cast to the
autocast dtype for y and to the input's dtype for ∂x; ∂b is the float32 sum of ∂y.  The forward
product uses the tensor cores' fast accumulation, ∂x does not (as torchao).

On a GPU with FP8 tensor cores (compute capability ≥ 8.9) each product is one ``torch._scaled_mm``;
elsewhere the same quantized operands are multiplied in float32 (an emulation with identical
rounding of the operands, which the CPU tests check against a direct computation).  Under
``torch.compile`` the row amaxes and the casts are fused into the kernels around them, except for
the gradient of GELU in the MLP, which one Triton kernel quantizes (``GRAD_OP``, module fp8_kernels).

Only the block linears (``attn.qkv``, ``attn.proj``, ``mlp.fc1``, ``mlp.fc2``) are converted, and only
where both sizes are multiples of 16 (the FP8 kernel's requirement); a call whose token count is
not a multiple of 16 runs the plain linear.  ``train.fp8=true`` in ``ditkit train``; the network and
its checkpoints are unchanged, so the EMA and any sampler use the ordinary layers.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ditkit.models.fp8 import (BLOCK_LINEARS, amax_scales, block_linears, fp8_mm, quantize, quantize_rows,
                               scaled_mm_takes_bias)
from ditkit.models.fp8_kernels import quantize_rows_op
from ditkit.models.module_swap import compute_dtype, replace_module


# The forward product is an operator of its own whose backward is registered with it.  As an
# autograd.Function, compiled under CUDA autocast (torch 2.11), ∂x and ∂W came back zero
# (benchmarks/fp8_training_check.py).  The operator takes x and W only to carry their gradients;
# it multiplies the quantized copies it is given, which are computed outside it, in traced code,
# so that torch.compile fuses each row's amax and cast into the kernel that produces the row.
# The backward below is traced too: ∂y's quantization fuses with the kernel producing ∂y, except in
# the layers of GRAD_OP, where fp8_kernels' operator quantizes it.
@torch.library.custom_op("ditkit::fp8_linear", mutates_args=(),
                         schema="(Tensor x, Tensor weight, Tensor? bias, Tensor xq, Tensor sx, Tensor wq, Tensor sw, "
                                "bool bias_in_gemm, bool grad_op) -> Tensor")
def _fp8_linear(x, weight, bias, xq, sx, wq, sw, bias_in_gemm, grad_op):
    """y (M, N) = (sx ⊙ xq) (wq ⊙ sw)ᵀ + bias in x's dtype: xq (M, K) and wq (N, K) e4m3 with scales sx (M, 1)
    per token and sw (N, 1) per output."""
    return fp8_mm(xq, sx, wq.t(), sw.t(), x.dtype, fast_accum=True, bias=bias, bias_in_gemm=bias_in_gemm)


@_fp8_linear.register_fake
def _(x, weight, bias, xq, sx, wq, sw, bias_in_gemm, grad_op):
    return x.new_empty(x.shape[0], weight.shape[0])


def _setup_context(ctx, inputs, output):
    x, weight, bias = inputs[:3]
    ctx.save_for_backward(x, weight)  # x in the compute dtype, as the plain linear saves it, for ∂W
    ctx.has_bias, ctx.grad_op = bias is not None, inputs[-1]


def _backward(ctx, gy):
    x, weight = ctx.saved_tensors
    gq, sg = (quantize_rows_op if ctx.grad_op else quantize_rows)(gy)  # (M, 1) scales, per token
    sw_cols = amax_scales(weight, 0)  # (1, K): W scaled per input column, (N, K) column-major, the kernel's layout for b
    wq_cols = quantize(weight.detach(), sw_cols).t().contiguous().t()
    gx = fp8_mm(gq, sg, wq_cols, sw_cols, x.dtype, fast_accum=False)  # (M, N)(N, K)
    gw = (gy.t() @ x).to(weight.dtype)  # (N, M)(M, K) in the compute dtype, as the plain linear
    gb = gy.float().sum(0) if ctx.has_bias else None
    return gx, gw, gb, None, None, None, None, None, None


_fp8_linear.register_autograd(_backward, setup_context=_setup_context)


class Float8TrainingLinear(nn.Linear):
    """An ``nn.Linear`` whose forward and ∂x products run in FP8 (see the module docstring)."""

    bias_in_gemm = False  # set by convert_for_fp8_training for the device the weights are on
    grad_op = False  # ∂y quantized by fp8_kernels.quantize_rows_op (else traced, fused by compile); see GRAD_OP

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if x2.shape[0] % 16:  # the FP8 kernel needs every size a multiple of 16
            return F.linear(x, self.weight, self.bias)
        x2 = x2.to(compute_dtype(x))
        (xq, sx), (wq, sw) = quantize_rows(x2.detach()), quantize_rows(self.weight.detach())  # (M, 1) per token, (N, 1) per output
        y = _fp8_linear(x2, self.weight, self.bias, xq, sx, wq, sw, self.bias_in_gemm, self.grad_op)
        return y.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return super().extra_repr() + ", fp8 training (e4m3 forward and ∂x, row-wise scales; ∂W unquantized)"


# The layers whose ∂y is quantized by the opaque operator: the MLP's first linear, whose ∂y is GELU's
# gradient.  Traced, its quantization became one slow mixed-order reduction (module fp8_kernels);
# measured over one XL block's compiled step at batch 128 (benchmarks/fp8_block.py, H100), the
# operator there took 8.70 → 8.26 ms, and on every layer 8.78 ms: elsewhere the fused form is faster.
GRAD_OP = ("mlp.fc1",)


def _sharing(cls: type[nn.Linear], lin: nn.Linear) -> nn.Linear:
    """A ``cls`` holding the same Parameter objects as ``lin`` (nothing copied)."""
    new = cls(lin.in_features, lin.out_features, bias=lin.bias is not None, device="meta")
    new.weight, new.bias = lin.weight, lin.bias
    return new.train(lin.training)


def convert_for_fp8_training(model: nn.Module, names: tuple[str, ...] = BLOCK_LINEARS) -> int:
    """Replace every ``nn.Linear`` whose qualified name ends with one of ``names`` (and whose sizes are
    multiples of 16) by a ``Float8TrainingLinear`` holding the same Parameters; returns how many.
    The Parameters are the same objects, so an optimizer built before or after sees the same tensors.
    Convert after moving the model to its device: whether the kernel adds the bias is probed there."""
    targets = [(n, m) for n, m in block_linears(model, names) if type(m) is nn.Linear]  # not those converted already
    for name, m in targets:
        new = _sharing(Float8TrainingLinear, m)
        new.bias_in_gemm = m.bias is not None and scaled_mm_takes_bias(m.weight.device)
        new.grad_op = any(name == n or name.endswith("." + n) for n in GRAD_OP)
        replace_module(model, name, new)
    return len(targets)


def revert_fp8_training(model: nn.Module) -> int:
    """Undo ``convert_for_fp8_training`` (plain ``nn.Linear`` again, same Parameters); returns how many."""
    targets = [(n, m) for n, m in model.named_modules() if type(m) is Float8TrainingLinear]
    for name, m in targets:
        replace_module(model, name, _sharing(nn.Linear, m))
    return len(targets)
