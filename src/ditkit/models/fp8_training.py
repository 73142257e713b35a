"""FP8 matrix products for training: the block linears' forward and input-gradient products in FP8.

Each ``Float8TrainingLinear`` keeps its ``weight`` and ``bias`` Parameters (float32, same names,
same state dict, same optimizer and EMA); only the products of a step change:

    forward   y  = x Wᵀ + b       x: e4m3, W: e4m3
    backward  ∂x = ∂y W           ∂y: e5m2, W: e4m3
              ∂W = ∂yᵀ x          in the compute dtype (bf16 under autocast), as the plain linear

Why not ∂W in FP8 too: Hopper's FP8 kernel takes both operands with the reduced dimension
contiguous, and for ∂W that dimension is the tokens, so ∂y and x would need transposed FP8 copies.
Measured on an H100 (DiT-XL/2, batch 128) those transposes, fused by compile into the kernels
around them, cost more than all three FP8 products saved (README, Speed).

Every operand is scaled per tensor from its current absolute maximum (dynamic "tensorwise"
scaling, the recipe of torchao's float8 training): s = amax(|t|) / fp8_max, q = round(t / s).  The
gradient uses e5m2 (range to 57344) for its wider range; activations and weights use e4m3
(448, one more mantissa bit).  The products accumulate in float32; the forward result is the
autocast dtype (bf16), ∂x the input's dtype, and ∂b is the float32 sum of ∂y.  The forward
product uses the tensor cores' fast accumulation, ∂x does not (as torchao).

On a GPU with FP8 tensor cores (compute capability ≥ 8.9) each product is one ``torch._scaled_mm``;
elsewhere the same quantized operands are multiplied in float32 (an emulation with identical
rounding of the operands, which the CPU tests check against a direct computation).  Under
``torch.compile`` the amax reductions and the casts are fused into the kernels around them.

Only the block linears (``attn.qkv``, ``attn.proj``, ``mlp.fc1``, ``mlp.fc2``) are converted, and only
where both sizes are multiples of 16 (the FP8 kernel's requirement); a call whose token count is
not a multiple of 16 runs the plain linear.  ``train.fp8=true`` in ``ditkit train``; the network and
its checkpoints are unchanged, so the EMA and any sampler use the ordinary layers.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from ditkit.models.fp8 import BLOCK_LINEARS, fp8_matmul_supported

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2


def tensor_scale(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The float32 scalar s with t ≈ s · q, q in ``dtype``: amax(|t|) / the dtype's largest value."""
    return t.detach().abs().amax().float().clamp_min(1e-12) / torch.finfo(dtype).max


def to_fp8(t: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    fmax = torch.finfo(dtype).max
    return (t.float() / scale).clamp(-fmax, fmax).to(dtype)


@functools.cache
def scaled_mm_takes_tensorwise_bias(device: torch.device) -> bool:
    """Whether this torch/GPU adds a bf16 bias inside the tensorwise-scaled FP8 product."""
    if not fp8_matmul_supported(device):
        return False
    a = torch.ones(16, 16, device=device).to(E4M3)
    one = torch.ones((), device=device)
    bias = torch.arange(16, device=device, dtype=torch.bfloat16)
    try:
        y = torch._scaled_mm(a, a.t(), scale_a=one, scale_b=one, bias=bias, out_dtype=torch.bfloat16)
    except RuntimeError:
        return False
    return bool(torch.equal(y.float(), 16 + bias.float().expand(16, 16)))


def fp8_mm(a: torch.Tensor, sa: torch.Tensor, b: torch.Tensor, sb: torch.Tensor, out_dtype: torch.dtype,
           fast_accum: bool, bias: torch.Tensor | None = None, bias_in_gemm: bool = False) -> torch.Tensor:
    """sa·sb · (a @ b) (+ bias) for FP8 a (M, K) row-major and b (K, N) column-major.  ``bias_in_gemm``:
    the kernel adds a bf16 bias itself (``scaled_mm_takes_tensorwise_bias``, probed outside compiled code)."""
    if fp8_matmul_supported(a.device):
        # The bias in the kernel's epilogue where it takes one (bf16 results): a separate add after the
        # qkv product would make compile write q, k and v out a second time.
        in_gemm = bias is not None and out_dtype == torch.bfloat16 and bias_in_gemm
        y = torch._scaled_mm(a, b, scale_a=sa, scale_b=sb, bias=bias.to(out_dtype) if in_gemm else None,
                             out_dtype=out_dtype, use_fast_accum=fast_accum)
        return y if bias is None or in_gemm else y + bias.to(out_dtype)
    y = (a.float() @ b.float()) * (sa * sb)
    return (y if bias is None else y + bias.float()).to(out_dtype)


class _Float8Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x2: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, out_dtype: torch.dtype,
                bias_in_gemm: bool):
        sx, sw = tensor_scale(x2, E4M3), tensor_scale(weight, E4M3)
        xq, wq = to_fp8(x2, sx, E4M3), to_fp8(weight, sw, E4M3)
        y = fp8_mm(xq, sx, wq.t(), sw, out_dtype, fast_accum=True, bias=bias, bias_in_gemm=bias_in_gemm)  # (M, K)(K, N)
        ctx.save_for_backward(x2.to(out_dtype), wq, sw)  # x as the plain linear saves it, for ∂W
        ctx.x_dtype, ctx.has_bias = x2.dtype, bias is not None
        return y

    @staticmethod
    def backward(ctx, gy: torch.Tensor):
        x2, wq, sw = ctx.saved_tensors
        sg = tensor_scale(gy, E5M2)
        gq = to_fp8(gy, sg, E5M2)
        gx = fp8_mm(gq, sg, wq.t().contiguous().t(), sw, ctx.x_dtype, fast_accum=False)  # (M, N)(N, K)
        gw = (gy.t() @ x2).float()  # (N, M)(M, K) in the compute dtype, as the plain linear
        gb = gy.float().sum(0) if ctx.has_bias else None
        return gx, gw, gb, None, None


class Float8TrainingLinear(nn.Linear):
    """An ``nn.Linear`` whose three training products run in FP8 (see the module docstring)."""

    bias_in_gemm = False  # set by convert_for_fp8_training for the device the weights are on

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if x2.shape[0] % 16:  # the FP8 kernel needs every size a multiple of 16
            return F.linear(x, self.weight, self.bias)
        autocast = torch.is_autocast_enabled(x.device.type)
        out_dtype = torch.get_autocast_dtype(x.device.type) if autocast else x.dtype
        with torch.autocast(x.device.type, enabled=False):
            y = _Float8Linear.apply(x2, self.weight, self.bias, out_dtype, self.bias_in_gemm)
        return y.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return super().extra_repr() + ", fp8 training (e4m3 forward, e5m2 gradients, tensorwise scales)"


def convert_for_fp8_training(model: nn.Module, names: tuple[str, ...] = BLOCK_LINEARS) -> int:
    """Turn, in place, every ``nn.Linear`` whose qualified name ends with one of ``names`` (and whose
    sizes are multiples of 16) into a ``Float8TrainingLinear``; returns how many.  The Parameters
    are kept (same objects), so an optimizer built before or after sees the same tensors.  Convert
    after moving the model to its device: whether the kernel adds the bias is probed there."""
    n = 0
    for name, m in model.named_modules():
        if (type(m) is nn.Linear and (name in names or name.endswith(tuple("." + s for s in names)))
                and m.in_features % 16 == 0 and m.out_features % 16 == 0):
            m.__class__ = Float8TrainingLinear
            m.bias_in_gemm = m.bias is not None and scaled_mm_takes_tensorwise_bias(m.weight.device)
            n += 1
    return n


def revert_fp8_training(model: nn.Module) -> int:
    """Undo ``convert_for_fp8_training`` (plain ``nn.Linear`` again); returns how many."""
    n = 0
    for m in model.modules():
        if type(m) is Float8TrainingLinear:
            m.__class__ = nn.Linear
            vars(m).pop("bias_in_gemm", None)
            n += 1
    return n
