"""FP8 (e4m3) matrix products for sampling: an inference-only replacement of ``nn.Linear``.

Weights are quantized once, one scale per output row (s_w[n] = max_k |W[n, k]| / 448, 448 being
the largest finite e4m3 value).  Activations are quantized in one of two ways:

- dynamic (the default after ``convert_to_fp8``): one scale per token, s_x[m] = max_k |x[m, k]| / 448,
  computed on the fly.  Exact range, but a row-wise reduction before every product; measured on
  an H200 it costs more than the faster product saves (docs/speed.md).
- static (after ``calibrate_fp8``): one scale per layer, from the largest |x| the layer saw during
  a calibration run of the sampler, times a safety margin; larger values saturate at ±448·s.
  Quantizing is then a multiply and a cast that torch.compile fuses into the kernel that
  produces x (LayerNorm + modulation, GELU), so the FP8 product's speed is kept.

    y[m, n] = s_x s_w[n] Σ_k q(x[m, k] / s_x) q(W[n, k] / s_w[n]) + b[n]

with q the rounding to float8_e4m3fn.  On a CUDA GPU with FP8 tensor cores (compute capability
≥ 8.9: Ada, Hopper) the product is one ``torch._scaled_mm`` with a bf16 result; elsewhere the same
quantized operands are multiplied in float32 (an emulation with identical rounding of the
inputs, used by the CPU tests).

Only the four large products of each transformer block (``attn.qkv``, ``attn.proj``,
``mlp.fc1``, ``mlp.fc2``: > 97% of DiT-XL/2's FLOPs) are converted; the adaLN, embedding and
final layers stay in the model's precision.  Training is unchanged; this is a sampling lever
(``SampleSpeed.fp8``, in the ``fastest`` recipe), and its effect on quality is measured, not assumed
(docs/speed.md).
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import torch
from torch import nn

from ditkit.fast.swap import compute_dtype, replace_module

FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)  # 448
BLOCK_LINEARS = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")


def quantize(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x / scale rounded to float8_e4m3fn, saturating at ±448 (scale broadcasts against x)."""
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)


def amax_scales(x: torch.Tensor, dim: int) -> torch.Tensor:
    """Float32 scales s = max |x| / 448 along ``dim`` (kept), so that x / s fills e4m3's range."""
    return x.detach().abs().amax(dim=dim, keepdim=True).float().clamp_min(1e-12) / FP8_MAX


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(M, K) -> (q (M, K) float8_e4m3fn, scale (M, 1) float32) with x ≈ q · scale per row."""
    scale = amax_scales(x, -1)
    return quantize(x, scale), scale


def block_linears(model: nn.Module, names: tuple[str, ...] = BLOCK_LINEARS) -> list[tuple[str, nn.Linear]]:
    """The ``nn.Linear`` layers whose qualified name ends with one of ``names`` (whole components:
    ``attn.proj`` is not ``cross_attn.proj``) and whose sizes are multiples of 16, the FP8
    tensor-core kernel's requirement."""
    return [(name, m) for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and (name in names or name.endswith(tuple("." + n for n in names)))
            and m.in_features % 16 == 0 and m.out_features % 16 == 0]


def fp8_matmul_supported(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


@functools.cache
def scaled_mm_takes_bias(device: torch.device) -> bool:
    """Whether this torch/GPU adds a bf16 bias inside the row-wise-scaled FP8 product (the GEMM's
    epilogue).  Without it the bias is a separate add, which compile fuses with the reshapes after
    the qkv product into three copies of q, k and v (2.2 ms per XL/2 sampling step on an H100)."""
    if not fp8_matmul_supported(device):
        return False
    a = torch.ones(16, 16, device=device).to(FP8)
    ones = torch.ones(16, 1, device=device)
    bias = torch.arange(16, device=device, dtype=torch.bfloat16)
    try:
        y = torch._scaled_mm(a, a.t(), scale_a=ones, scale_b=ones.t().contiguous(), out_dtype=torch.bfloat16, bias=bias)
    except RuntimeError:
        return False
    return bool(torch.equal(y.float(), 16 + bias.float().expand(16, 16)))  # accepted and actually added


def fp8_mm(a: torch.Tensor, sa: torch.Tensor, b: torch.Tensor, sb: torch.Tensor, out_dtype: torch.dtype,
           fast_accum: bool, bias: torch.Tensor | None = None, bias_in_gemm: bool = False) -> torch.Tensor:
    """(sa ⊙ a) @ (b ⊙ sb) (+ bias) for e4m3 a (M, K) row-major with row scales sa (M, 1) and b (K, N)
    column-major with column scales sb (1, N).  ``bias_in_gemm``: the kernel adds a bf16 bias itself
    (``fp8.scaled_mm_takes_bias``, probed outside compiled code)."""
    if fp8_matmul_supported(a.device):
        # Row-wise scales need a bf16 result.  The bias in the kernel's epilogue where it takes one: a
        # separate add after the qkv product would make compile write q, k and v out a second time.
        in_gemm = bias is not None and bias_in_gemm
        y = torch._scaled_mm(a.contiguous(), b, scale_a=sa, scale_b=sb, bias=bias.to(torch.bfloat16) if in_gemm else None,
                             out_dtype=torch.bfloat16, use_fast_accum=fast_accum)
        y = y if bias is None or in_gemm else y + bias.to(y.dtype)
        return y.to(out_dtype)
    with torch.autocast(a.device.type, enabled=False):  # the emulation multiplies in float32, autocast or not
        y = (a.float() * sa) @ (b.float() * sb)
    return (y if bias is None else y + bias.float()).to(out_dtype)


class Float8Linear(nn.Module):
    """y = x Wᵀ + b with W held in FP8 (see the module docstring).  Built from an ``nn.Linear``
    with ``Float8Linear.from_linear``; has no trainable parameters."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, fast_accum: bool = True):
        super().__init__()
        self.in_features, self.out_features, self.fast_accum = in_features, out_features, fast_accum
        self.register_buffer("weight_fp8", torch.empty(out_features, in_features, dtype=FP8))
        self.register_buffer("weight_scale", torch.empty(1, out_features))  # (1, N) float32
        self.register_buffer("bias", torch.empty(out_features) if bias else None)
        self.register_buffer("input_scale", torch.ones(()))  # the static per-layer scale, once calibrated
        self.static = False  # a Python flag, not a tensor test: no host sync, no graph break under compile
        self.bias_in_gemm = False  # set by from_linear where the FP8 kernel takes the bias
        self.observed_amax: torch.Tensor | None = None  # set while calibrating

    @classmethod
    def from_linear(cls, linear: nn.Linear, fast_accum: bool = True) -> "Float8Linear":
        m = cls(linear.in_features, linear.out_features, linear.bias is not None, fast_accum).to(linear.weight.device)
        with torch.no_grad():
            q, scale = quantize_rows(linear.weight.detach())
            m.weight_fp8.copy_(q)
            m.weight_scale.copy_(scale.t())
            if linear.bias is not None:
                m.bias.copy_(linear.bias.detach().float())
        m.bias_in_gemm = linear.bias is not None and scaled_mm_takes_bias(linear.weight.device)
        return m

    def dequantized_weight(self) -> torch.Tensor:
        return self.weight_fp8.float() * self.weight_scale.t()

    @property
    def calibrated(self) -> bool:
        """Whether the input scale is the static one (calibrated, and not calibrating now)."""
        return self.static and self.observed_amax is None

    def quantize_input(self, x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x2 (M, K) -> (q (M, K) e4m3, its scales (M, 1) float32), recording the range while calibrating."""
        if self.observed_amax is not None:  # calibrating: record the range, compute as dynamic
            self.observed_amax = torch.maximum(self.observed_amax, x2.detach().abs().amax().float())
        if self.calibrated:
            return quantize(x2, self.input_scale), self.row_scales(x2.shape[0])
        return quantize_rows(x2)

    def row_scales(self, rows: int) -> torch.Tensor:
        """The static scale as (rows, 1): _scaled_mm's row-wise form of one scale."""
        return self.input_scale.expand(rows, 1).contiguous()

    def product(self, q: torch.Tensor, scale: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
        """y (M, N) = (scale ⊙ q) Wᵀ + b for e4m3 q (M, K) and its scales (M, 1)."""
        # mat2 column-major: the (N, K) row-major weight, transposed, with its (1, N) scales.
        return fp8_mm(q, scale, self.weight_fp8.t(), self.weight_scale, out_dtype, self.fast_accum, self.bias,
                      self.bias_in_gemm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, scale = self.quantize_input(x.reshape(-1, self.in_features))
        return self.product(q, scale, compute_dtype(x)).reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        act = "static per-layer" if self.static else "dynamic per-token"
        return f"in_features={self.in_features}, out_features={self.out_features}, fp8=e4m3, weights row-wise, inputs {act}"


def convert_to_fp8(model: nn.Module, names: tuple[str, ...] = BLOCK_LINEARS, fast_accum: bool = True) -> int:
    """Replace, in place, every ``nn.Linear`` whose qualified name ends with one of ``names`` by a
    ``Float8Linear``; returns how many were replaced.  For sampling: the result cannot be trained.
    Names match whole components (``attn.proj`` is not ``cross_attn.proj``).  Layers whose sizes are
    not multiples of 16 (a requirement of the FP8 tensor-core kernel) are kept.  Convert the model
    after moving it to its device and dtype: ``.to(dtype)`` afterwards would cast the FP8 weights.
    The calibrated ``static`` flag is a Python attribute, not saved in a state dict: calibrate
    after loading."""
    targets = block_linears(model, names)
    for name, linear in targets:
        replace_module(model, name, Float8Linear.from_linear(linear, fast_accum))
    return len(targets)


@torch.no_grad()
def calibrate_fp8(model: nn.Module, run: Callable[[], Any], margin: float = 2.0) -> int:
    """Switch the model's ``Float8Linear`` layers to static activation scales: ``run()`` (e.g. the
    sampler on a small batch, all its steps) is executed with dynamic per-token quantization while
    each layer records the largest |x| it sees; each layer's scale is then margin · amax / 448.
    Returns the number of layers calibrated.  A layer that ``run`` never reached stays dynamic."""
    layers = [m for m in model.modules() if isinstance(m, Float8Linear)]
    if not layers:
        raise ValueError("calibrate_fp8: the model has no Float8Linear layers; call convert_to_fp8 first")
    for m in layers:
        m.observed_amax = torch.zeros((), device=m.weight_fp8.device)
    try:
        run()
    finally:
        seen = 0
        for m in layers:
            amax, m.observed_amax = m.observed_amax, None
            if amax is not None and amax > 0:
                m.input_scale.copy_(margin * amax / FP8_MAX)
                m.static = True
                seen += 1
    return seen
