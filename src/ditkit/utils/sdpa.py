"""Which kernel ``F.scaled_dot_product_attention`` runs on a CUDA GPU.

PyTorch tries cuDNN attention first on Hopper GPUs.  For DiT's short sequences (256 tokens) and
head dims 64 and 72 it is the slowest of the three fused kernels: fwd+bwd per DiT-XL/2 layer at
batch 32 in bf16 on an H100, cuDNN 0.614 ms, memory-efficient 0.608 ms, flash 0.451 ms
(``benchmarks/bench.py``, docs/results/bench_h100_quick.json).  ditkit therefore prefers flash.
The choice is process-wide (``torch.backends.cuda.enable_*_sdp``), changes no result beyond
floating-point rounding, and is a no-op on the CPU.
"""
from __future__ import annotations

import torch

SDPA_CHOICES = ("flash", "auto", "cudnn", "efficient", "math")


def use_sdpa_backend(name: str) -> None:
    """``flash``: flash, then memory-efficient (fp32 inputs, which flash refuses), then math;
    cuDNN off.  ``auto``: PyTorch's own order.  ``cudnn`` / ``efficient`` / ``math``: that kernel
    first (math stays on as the fallback every input accepts)."""
    if name not in SDPA_CHOICES:
        raise ValueError(f"unknown SDPA backend {name!r}; choose one of {', '.join(SDPA_CHOICES)}")
    b = torch.backends.cuda
    on = {"flash": ("flash", "efficient"), "auto": ("flash", "efficient", "cudnn"), "cudnn": ("cudnn",),
          "efficient": ("efficient",), "math": ()}[name]
    b.enable_flash_sdp("flash" in on)
    b.enable_mem_efficient_sdp("efficient" in on)
    b.enable_cudnn_sdp("cudnn" in on)
    b.enable_math_sdp(True)
