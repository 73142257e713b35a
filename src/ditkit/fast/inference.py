"""A network prepared for sampling: its precision, its FP8 layers and its compilation (the levers of
``ditkit.fast.SampleSpeed``; the samplers always keep x_t and their arithmetic in float32).

Precision:

- ``fp32``: the official sample.py's numerics (TF32 matrix products where torch allows them).
- ``amp-bf16``: autocast; bf16 matrix products, float32 LayerNorm and residual stream.  The
  weights autocast would cast to bf16 on every call (linears, the patch convolutions) are cast
  once instead: the same numbers, without re-reading 0.9 GB of float32 adaLN weights per DiT-XL/2
  call (0.5 ms on an H100).

Compilation: ``none``; ``default`` (torch.compile); ``cudagraphs`` (torch.compile's
reduce-overhead mode: the fixed-shape network call replayed as one CUDA graph).
"""
from __future__ import annotations

import torch
from torch import nn

from ditkit.fast.fp8 import Float8Linear, convert_to_fp8
from ditkit.fast.fp8_mlp import Float8Mlp, convert_to_fp8_mlp
from ditkit.fast.swap import AUTOCAST_CAST

PRECISIONS = ("fp32", "amp-bf16")
COMPILE_MODES = ("none", "default", "cudagraphs")


class InferenceNetwork(nn.Module):
    """net(x, t, **kwargs) in the chosen precision, returning float32.  ``t`` and integer inputs
    pass unchanged (the timestep embedding computes its sinusoids in float32 itself)."""

    def __init__(self, net: nn.Module, precision: str, fp8_layers: int = 0):
        super().__init__()
        self.net, self.precision, self.fp8_layers = net, precision, fp8_layers

    def forward(self, x: torch.Tensor, t: torch.Tensor, **kwargs) -> torch.Tensor:
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=self.precision == "amp-bf16"):
            return self.net(x, t, **kwargs).float()


def for_inference(model: nn.Module, precision: str, fp8: bool = False, fp8_mlp: bool = True) -> InferenceNetwork:
    """Wraps ``model`` (eval mode, changed in place) to run in ``precision``, with its block
    linears in FP8 if ``fp8`` (ditkit.fast.fp8; calibrate static scales afterwards) and, unless
    ``fp8_mlp`` is off, GELU and fc2's quantization in fc1's product (ditkit.fast.fp8_mlp).  Order
    matters: FP8 quantizes the float32 weights first; then, for ``amp-bf16``, the weights autocast
    would cast on every call are cast once.  ``.fp8_layers``: how many linears became FP8."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}; got {precision!r}")
    if fp8 and fp8_mlp:
        convert_to_fp8_mlp(model)
    fp8_layers = convert_to_fp8(model) if fp8 else 0
    for m in model.modules() if precision == "amp-bf16" else []:
        if isinstance(m, AUTOCAST_CAST) and not isinstance(m, (Float8Linear, Float8Mlp)):  # FP8 layers keep their dtypes
            for v in [*m.parameters(recurse=False), *m.buffers(recurse=False)]:
                if v is not None and v.is_floating_point():
                    v.data = v.data.to(torch.bfloat16)
    return InferenceNetwork(model.eval(), precision, fp8_layers)


class _Copied(nn.Module):
    """A CUDA graph's output lives in memory its next replay overwrites; a sampler that keeps one
    evaluation while taking the next (Heun, dopri5) needs its own copy (a few MB per call)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, *args, **kwargs) -> torch.Tensor:
        return self.net(*args, **kwargs).clone()


def compiled(net: nn.Module, mode: str, **options) -> nn.Module:
    """The network through torch.compile (``options``: more of its arguments), or unchanged for ``none``."""
    if mode not in COMPILE_MODES:
        raise ValueError(f"compile mode must be one of {', '.join(COMPILE_MODES)}; got {mode!r}")
    if mode == "none":
        return net
    if mode == "cudagraphs":
        return _Copied(torch.compile(net, mode="reduce-overhead", **options))
    return torch.compile(net, **options)
