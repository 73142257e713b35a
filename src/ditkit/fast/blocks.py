"""Switches applied to a model's transformer blocks from outside: activation checkpointing, a bf16
residual stream, and the FP8 products inside the fused modules.  None of them changes a Parameter,
a buffer or a state-dict key; each returns how many modules it touched.
"""
from __future__ import annotations

import functools

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ditkit.fast.fused_attention import FusedAttention
from ditkit.fast.fused_mlp import FusedMlp
from ditkit.fast.fused_norm import FusedNormBlock

FP8_BACKWARD_PARTS = ("fc1", "qkv")  # the ∂x products enable_fp8_backward can switch


@functools.cache
def _checkpointed(cls: type[nn.Module]) -> type[nn.Module]:
    """``cls`` whose forward, in training with gradients on, is recomputed in the backward instead of
    keeping its activations (torch.utils.checkpoint, non-reentrant)."""

    def forward(self, *args, **kwargs):
        run = super(subclass, self).forward
        if self.training and torch.is_grad_enabled():
            return checkpoint(run, *args, use_reentrant=False, **kwargs)
        return run(*args, **kwargs)

    subclass = type(f"Checkpointed{cls.__name__}", (cls,), {"forward": forward, "__module__": __name__})
    return subclass


def checkpoint_blocks(model: nn.Module) -> int:
    """Recompute each of ``model.blocks`` in the backward (memory for compute: one (N, T, D) tensor kept
    per block instead of its activations).  Retypes the blocks in place; apply after any module swap."""
    blocks = list(getattr(model, "blocks", ()))
    for block in blocks:
        block.__class__ = _checkpointed(type(block))
    return len(blocks)


def _cast_stream(dtype: torch.dtype):
    def hook(module, args, kwargs):
        return (args[0].to(dtype), *args[1:]), kwargs

    return hook


def residual_stream_in(model: nn.Module, dtype: torch.dtype) -> int:
    """The residual stream (every block's input and output) in ``dtype``: the first block's input is cast,
    and the blocks' residual additions x + α·f(x) keep it.  Under bf16 autocast the stream would otherwise
    stay float32 (the patch embedding plus the float32 position table), so bf16 halves its memory traffic;
    Megatron's default.  A forward pre-hook on the first block (the sampling EMA, copied before, keeps the
    float32 stream)."""
    blocks = list(getattr(model, "blocks", ()))
    if blocks:
        blocks[0].register_forward_pre_hook(_cast_stream(dtype), with_kwargs=True)
    return min(len(blocks), 1)


def enable_fp8_forward(model: nn.Module, enabled: bool = True) -> int:
    """Run fc1's and qkv's forward products in FP8 (``ditkit.fast.fp8_forward``) in every ``FusedNormBlock`` of
    ``model`` without cross-attention, where the MLP is a ``FusedMlp`` and the attention a ``FusedAttention``
    (either suffices); returns how many blocks."""
    blocks = [m for m in model.modules()
              if isinstance(m, FusedNormBlock) and getattr(m, "cross_attn", None) is None
              and (isinstance(m.mlp, FusedMlp) or isinstance(m.attn, FusedAttention))]
    for block in blocks:
        block.fp8_forward = enabled
    return len(blocks)


def enable_fp8_backward(model: nn.Module, enabled: bool = True, parts: tuple[str, ...] = FP8_BACKWARD_PARTS) -> int:
    """Run the ∂x products of ``parts`` in FP8 with per-token scales (``ditkit.fast.fp8_backward``): fc1's in every
    ``FusedMlp``, qkv's in every ``FusedAttention`` of ``model`` (their ∂qkv then comes in e4m3 from the kernel that
    stacks it, ``ditkit.kernels.qkv.stack_rows_fp8``); returns how many modules."""
    if isinstance(parts, str):
        raise TypeError(f"enable_fp8_backward: parts is a tuple of names from {FP8_BACKWARD_PARTS}, got the string {parts!r}")
    unknown = set(parts) - set(FP8_BACKWARD_PARTS)
    if unknown:
        raise ValueError(f"enable_fp8_backward: unknown parts {sorted(unknown)}; known: {FP8_BACKWARD_PARTS}")
    kinds = tuple(kind for part, kind in (("fc1", FusedMlp), ("qkv", FusedAttention)) if part in parts)
    modules = [m for m in model.modules() if kinds and isinstance(m, kinds)]
    for m in modules:
        m.fp8_backward = enabled
    return len(modules)
