"""The MLP of FP8 sampling with GELU in fc1's product: fc1's epilogue applies GELU and writes fc2's input in e4m3.

With ``Float8Linear`` layers alone (``ditkit.fast.fp8``), fc1 writes its (tokens × 4·hidden) result in bf16 and a
compiled kernel reads it back for GELU and fc2's quantization.  Here one cuBLASLt product does all three (GELU_BIAS
epilogue, an e4m3 result scaled by 1/s, s being fc2's calibrated input scale; ``cublaslt.linear_gelu_fp8``):

    a_q = q(GELU(s_x s_w · x_q W_qᵀ + b) / s)          q: rounding to e4m3, saturating at ±448

cuBLASLt takes an e4m3 result only with one scale per operand (its heuristic refuses per-row weight scales there:
status 7 on an H100), so fc1's weight gets a per-tensor e4m3 copy, quantized from the float weights when the MLP is
converted (before ``convert_to_fp8``), beside ``Float8Linear``'s per-row one (used while calibrating).

At DiT-XL/2's guided sampling shapes (64 rows of 256 tokens) that drops a 151 MB bf16 write and its read per block,
and halves what fc1 writes.  GELU now sees fc1's float32 result instead of its bf16 rounding.

It takes calibrated (static) scales for both layers (``calibrate_fp8``); while calibrating, or with dynamic scales,
``Float8Mlp`` computes as the MLP of two ``Float8Linear`` layers.  Off a GPU with cuBLASLt and FP8 tensor cores the
operator emulates the product in float32 with the same quantized operands (what the CPU tests check).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ditkit.fast.fp8 import FP8, Float8Linear, amax_scales, block_linears, fp8_matmul_supported, quantize
from ditkit.fast.swap import compute_dtype, retype_modules
from ditkit.kernels import cublaslt
from ditkit.kernels.norm import quantize_fp8
from ditkit.models.dit import Mlp


@torch.library.custom_op("ditkit::fp8_gelu_linear", mutates_args=(),
                         schema="(Tensor xq, Tensor sx, Tensor wq, Tensor sw, Tensor? b, Tensor s_out) -> Tensor")
def fp8_gelu_linear(xq, sx, wq, sw, b, s_out):
    """xq (M, K) and wq (N, K) e4m3 with per-tensor scales sx, sw (1,) float32, b (N,) bf16, s_out (1,) float32 (the
    next product's input scale) -> q(GELU(sx sw · xq wqᵀ + b) / s_out) (M, N) e4m3; cuBLASLt multiplies by 1 / s_out,
    as ``norm_kernels.quantize_fp8`` (the emulation's rounding) does."""
    if fp8_matmul_supported(xq.device) and cublaslt.available(xq.device):
        return cublaslt.linear_gelu_fp8(xq, sx, wq, sw, b, s_out.reciprocal())
    with torch.autocast(xq.device.type, enabled=False):  # the emulation multiplies in float32, autocast or not
        y = (xq.float() * sx) @ (wq.float() * sw).t()
        a = F.gelu(y if b is None else y + b.float(), approximate="tanh")
    return quantize_fp8(a, s_out)


@fp8_gelu_linear.register_fake
def _(xq, sx, wq, sw, b, s_out):
    return xq.new_empty(xq.shape[0], wq.shape[0], dtype=FP8)


class Float8Mlp(Mlp):
    """``Mlp`` whose forward runs fc1, GELU and fc2's quantization as one FP8 product once both linears are
    calibrated ``Float8Linear`` layers (see the module docstring); otherwise the plain MLP.  Buffers: fc1's weight
    in e4m3 with one scale, ``w1_fp8`` (4·hidden, hidden) and ``w1_scale`` (1,) float32."""

    w1_fp8: torch.Tensor
    w1_scale: torch.Tensor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fc1, fc2 = self.fc1, self.fc2
        if not (isinstance(fc1, Float8Linear) and isinstance(fc2, Float8Linear) and fc1.calibrated and fc2.calibrated):
            return super().forward(x)
        x2 = x.reshape(-1, fc1.in_features)
        sx = fc1.input_scale.view(1)
        bias = fc1.bias.to(torch.bfloat16) if fc1.bias is not None else None
        aq = fp8_gelu_linear(quantize(x2, sx), sx, self.w1_fp8, self.w1_scale, bias,
                             fc2.input_scale.view(1))  # (M, 4·hidden) e4m3: fc2's input
        y = fc2.product(aq, fc2.row_scales(aq.shape[0]), compute_dtype(x))
        return y.reshape(*x.shape[:-1], fc2.out_features)


def convert_to_fp8_mlp(model: nn.Module) -> int:
    """Retype, in place, every plain ``Mlp`` whose fc1 and fc2 ``convert_to_fp8`` will convert (float ``nn.Linear``
    layers that ``fp8.block_linears`` selects) as a ``Float8Mlp``, quantizing fc1's weight per tensor; returns how
    many.  For sampling, before ``convert_to_fp8`` (which needs the float weights too); the fused path starts once
    ``calibrate_fp8`` has run.  As after ``convert_to_fp8``, a ``.to(dtype)`` afterwards would cast the e4m3 weights.
    The two buffers are not in the state dict (derived here): a converted model's state dict is the same with or
    without this step."""
    convertible = {name for name, _ in block_linears(model)}
    targets = [m for name, m in model.named_modules()
               if type(m) is Mlp and {f"{name}.fc1", f"{name}.fc2"} <= convertible]
    for m in targets:
        w = m.fc1.weight.detach()
        scale = amax_scales(w.reshape(1, -1), -1).view(1)
        retype_modules(m, {Mlp: Float8Mlp})
        m.register_buffer("w1_fp8", quantize(w, scale), persistent=False)
        m.register_buffer("w1_scale", scale, persistent=False)
    return len(targets)
