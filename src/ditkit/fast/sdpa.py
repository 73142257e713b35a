"""Which kernel ``F.scaled_dot_product_attention`` runs on a CUDA GPU.

PyTorch's own order (``auto``, ditkit's default) tries cuDNN attention first on Hopper GPUs.
Forced alone on contiguous inputs, flash looks faster for DiT-XL/2's head dim 72 (fwd+bwd per
layer at batch 32, bf16, H200: flash 0.385 ms, cuDNN 0.532 ms), but inside a real training step
cuDNN wins (all 28 layers: 5.5 ms against 6.7 ms, eager bf16, ``benchmarks/bench.py --profile``;
docs/speed.md), so the default stays PyTorch's.  The choice is process-wide
(``torch.backends.cuda.enable_*_sdp``), changes no result beyond floating-point rounding, and is a
no-op on the CPU.
"""
from __future__ import annotations

import torch

SDPA_CHOICES = ("auto", "flash", "cudnn", "efficient", "math")
_FLAGS = ("flash_sdp", "mem_efficient_sdp", "cudnn_sdp", "math_sdp")  # torch.backends.cuda.enable_<flag>
_FUSED = {"auto": {"flash_sdp", "mem_efficient_sdp", "cudnn_sdp"}, "flash": {"flash_sdp", "mem_efficient_sdp"},
          "cudnn": {"cudnn_sdp"}, "efficient": {"mem_efficient_sdp"}, "math": set()}


def _set_flags(values) -> None:
    for flag, on in zip(_FLAGS, values):
        getattr(torch.backends.cuda, f"enable_{flag}")(on)


def use_sdpa_backend(name: str) -> None:
    """``auto``: PyTorch's own order.  ``flash``: flash, then memory-efficient (for fp32 inputs,
    which flash refuses), cuDNN off.  ``cudnn`` / ``efficient`` / ``math``: that kernel only (math
    stays on as the fallback every input accepts)."""
    if name not in SDPA_CHOICES:
        raise ValueError(f"unknown SDPA backend {name!r}; choose one of {', '.join(SDPA_CHOICES)}")
    _set_flags(flag in _FUSED[name] or flag == "math_sdp" for flag in _FLAGS)
